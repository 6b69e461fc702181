"""The documentation: built strictly, generated pages current, its examples run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent


def yaml_blocks(path: Path) -> list[str]:
    return re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_readme_is_one_screen_and_links_into_the_docs():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    for link in re.findall(r"\]\((docs/[^)#]+)\)", text):
        assert (REPO / link).is_file(), link
    assert "Gemma Terms of Use\n\nLast modified" not in text  # the licence text lives in THIRD_PARTY_NOTICES.md
    for name in ("LICENSE", "THIRD_PARTY_NOTICES.md", "CITATION.cff", "CHANGELOG.md"):
        assert (REPO / name).is_file(), name


def test_the_generated_pages_are_what_the_code_generates():
    sys.path.insert(0, str(REPO / "docs"))
    import hooks

    assert hooks.stale() == []


@pytest.mark.timeout(300)
def test_the_docs_build_strictly(tmp_path):
    """A broken link, a missing page or an unresolved docstring reference fails the build."""
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    # mkdocs 1.6 with mkdocs-material 9.8 prints "Aborted with N warnings in strict mode!" and
    # still exits 0: the warnings themselves are the verdict
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Aborted" not in out, out[-3000:]
    assert not [line for line in out.splitlines() if line.startswith(("WARNING", "ERROR"))], out[-3000:]
    assert (tmp_path / "site" / "reference" / "settings" / "index.html").is_file()
    assert (tmp_path / "site" / "results" / "figures" / "convergence.png").is_file()


def test_every_config_in_the_docs_is_a_valid_config(tmp_path):
    """Each YAML block of the tutorials and how-tos parses as a config (alone, or layered
    over the default experiment where it names no model)."""
    from pipeline.config import load_config

    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    checked = 0
    for page in pages:
        for i, block in enumerate(yaml_blocks(page)):
            raw = yaml.safe_load(block)
            if not isinstance(raw, dict) or not set(raw) & {"models", "corpora", "train", "extract", "plugins"}:
                continue
            if "plugins" in raw:  # the how-to's plugin: run through the workflow by test_workflow
                continue
            if "models" not in raw:
                raw["base"] = str(REPO / "config" / "config.yaml")
            f = tmp_path / f"{page.stem}-{i}.yaml"
            f.write_text(yaml.safe_dump(raw))
            load_config(f)
            checked += 1
    assert checked >= 2  # the README's and the your-model tutorial's


def test_the_readme_example_runs_only_what_it_names(tmp_path):
    """The README's own-model config, with its paths pointed at a tiny model and corpus:
    snakemake schedules their jobs and nothing of the default experiment."""
    from tiny import save_tiny_model_dir

    mine = yaml.safe_load(next(b for b in yaml_blocks(REPO / "README.md") if b.startswith("# mine.yaml")))
    save_tiny_model_dir(tmp_path / "model")
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"d{i}.jsonl").write_text(
            "".join(f'{{"id": "{i}-{j}", "text": "summer day {j}"}}\n' for j in range(20))
        )
    mine["data_dir"] = str(tmp_path / "data")
    mine["models"]["mine"]["source"] = str(tmp_path / "model")
    mine["corpora"]["notes"]["source"] = str(tmp_path / "docs" / "*.jsonl")
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(mine))
    from test_workflow import dry_run_only_mine

    dry_run_only_mine(tmp_path / "mine.yaml")


def test_the_translator_kind_how_to_is_the_plugin_the_workflow_test_runs():
    from test_workflow import SHIFT_PLUGIN

    code = python_blocks(REPO / "docs" / "how-to" / "add-a-translator-kind.md")[0]
    assert code.strip() == SHIFT_PLUGIN.strip()


def test_the_commands_the_docs_name_exist():
    """Every `lenspipe <subcommand>` in a code span or block of the docs is one of the CLI's,
    every config file they run exists, and every `make` target they name is the Makefile's."""
    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    makefile = (REPO / "Makefile").read_text()
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
    texts = [p.read_text() for p in pages]
    blocks = [b for t in texts for b in re.findall(r"```[a-z]*\n(.*?)```", t, flags=re.S)]
    spans = [m for t in texts for m in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", t, flags=re.S))]
    code = "\n".join(blocks + spans)
    # a command: at the start of a code line or span (after a prompt or an env assignment)
    named = set(re.findall(r"^\s*(?:\$ )?(?:\S+=\S+ )*(?:\.venv/bin/)?lenspipe ([a-z][a-z-]+)", code, flags=re.M))
    assert named and named <= set(sub.choices), named - set(sub.choices)
    for f in set(re.findall(r"config/[a-z-]+\.yaml", code)):
        assert (REPO / f).is_file(), f
    for target in set(re.findall(r"\bmake ([a-z-]+)", code)):
        assert re.search(rf"^{target}:", makefile, flags=re.M), target
