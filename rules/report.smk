# The report: plots, every analysis's section, prompt trajectories; one HTML + Markdown.

rule report:
    input:
        layer_metrics=expand(P(paths.LAYER_METRICS), model=MODELS, corpus=CORPORA),
        calibration=expand(P(paths.CALIBRATION), model=MODELS, corpus=CORPORA),
        analyses=all_analyses,
    output:
        report=P(paths.REPORT),
        html=P(paths.REPORT_HTML),
    params:
        runs=[Artifacts.of(CFG, m, c) for m in MODELS for c in CORPORA],
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
