"""The Snakemake workflow end to end on a tiny config (.test/config.yaml)."""

import subprocess
import sys
from pathlib import Path

import pytest
from tiny import save_tiny_model_dir

REPO = Path(__file__).resolve().parent.parent


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(REPO / ".test" / "config.yaml"), "--cores", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def workdir(tmp_path):
    save_tiny_model_dir(tmp_path / "tiny" / "model")
    corpus = tmp_path / "tiny" / "corpus"
    corpus.mkdir(parents=True)
    for i in range(5):
        corpus.joinpath(f"doc{i}.txt").write_text(" ".join(f"summer{(i + j) % 13} day" for j in range(120)))
    return tmp_path


def test_workflow_runs_and_rerun_is_noop(workdir):
    first = snakemake(workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    out = workdir / "data" / "corpora" / "tiny-txt" / "tiny"
    assert {p.name for p in out.iterdir()} >= {"train.npz", "validation.npz", "test.npz", "manifest.json"}
    assert (workdir / "data" / "models" / "tiny" / "lenspipe_model.json").is_file()
    assert (workdir / "data" / "logs" / "prepare_corpus" / "tiny-txt-tiny.log").read_text()
    tables = workdir / "data" / "tables" / "tiny" / "tiny-txt"
    assert (tables / "layer_metrics.parquet").is_file() and (tables / "calibration.parquet").is_file()
    assert (workdir / "data" / "report" / "report.html").stat().st_size > 10_000
    assert "lenspipe: done." in first.stdout and "report.html" in first.stdout
    second = snakemake(workdir)
    assert second.returncode == 0 and "Nothing to be done" in second.stderr
    # changing one evaluation setting re-runs evaluation and report only
    changed = workdir / "changed.yaml"
    changed.write_text((REPO / ".test" / "config.yaml").read_text().replace("bootstrap: 50", "bootstrap: 60"))
    dry = snakemake(workdir, "--configfile", str(changed), "-n")
    jobs = dry.stdout + dry.stderr
    assert "rule evaluate:" in jobs and "rule report:" in jobs
    assert "rule extract:" not in jobs and "rule train:" not in jobs and "rule prepare_corpus:" not in jobs
    # changing the test split's token budget re-extracts that split only, and retrains nothing
    budget = workdir / "budget.yaml"
    budget.write_text((REPO / ".test" / "config.yaml").read_text().replace("test: null}", "test: 128}"))
    dry = snakemake(workdir, "--configfile", str(budget), "-n")
    jobs = dry.stdout + dry.stderr
    assert jobs.count("rule extract:") == 1 and "split=test" in jobs and "rule train:" not in jobs


def test_workflow_bad_input_fails_cleanly(workdir):
    for p in (workdir / "tiny" / "corpus").iterdir():
        p.write_text("too short")
    proc = snakemake(workdir)
    assert proc.returncode != 0
    log = (workdir / "data" / "logs" / "prepare_corpus" / "tiny-txt-tiny.log").read_text()
    assert "fewer than one sequence of seq_len=32" in log and "Traceback" not in log
    assert not (workdir / "data" / "corpora" / "tiny-txt" / "tiny" / "manifest.json").exists()


def test_schema_violation_is_reported(workdir):
    bad = workdir / "bad.yaml"
    bad.write_text((REPO / ".test" / "config.yaml").read_text().replace("seq_len: 32", "seq_len: -3"))
    proc = snakemake(workdir, "--configfile", str(bad), "-n")
    assert proc.returncode != 0 and "seq_len" in proc.stdout + proc.stderr
