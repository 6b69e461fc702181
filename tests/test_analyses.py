"""The analyses: invariants of each table on tiny models and hand-made inputs."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from slowed_stage import run as run_stage
from tiny import VOCAB, make_llama, make_tokenizer, save_prepared, write_packed_split

from pipeline.analyses.compare_models import compare_models, comparison_table
from pipeline.analyses.findings import spearman
from pipeline.analyses.layer_contributions import kl_drops, layer_contributions, skip_costs
from pipeline.analyses.layer_transfer import layer_transfer
from pipeline.analyses.lens_corpus_matrix import lens_corpus_matrix
from pipeline.analyses.lens_corpus_matrix import summary as matrix_summary
from pipeline.analyses.prediction_depth import early_exit_of, frequency_buckets, prediction_depth, prediction_depth_of
from pipeline.analyses.token_categories import categorise, category_table, paired_tokens, token_categories
from pipeline.analyses.translator_anatomy import anatomy_tables, effective_rank, linear_map, translator_anatomy
from pipeline.config import AnalysesConfig, ExtractConfig
from pipeline.errors import LenspipeError
from pipeline.extract import extract
from pipeline.lens.translators import make_translator

TAUS = AnalysesConfig().taus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model, its stores, an affine lens and the evaluate tables (token table included)."""
    root = tmp_path_factory.mktemp("analyses")
    save_prepared(make_llama(VOCAB, initializer_range=0.3), root / "model")
    make_tokenizer(VOCAB).save_pretrained(root / "model")  # token_categories decodes token ids
    ecfg = ExtractConfig(
        batch_size=4, shard_tokens=64, chunk_tokens=32, dtype="float32", max_tokens={"train": None, "test": None}
    )
    for split, n_seq, seed in (("train", 16, 0), ("test", 8, 1)):
        write_packed_split(root / f"{split}.npz", n_seq=n_seq, seq_len=16, vocab=VOCAB, seed=seed)
        extract(root / "model", root / f"{split}.npz", root / f"{split}.zarr", ecfg, split)
    run_stage("train", root, root / "affine")
    run_stage("evaluate", root, root / "tables")
    return root


# ------------------------------------------------------------------------ prediction depth, early exit


def test_prediction_depth_by_hand():
    final = torch.tensor([7, 7, 7, 7])
    top1 = torch.tensor(
        [
            [7, 1, 7, 1],  # layer 0
            [7, 1, 1, 1],  # layer 1
            [7, 7, 7, 1],
        ]
    )  # layer 2
    # agrees from layer 0 on -> 0; only at the last layer -> 2; agrees, leaves, returns -> 2; never -> 3
    assert prediction_depth_of(top1, final).tolist() == [0, 2, 2, 3]


def test_early_exit_by_hand():
    final = torch.tensor([5, 5, 5])
    top1 = torch.tensor([[5, 4, 4], [5, 5, 4]])
    prob = torch.tensor([[0.95, 0.2, 0.1], [0.99, 0.92, 0.3]])
    layer, agree = early_exit_of(top1, prob, final, 0.9)
    assert layer.tolist() == [0, 1, 2] and agree.tolist() == [True, True, True]  # token 2 runs the model
    layer, agree = early_exit_of(top1, prob, final, 0.1)
    assert layer.tolist() == [0, 0, 0] and agree.tolist() == [True, False, False]


def test_frequency_buckets():
    train = np.array([3] * 50 + [4] * 5 + list(range(100, 200)))
    labels = frequency_buckets(np.array([3, 4, 150, 999]), train)
    assert labels[0] == "top 10" and labels[1] == "top 10" and labels[2] == "top 11-100"
    assert labels[3] == "rarer or unseen"


def test_prediction_depth_tables(setup, tmp_path):
    tables = prediction_depth(setup / "tables" / "token_metrics", setup / "train.npz", tmp_path, taus=TAUS)
    depth, exits = tables["prediction_depth"], tables["early_exit"]
    assert set(depth.lens) == {"logit", "tuned"} and (tmp_path / "prediction_depth.png").stat().st_size > 10_000
    all_ = depth[depth.bucket == "all"]
    assert np.allclose(all_.groupby("lens").frac.sum(), 1) and all_.depth.between(0, 2).all()
    assert all_.groupby("lens")["count"].sum().eq(8 * 16).all()
    assert depth[depth.bucket != "all"].groupby("lens")["count"].sum().eq(8 * 16).all()
    for _, g in exits.groupby(["lens", "tau"]):
        assert np.isclose(g.exit_frac.sum(), 1) and np.isclose(g.cum_exit_frac.iloc[-1], 1)
    s = exits.drop_duplicates(["lens", "tau"]).sort_values("tau")
    for _, g in s.groupby("lens"):  # a higher bar exits later: fewer layers saved
        assert (np.diff(g.layers_saved_frac) <= 1e-12).all()
    with pytest.raises(LenspipeError, match="token_metrics"):
        prediction_depth(tmp_path / "none", setup / "train.npz", tmp_path, taus=TAUS)


# ------------------------------------------------------------------------ layer contributions


def test_kl_drops_and_spearman():
    assert kl_drops(np.array([3.0, 1.0, 0.5])).tolist() == [2.0, 0.5, 0.5]
    assert spearman(np.array([1, 2, 3]), np.array([10, 20, 30])) == pytest.approx(1)


def next_token_loss(model, ids) -> float:
    """The model's mean next-token loss on ids (batch, pos), by transformers itself."""
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_skipping_a_block_equals_zeroing_its_writes():
    model = make_llama(VOCAB, initializer_range=0.3)
    ids = torch.randint(0, VOCAB, (3, 12))
    base, skipped = skip_costs(model, ids)  # (3,), (3, n_layers): summed over 11 positions each
    assert base.sum() / 33 == pytest.approx(next_token_loss(model, ids), rel=1e-5)
    block = model.model.layers[1]  # a pre-norm block adds attn(o_proj) and mlp(down_proj) outputs
    with torch.no_grad():
        block.self_attn.o_proj.weight.zero_()
        block.mlp.down_proj.weight.zero_()
    assert skipped[:, 1].sum() / 33 == pytest.approx(next_token_loss(model, ids), rel=1e-6)
    assert skipped[:, 1].sum() != pytest.approx(base.sum(), rel=1e-4)


def test_layer_contributions_table(setup, tmp_path):
    df = layer_contributions(
        setup / "tables" / "layer_metrics.parquet",
        setup / "tables" / "token_metrics",
        setup / "model",
        setup / "test.npz",
        tmp_path,
        translator="affine",
        skip_tokens=32,
    )
    assert df.block.tolist() == [0, 1] and sorted(df.rank_lens) == [1, 2] and sorted(df.rank_skip) == [1, 2]
    lm = pd.read_parquet(setup / "tables" / "layer_metrics.parquet")
    tuned = lm[lm.lens == "tuned"].sort_values("layer").kl.to_numpy()
    assert np.isclose(df.kl_drop_all.sum(), tuned[0])  # the drops telescope to the layer-0 KL
    assert (df.sample_tokens == 32).all() and (tmp_path / "layer_contributions.png").exists()


def _model(setup):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(setup / "model", dtype=torch.float32).eval()


def test_layer_contributions_skip_and_kl_share_tokens(setup, tmp_path):
    # Block skipping once ran on the split's first sequences while the KL drops came from
    # the evaluated tokens: two different samples. Both must be the same evaluated tokens.
    from pipeline.corpus import load_split
    from pipeline.tables import read_provenance

    df = layer_contributions(
        setup / "tables" / "layer_metrics.parquet",
        setup / "tables" / "token_metrics",
        setup / "model",
        setup / "test.npz",
        tmp_path,
        translator="affine",
        skip_tokens=32,
    )
    prov = read_provenance(tmp_path / "layer_contributions.parquet")
    evaluated = read_provenance(setup / "tables" / "layer_metrics.parquet")["evaluated"]
    seqs, split_seqs = prov["sample_sequences"], prov["sample_split_sequences"]
    assert len(seqs) == 2 and set(seqs) <= set(evaluated["sequences"]) and seqs != [0, 1]
    packed = load_split(setup / "test.npz")
    ids = torch.from_numpy(packed.tokens[split_seqs]).long()
    assert df.base_ce.iloc[0] == pytest.approx(next_token_loss(_model(setup), ids), rel=1e-5)
    tokens = pd.read_parquet(setup / "tables" / "token_metrics")
    mine = tokens[(tokens.lens == "tuned") & tokens.token_index.isin([s * 16 + p for s in seqs for p in range(16)])]
    kl = mine.groupby("layer").kl.mean().to_numpy(np.float64)
    np.testing.assert_allclose(df.kl_drop, kl - np.append(kl[1:], 0.0), rtol=1e-6)


# ------------------------------------------------------------------------ translator anatomy


def test_identity_translators_have_distance_zero_and_full_rank():
    d = 8
    df, spectra = anatomy_tables(
        {0: make_translator("affine", d), 1: make_translator("linear", d), 2: make_translator("scaling", d)}
    )
    assert np.allclose(df.rel_dist_identity, 0) and np.allclose(df.effective_rank, d)
    assert np.allclose(df.bias_norm, 0) and df.cos_next.isna().all()  # no deviation to compare
    assert np.allclose(spectra.singular_value, 1) and len(spectra) == 3 * d


def test_linear_map_reproduces_each_translator():
    torch.manual_seed(0)
    h = torch.randn(5, 8, dtype=torch.float64)
    for kind in ("affine", "linear", "scaling"):
        t = make_translator(kind, 8).double()
        with torch.no_grad():
            for p in t.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        a, b = linear_map(t)
        torch.testing.assert_close(h @ a.T + b, t(h))
    with pytest.raises(LenspipeError, match="linear translator"):
        linear_map(make_translator("mlp", 8))
    assert effective_rank(torch.tensor([1.0, 0.0, 0.0])) == pytest.approx(1)


def test_translator_anatomy_of_a_trained_lens(setup, tmp_path):
    df = translator_anatomy(setup / "affine", setup / "model", tmp_path)
    assert df.layer.tolist() == [0, 1] and (df.rel_dist_identity > 0).all()
    assert df.cos_next.iloc[:-1].between(-1, 1).all() and np.isnan(df.cos_next.iloc[-1])
    assert (df.effective_rank <= df.d_model).all() and (tmp_path / "translator_anatomy.png").exists()


# ------------------------------------------------------------------------ token categories


@pytest.mark.parametrize(
    "text,cat",
    [
        (" the", "word start"),
        ("ing", "word piece"),
        ("\n", "whitespace"),
        (",", "punctuation"),
        (" 42", "number"),
        (" HAMLET", "all caps"),
        ("é2x", "other"),
        (" don't", "word start"),
    ],
)
def test_categorise(text, cat):
    assert categorise(text) == cat


def test_category_table_invariants(setup, tmp_path):
    df = token_categories(setup / "tables" / "token_metrics", setup / "model", tmp_path, translator="affine")
    assert np.allclose(df.kl_gap, df.kl_logit - df.kl_tuned) and df.top1_disagree.between(0, 1).all()
    assert (df.groupby("layer").n.sum() == 8 * 15).all()  # every position with a next token, once per layer
    # a "tuned" lens that is the logit lens: no disagreement, no KL gap
    tokens = pd.read_parquet(setup / "tables" / "token_metrics")
    tokens = tokens.assign(lens=tokens.lens.astype(str), translator=tokens.translator.astype(str))
    logit = tokens[tokens.lens == "logit"]
    both = paired_tokens(
        pd.concat([logit, logit.assign(lens="tuned", translator="affine")]),
        pd.Series("x", index=np.sort(logit.token_index.unique()), dtype=object),
        "affine",
    )
    same = category_table(both, "affine")
    assert len(same) == 2 and (same.top1_disagree == 0).all() and (same.kl_gap == 0).all()
    findings = pd.read_parquet(tmp_path / "token_categories_findings.parquet")
    assert (findings.n <= 8).all()  # at most the 8 evaluated sequences: resampled by sequence


# ------------------------------------------------------------------------ layer transfer, comparison


def test_layer_transfer_diagonal_is_the_tuned_lens(setup, tmp_path):
    df = layer_transfer(
        setup / "test.zarr", setup / "model", setup / "affine", tmp_path, transfer_tokens=10_000, transfer_stride=1
    )  # every token: comparable to evaluate
    assert len(df) == 3 * 2 and (df.kl >= 0).all()
    lm = pd.read_parquet(setup / "tables" / "layer_metrics.parquet")
    for lens, layer_key in (("tuned", lambda j: j), ("logit", lambda j: -1)):
        want = lm[lm.lens == lens].set_index("layer").kl
        for j in (0, 1):
            got = df[(df.lens_layer == layer_key(j)) & (df.hidden_layer == j)].kl.item()
            assert got == pytest.approx(want[j], rel=1e-4)


def test_compare_models_concatenates_runs(setup, tmp_path):
    lm = pd.read_parquet(setup / "tables" / "layer_metrics.parquet")
    other = lm.assign(model="other")
    p = tmp_path / "other.parquet"
    other.to_parquet(p)
    df = compare_models([setup / "tables" / "layer_metrics.parquet", p], tmp_path)
    assert set(df.model) == {"tiny", "other"} and "model" not in set(df.lens)
    assert (df.n_layers == 2).all() and np.allclose(df.depth, df.layer / 2)
    assert len(comparison_table([lm])) == len(lm) - 1 and (tmp_path / "compare_models.png").exists()
    assert pd.read_parquet(tmp_path / "compare_anatomy.parquet").empty  # not given: empty tables


def test_compare_models_puts_anatomy_and_prediction_depth_side_by_side(setup, tmp_path):
    """Two runs of different depth: anatomy and prediction depth on the normalised axis."""
    from pipeline.analyses.compare_models import summary

    run_a = tmp_path / "a"
    translator_anatomy(setup / "affine", setup / "model", run_a)
    prediction_depth(setup / "tables" / "token_metrics", setup / "train.npz", run_a, taus=TAUS)
    lm = pd.read_parquet(setup / "tables" / "layer_metrics.parquet")
    # a second "model" with twice the layers: layer l of it is at depth l / 4
    deep = pd.concat([lm.assign(layer=lm.layer * 2), lm[lm.lens != "model"].assign(layer=lm.layer * 2 + 1)])
    deep = deep.assign(model="deep", depth=deep.layer / 4)
    anat = pd.read_parquet(run_a / "translator_anatomy.parquet")
    anat = pd.concat([anat.assign(layer=anat.layer * 2), anat.assign(layer=anat.layer * 2 + 1)])
    pdep = pd.read_parquet(run_a / "prediction_depth.parquet")
    pdep = pdep.assign(depth=pdep.depth * 2, n_layers=4)  # settling layers of a 4-layer model
    paths = {}
    for name, df in {"lm": deep, "anat": anat, "pdep": pdep}.items():
        paths[name] = tmp_path / f"{name}.parquet"
        df.to_parquet(paths[name])
    compare_models(
        [setup / "tables" / "layer_metrics.parquet", paths["lm"]],
        tmp_path / "out",
        [run_a / "translator_anatomy.parquet", paths["anat"]],
        [run_a / "prediction_depth.parquet", paths["pdep"]],
    )
    a = pd.read_parquet(tmp_path / "out" / "compare_anatomy.parquet")
    assert set(a.model) == {"tiny", "deep"} and dict(a.groupby("model").n_layers.first()) == {"deep": 4, "tiny": 2}
    assert np.allclose(a.depth, a.layer / a.n_layers) and np.allclose(
        a.effective_rank_frac, a.effective_rank / a.d_model
    )
    d = pd.read_parquet(tmp_path / "out" / "compare_depth.parquet")
    assert np.allclose(d.depth, d.pred_layer / d.n_layers)
    last = d.sort_values("pred_layer").groupby(["model", "lens", "bucket"]).cum_frac.last()
    assert np.allclose(last[last > 0], 1.0)  # every token settles somewhere (or never: n_layers)
    text = summary(
        *(
            pd.read_parquet(tmp_path / "out" / f"{t}.parquet")
            for t in ("compare_models", "compare_anatomy", "compare_depth")
        )
    )
    assert "deep/" in text and "half the tokens settled by depth" in text and "of d_model" in text
    assert (tmp_path / "out" / "compare_models.png").stat().st_size > 10_000


def test_lens_corpus_matrix_ratios(setup, tmp_path):
    """A cross-corpus table (same rows, tuned KL doubled) gives twice the diagonal's ratio."""
    lm = pd.read_parquet(setup / "tables" / "layer_metrics.parquet")
    corpus = lm.corpus.iloc[0]
    other = lm.assign(corpus="other", kl=np.where(lm.lens == "tuned", 2 * lm.kl, lm.kl))
    p = tmp_path / "other.parquet"
    other.to_parquet(p)
    df = lens_corpus_matrix([setup / "tables" / "layer_metrics.parquet", p], tmp_path)
    own, cross = df[df.in_domain], df[~df.in_domain]
    assert set(df.train_corpus) == {corpus} and set(cross.corpus) == {"other"} and len(own) == len(cross)
    tuned, logit = lm[lm.lens == "tuned"].set_index(["translator", "layer"]), lm[lm.lens == "logit"].set_index("layer")
    for r in own.itertuples():
        assert r.kl_ratio == tuned.kl[(r.translator, r.layer)] / logit.kl[r.layer]
    assert np.allclose(cross.kl_ratio.to_numpy(), 2 * own.kl_ratio.to_numpy())
    assert (tmp_path / "lens_corpus_matrix.png").exists() and "on other" in matrix_summary(df)
