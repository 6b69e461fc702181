"""``lenspipe``: a subcommand for every rule, writing the rule's paths; help, examples, errors."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.analyses import ANALYSES
from pipeline.cli import build_parser, main

REPO = Path(__file__).resolve().parent.parent
TINY = str(REPO / ".test" / "config.yaml")


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """Run ``lenspipe argv`` in-process: (exit status, stdout, stderr)."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return list(action.choices)


def test_every_rule_has_a_subcommand_and_every_subcommand_an_example(tmp_path, capsys):
    scale = tmp_path / "scale.yaml"  # every rule exists: parts and groups too
    scale.write_text("extract: {parts: 2}\ntrain: {layer_groups: 2}\n")
    rules = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(REPO / "Snakefile"),
            "--configfile",
            TINY,
            str(scale),
            "--list-rules",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout.split()
    assert {"extract_part", "assemble_store", "train_group", "merge_lens", "compare_models", "report"} <= set(rules)
    twins = {"extract_part": "extract", "train_group": "train", "evaluate_across": "evaluate"}
    # `lenspipe extract --part`, `train --group`, `evaluate --train-corpus`
    commands = _subcommands()
    assert {twins.get(r, r).replace("_", "-") for r in rules if r != "all"} <= set(commands), rules
    for name in commands:
        code, out, _ = _cli([name, "--help"], capsys)
        assert code == 0 and f"example:\n  lenspipe {name}" in out, name


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--model", "tiny", "--corpus", "tiny-txt", "--kind", "conv"],
            "unknown translator kind 'conv'; choose one of affine, linear, mlp, scaling",
        ),
        (
            ["train", "--model", "tiny", "--corpus", "tiny-txt", "--kind", "affine"],
            "no store at data/stores/tiny/tiny-txt/train.zarr: run `lenspipe extract --model tiny --corpus tiny-txt "
            "--split train` first",
        ),
        (["evaluate", "--model", "tiny", "--corpus", "nosuch"], "no corpus 'nosuch' in "),
        (
            ["layer-transfer", "--model", "tiny", "--corpus", "tiny-txt"],
            "no store at data/stores/tiny/tiny-txt/test.zarr",
        ),
        (["report"], "no layer metrics at data/tables/tiny/tiny-txt/layer_metrics.parquet: run `lenspipe evaluate"),
        (
            ["extract", "--model", "tiny", "--corpus", "tiny-txt", "--split", "test", "--part", "3"],
            "--part 3: the config's extract.parts is 1, so it is one of 0..0",
        ),
        (["trajectory", "--model", "tiny", "--lens", "data", "some text"], "no model dir at data/models/tiny"),
        (["verify", "nowhere.zarr"], "no activation store at"),
    ],
)
def test_a_user_mistake_is_one_message_and_status_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    code, _, err = _cli(argv + (["--config", TINY] if argv[0] != "verify" else []), capsys)
    assert code == 2 and f"lenspipe: error: {message}" in err, err
    assert "Traceback" not in err


def test_bad_arguments_exit_2(capsys):
    for argv in (
        [],
        ["nosuch"],
        ["train", "--model", "m"],
        ["extract", "--model", "m", "--corpus", "c", "--split", "x"],
    ):
        assert _cli(argv, capsys)[0] == 2, argv


def test_the_cli_writes_what_the_workflow_would_so_it_has_nothing_left_to_do(tmp_path, monkeypatch, capsys):
    """Every stage by `lenspipe`, in order, on the tiny config: the workflow then finds
    every one of its outputs made, and `trajectory` shows a prompt through both lenses."""
    from test_workflow import _fresh_workdir, snakemake

    work = _fresh_workdir(tmp_path)
    monkeypatch.chdir(work)
    run = ["--model", "tiny", "--corpus", "tiny-txt", "--config", TINY]
    steps = [["prepare-model", "--model", "tiny", "--config", TINY], ["prepare-corpus", *run]]
    steps += [["extract", *run, "--split", s] for s in ("train", "validation", "test")]
    steps += [["train", *run, "--kind", k] for k in ("affine", "scaling")] + [["evaluate", *run]]
    steps += [[a.command, *(run if a.per_run else ["--config", TINY])] for a in ANALYSES] + [
        ["report", "--config", TINY]
    ]
    for argv in steps:
        code, _, err = _cli(argv, capsys)
        assert code == 0, (argv, err[-2000:])
    dry = snakemake(work, "-n")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-3000:]
    code, out, err = _cli(
        [
            "trajectory",
            "--model",
            "tiny",
            "--lens",
            "data/lenses/tiny/tiny-txt/affine",
            "summer day",
            "--out",
            "fig.png",
            "--config",
            TINY,
        ],
        capsys,
    )
    lines = out.splitlines()
    assert code == 0 and "logit lens" in lines[1] and "tuned (affine)" in lines[1], out
    assert [line.split()[0] for line in lines[2:]] == ["0", "1", "2"]  # embeddings, block 1, the output
    assert Path("fig.png").stat().st_size > 10_000
    with contextlib.suppress(FileNotFoundError):
        Path("fig.png").unlink()


def test_a_workflow_job_reads_only_what_its_rule_declares(tmp_path):
    """Artifacts.need in a job (``declaring(snakemake.input)``) refuses an input the rule
    does not declare, naming the file to declare; the CLI's Artifacts check nothing."""
    from pipeline import paths
    from pipeline.errors import LenspipeError
    from pipeline.paths import Artifacts

    a = Artifacts(str(tmp_path), "m", "c")
    marker = Path(a.fill(paths.MODEL_MARKER))
    marker.parent.mkdir(parents=True)
    marker.write_text("{}")
    table = Path(a.fill(paths.LAYER_METRICS))
    table.parent.mkdir(parents=True)
    table.write_text("")
    assert a.need("model_dir") == marker.parent  # no declared inputs: no check
    job = a.declaring([table])
    with pytest.raises(LenspipeError, match=r"does not declare .*lenspipe_model.json as an input"):
        job.need("model_dir")
    assert job.need("layer_metrics") == table
    assert a.declaring([table, marker]).need("model_dir") == marker.parent
    # the per-token table is declared by the layer_metrics table its evaluate job writes
    Path(a.fill(paths.TOKEN_METRICS)).mkdir()
    assert job.need("token_metrics") == Path(a.fill(paths.TOKEN_METRICS))
