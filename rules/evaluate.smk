# Every lens at every layer on the held-out split: the Parquet tables. `evaluate`: a run's
# lenses on its own corpus; `evaluate_across`: the lenses trained on {train_corpus} on
# another corpus's held-out split (the lens x corpus matrix). Both evaluate the logit lens.

rule evaluate:
    input:
        model=path_of(paths.MODEL_MARKER),
        store=path_of(paths.STORE_DONE, split=EVAL_SPLIT),
        split=path_of(paths.CORPUS_SPLIT, split=EVAL_SPLIT),
        lenses=expand(path_of(paths.LENS_META, kind="{kind}"), kind=KINDS, allow_missing=True),
    output:
        layer_metrics=path_of(paths.LAYER_METRICS),
        calibration=path_of(paths.CALIBRATION),
    params:
        model_dir=parent_of_input("model"),
        store=path_of(paths.STORE, split=EVAL_SPLIT),
        train_corpus="{corpus}",
        lens_dirs=lambda w: {k: path_of(paths.LENS_DIR, model=w.model, corpus=w.corpus, kind=k) for k in KINDS},
        out_dir=path_of(paths.TABLES_DIR),
        revision=lambda w: CFG.models[w.model].revision,
        evaluate=lambda w: section(CFG.for_model(w.model).evaluate_config(w.corpus)),
    log:
        log_of("evaluate", "{model}-{corpus}"),
    threads: 2
    resources:
        **LARGE,
    conda:
        ENV
    script:
        "../stages/evaluate.py"


use rule evaluate as evaluate_across with:
    input:
        model=path_of(paths.MODEL_MARKER),
        store=path_of(paths.STORE_DONE, split=EVAL_SPLIT),
        split=path_of(paths.CORPUS_SPLIT, split=EVAL_SPLIT),
        lenses=expand(path_of(paths.LENS_META, corpus="{train_corpus}", kind="{kind}"), kind=KINDS, allow_missing=True),
    output:
        layer_metrics=path_of(paths.ACROSS_LAYER_METRICS),
        calibration=path_of(paths.ACROSS_CALIBRATION),
    params:
        model_dir=parent_of_input("model"),
        store=path_of(paths.STORE, split=EVAL_SPLIT),
        train_corpus="{train_corpus}",
        lens_dirs=lambda w: {k: path_of(paths.LENS_DIR, model=w.model, corpus=w.train_corpus, kind=k) for k in KINDS},
        out_dir=path_of(paths.ACROSS_DIR),
        revision=lambda w: CFG.models[w.model].revision,
        evaluate=lambda w: section(CFG.for_model(w.model).evaluate_config(w.corpus)),
    log:
        log_of("evaluate_across", "{model}-{train_corpus}-on-{corpus}"),
