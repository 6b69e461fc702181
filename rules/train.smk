# One tuned lens per translator kind from the train store (validation store for early
# stopping): one job per lens, or (train.layer_groups > 1) one per layer group, merged.

rule train:
    input:
        model=path_of(paths.MODEL_MARKER),
        train=path_of(paths.STORE_DONE, split="train"),
        validation=path_of(paths.STORE_DONE, split="validation"),
    output:
        lens=path_of(paths.LENS_META),
        log=path_of(paths.LENS_LOG),
    params:
        model_dir=parent_of_input("model"),
        train_store=path_of(paths.STORE, split="train"),
        val_store=path_of(paths.STORE, split="validation"),
        lens_dir=path_of(paths.LENS_DIR),
        train=lambda w: section(CFG.for_model(w.model).train, kinds=[w.kind]),  # a new kind retrains no other
    log:
        log_of("train", "{model}-{corpus}-{kind}"),
    threads: 2
    resources:
        **LARGE,
    conda:
        ENV
    script:
        "../stages/train.py"


if CFG.train.layer_groups > 1:

    use rule train as train_group with:
        output:
            path_of(paths.LENS_GROUP_META),
        params:
            lens_dir=path_of(paths.LENS_GROUP_DIR),
        log:
            log_of("train_group", "{model}-{corpus}-{kind}-{group}"),

    rule merge_lens:
        input:
            model=path_of(paths.MODEL_MARKER),
            groups=expand(path_of(paths.LENS_GROUP_META, group="{group}"), group=range(CFG.train.layer_groups),
                          allow_missing=True),
        output:
            lens=path_of(paths.LENS_META),
            log=path_of(paths.LENS_LOG),
        params:
            model_dir=parent_of_input("model"),
            lens_dir=path_of(paths.LENS_DIR),
        log:
            log_of("merge_lens", "{model}-{corpus}-{kind}"),
        threads: 1
        resources:
            **SMALL,
        conda:
            ENV
        script:
            "../stages/merge_lens.py"

    ruleorder: merge_lens > train
