"""What a run of the workflow wrote, as the explorer shows it: runs, lenses, tables, findings.

Reads only what exists under the config's ``data_dir`` (the explorer starts after any part
of a run); for a missing artifact it names the command that makes it (``paths.INPUTS``).
No torch here: the tables and findings pages answer without loading a model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .. import paths
from ..analyses import ANALYSES
from ..errors import LenspipeError
from ..paths import Artifacts
from .errors import NotFound

#: The layer_metrics columns the explorer plots (each with its _lo/_hi CI where it has one).
METRICS = ("kl", "ce", "acc", "agree_top1", "agree_topk", "entropy", "consistency", "ece")
KEYS = ("model", "corpus", "train_corpus", "lens", "translator", "position", "layer", "depth")


def clean(value: Any) -> Any:
    """A JSON-safe scalar: NaN and infinities become None (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # numpy scalars
        return clean(value.item())
    return value


def records(df) -> list[dict[str, Any]]:
    """A DataFrame as JSON-safe rows."""
    return [{k: clean(v) for k, v in row.items()} for row in df.to_dict("records")]


class Catalog:
    """The runs of one config under its data directory."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.data_dir = Path(cfg.data_dir).resolve()

    def artifacts(self, model: str, corpus: str) -> Artifacts:
        """One run's artifacts, its names checked against the config (404 otherwise)."""
        if model not in self.cfg.models or corpus not in self.cfg.corpora:
            raise NotFound(f"no run {model}/{corpus} in the config; runs: {self.run_names()}")
        return Artifacts.of(self.cfg.for_model(model), model, corpus)

    def run_names(self) -> str:
        return ", ".join(f"{m}/{c}" for m in self.cfg.models for c in self.cfg.train_corpora)

    def lens_dirs(self, model: str, corpus: str) -> dict[str, Path]:
        """The trained lenses of a run, by kind (those whose lens.json exists)."""
        a = self.artifacts(model, corpus)
        kinds = self.cfg.for_model(model).train.kinds
        return {
            k: Path(a.fill(paths.LENS_DIR, kind=k)) for k in kinds if Path(a.fill(paths.LENS_META, kind=k)).is_file()
        }

    def runs(self) -> list[dict[str, Any]]:
        """Every (model, train corpus) of the config with what of it exists."""
        out = []
        for model in self.cfg.models:
            for corpus in self.cfg.train_corpora:
                a = self.artifacts(model, corpus)
                out.append(
                    {
                        "model": model,
                        "corpus": corpus,
                        "kinds": sorted(self.lens_dirs(model, corpus)),
                        "model_ready": Path(a.fill(paths.MODEL_MARKER)).is_file(),
                        "tokens_ready": Path(a.fill(paths.TOKEN_METRICS)).is_dir(),
                        "store_ready": Path(a.fill(paths.STORE_DONE)).is_file(),
                        "eval_split": a.eval_split,
                    }
                )
        return out

    def layer_metrics(self) -> dict[str, Any]:
        """Every layer_metrics table of the lens x corpus matrix, as rows with their CIs,
        and the commands that make the missing ones."""
        import pandas as pd

        frames, missing = [], []
        artifacts = Artifacts.of(self.cfg)
        for model in self.cfg.models:
            for train, corpus in self.cfg.evaluations():
                try:
                    df = pd.read_parquet(artifacts.layer_metrics(model, train, corpus))
                except LenspipeError as e:  # its message names the command that makes it
                    missing.append(str(e))
                    continue
                cols = [c for c in (*KEYS, *METRICS) if c in df] + [
                    f"{m}_{e}" for m in METRICS for e in ("lo", "hi") if f"{m}_{e}" in df
                ]
                frames.append(df[cols])
        rows = records(pd.concat(frames, ignore_index=True)) if frames else []
        return {"rows": rows, "metrics": list(METRICS), "missing": missing}

    def findings(self) -> dict[str, Any]:
        """Each analysis's findings (estimate, CI, sample size, verdict) per run, with its
        figure and where to look for the examples behind it."""
        out, missing = [], []
        runs = [(m, c) for m in self.cfg.models for c in self.cfg.train_corpora]
        for analysis in ANALYSES:
            for model, corpus in runs if analysis.per_run else [(None, None)]:
                where = Path(
                    paths.fill(
                        paths.ANALYSES_DIR if analysis.per_run else paths.ANALYSES_ROOT,
                        data_dir=str(self.data_dir),
                        model=model,
                        corpus=corpus,
                    )
                )
                table = where / f"{analysis.findings_table}.parquet"
                if not table.is_file():
                    names = f" --model {model} --corpus {corpus}" if analysis.per_run else ""
                    missing.append(f"lenspipe {analysis.command}{names}")
                    continue
                figure = self.file_url(where / f"{analysis.rule}.png")
                out.append(
                    {
                        "rule": analysis.rule,
                        "title": analysis.title,
                        "model": model,
                        "corpus": corpus,
                        "findings": records(analysis.findings(where)),
                        "figure": figure,
                        "examples": self.examples(analysis.rule, where),
                    }
                )
        return {"analyses": out, "missing": missing}

    def examples(self, rule: str, where: Path) -> list[dict[str, Any]]:
        """Links from a finding to the examples behind it: fact prompts open in the
        trajectory view; token categories and prediction depth filter the cache browser."""
        import pandas as pd

        if rule == "fact_localization" and (where / "fact_prompts.parquet").is_file():
            facts = pd.read_parquet(where / "fact_prompts.parquet")
            if "kept" in facts:  # the facts the model itself gets right (those the depths are of) first
                facts = facts.sort_values("kept", ascending=False, kind="stable")
            return [{"prompt": p, "answer": a, "label": f"{p} → {a}"} for p, a in zip(facts.prompt, facts.answer)]
        if rule == "token_categories" and (where / "token_categories.parquet").is_file():
            cats = pd.read_parquet(where / "token_categories.parquet")
            return [
                {"filter": {"category": c}, "label": f"tokens before a {c} token"} for c in sorted(set(cats.category))
            ]
        if rule == "prediction_depth":
            return [{"sort": "depth_tuned", "desc": True, "label": "tokens the tuned lens settles on last"}]
        return []

    def file_url(self, path: Path) -> str | None:
        """The URL of a file the explorer serves (None: missing, or outside the data directory)."""
        try:
            return "/files/" + self.file(str(path.relative_to(self.data_dir))).relative_to(self.data_dir).as_posix()
        except (NotFound, ValueError):
            return None

    def file(self, relative: str) -> Path:
        """A file under the data directory; anything that resolves outside it is refused
        (``..``, absolute paths, links that leave it) as if it did not exist, and so is a
        name no file system takes (a NUL byte, a name too long)."""
        try:
            candidate = (self.data_dir / relative).resolve()
            inside = candidate.is_relative_to(self.data_dir) and candidate.is_file()
        except (ValueError, OSError):
            inside = False
        if not inside:
            raise NotFound(f"no file {relative[:200]!r} under the data directory")
        return candidate
