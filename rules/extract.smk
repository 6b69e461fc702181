# Every layer's residual stream of a split into a zarr store: one job per split, or
# (extract.parts > 1) one job per part of it, linked into one store by assemble_store.

rule extract:
    input:
        model=path_of(paths.MODEL_MARKER),
        split=path_of(paths.CORPUS_SPLIT),
    output:
        # A summary written after the store is complete. The store itself is not a declared
        # output, so Snakemake never deletes it on failure: a re-run resumes it.
        path_of(paths.STORE_DONE),
    params:
        model_dir=parent_of_input("model"),
        store=path_of(paths.STORE),
        # what this split's store depends on: its own budget, not the other splits'
        extract=lambda w: extract_section(w.model, w.split),
    log:
        log_of("extract", "{model}-{corpus}-{split}"),
    threads: 2
    resources:
        **LARGE,
    conda:
        ENV
    script:
        "../stages/extract.py"


if CFG.extract.parts > 1:

    use rule extract as extract_part with:
        output:
            path_of(paths.STORE_PART_DONE),
        params:
            store=path_of(paths.STORE_PART),
        log:
            log_of("extract_part", "{model}-{corpus}-{split}-{part}"),

    rule assemble_store:
        input:
            expand(path_of(paths.STORE_PART_DONE, part="{part}"), part=range(CFG.extract.parts), allow_missing=True),
        output:
            path_of(paths.STORE_DONE),
        params:
            parts=lambda w: [path_of(paths.STORE_PART, model=w.model, corpus=w.corpus, split=w.split, part=i)
                             for i in range(CFG.extract.parts)],
            store=path_of(paths.STORE),
        log:
            log_of("assemble_store", "{model}-{corpus}-{split}"),
        threads: 1
        resources:
            **SMALL,
        conda:
            ENV
        script:
            "../stages/assemble_store.py"

    ruleorder: assemble_store > extract
