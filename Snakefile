# lenspipe: tuned lenses from cached activations. Wiring only; logic lives in pipeline/.
from snakemake.utils import validate

from pipeline import paths

configfile: "config/config.yaml"
validate(config, "config/schema.yaml")

DATA = config["data_dir"]
MODELS = list(config["models"])
CORPORA = list(config["corpora"])
SPLITS = ["train", "validation", "test"]
KINDS = config.get("train", {}).get("kinds", ["affine"])

wildcard_constraints:
    model="[A-Za-z0-9._-]+",
    corpus="[A-Za-z0-9._-]+",
    split="train|validation|test",
    kind="affine|linear|mlp|scaling",


def P(pattern, **kw):
    return paths.fill(pattern, data_dir=DATA, **kw)


rule all:
    input:
        expand(P(paths.STORE_DONE), model=MODELS, corpus=CORPORA, split=SPLITS),
        expand(P(paths.LENS_META), model=MODELS, corpus=CORPORA, kind=KINDS),
    default_target: True


rule prepare_model:
    output:
        P(paths.MODEL_MARKER),
    params:
        model_dir=P(paths.MODEL_DIR),
        cache_dir=P(paths.CACHE_DIR),
    log:
        P(paths.LOG, rule="prepare_model", name="{model}"),
    threads: 2
    resources:
        mem_mb=4000,
    script:
        "stages/prepare_model.py"


rule prepare_corpus:
    input:
        model=P(paths.MODEL_MARKER),
    output:
        splits=expand(P(paths.CORPUS_SPLIT, split="{split}"), split=SPLITS, allow_missing=True),
        manifest=P(paths.CORPUS_MANIFEST),
    params:
        model_dir=P(paths.MODEL_DIR),
        out_dir=P(paths.CORPUS_DIR),
        cache_dir=P(paths.CACHE_DIR),
    log:
        P(paths.LOG, rule="prepare_corpus", name="{corpus}-{model}"),
    threads: 1
    resources:
        mem_mb=4000,
    script:
        "stages/prepare_corpus.py"


rule extract:
    input:
        model=P(paths.MODEL_MARKER),
        split=P(paths.CORPUS_SPLIT),
    output:
        # A summary written after the store is complete. The store itself is not a declared
        # output, so Snakemake never deletes it on failure: a re-run resumes it.
        P(paths.STORE_DONE),
    params:
        model_dir=P(paths.MODEL_DIR),
        store=P(paths.STORE),
        extract=config.get("extract", {}),
    log:
        P(paths.LOG, rule="extract", name="{model}-{corpus}-{split}"),
    threads: 2
    resources:
        mem_mb=6000,
        gpu=0,
    script:
        "stages/extract.py"


rule train:
    input:
        model=P(paths.MODEL_MARKER),
        train=P(paths.STORE_DONE, split="train"),
        validation=P(paths.STORE_DONE, split="validation"),
    output:
        lens=P(paths.LENS_META),
        log=P(paths.LENS_LOG),
    params:
        model_dir=P(paths.MODEL_DIR),
        train_store=P(paths.STORE, split="train"),
        val_store=P(paths.STORE, split="validation"),
        lens_dir=P(paths.LENS_DIR),
        train=config.get("train", {}),
    log:
        P(paths.LOG, rule="train", name="{model}-{corpus}-{kind}"),
    threads: 2
    resources:
        mem_mb=8000,
        gpu=0,
    script:
        "stages/train.py"
