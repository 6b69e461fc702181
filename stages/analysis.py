"""Snakemake rules of the analyses (rules/analyses.smk): pipeline.analyses.<rule>.run on
the rule's artifacts (one run of the config, or all of them) with its settings."""

from pipeline.analyses import BY_RULE
from pipeline.logs import run_stage


def main() -> None:
    p = snakemake.params
    # the job reads only what its rule declares (Artifacts.need checks it)
    BY_RULE[snakemake.rule].run(p.artifacts.declaring(snakemake.input), p.settings)


run_stage(snakemake, main)
