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


# ------------------------------------------------------------------------ the tutorials' commands

#: What a command of the docs is run as, where it cannot run as written in a test: the real
#: model's workflow is dry-run (-n: its jobs are scheduled, none runs), the lenspipe commands
#: run on the tiny workflow's outputs with the default run's names replaced by the tiny ones.
NAMES = {"smollm2-135m": "tiny", "shakespeare": "tiny-txt"}
#: Commands not run, and why.
NOT_RUN = {
    "make test": "the test suite itself",
    "--profile profiles/slurm": "needs a SLURM cluster (its rules are linted in test_workflow)",
}


def shell_commands(page: Path) -> list[str]:
    """The command lines of a page's shell blocks (``` and ```bash), comments dropped."""
    import shlex

    command = re.compile(r"\s*(\w+=\S+\s+)*(\.venv/bin/)?(snakemake|lenspipe|make|printf)\s")
    out = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", page.read_text(), flags=re.S):
        for line in block.splitlines():
            if command.match(line + " "):
                words = shlex.split(line, comments=True)
                out.append(" ".join(w if w == ">" else shlex.quote(w) for w in words))
    return out


def sandbox(root: Path, tiny_workdir: Path) -> Path:
    """A directory that looks like a checkout after the tiny run: the workflow's files
    linked, the tiny run's data/ and tiny/ copied, the tiny config at view.yaml."""

    for name in ("Snakefile", "rules", "config", "profiles", "stages", ".test"):
        (root / name).symlink_to(REPO / name)
    from test_view import view_config

    view_config(root, tiny_workdir)
    return root


def run_doc_command(command: str, where: Path) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(where)}
    if re.search(r"(^|\s)(\S*/)?(snakemake|make run)\b", command):  # the real model's workflow: dry run
        command = re.sub(r"^make run\b", "snakemake --cores 2", command) + " -n"
    elif "lenspipe" in command:
        for real, tiny in NAMES.items():
            command = command.replace(real, tiny)
        command = command.replace("/elsewhere/", f"{where}/elsewhere/").replace("mine.yaml", "view.yaml")
        if re.search(r"lenspipe view\b", command):
            if "--config" not in command:
                command += " --config view.yaml"
            from test_view import free_port

            command = f"timeout -s INT 20 {command} --port {free_port()}; test $? -eq 124 -o $? -eq 0 -o $? -eq 130"
    command = re.sub(r"(^|\s)\.venv/bin/", r"\1", command)
    return subprocess.run(["bash", "-c", command], cwd=where, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.timeout(900)
def test_the_tutorials_commands_run(tiny_run, tmp_path):
    """Every command line of the README, the tutorials and the how-tos runs: the real model's
    workflow as a dry run, lenspipe's commands on the tiny workflow's outputs."""
    workdir, first = tiny_run
    assert first.returncode == 0, first.stderr[-3000:]
    where = sandbox(tmp_path, workdir)
    pages = [
        REPO / "README.md",
        *sorted((REPO / "docs" / "tutorials").glob("*.md")),
        *sorted((REPO / "docs" / "how-to").glob("*.md")),
    ]
    ran = []
    for page in pages:
        for command in shell_commands(page):
            if any(skip in command for skip in NOT_RUN):
                continue
            proc = run_doc_command(command, where)
            assert proc.returncode == 0, (page.name, command, proc.stdout[-2000:], proc.stderr[-3000:])
            ran.append(command)
    assert len(ran) >= 10, ran
    assert (where / "elsewhere" / "test.zarr").is_dir() and (where / "scale.yaml").is_file()
    # and their Python, on the tiny outputs too: the programs run (a block that imports what
    # it uses), the fragments (a registry entry inside a list) are compiled
    import textwrap

    for page in pages:
        for code in python_blocks(page):
            code = textwrap.dedent(code)
            for real, tiny in NAMES.items():
                code = code.replace(real, tiny)
            if not re.search(r"^(from|import) ", code, flags=re.M):
                compile(code, page.name, "exec")
                continue
            proc = subprocess.run([sys.executable, "-c", code], cwd=where, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, (page.name, code, proc.stderr[-3000:])
            ran.append(code)
    assert (where / "exported" / "config.json").is_file()  # the reference-format how-to's export
