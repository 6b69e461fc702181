"""Where each artifact lives under ``data_dir``; shared by the Snakefile and the CLI.

``{model}`` and ``{corpus}`` are the names from the config; ``{split}`` is one of
train / validation / test; ``{kind}`` a translator kind; ``{analysis}`` an analysis table.
``{train_corpus}`` is the corpus a lens was trained on, where it is evaluated on another
one (``{corpus}``): the tables of a run (lenses on their own corpus) keep their place,
and those of its lenses on another corpus go under that corpus's tables.
:class:`Artifacts` fills them for one run of a config and says, for a missing input,
which command makes it.
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import LenspipeError

MODEL_DIR = "{data_dir}/models/{model}"
MODEL_MARKER = MODEL_DIR + "/lenspipe_model.json"
CORPUS_DIR = "{data_dir}/corpora/{corpus}/{model}"
CORPUS_SPLIT = CORPUS_DIR + "/{split}.npz"
CORPUS_MANIFEST = CORPUS_DIR + "/manifest.json"
CACHE_DIR = "{data_dir}/cache"
LOG = "{data_dir}/logs/{rule}/{name}.log"
STORE = "{data_dir}/stores/{model}/{corpus}/{split}.zarr"
STORE_DONE = "{data_dir}/stores/{model}/{corpus}/{split}.extract.json"
STORE_PART = "{data_dir}/stores/{model}/{corpus}/{split}.parts/{part}.zarr"
STORE_PART_DONE = "{data_dir}/stores/{model}/{corpus}/{split}.parts/{part}.extract.json"
LENS_DIR = "{data_dir}/lenses/{model}/{corpus}/{kind}"
LENS_META = LENS_DIR + "/lens.json"
LENS_LOG = LENS_DIR + "/train_log.parquet"
LENS_GROUP_DIR = "{data_dir}/lenses/{model}/{corpus}/groups/{kind}/{group}"
LENS_GROUP_META = LENS_GROUP_DIR + "/lens.json"
TABLES_DIR = "{data_dir}/tables/{model}/{corpus}"
LAYER_METRICS = TABLES_DIR + "/layer_metrics.parquet"
CALIBRATION = TABLES_DIR + "/calibration.parquet"
TOKEN_METRICS = TABLES_DIR + "/token_metrics"
#: The lenses trained on {train_corpus} evaluated on {corpus}'s held-out split (the same
#: tables as a run's; the lens x corpus matrix reads them beside the runs' own).
ACROSS_DIR = TABLES_DIR + "/trained-on-{train_corpus}"
ACROSS_LAYER_METRICS = ACROSS_DIR + "/layer_metrics.parquet"
ACROSS_CALIBRATION = ACROSS_DIR + "/calibration.parquet"
REPORT_DIR = "{data_dir}/report"
REPORT = REPORT_DIR + "/report.md"
REPORT_HTML = REPORT_DIR + "/report.html"
#: Analyses of one run; an analysis across runs (compare_models) writes to ANALYSES_ROOT.
ANALYSES_ROOT = "{data_dir}/analyses"
ANALYSES_DIR = ANALYSES_ROOT + "/{model}/{corpus}"


def fill(pattern: str, **kw) -> str:
    """Fill a path pattern; keeps unknown ``{wildcards}`` for Snakemake."""
    names = {f for _, f, _, _ in string.Formatter().parse(pattern) if f}
    return pattern.format(**{n: kw.get(n, "{" + n + "}") for n in names})


#: What a stage reads -> (the path it gets, the file that exists once it is made, the
#: command that makes it).
INPUTS = {
    "model_dir": (MODEL_DIR, MODEL_MARKER, "lenspipe prepare-model --model {model}"),
    "split": (CORPUS_SPLIT, CORPUS_SPLIT, "lenspipe prepare-corpus --model {model} --corpus {corpus}"),
    "store": (STORE, STORE, "lenspipe extract --model {model} --corpus {corpus} --split {split}"),
    "store_part": (
        STORE_PART,
        STORE_PART_DONE,
        "lenspipe extract --model {model} --corpus {corpus} --split {split} --part {part}",
    ),
    "lens": (LENS_DIR, LENS_META, "lenspipe train --model {model} --corpus {corpus} --kind {kind}"),
    "lens_group": (
        LENS_GROUP_DIR,
        LENS_GROUP_META,
        "lenspipe train --model {model} --corpus {corpus} --kind {kind} --group {group}",
    ),
    "layer_metrics": (LAYER_METRICS, LAYER_METRICS, "lenspipe evaluate --model {model} --corpus {corpus}"),
    "calibration": (CALIBRATION, CALIBRATION, "lenspipe evaluate --model {model} --corpus {corpus}"),
    "token_metrics": (
        TOKEN_METRICS,
        TOKEN_METRICS,
        "lenspipe evaluate --model {model} --corpus {corpus} "
        "(with evaluate.token_metrics true, or auto and at most 65,536 tokens)",
    ),
    # per-run analysis tables that compare_models reads across runs
    "translator_anatomy": (
        ANALYSES_DIR + "/translator_anatomy.parquet",
        ANALYSES_DIR + "/translator_anatomy.parquet",
        "lenspipe translator-anatomy --model {model} --corpus {corpus}",
    ),
    "prediction_depth": (
        ANALYSES_DIR + "/prediction_depth.parquet",
        ANALYSES_DIR + "/prediction_depth.parquet",
        "lenspipe prediction-depth --model {model} --corpus {corpus}",
    ),
    "fact_prompts": (
        ANALYSES_DIR + "/fact_prompts.parquet",
        ANALYSES_DIR + "/fact_prompts.parquet",
        "lenspipe fact-localization --model {model} --corpus {corpus}",
    ),
    "fact_depths": (
        ANALYSES_DIR + "/fact_depths.parquet",
        ANALYSES_DIR + "/fact_depths.parquet",
        "lenspipe fact-localization --model {model} --corpus {corpus}",
    ),
    "across_layer_metrics": (
        ACROSS_LAYER_METRICS,
        ACROSS_LAYER_METRICS,
        "lenspipe evaluate --model {model} --corpus {corpus} --train-corpus {train_corpus}",
    ),
}


#: The file a rule declares for an input it reads, where that is not the "made" file of
#: INPUTS: a store is declared by its completion record, a model directory by its marker,
#: the per-token table by the layer_metrics table the same evaluate job writes.
DECLARED_AS = {"store": STORE_DONE, "model_dir": MODEL_MARKER, "token_metrics": LAYER_METRICS}


def layer_metrics_pattern(train_corpus: str, corpus: str) -> str:
    """The layer_metrics table of the lenses trained on ``train_corpus`` evaluated on ``corpus``."""
    return LAYER_METRICS if train_corpus == corpus else ACROSS_LAYER_METRICS


@dataclass(frozen=True)
class Artifacts:
    """The artifacts of one (model, corpus) run of a config under its ``data_dir``;
    ``runs`` lists every run of the config (a model and a corpus lenses are trained on), for
    what spans them (compare_models); ``evaluations`` every (model, train corpus, evaluated
    corpus) of the lens x corpus matrix, runs included."""

    data_dir: str
    model: str | None = None
    corpus: str | None = None
    eval_split: str = "test"
    """The split evaluation reads (``evaluate.split``): the default ``split`` of :meth:`need`."""
    runs: tuple[tuple[str, str], ...] = ()
    evaluations: tuple[tuple[str, str, str], ...] = ()
    declared: frozenset[str] | None = None
    """In a workflow job, the input files its rule declares (:meth:`declaring`): :meth:`need`
    then refuses what the rule does not declare, so that the paths a rule declares are the
    paths its job reads. None (the CLI, library calls): no such check."""

    @classmethod
    def of(cls, cfg, model: str | None = None, corpus: str | None = None) -> Artifacts:
        """For a PipelineConfig (names already checked against it)."""
        return cls(
            str(cfg.data_dir),
            model,
            corpus,
            cfg.evaluate.split,
            tuple((m, c) for m in cfg.models for c in cfg.train_corpora),
            tuple((m, t, e) for m in cfg.models for t, e in cfg.evaluations()),
        )

    def fill(self, pattern: str, **kw) -> str:
        return fill(
            pattern,
            **{"data_dir": self.data_dir, "model": self.model, "corpus": self.corpus, "split": self.eval_split, **kw},
        )

    def declaring(self, files) -> Artifacts:
        """These artifacts for a job whose rule declares ``files`` (``snakemake.input``)."""
        return replace(self, declared=frozenset(os.path.normpath(str(f)) for f in files))

    def need(self, name: str, **kw) -> Path:
        """The path of input ``name`` (a key of INPUTS), after checking it has been made
        (and, in a workflow job, that its rule declares it)."""
        pattern, made, command = INPUTS[name]
        if self.declared is not None:
            proof = os.path.normpath(self.fill(DECLARED_AS.get(name, made), **kw))
            if proof not in self.declared:
                raise LenspipeError(
                    f"this job reads the {name.replace('_', ' ')} at {self.fill(pattern, **kw)}, but its rule "
                    f"does not declare {proof} as an input: add it to the rule's input"
                )
        if not Path(self.fill(made, **kw)).exists():
            values = {"model": self.model, "corpus": self.corpus, "split": self.eval_split, **kw}
            raise LenspipeError(
                f"no {name.replace('_', ' ')} at {self.fill(pattern, **kw)}: run "
                f"`{command.format(**values)}` first (with the same --config)"
            )
        return Path(self.fill(pattern, **kw))

    def layer_metrics(self, model: str, train_corpus: str, corpus: str) -> Path:
        """The layer_metrics table of ``train_corpus``'s lenses on ``corpus`` (checked to exist)."""
        name = "layer_metrics" if train_corpus == corpus else "across_layer_metrics"
        return self.need(name, model=model, corpus=corpus, train_corpus=train_corpus)

    @property
    def analyses_dir(self) -> Path:
        """Where this run's analyses go; the analyses root for an Artifacts of no one run."""
        return Path(self.fill(ANALYSES_DIR if self.model else ANALYSES_ROOT))
