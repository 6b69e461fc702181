# Every lens at every layer on the held-out split: the Parquet tables.

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
        revision=lambda w: CFG.models[w.model].revision,
        evaluate=lambda w: section(CFG.for_model(w.model).evaluate),
    log:
        log_of("evaluate", "{model}-{corpus}"),
    threads: 2
    resources:
        **LARGE,
    conda:
        ENV
    script:
        "../stages/evaluate.py"
