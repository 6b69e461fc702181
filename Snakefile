# lenspipe: tuned lenses from cached activations. Wiring only; logic lives in pipeline/.
import os

from snakemake.utils import validate

from pipeline import paths

configfile: "config/config.yaml"


def _check_config():
    """One message and exit status 2 for a config mistake, before any job (and in -n)."""
    import sys

    from pipeline.workflow import check_workflow_config
    from pipeline.errors import ConfigError

    try:
        check_workflow_config(config, os.path.join(workflow.basedir, "config", "schema.yaml"))
    except ConfigError as e:
        files = ", ".join(map(str, workflow.configfiles)) or "config/config.yaml"
        print(f"lenspipe: error: config ({files}): {e}", file=sys.stderr, flush=True)
        sys.exit(2)


_check_config()
validate(config, "config/schema.yaml")  # fills in the schema's defaults

DATA = config["data_dir"]
MODELS = list(config["models"])
CORPORA = list(config["corpora"])
SPLITS = ["train", "validation", "test"]
KINDS = config.get("train", {}).get("kinds", ["affine"])
EVAL_SPLIT = config.get("evaluate", {}).get("split", "test")

wildcard_constraints:
    model="[A-Za-z0-9._-]+",
    corpus="[A-Za-z0-9._-]+",
    split="train|validation|test",
    kind="affine|linear|mlp|scaling",
    group=r"\d+",
    part=r"\d+",


def P(pattern, **kw):
    return paths.fill(pattern, data_dir=DATA, **kw)


def parent_of_input(name):
    """A directory param derived from an input file (so it can never disagree with it)."""
    return lambda w, input: os.path.dirname(input[name])


def parent_of_output(name):
    return lambda w, output: os.path.dirname(output[name])


rule all:
    input:
        expand(P(paths.STORE_DONE), model=MODELS, corpus=CORPORA, split=SPLITS),
        P(paths.REPORT),
    default_target: True


rule prepare_model:
    output:
        marker=P(paths.MODEL_MARKER),
    params:
        model_dir=parent_of_output("marker"),
        cache_dir=P(paths.CACHE_DIR),
    log:
        P(paths.LOG, rule="prepare_model", name="{model}"),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=30,  # minutes, on the default config's 2 CPU cores x ~10
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/prepare_model.py"


rule prepare_corpus:
    input:
        model=P(paths.MODEL_MARKER),
    output:
        splits=expand(P(paths.CORPUS_SPLIT, split="{split}"), split=SPLITS, allow_missing=True),
        manifest=P(paths.CORPUS_MANIFEST),
    params:
        model_dir=parent_of_input("model"),
        out_dir=P(paths.CORPUS_DIR),
        cache_dir=P(paths.CACHE_DIR),
    log:
        P(paths.LOG, rule="prepare_corpus", name="{corpus}-{model}"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,  # minutes, on the default config's 2 CPU cores x ~10
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/prepare_corpus.py"


PARTS = config.get("extract", {}).get("parts", 1)


def extract_params(w):
    """What a split's store depends on (another split's budget does not count)."""
    return {k: v for k, v in config.get("extract", {}).items() if k != "max_tokens"}


if PARTS == 1:

    rule extract:
        input:
            model=P(paths.MODEL_MARKER),
            split=P(paths.CORPUS_SPLIT),
        output:
            # A summary written after the store is complete. The store itself is not a declared
            # output, so Snakemake never deletes it on failure: a re-run resumes it.
            P(paths.STORE_DONE),
        params:
            model_dir=parent_of_input("model"),
            store=P(paths.STORE),
            extract=extract_params,
            budget=lambda w: config.get("extract", {}).get("max_tokens", {}).get(w.split, "default"),
        log:
            P(paths.LOG, rule="extract", name="{model}-{corpus}-{split}"),
        threads: 2
        resources:
            mem_mb=6000,
            runtime=240,  # minutes, on the default config's 2 CPU cores x ~10
            gpu=0,
        conda:
            "envs/lenspipe.yaml"
        script:
            "stages/extract.py"

else:

    rule extract_part:
        input:
            model=P(paths.MODEL_MARKER),
            split=P(paths.CORPUS_SPLIT),
        output:
            # the part store itself is not a declared output: a failed job leaves it to resume
            P(paths.STORE_PART_DONE),
        params:
            model_dir=parent_of_input("model"),
            store=P(paths.STORE_PART),
            extract=extract_params,
            budget=lambda w: config.get("extract", {}).get("max_tokens", {}).get(w.split, "default"),
        log:
            P(paths.LOG, rule="extract_part", name="{model}-{corpus}-{split}-{part}"),
        threads: 2
        resources:
            mem_mb=6000,
            runtime=240,
            gpu=0,
        conda:
            "envs/lenspipe.yaml"
        script:
            "stages/extract_part.py"

    rule assemble_store:
        input:
            expand(P(paths.STORE_PART_DONE, part="{part}"), part=range(PARTS), allow_missing=True),
        output:
            P(paths.STORE_DONE),
        params:
            parts=lambda w: [P(paths.STORE_PART, model=w.model, corpus=w.corpus, split=w.split, part=i)
                             for i in range(PARTS)],
            store=P(paths.STORE),
        log:
            P(paths.LOG, rule="assemble_store", name="{model}-{corpus}-{split}"),
        threads: 1
        resources:
            mem_mb=2000,
            runtime=30,
        conda:
            "envs/lenspipe.yaml"
        script:
            "stages/assemble_store.py"


GROUPS = config.get("train", {}).get("layer_groups", 1)
TRAIN_PARAMS = {k: v for k, v in config.get("train", {}).items() if k != "kinds"}  # a new kind retrains no other


if GROUPS == 1:

    rule train:
        input:
            model=P(paths.MODEL_MARKER),
            train=P(paths.STORE_DONE, split="train"),
            validation=P(paths.STORE_DONE, split="validation"),
        output:
            lens=P(paths.LENS_META),
            log=P(paths.LENS_LOG),
        params:
            model_dir=parent_of_input("model"),
            train_store=P(paths.STORE, split="train"),
            val_store=P(paths.STORE, split="validation"),
            lens_dir=P(paths.LENS_DIR),
            train=TRAIN_PARAMS,
        log:
            P(paths.LOG, rule="train", name="{model}-{corpus}-{kind}"),
        threads: 2
        resources:
            mem_mb=8000,
            runtime=240,  # minutes, on the default config's 2 CPU cores x ~10
            gpu=0,
        conda:
            "envs/lenspipe.yaml"
        script:
            "stages/train.py"

else:

    rule train_group:
        input:
            model=P(paths.MODEL_MARKER),
            train=P(paths.STORE_DONE, split="train"),
            validation=P(paths.STORE_DONE, split="validation"),
        output:
            P(paths.LENS_GROUP_META),
        params:
            model_dir=parent_of_input("model"),
            train_store=P(paths.STORE, split="train"),
            val_store=P(paths.STORE, split="validation"),
            lens_dir=P(paths.LENS_GROUP_DIR),
            train=TRAIN_PARAMS,
        log:
            P(paths.LOG, rule="train_group", name="{model}-{corpus}-{kind}-{group}"),
        threads: 2
        resources:
            mem_mb=8000,
            runtime=240,  # minutes, on the default config's 2 CPU cores x ~10
            gpu=0,
        conda:
            "envs/lenspipe.yaml"
        script:
            "stages/train_group.py"

    rule merge_lens:
        input:
            model=P(paths.MODEL_MARKER),
            groups=expand(P(paths.LENS_GROUP_META, group="{group}"), group=range(GROUPS),
                          allow_missing=True),
        output:
            lens=P(paths.LENS_META),
            log=P(paths.LENS_LOG),
        params:
            model_dir=parent_of_input("model"),
            lens_dir=P(paths.LENS_DIR),
        log:
            P(paths.LOG, rule="merge_lens", name="{model}-{corpus}-{kind}"),
        threads: 1
        resources:
            mem_mb=4000,
            runtime=15,  # minutes, on the default config's 2 CPU cores x ~10
        conda:
            "envs/lenspipe.yaml"
        script:
            "stages/merge_lens.py"


rule evaluate:
    input:
        model=P(paths.MODEL_MARKER),
        store=P(paths.STORE_DONE, split=EVAL_SPLIT),
        split=P(paths.CORPUS_SPLIT, split=EVAL_SPLIT),
        lenses=expand(P(paths.LENS_META, kind="{kind}"), kind=KINDS, allow_missing=True),
    output:
        layer_metrics=P(paths.LAYER_METRICS),
        calibration=P(paths.CALIBRATION),
    params:
        model_dir=parent_of_input("model"),
        store=P(paths.STORE, split=EVAL_SPLIT),
        lens_dirs=lambda w: {k: P(paths.LENS_DIR, model=w.model, corpus=w.corpus, kind=k) for k in KINDS},
        out_dir=P(paths.TABLES_DIR),
        evaluate=config.get("evaluate", {}),
    log:
        P(paths.LOG, rule="evaluate", name="{model}-{corpus}"),
    threads: 2
    resources:
        mem_mb=8000,
        runtime=240,  # minutes, on the default config's 2 CPU cores x ~10
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/evaluate.py"


# ---------------------------------------------------------------- analyses (pipeline/<rule>.py)

ANALYSES = config.get("analyses", {})
ANALYSES_ON = ANALYSES.get("enabled", True)
TRANSLATOR = ANALYSES.get("translator") or KINDS[0]


def analysis_outputs(rule_name):
    tables = [P(paths.ANALYSIS, analysis=t) for t in paths.ANALYSIS_TABLES[rule_name]]
    return tables + [P(paths.ANALYSIS_PNG, analysis=rule_name)]


def all_analyses(w=None):
    if not ANALYSES_ON:
        return []
    runs = [dict(model=m, corpus=c) for m in MODELS for c in CORPORA]
    per_run = [f for r in runs for name in paths.ANALYSIS_TABLES
               for f in expand(analysis_outputs(name), **r)]
    return per_run + [P(paths.COMPARE)]


rule prediction_depth:
    input:
        tables=P(paths.LAYER_METRICS),
        train_split=P(paths.CORPUS_SPLIT, split="train"),
    output:
        analysis_outputs("prediction_depth"),
    params:
        token_dir=P(paths.TOKEN_METRICS),
        out_dir=P(paths.ANALYSES_DIR),
        taus=ANALYSES.get("taus"),
    log:
        P(paths.LOG, rule="prediction_depth", name="{model}-{corpus}"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,  # minutes, on the default config's 2 CPU cores x ~10
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/prediction_depth.py"


rule layer_contributions:
    input:
        tables=P(paths.LAYER_METRICS),
        model=P(paths.MODEL_MARKER),
        split=P(paths.CORPUS_SPLIT, split=EVAL_SPLIT),
    output:
        analysis_outputs("layer_contributions"),
    params:
        token_dir=P(paths.TOKEN_METRICS),
        model_dir=parent_of_input("model"),
        out_dir=P(paths.ANALYSES_DIR),
        translator=TRANSLATOR,
        skip_tokens=ANALYSES.get("skip_tokens", 512),
    log:
        P(paths.LOG, rule="layer_contributions", name="{model}-{corpus}"),
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,  # minutes, on the default config's 2 CPU cores x ~10
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/layer_contributions.py"


rule translator_anatomy:
    input:
        lens=P(paths.LENS_META, kind=TRANSLATOR),
        model=P(paths.MODEL_MARKER),
    output:
        analysis_outputs("translator_anatomy"),
    params:
        lens_dir=parent_of_input("lens"),
        model_dir=parent_of_input("model"),
        out_dir=P(paths.ANALYSES_DIR),
    log:
        P(paths.LOG, rule="translator_anatomy", name="{model}-{corpus}"),
    threads: 2
    resources:
        mem_mb=4000,
        runtime=15,  # minutes, on the default config's 2 CPU cores x ~10
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/translator_anatomy.py"


rule token_categories:
    input:
        tables=P(paths.LAYER_METRICS),
        model=P(paths.MODEL_MARKER),
    output:
        analysis_outputs("token_categories"),
    params:
        token_dir=P(paths.TOKEN_METRICS),
        model_dir=parent_of_input("model"),
        out_dir=P(paths.ANALYSES_DIR),
        translator=TRANSLATOR,
    log:
        P(paths.LOG, rule="token_categories", name="{model}-{corpus}"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=15,  # minutes, on the default config's 2 CPU cores x ~10
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/token_categories.py"


rule layer_transfer:
    input:
        store=P(paths.STORE_DONE, split=EVAL_SPLIT),
        lens=P(paths.LENS_META, kind=TRANSLATOR),
        model=P(paths.MODEL_MARKER),
    output:
        analysis_outputs("layer_transfer"),
    params:
        store=P(paths.STORE, split=EVAL_SPLIT),
        lens_dir=parent_of_input("lens"),
        model_dir=parent_of_input("model"),
        out_dir=P(paths.ANALYSES_DIR),
        tokens=ANALYSES.get("transfer_tokens", 256),
        stride=ANALYSES.get("transfer_stride", 2),
    log:
        P(paths.LOG, rule="layer_transfer", name="{model}-{corpus}"),
    threads: 2
    resources:
        mem_mb=6000,
        runtime=60,  # minutes, on the default config's 2 CPU cores x ~10
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/layer_transfer.py"


rule compare_models:
    input:
        expand(P(paths.LAYER_METRICS), model=MODELS, corpus=CORPORA),
    output:
        P(paths.COMPARE),
        P(paths.COMPARE).replace(".parquet", ".png"),
    params:
        out_dir=parent_of_output(0),
    log:
        P(paths.LOG, rule="compare_models", name="all"),
    threads: 1
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/compare_models.py"


rule report:
    input:
        layer_metrics=expand(P(paths.LAYER_METRICS), model=MODELS, corpus=CORPORA),
        calibration=expand(P(paths.CALIBRATION), model=MODELS, corpus=CORPORA),
        analyses=all_analyses,
    output:
        report=P(paths.REPORT),
        html=P(paths.REPORT_HTML),
    params:
        runs=[dict(model=m, corpus=c, model_dir=P(paths.MODEL_DIR, model=m),
                   layer_metrics=P(paths.LAYER_METRICS, model=m, corpus=c),
                   calibration=P(paths.CALIBRATION, model=m, corpus=c),
                   lens_dirs={k: P(paths.LENS_DIR, model=m, corpus=c, kind=k) for k in KINDS},
                   analyses_dir=P(paths.ANALYSES_DIR, model=m, corpus=c) if ANALYSES_ON else None)
              for m in MODELS for c in CORPORA],
        compare=P(paths.COMPARE) if ANALYSES_ON else None,
        out_dir=parent_of_output("report"),
        prompts=config.get("report", {}).get("prompts"),
    log:
        P(paths.LOG, rule="report", name="report"),
    threads: 1
    conda:
        "envs/lenspipe.yaml"
    script:
        "stages/report.py"


onsuccess:
    from pipeline.report import print_summary

    print_summary(expand(P(paths.LAYER_METRICS), model=MODELS, corpus=CORPORA), P(paths.REPORT_DIR))
