# The analyses (pipeline/analyses/): the inputs each reads, its threads and resources.
# Every one runs stages/analysis.py, which calls pipeline.analyses.<rule>.run with the
# rule's artifacts and its settings from the config; the outputs are the registry's.

rule prediction_depth:
    input:
        tables=P(paths.LAYER_METRICS),
        train_split=P(paths.CORPUS_SPLIT, split="train"),
    output:
        analysis_outputs("prediction_depth"),
    params:
        **analysis_params("prediction_depth"),
    log:
        log_of("prediction_depth", "{model}-{corpus}"),
    threads: 1
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule layer_contributions:
    input:
        tables=P(paths.LAYER_METRICS),
        model=P(paths.MODEL_MARKER),
        split=P(paths.CORPUS_SPLIT, split=EVAL_SPLIT),
    output:
        analysis_outputs("layer_contributions"),
    params:
        **analysis_params("layer_contributions"),
    log:
        log_of("layer_contributions", "{model}-{corpus}"),
    threads: 2
    resources:
        **MEDIUM,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule translator_anatomy:
    input:
        lens=P(paths.LENS_META, kind=CFG.analyses.translator),
        model=P(paths.MODEL_MARKER),
    output:
        analysis_outputs("translator_anatomy"),
    params:
        **analysis_params("translator_anatomy"),
    log:
        log_of("translator_anatomy", "{model}-{corpus}"),
    threads: 2
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule token_categories:
    input:
        tables=P(paths.LAYER_METRICS),
        model=P(paths.MODEL_MARKER),
    output:
        analysis_outputs("token_categories"),
    params:
        **analysis_params("token_categories"),
    log:
        log_of("token_categories", "{model}-{corpus}"),
    threads: 1
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule layer_transfer:
    input:
        store=P(paths.STORE_DONE, split=EVAL_SPLIT),
        lens=P(paths.LENS_META, kind=CFG.analyses.translator),
        model=P(paths.MODEL_MARKER),
    output:
        analysis_outputs("layer_transfer"),
    params:
        **analysis_params("layer_transfer"),
    log:
        log_of("layer_transfer", "{model}-{corpus}"),
    threads: 2
    resources:
        **MEDIUM,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule causal_fidelity:
    input:
        store=P(paths.STORE_DONE, split=EVAL_SPLIT),
        lens=P(paths.LENS_META, kind=CFG.analyses.translator),
        model=P(paths.MODEL_MARKER),
    output:
        analysis_outputs("causal_fidelity"),
    params:
        **analysis_params("causal_fidelity"),
    log:
        log_of("causal_fidelity", "{model}-{corpus}"),
    threads: 2
    resources:
        **MEDIUM,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule anomaly_detection:
    input:
        lens=P(paths.LENS_META, kind=CFG.analyses.translator),
        model=P(paths.MODEL_MARKER),
        fit_split=P(paths.CORPUS_SPLIT, split="validation"),
        split=P(paths.CORPUS_SPLIT, split=EVAL_SPLIT),
    output:
        analysis_outputs("anomaly_detection"),
    params:
        **analysis_params("anomaly_detection"),
    log:
        log_of("anomaly_detection", "{model}-{corpus}"),
    threads: 2
    resources:
        **MEDIUM,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule fact_localization:
    input:
        lens=P(paths.LENS_META, kind=CFG.analyses.translator),
        model=P(paths.MODEL_MARKER),
        # its corpus's separator token (manifest.json beside it) starts every prompt
        split=P(paths.CORPUS_SPLIT, split=EVAL_SPLIT),
    output:
        analysis_outputs("fact_localization"),
    params:
        **analysis_params("fact_localization"),
    log:
        log_of("fact_localization", "{model}-{corpus}"),
    threads: 2
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule attention_mlp:
    input:
        # the per-token table beside it, at the attention position too (extract.positions)
        tables=P(paths.LAYER_METRICS),
    output:
        analysis_outputs("attention_mlp"),
    params:
        **analysis_params("attention_mlp"),
    log:
        log_of("attention_mlp", "{model}-{corpus}"),
    threads: 1
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule compare_models:
    input:
        # the per-token tables beside them too (the findings' bootstrap over sequences)
        layer_metrics=run_tables(paths.LAYER_METRICS),
        anatomy=run_tables(paths.INPUTS["translator_anatomy"][0]),
        depth=run_tables(paths.INPUTS["prediction_depth"][0]),
        facts=run_tables(paths.INPUTS["fact_prompts"][0]),
        fact_depths=run_tables(paths.INPUTS["fact_depths"][0]),
    output:
        analysis_outputs("compare_models"),
    params:
        **analysis_params("compare_models"),
    log:
        log_of("compare_models", "all"),
    threads: 1
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/analysis.py"


rule lens_corpus_matrix:
    input:
        # the per-token tables beside them too (the findings' bootstrap over sequences)
        all_evaluations("layer_metrics"),
    output:
        analysis_outputs("lens_corpus_matrix"),
    params:
        **analysis_params("lens_corpus_matrix"),
    log:
        log_of("lens_corpus_matrix", "all"),
    threads: 1
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/analysis.py"
