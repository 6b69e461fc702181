# lenspipe: tuned lenses from cached activations. Wiring only; logic lives in pipeline/.
# The config is parsed and checked once (rules/common.smk): the files given with --configfile,
# each standing alone (or layered with `base:`), or config/config.yaml when none is given.
# Each rule file is one group of stages, in the order data flows.

include: "rules/common.smk"
include: "rules/prepare.smk"
include: "rules/extract.smk"
include: "rules/train.smk"
include: "rules/evaluate.smk"
include: "rules/analyses.smk"
include: "rules/report.smk"


rule all:
    input:
        all_stores(),
        all_evaluations(),
        path_of(paths.REPORT),
    default_target: True


onsuccess:
    from pipeline.report import print_summary

    print_summary(all_evaluations(), path_of(paths.REPORT_DIR))
