"""The analyses, and the one table of them that the workflow, the CLI and the report read.

Each analysis is a rule (``rules/analyses.smk``), a ``lenspipe`` subcommand (the rule's
name with dashes) and a module ``pipeline.analyses.<rule>`` holding

1. ``<rule>(...)``, the library function, which writes the analysis's tables
   (``<table>.parquet``), its findings (``<rule>_findings.parquet``: each question's
   estimate, 95% CI, sample size and verdict, see ``findings``) and its figure (``<rule>.png``);
2. ``run(artifacts, **settings)``, the job of the rule and of the subcommand: it takes
   its inputs from a :class:`pipeline.paths.Artifacts` (one run of the config, or all of
   them) and its settings (``analyses.*`` of the config) by name;
3. ``summary(*tables)``, the report's sentence, from its tables in ``tables`` order.

Its module holds ``POWER``, a paragraph beginning "Power.": the effect the analysis must be
able to detect and the sample size that gives it (the report quotes it).

A new analysis: its module, its test and one entry in :data:`ANALYSES`, which is its rule
too (``rules/analyses.smk`` makes one rule per entry: inputs, outputs, threads, settings).

- ``prediction_depth``     where each lens settles on the model's top-1; early exit
- ``layer_contributions``  each block's KL drop under the tuned lens vs the cost of skipping it
- ``translator_anatomy``   each translator as h -> A h + b: distance from I, spectrum, bias
- ``token_categories``     logit vs tuned lens by category of the token to predict
- ``layer_transfer``       translator i on the hidden states of layer j
- ``compare_models``       every run of the config on a normalised depth axis, with its
                           translator anatomy and prediction depth side by side
- ``causal_fidelity``      lens-chosen residual directions ablated in the model: same effect?
- ``anomaly_detection``    an IsolationForest on lens trajectories: injections, shuffles, code
- ``fact_localization``    the first layer at which each lens ranks a fact's answer top-1 / top-5
- ``attention_mlp``        each block's KL drop split into its attention's and its MLP's (the
                           attention lens position), with CIs over sequences
- ``live``                 (helper) the model and lenses on text outside the cache
- ``findings``             (helper) estimates with bootstrap CIs, sample sizes and verdicts
- ``lens_corpus_matrix``   every trained lens on every corpus: the tuned/logit KL ratio per layer
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import paths


@dataclass(frozen=True)
class Analysis:
    rule: str
    """The rule, the module ``pipeline.analyses.<rule>``, its function and its figure."""
    tables: tuple[str, ...]
    """The tables it writes (``<table>.parquet``), in the order ``summary`` takes them."""
    title: str
    """Its section title in the report."""
    settings: tuple[str, ...] = ()
    """The ``analyses`` config fields ``run`` takes: its rule re-runs when one changes."""
    per_run: bool = True
    """One job per (model, corpus) run, or one job across all runs of the config."""
    inputs: tuple[str, ...] = ("layer_metrics",)
    """What its rule declares as inputs, by name (:data:`INPUTS`): the run's artifacts, or
    for an analysis across runs, every run's (``layer_metrics`` of every cell of the lens x
    corpus matrix for ``evaluations``)."""
    threads: int = 1
    """Its job's threads: 2 where torch computes (the model or lenses run)."""
    size: str = "small"
    """Its job's memory and time class (``rules/common.smk``: small, medium)."""

    @property
    def command(self) -> str:
        return self.rule.replace("_", "-")

    def module(self):
        return importlib.import_module(f"{__name__}.{self.rule}")

    @property
    def findings_table(self) -> str:
        """Its findings (``findings.Finding`` rows: estimate, CI, sample size, verdict)."""
        return f"{self.rule}_findings"

    def outputs(self, analyses_dir: str | Path) -> list[str]:
        """Its tables, its findings and its figure under an analyses directory (or a pattern of one)."""
        return [f"{analyses_dir}/{t}.parquet" for t in (*self.tables, self.findings_table)] + [
            f"{analyses_dir}/{self.rule}.png"
        ]

    def settings_of(self, analyses_cfg) -> dict[str, Any]:
        """Its settings, read from an AnalysesConfig."""
        return {name: getattr(analyses_cfg, name) for name in self.settings}

    def run(self, artifacts, settings: dict[str, Any]) -> None:
        self.module().run(artifacts, **settings)

    def summary(self, analyses_dir: Path) -> str:
        import pandas as pd

        return self.module().summary(*(pd.read_parquet(Path(analyses_dir) / f"{t}.parquet") for t in self.tables))

    def findings(self, analyses_dir: Path):
        import pandas as pd

        return pd.read_parquet(Path(analyses_dir) / f"{self.findings_table}.parquet")

    def power(self) -> str:
        """Its module's ``POWER``: the effect it must detect and the sample size that gives it."""
        from .findings import power_of

        return power_of(self.module())


#: The inputs an analysis may declare (``Analysis.inputs``): the path pattern's name in
#: ``pipeline.paths`` and its fixed wildcards (``split="eval"``: ``evaluate.split``; ``kind``:
#: ``analyses.translator``). The per-token table beside a layer_metrics table is read with it.
INPUTS = {
    "layer_metrics": (paths.LAYER_METRICS, {}),
    "model": (paths.MODEL_MARKER, {}),
    "lens": (paths.LENS_META, {"kind": "translator"}),
    "store": (paths.STORE_DONE, {"split": "eval"}),
    "split": (paths.CORPUS_SPLIT, {"split": "eval"}),
    "train_split": (paths.CORPUS_SPLIT, {"split": "train"}),
    "fit_split": (paths.CORPUS_SPLIT, {"split": "validation"}),  # anomaly detection fits on it
    # across runs: each run's own tables
    "anatomy": (paths.INPUTS["translator_anatomy"][0], {}),
    "depth": (paths.INPUTS["prediction_depth"][0], {}),
    "facts": (paths.INPUTS["fact_prompts"][0], {}),
    "fact_depths": (paths.INPUTS["fact_depths"][0], {}),
    "evaluations": (paths.LAYER_METRICS, {}),
}

_LENS = ("lens", "model")
ANALYSES = (
    Analysis(
        "prediction_depth",
        ("prediction_depth", "early_exit"),
        "prediction depth and early exit",
        ("taus",),
        inputs=("layer_metrics", "train_split"),
    ),
    Analysis(
        "layer_contributions",
        ("layer_contributions",),
        "layer contributions",
        ("translator", "skip_tokens"),
        inputs=("layer_metrics", "model", "split"),
        threads=2,
        size="medium",
    ),
    Analysis(
        "translator_anatomy",
        ("translator_anatomy", "translator_spectra"),
        "translator anatomy",
        ("translator",),
        inputs=_LENS,
        threads=2,
    ),
    Analysis(
        "token_categories",
        ("token_categories",),
        "token categories",
        ("translator",),
        inputs=("layer_metrics", "model"),
    ),
    Analysis(
        "layer_transfer",
        ("layer_transfer",),
        "layer transfer",
        ("translator", "transfer_tokens", "transfer_stride"),
        inputs=("store", *_LENS),
        threads=2,
        size="medium",
    ),
    Analysis(
        "causal_fidelity",
        ("causal_fidelity", "causal_agreement"),
        "causal fidelity",
        ("translator", "causal_layers", "causal_directions", "causal_random", "causal_tokens"),
        inputs=("store", *_LENS),
        threads=2,
        size="medium",
    ),
    Analysis(
        "anomaly_detection",
        ("anomaly_detection", "anomaly_scores"),
        "anomaly detection",
        ("translator", "anomaly_sequences", "anomaly_other", "anomaly_tokens", "anomaly_stride"),
        inputs=(*_LENS, "fit_split", "split"),
        threads=2,
        size="medium",
    ),
    # the split's manifest beside it gives the separator token that starts every prompt
    Analysis(
        "fact_localization",
        ("fact_prompts", "fact_layers", "fact_depths"),
        "fact localization",
        ("translator",),
        inputs=(*_LENS, "split"),
        threads=2,
    ),
    # the per-token table beside layer_metrics, at the attention position too
    Analysis("attention_mlp", ("attention_mlp",), "attention vs MLP", ("translator",)),
    Analysis(
        "compare_models",
        ("compare_models", "compare_anatomy", "compare_depth", "compare_facts"),
        "Across models and checkpoints",
        ("translator",),
        per_run=False,
        inputs=("layer_metrics", "anatomy", "depth", "facts", "fact_depths"),
    ),
    Analysis(
        "lens_corpus_matrix",
        ("lens_corpus_matrix",),
        "Lenses across corpora",
        ("translator",),
        per_run=False,
        inputs=("evaluations",),
    ),
)
BY_RULE = {a.rule: a for a in ANALYSES}
