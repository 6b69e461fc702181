# A model as a local Hugging Face directory; a corpus split, tokenized and packed.

rule prepare_model:
    output:
        marker=path_of(paths.MODEL_MARKER),
    params:
        # its overrides shape later stages only: changing them must not re-make the model
        model=lambda w: section(CFG.models[w.model], overrides={}),
        model_dir=parent_of_output("marker"),
        cache_dir=path_of(paths.CACHE_DIR),
    log:
        log_of("prepare_model", "{model}"),
    threads: 2
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/prepare_model.py"


rule prepare_corpus:
    input:
        model=path_of(paths.MODEL_MARKER),
    output:
        splits=expand(path_of(paths.CORPUS_SPLIT, split="{split}"), split=SPLITS, allow_missing=True),
        manifest=path_of(paths.CORPUS_MANIFEST),
    params:
        # not what is evaluated on it: making a corpus evaluation-only re-prepares nothing
        corpus=lambda w: section(CFG.corpora[w.corpus], without=CORPUS_EVALUATION_FIELDS),
        model_dir=parent_of_input("model"),
        out_dir=path_of(paths.CORPUS_DIR),
        cache_dir=path_of(paths.CACHE_DIR),
    log:
        log_of("prepare_corpus", "{corpus}-{model}"),
    threads: 1
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/prepare_corpus.py"
