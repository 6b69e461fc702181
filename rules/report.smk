# The report: plots, every analysis's section, prompt trajectories; one HTML + Markdown.

rule report:
    input:
        layer_metrics=all_evaluations("layer_metrics"),
        calibration=all_evaluations("calibration"),
        analyses=all_analyses,
        # the prompts' trajectories run each model with its lenses
        models=[path_of(paths.MODEL_MARKER, model=m) for m, c in RUNS],
        lenses=[path_of(paths.LENS_META, model=m, corpus=c, kind=k) for m, c in RUNS for k in KINDS],
        splits=[path_of(paths.CORPUS_SPLIT, model=m, corpus=c, split=EVAL_SPLIT) for m, c in RUNS],
    output:
        report=path_of(paths.REPORT),
        html=path_of(paths.REPORT_HTML),
    params:
        runs=[Artifacts.of(CFG, m, c) for m, c in RUNS],
        kinds=KINDS,
        out_dir=parent_of_output("report"),
        report=section(CFG.report),
        with_analyses=CFG.analyses.enabled,
    log:
        log_of("report", "report"),
    threads: 1
    resources:
        **SMALL,
    conda:
        ENV
    script:
        "../stages/report.py"
