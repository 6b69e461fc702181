# The analyses (pipeline/analyses/): one rule per entry of the registry (pipeline.analyses.
# ANALYSES), which names its inputs, outputs, settings, threads and size. Every one runs
# stages/analysis.py, which calls pipeline.analyses.<rule>.run with the rule's artifacts and
# its settings from the config.

for analysis in ANALYSES:

    rule:
        name:
            analysis.rule
        input:
            **analysis_inputs(analysis),
        output:
            analysis_outputs(analysis.rule),
        params:
            **analysis_params(analysis.rule),
        log:
            log_of(analysis.rule, "{model}-{corpus}" if analysis.per_run else "all"),
        threads: analysis.threads
        resources:
            **SIZES[analysis.size],
        conda:
            ENV
        script:
            "../stages/analysis.py"
