# One tuned lens per translator kind from the train store (validation store for early
# stopping): one job per lens, or (train.layer_groups > 1) one per layer group, merged.

rule train:
    input:
        model=P(paths.MODEL_MARKER),
        train=P(paths.STORE_DONE, split="train"),
        validation=P(paths.STORE_DONE, split="validation"),
    output:
        lens=P(paths.LENS_META),
        log=P(paths.LENS_LOG),
    params:
        model_dir=parent_of_input("model"),
        train_store=P(paths.STORE, split="train"),
        val_store=P(paths.STORE, split="validation"),
        lens_dir=P(paths.LENS_DIR),
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
            P(paths.LENS_GROUP_META),
        params:
            lens_dir=P(paths.LENS_GROUP_DIR),
        log:
            log_of("train_group", "{model}-{corpus}-{kind}-{group}"),

    rule merge_lens:
        input:
            model=P(paths.MODEL_MARKER),
            groups=expand(P(paths.LENS_GROUP_META, group="{group}"), group=range(CFG.train.layer_groups),
                          allow_missing=True),
        output:
            lens=P(paths.LENS_META),
            log=P(paths.LENS_LOG),
        params:
            model_dir=parent_of_input("model"),
            lens_dir=P(paths.LENS_DIR),
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
