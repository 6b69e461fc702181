"""Lenses at the attention position: training, the lens format, evaluation, the tables, the
analyses of block rows and the attention/MLP split, on a tiny model extracted twice (block
positions only, and block + attention) from the same tokens."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from tiny import VOCAB, make_llama, make_tokenizer, save_prepared, write_packed_split

from pipeline import metrics as M
from pipeline.analyses.attention_mlp import attention_mlp, sequence_bootstrap, summary
from pipeline.analyses.prediction_depth import prediction_depth
from pipeline.analyses.token_categories import token_categories
from pipeline.config import EvaluateConfig, ExtractConfig, TrainConfig
from pipeline.evaluate import evaluate
from pipeline.extract import extract
from pipeline.lens.reference import export_reference
from pipeline.lens.tuned import TunedLens
from pipeline.merge import merge_lens
from pipeline.model.head import load_unembed_head
from pipeline.report import headline, plot_layer_metrics
from pipeline.store.reader import open_store
from pipeline.train import train, train_group

IDENT = {"model": "tiny", "revision": None, "corpus": "rand", "split": "test"}
BOTH = ["block", "attention"]
TRAIN = dict(steps=3, batch_tokens=32, val_tokens=32, eval_every=1, checkpoint_every=0, patience=0)
EVAL = dict(max_tokens=None, chunk_tokens=32, bootstrap=50)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """``blocks/`` and ``inside/``: stores, an affine lens and the evaluation tables of each."""
    root = tmp_path_factory.mktemp("positions")
    model_dir = save_prepared(make_llama(VOCAB, initializer_range=0.3), root / "model")
    make_tokenizer(VOCAB).save_pretrained(model_dir)  # token_categories decodes token ids
    for split, n_seq, seed in (("train", 16, 0), ("test", 8, 1)):
        write_packed_split(root / f"{split}.npz", n_seq=n_seq, seq_len=16, vocab=VOCAB, seed=seed, n_docs=2)
    for name, positions in (("blocks", ["block"]), ("inside", BOTH)):
        d = root / name
        ecfg = ExtractConfig(
            batch_size=4,
            shard_tokens=64,
            chunk_tokens=32,
            dtype="float32",
            positions=positions,
            max_tokens={"train": None, "test": None},
        )
        for split in ("train", "test"):
            extract(model_dir, root / f"{split}.npz", d / f"{split}.zarr", ecfg, split)
        train(d / "train.zarr", d / "test.zarr", model_dir, d / "affine", TrainConfig(**TRAIN), "affine")
        evaluate(
            d / "test.zarr",
            root / "test.npz",
            model_dir,
            {"affine": d / "affine"},
            EvaluateConfig(**EVAL),
            d / "tables",
            IDENT,
        )
    return root


def _lens(setup, name):
    return TunedLens.load(setup / name / "affine", model_dir=setup / "model")


# ------------------------------------------------------------------------ training and the lens format


def test_training_gives_every_lens_position_a_translator(setup):
    lens = _lens(setup, "inside")
    assert lens.layers == [0, 1] and lens.attention_layers == [0, 1]
    assert lens.keys() == [("block", 0), ("attention", 0), ("block", 1), ("attention", 1)]
    meta = json.loads((setup / "inside" / "affine" / "lens.json").read_text())
    assert meta["attention_layers"] == [0, 1]
    assert set(meta["metrics"]["val_kl"]) == {"0", "attn.0", "1", "attn.1"}
    state = load_file(str(setup / "inside" / "affine" / "translators.safetensors"))
    assert {"attn.0.weight", "attn.1.bias", "0.weight"} <= set(state)
    log = pd.read_parquet(setup / "inside" / "affine" / "train_log.parquet")
    assert set(log.position) == {"block", "attention"}
    assert log[log.step == 1][["layer", "position"]].values.tolist() == [
        [0, "block"],
        [0, "attention"],
        [1, "block"],
        [1, "attention"],
    ]
    # trained: not the identity, and not the block translator of its layer either
    assert not torch.equal(lens.translator(("attention", 0)).weight, lens.translator(("block", 0)).weight)


def test_block_translators_do_not_depend_on_the_attention_ones(setup):
    """Each lens position is clipped, validated and stopped on its own, on the same batches:
    the block translators of the lens trained with attention are bitwise the block-only lens's."""
    a, b = _lens(setup, "inside"), _lens(setup, "blocks")
    for layer in (0, 1):
        for k, v in a.translator(("block", layer)).state_dict().items():
            assert torch.equal(v, b.translator(("block", layer)).state_dict()[k])
    meta = json.loads((setup / "blocks" / "affine" / "lens.json").read_text())
    assert "attention_layers" not in meta  # a block-only lens.json is the one of before
    state = load_file(str(setup / "blocks" / "affine" / "translators.safetensors"))
    assert not any(k.startswith("attn.") for k in state)


def test_the_attention_translators_are_least_squares_then_kl_fitted_to_the_last_layer(setup, tmp_path):
    """With no KL steps, an attention translator is the least-squares map attention l -> the
    last layer, which lowers the validation KL below the logit lens's at that position."""
    d = setup / "inside"
    train(
        d / "train.zarr",
        d / "test.zarr",
        setup / "model",
        tmp_path / "ls",
        TrainConfig(**(TRAIN | {"steps": 0})),
        "affine",
    )
    meta = json.loads((tmp_path / "ls" / "lens.json").read_text())["metrics"]
    for key in ("attn.0", "attn.1"):
        assert meta["val_kl"][key] < meta["val_kl_logit_lens"][key]


def test_layer_groups_merge_into_the_one_job_lens(setup, tmp_path):
    d = setup / "inside"
    cfg = TrainConfig(**(TRAIN | {"layer_groups": 2}))
    groups = [tmp_path / f"g{i}" for i in range(2)]
    for i, g in enumerate(groups):
        train_group(d / "train.zarr", d / "test.zarr", setup / "model", g, cfg, "affine", i)
    merged = merge_lens(groups, setup / "model", tmp_path / "merged")
    one = _lens(setup, "inside")
    assert merged.keys() == one.keys()
    for key in one.keys():
        for k, v in one.translator(key).state_dict().items():
            assert torch.equal(v, merged.translator(key).state_dict()[k]), key
    log = pd.read_parquet(tmp_path / "merged" / "train_log.parquet")
    assert log[log.step == 1][["layer", "position"]].values.tolist() == [
        [0, "block"],
        [0, "attention"],
        [1, "block"],
        [1, "attention"],
    ]


def test_the_reference_export_keeps_the_block_translators_and_says_so(setup, tmp_path, caplog):
    lens = _lens(setup, "inside")
    with caplog.at_level(logging.WARNING):
        export_reference(lens, tmp_path / "ref")
    assert "attention position (layers [0, 1]) are not exported" in caplog.text
    state = torch.load(tmp_path / "ref" / "params.pt", weights_only=True)
    assert sorted(state) == ["0.bias", "0.weight", "1.bias", "1.weight"]


# ------------------------------------------------------------------------ evaluation and tables


def test_the_tables_gain_attention_rows_and_keep_the_block_rows(setup):
    """The block rows of an evaluation with attention positions are, value for value, those
    of the block-only evaluation; attention rows sit half-way through their block on the
    depth axis."""
    a = pd.read_parquet(setup / "inside" / "tables" / "layer_metrics.parquet")
    b = pd.read_parquet(setup / "blocks" / "tables" / "layer_metrics.parquet")
    assert set(b.position) == {"block"} and set(a.position) == {"block", "attention"}
    mid = a[a.position == "attention"]
    assert sorted(map(tuple, mid[["lens", "layer"]].values)) == [("logit", 0), ("logit", 1), ("tuned", 0), ("tuned", 1)]
    assert np.allclose(mid.depth, (mid.layer + 0.5) / 2)
    blocks = a[a.position == "block"].reset_index(drop=True)
    metrics = [c for c in b.columns if c not in ("consistency", "consistency_lo", "consistency_hi")]
    pd.testing.assert_frame_equal(blocks[metrics], b[metrics])
    pd.testing.assert_frame_equal(blocks[["consistency"]], b[["consistency"]])  # still block l vs block l + 1
    # in depth order, lens by lens
    tuned = a[a.lens == "tuned"]
    assert list(zip(tuned.layer, tuned.position)) == [(0, "block"), (0, "attention"), (1, "block"), (1, "attention")]
    cal = pd.read_parquet(setup / "inside" / "tables" / "calibration.parquet")
    assert set(cal.position) == {"block", "attention"}


def test_the_kl_at_an_attention_position_by_hand(setup):
    """Evaluation's KL at attention l is the head of the lens's attention translator on the
    store's attn array, against the model's final distribution."""
    d = setup / "inside"
    store, lens = open_store(d / "test.zarr"), _lens(setup, "inside")
    head = load_unembed_head(setup / "model")
    with torch.no_grad():
        final = torch.log_softmax(head(store.layers(store.n_layers)).double(), -1)  # (n, vocab)
        for layer in (0, 1):
            z = head(lens.translator(("attention", layer))(store.attention(layer))).double()
            kl = M.kl_div(final, torch.log_softmax(z, -1)).mean().item()
            lm = pd.read_parquet(d / "tables" / "layer_metrics.parquet")
            row = lm[(lm.lens == "tuned") & (lm.position == "attention") & (lm.layer == layer)].iloc[0]
            assert row.kl == pytest.approx(kl, rel=1e-5)


def test_the_token_table_has_every_position_and_analyses_read_its_block_rows(setup, tmp_path):
    tok = pd.read_parquet(setup / "inside" / "tables" / "token_metrics")
    assert set(tok.position) == {"block", "attention"}
    assert (tok[tok.lens == "model"].position == "block").all()
    for name in ("blocks", "inside"):
        prediction_depth(setup / name / "tables" / "token_metrics", setup / "train.npz", tmp_path / name, taus=[0.5])
        token_categories(
            setup / name / "tables" / "token_metrics", setup / "model", tmp_path / name, translator="affine"
        )
    for table in ("prediction_depth", "early_exit", "token_categories"):
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "inside" / f"{table}.parquet"),
            pd.read_parquet(tmp_path / "blocks" / f"{table}.parquet"),
        )


def test_the_report_draws_attention_positions_as_half_steps(setup, tmp_path):
    df = pd.read_parquet(setup / "inside" / "tables" / "layer_metrics.parquet")
    table = headline(df)
    assert list(table.columns) == [
        "logit lens",
        "tuned (affine)",
        "logit lens @ attention",
        "tuned (affine) @ attention",
    ]
    pd.testing.assert_frame_equal(
        table[["logit lens", "tuned (affine)"]],
        headline(pd.read_parquet(setup / "blocks" / "tables" / "layer_metrics.parquet")),
    )
    plot_layer_metrics(df, tmp_path / "layers.png", "tiny")
    assert (tmp_path / "layers.png").stat().st_size > 10_000


# ------------------------------------------------------------------------ attention vs MLP


def test_the_attention_and_mlp_drops_add_up_to_each_blocks(setup, tmp_path):
    df = attention_mlp(setup / "inside" / "tables" / "token_metrics", tmp_path, translator="affine")
    lm = pd.read_parquet(setup / "inside" / "tables" / "layer_metrics.parquet")
    for lens in ("tuned", "logit"):
        g = df[df.lens == lens]
        kl = lm[(lm.lens == lens) & (lm.position == "block")].sort_values("layer").kl.to_numpy()
        block_drop = kl - np.append(kl[1:], 0.0)  # across block l: KL(block l) - KL(block l + 1)
        att, mlp, diff = (
            g[g.sublayer == s].sort_values("layer").estimate.to_numpy() for s in ("attention", "mlp", "attention - mlp")
        )
        np.testing.assert_allclose(att + mlp, block_drop, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(att - mlp, diff, rtol=1e-6, atol=1e-9)
        mid = lm[(lm.lens == lens) & (lm.position == "attention")].sort_values("layer").kl.to_numpy()
        np.testing.assert_allclose(att, kl - mid, rtol=1e-5, atol=1e-6)
    assert (df.n_sequences == 8).all() and ((df.ci_lo <= df.estimate + 1e-9) & (df.estimate <= df.ci_hi + 1e-9)).all()
    findings = pd.read_parquet(tmp_path / "attention_mlp_findings.parquet")
    assert findings.question.str.contains("layer 1: tuned-lens KL drop of attention minus MLP").any()
    assert (tmp_path / "attention_mlp.png").stat().st_size > 10_000
    assert "attention removes" in summary(df)


def test_a_run_without_attention_positions_says_how_to_get_them(setup, tmp_path):
    df = attention_mlp(setup / "blocks" / "tables" / "token_metrics", tmp_path, translator="affine")
    assert df.empty and "config/inside-blocks.yaml" in summary(df)
    assert pd.read_parquet(tmp_path / "attention_mlp_findings.parquet").empty


def test_the_bootstrap_resamples_whole_sequences():
    w = sequence_bootstrap(8, n_boot=200)
    assert w.shape == (200, 8) and (w.sum(1) == 8).all()  # each resample draws 8 sequences
    assert np.array_equal(w, sequence_bootstrap(8, n_boot=200))  # seeded
    assert (w == 0).any(1).mean() > 0.9  # with replacement: most resamples leave a sequence out


def test_step_scales_are_per_lens_position(setup, tmp_path):
    """``train.step_scale: residual`` measures the residual's scale at every lens position."""
    d = setup / "inside"
    train(
        d / "train.zarr",
        d / "test.zarr",
        setup / "model",
        tmp_path / "s",
        TrainConfig(**(TRAIN | {"step_scale": "residual"})),
        "affine",
    )
    scales = json.loads((tmp_path / "s" / "lens.json").read_text())["metrics"]["residual_scales"]
    assert set(scales) == {"0", "attn.0", "1", "attn.1", "2"}
    store = open_store(d / "train.zarr")
    rms = store.attention(1, 0, 64).double().pow(2).mean(-1).sqrt().median().item()
    assert scales["attn.1"] == pytest.approx(rms)
