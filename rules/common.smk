# What every file of rules/ shares: the config (parsed once, checked at start), path filling and
# the defaults for threads, resources and software. No rules here (snakemake --lint).
import os
import re
import sys

from pipeline import paths
from pipeline.analyses import ANALYSES, BY_RULE, INPUTS as ANALYSIS_INPUTS
from pipeline.config import SPLITS
from pipeline.lens import kinds
from pipeline.paths import Artifacts
from pipeline.positions import DEFAULT as DEFAULT_POSITIONS
from pipeline.workflow import CORPUS_EVALUATION_FIELDS, section


def checked_config():
    """The typed config. A mistake is one message and exit status 2 before any job (-n too)."""
    from pipeline.errors import ConfigError
    from pipeline.workflow import check_workflow_config

    try:
        return check_workflow_config(list(workflow.configfiles), config)
    except ConfigError as e:
        files = ", ".join(map(str, workflow.configfiles)) or "config/config.yaml"
        print(f"lenspipe: error: config ({files}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)


CFG = checked_config()
DATA = str(CFG.data_dir)
MODELS, CORPORA, KINDS = list(CFG.models), list(CFG.corpora), CFG.train.kinds
EVAL_SPLIT = CFG.evaluate.split
RUNS = Artifacts.of(CFG).runs  # (model, corpus) where lenses are trained: the per-run rules
EVALUATIONS = Artifacts.of(CFG).evaluations  # (model, train corpus, evaluated corpus)

# Every rule's software, and its resources by size of job (mem_mb in MB; runtime in minutes,
# ~10x what the default config takes on 2 CPU cores). gpu: 0 lets a profile give one to a
# GPU stage (profiles/slurm). Threads are each rule's own: 2 where torch computes.
ENV = "../envs/lenspipe.yaml"
SMALL = dict(mem_mb=4000, runtime=30)
MEDIUM = dict(mem_mb=6000, runtime=60)
LARGE = dict(mem_mb=8000, runtime=240, gpu=0)
SIZES = {"small": SMALL, "medium": MEDIUM, "large": LARGE}

wildcard_constraints:
    model="[A-Za-z0-9._-]+",
    corpus="[A-Za-z0-9._-]+",
    train_corpus="|".join(re.escape(c) for c in CFG.train_corpora),
    split="|".join(SPLITS),
    kind="|".join(kinds.names()),
    group=r"\d+",
    part=r"\d+",


def path_of(pattern, **kw):
    return paths.fill(pattern, data_dir=DATA, **kw)


def log_of(rule, name):
    return path_of(paths.LOG, rule=rule, name=name)


def parent_of_input(name):
    """A directory param derived from an input file (so it can never disagree with it)."""
    return lambda w, input: os.path.dirname(input[name])


def parent_of_output(name):
    return lambda w, output: os.path.dirname(output[name])


def run_artifacts(w):
    """The artifacts of the job's (model, corpus) run (pipeline.paths.Artifacts)."""
    return Artifacts.of(CFG, w.model, w.corpus)


def analysis_outputs(rule):
    a = BY_RULE[rule]
    return a.outputs(path_of(paths.ANALYSES_DIR if a.per_run else paths.ANALYSES_ROOT))


def analysis_inputs(a):
    """The inputs the registry declares for analysis ``a``: its run's, or every run's."""
    values = {"eval": EVAL_SPLIT, "translator": CFG.analyses.translator}
    out = {}
    for name in a.inputs:
        pattern, fixed = ANALYSIS_INPUTS[name]
        filled = path_of(pattern, **{k: values.get(v, v) for k, v in fixed.items()})
        if a.per_run:
            out[name] = filled
        else:
            out[name] = all_evaluations() if name == "evaluations" else run_tables(filled)
    return out


def analysis_params(rule):
    """What stages/analysis.py hands to pipeline.analyses.<rule>.run (a run's own settings:
    its model may override analyses.*)."""
    a = BY_RULE[rule]
    if not a.per_run:
        return dict(artifacts=Artifacts.of(CFG), settings=a.settings_of(CFG.analyses))
    return dict(artifacts=run_artifacts, settings=lambda w: a.settings_of(CFG.for_model(w.model).analyses))


def extract_section(model, split):
    """What one split's store depends on: the model's extract settings, with its own budget
    only (not the other splits'), and its positions only where they are not the default (a
    block-only store is the store of before positions existed: its job stays up to date)."""
    cfg = CFG.for_model(model).extract
    without = ("positions",) if tuple(cfg.positions) == DEFAULT_POSITIONS else ()
    return section(cfg, without=without, max_tokens={split: cfg.max_tokens.get(split)})


def all_stores():
    """Every store the config needs: every split of a corpus lenses train on, the held-out
    split of an evaluation-only one."""
    return [path_of(paths.STORE_DONE, model=m, corpus=c, split=s) for m in MODELS for c in CORPORA
            for s in CFG.splits_of(c)]


def run_tables(pattern):
    """A table of every run (a model's lenses on the corpus they were trained on)."""
    return [path_of(pattern, model=m, corpus=c) for m, c in RUNS]


def all_evaluations(name="layer_metrics"):
    """The layer_metrics (or calibration) table of every cell of the lens x corpus matrix."""
    across = paths.ACROSS_LAYER_METRICS if name == "layer_metrics" else paths.ACROSS_CALIBRATION
    own = paths.LAYER_METRICS if name == "layer_metrics" else paths.CALIBRATION
    return [path_of(own if t == e else across, model=m, corpus=e, train_corpus=t) for m, t, e in EVALUATIONS]


def all_analyses(w=None):
    if not CFG.analyses.enabled:
        return []
    out = []
    for a in BY_RULE.values():
        out += [f for m, c in RUNS for f in expand(analysis_outputs(a.rule), model=m, corpus=c)] if a.per_run \
            else analysis_outputs(a.rule)
    return out
