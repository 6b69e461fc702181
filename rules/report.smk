# The report: plots, every analysis's section, prompt trajectories; one HTML + Markdown.

rule report:
    input:
        layer_metrics=all_evaluations("layer_metrics"),
        calibration=all_evaluations("calibration"),
        analyses=all_analyses,
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
