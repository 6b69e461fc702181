"""The analyses that run the model themselves (causal fidelity, anomaly detection, fact
localization): invariants on a tiny model whose vocabulary is its tokenizer's."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from slowed_stage import run as run_stage
from tiny import make_llama, make_tokenizer, save_prepared, write_packed_split

from pipeline.analyses.anomaly_detection import TYPES, anomaly_detection, auroc_ci, detector_scores, splice, windows
from pipeline.analyses.causal_fidelity import (
    causal_basis,
    causal_fidelity,
    derangement,
    objective,
    random_basis,
    resample_ablate,
)
from pipeline.analyses.fact_localization import fact_localization, first_layer, load_facts
from pipeline.analyses.live import load_live
from pipeline.config import ExtractConfig
from pipeline.errors import LenspipeError
from pipeline.extract import extract


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A tiny Llama with its own tokenizer, train/validation/test splits and stores, an affine lens."""
    root = tmp_path_factory.mktemp("live")
    tok = make_tokenizer()
    save_prepared(make_llama(len(tok), initializer_range=0.3), root / "model")
    tok.save_pretrained(root / "model")
    ecfg = ExtractConfig(
        batch_size=4, shard_tokens=64, chunk_tokens=32, dtype="float32", max_tokens={"train": None, "test": None}
    )
    for split, n_seq, seed in (("train", 16, 0), ("validation", 12, 2), ("test", 24, 1)):
        write_packed_split(root / f"{split}.npz", n_seq=n_seq, seq_len=16, vocab=len(tok), seed=seed)
    for split in ("train", "test"):
        extract(root / "model", root / f"{split}.npz", root / f"{split}.zarr", ecfg, split)
    run_stage("train", root, root / "affine")
    return root


# ------------------------------------------------------------------------ causal fidelity


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_ablating_zero_directions_changes_nothing(live):
    """An ablation resumes the model at the ablated layer (pipeline.model.resume): along no
    direction it gives the model's own logits bitwise, along one it changes them, and it is
    the model with its block input replaced (a pre-hook, the way the paper's ablation runs)."""
    from pipeline.model.parts import find_parts
    from pipeline.model.resume import Resumable

    model = load_live(live / "model", live / "affine").model
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    base = _logits(model, ids)
    r = Resumable(model, ids)
    flat = r.resid[1].flatten(0, 1)
    donor = torch.from_numpy(derangement(24, 0))
    none = resample_ablate(flat, flat[donor], torch.zeros(32, 0)).view_as(r.resid[1])
    assert torch.equal(r.logits_from(1, none), base)  # bitwise: V V^T = 0
    one = resample_ablate(flat, flat[donor], random_basis(32, 1, 0).float()).view_as(r.resid[1])
    ablated = r.logits_from(1, one)
    assert not torch.allclose(ablated, base, atol=1e-4)  # one direction does change it
    handle = find_parts(model).blocks[1].register_forward_pre_hook(lambda _m, args: (one, *args[1:]))
    try:
        torch.testing.assert_close(_logits(model, ids), ablated, rtol=0, atol=1e-6)
    finally:
        handle.remove()


def test_resampling_every_direction_swaps_the_residual():
    h, other = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    torch.testing.assert_close(resample_ablate(h, other, random_basis(8, 8, 1)), other)
    assert torch.equal(resample_ablate(h, other, torch.zeros(8, 0, dtype=torch.float64)), h)
    perm = derangement(7, 3)
    assert sorted(perm.tolist()) == list(range(7)) and (perm != np.arange(7)).all()


def test_causal_basis_finds_the_sensitive_direction():
    # the lens responds to coordinate 2 only, and every coordinate varies alike: CBE picks e_2
    gen = torch.Generator().manual_seed(0)
    c = torch.randn(400, 6, generator=gen, dtype=torch.float64)
    g = torch.zeros(400, 6, dtype=torch.float64)
    g[:, 2] = torch.randn(400, generator=gen, dtype=torch.float64)
    V = causal_basis(g, c - c.mean(0), 3)
    torch.testing.assert_close(V.T @ V, torch.eye(3, dtype=torch.float64))  # orthonormal
    assert abs(V[2, 0]) > 0.99
    S = c.T @ c / 399
    e = torch.eye(6, dtype=torch.float64)
    assert objective(V[:, 0], g, c, S) >= objective(e[2], g, c, S) > 0  # the optimum, at least as good as e_2
    assert objective(e[0], g, c, S) == 0  # a direction the lens ignores has no effect


def test_causal_fidelity_tables(live, tmp_path):
    tables = causal_fidelity(
        live / "test.zarr",
        live / "model",
        live / "affine",
        tmp_path,
        causal_layers=3,
        causal_directions=3,
        causal_random=2,
        causal_tokens=32,
    )
    df, agree = tables["causal_fidelity"], tables["causal_agreement"]
    assert sorted(df.layer.unique()) == [0, 1] and len(df) == 2 * (3 + 2)
    assert (df.lens_kl >= 0).all() and (df.model_kl >= 0).all() and (df.sample_tokens == 32).all()
    assert set(agree.directions) == {"causal", "random", "all"} and agree.spearman.dropna().between(-1, 1).all()
    assert (tmp_path / "causal_fidelity.png").stat().st_size > 10_000


# ------------------------------------------------------------------------ anomaly detection


def test_auroc_of_one_distribution_against_itself_is_one_half_within_its_ci():
    rng = np.random.default_rng(0)
    a = rng.normal(size=60)
    assert auroc_ci(a, a)[0] == pytest.approx(0.5, abs=1e-12)  # the very same scores: every pair ties
    auc, lo, hi = auroc_ci(a, rng.normal(size=60))  # two samples of one distribution
    assert lo <= 0.5 <= hi and lo < auc < hi
    auc, lo, hi = auroc_ci(a, a + 5)
    assert auc == 1 and lo == pytest.approx(1)


def test_auroc_ci_matches_sklearn_resample_by_resample():
    """The pair-matrix AUROC and its bootstrap give sklearn's values on the same draws."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    normal, anomalous = rng.integers(0, 6, 17).astype(float), rng.integers(2, 9, 11).astype(float)  # ties
    y = np.r_[np.zeros(17), np.ones(11)]
    draws = np.random.default_rng(3)
    boot = [roc_auc_score(y, np.r_[draws.choice(normal, 17), draws.choice(anomalous, 11)]) for _ in range(200)]
    auc, lo, hi = auroc_ci(normal, anomalous, n_boot=200, seed=3)
    assert auc == pytest.approx(roc_auc_score(y, np.r_[normal, anomalous]), abs=1e-12)
    assert (lo, hi) == pytest.approx(tuple(np.percentile(boot, [2.5, 97.5])), abs=1e-12)


def test_detector_scores_outliers_higher_and_identical_inputs_alike():
    rng = np.random.default_rng(0)
    fit = rng.normal(size=(80, 4))
    normal, far = rng.normal(size=(30, 4)), rng.normal(size=(30, 4)) + 6
    s = detector_scores(fit, np.r_[normal, far])
    assert s[30:].min() > s[:30].mean()
    assert auroc_ci(detector_scores(fit, normal), detector_scores(fit, normal))[0] == pytest.approx(0.5, abs=1e-12)


def test_windows_and_splice():
    tokens = np.arange(20 * 16).reshape(20, 16)
    w = windows(tokens, 5, 8, 0)
    assert w.shape == (5, 8) and (np.diff(w, axis=1) == 1).all()  # contiguous pieces of sequences
    assert len({r[0] // 16 for r in w}) == 5  # from 5 different sequences
    many = windows(tokens, 30, 8, 0)  # more windows than sequences: aligned slots, never overlapping
    assert many.shape == (30, 8) and (np.diff(many, axis=1) == 1).all() and len(set(many.ravel())) == 30 * 8
    assert len({r[0] // 16 for r in many}) == 20  # every sequence used
    with pytest.raises(LenspipeError, match="disjoint windows"):
        windows(tokens, 41, 8, 0)  # 20 sequences hold 40 such windows
    out = splice(w, [[-1, -2, -3]], 0)
    assert out.shape == w.shape
    for row, base in zip(out, w):
        at = int(np.flatnonzero(row == -1)[0])
        assert row[at : at + 3].tolist() == [-1, -2, -3] and row[:at].tolist() == base[:at].tolist()


def test_anomaly_detection_tables(live, tmp_path):
    tables = anomaly_detection(
        live / "model",
        live / "affine",
        live / "validation.npz",
        live / "test.npz",
        tmp_path,
        anomaly_sequences=7,
        anomaly_other=3,
        anomaly_tokens=12,
        anomaly_stride=1,
    )
    df, scores = tables["anomaly_detection"], tables["anomaly_scores"]
    assert len(df) == len(TYPES) * 3 and df.auroc.between(0, 1).all()
    assert ((df.auroc_lo <= df.auroc + 1e-12) & (df.auroc <= df.auroc_hi + 1e-12)).all()
    assert (df.n_fit == 7).all() and (df.n_normal == 7).all() and (df.window_tokens == 12).all()
    assert df.groupby("anomaly").n_anomalous.first().to_dict() == {
        "control": 7,
        "injection": 7,
        "shuffled": 3,
        "code": 3,
    }
    assert set(scores.group) == {"fit", "normal", *TYPES}
    findings = pd.read_parquet(tmp_path / "anomaly_detection_findings.parquet")
    control = findings[findings.question.str.startswith("AUROC, control")]
    assert len(control) == 3 and (control.test == "includes").all()
    assert (findings.verdict[findings.n < 8] == "not resolved at this sample size").all()
    assert (tmp_path / "anomaly_detection.png").stat().st_size > 10_000


# ------------------------------------------------------------------------ fact localization


def test_first_layer_by_hand():
    rank = np.array(
        [
            [9, 3, 0, 7],  # layer 0
            [0, 2, 5, 7],  # layer 1
            [0, 0, 0, 7],
        ]
    )  # layer 2 (the last lens layer)
    assert first_layer(rank, 1).tolist() == [1, 2, 0, 3]  # 3 = n_layers: only at the output
    assert first_layer(rank, 5).tolist() == [1, 0, 0, 3]
    # top-1 at the last lens layer: a depth below n_layers; top-5 is never later than top-1
    assert (first_layer(rank, 1)[rank[-1] == 0] < rank.shape[0]).all()
    assert (first_layer(rank, 5) <= first_layer(rank, 1)).all()


def _facts_file(live, path):
    """Prompts whose answer the tiny model ranks top-1 (found by search), one it does not,
    one whose answer is several tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(live / "model")
    model = load_live(live / "model", live / "affine").model
    lines = []
    for w in [
        "fairest",
        "creatures",
        "desire",
        "increase",
        "thereby",
        "beauty",
        "riper",
        "should",
        "decease",
        "tender",
        "memory",
    ]:
        for p in (w, f"But {w}", f"{w} thy", f"Thou art {w}"):
            top = int(_logits(model, torch.tensor([tok(p, add_special_tokens=False)["input_ids"]]))[0, -1].argmax())
            text = tok.decode([top])
            if text.startswith(" ") and len(text) > 1 and tok(text, add_special_tokens=False)["input_ids"] == [top]:
                lines.append(f"found\t{p}\t{text[1:]}")
    assert lines, "no prompt of the tiny model has a one-token top-1"
    path.write_text("\n".join(["# test facts", *lines, "wrong\tFrom fairest\tzzzz", "long\tFrom\tcreatures desire"]))
    return len(lines)


def test_fact_localization_keeps_only_the_models_top1(live, tmp_path):
    n_found = _facts_file(live, tmp_path / "facts.tsv")
    assert len(load_facts(tmp_path / "facts.tsv")) == n_found + 2
    t = fact_localization(
        live / "model", live / "affine", live / "test.npz", tmp_path, sets={"test": tmp_path / "facts.tsv"}
    )
    prompts, layers, depths = t["fact_prompts"], t["fact_layers"], t["fact_depths"]
    assert set(prompts.fact_set) == {"test"}
    assert prompts.kept.sum() == n_found and not prompts.kept[prompts.category != "found"].any()
    assert set(prompts.dropped[~prompts.kept]) <= {"not the model's top-1", "answer is not one token"}
    assert len(layers) == n_found * 2 * 2 and len(depths) == n_found * 2  # 2 lenses x 2 lens layers
    assert depths.depth_top1.between(0, 2).all() and (depths.depth_top5 <= depths.depth_top1).all()
    last = layers[layers.layer == 1].set_index(["fact", "lens"])["rank"]
    top1_last = depths.set_index(["fact", "lens"]).depth_top1[last == 0]
    assert (top1_last < 2).all()  # top-1 at the last lens layer: depth below n_layers
    assert (tmp_path / "fact_localization.png").stat().st_size > 10_000


def test_fact_localization_with_no_prompt_kept_writes_empty_tables(live, tmp_path):
    t = fact_localization(live / "model", live / "affine", live / "test.npz", tmp_path)  # the shipped facts
    prompts = t["fact_prompts"]
    assert set(prompts.fact_set) == {"statements", "cloze"} and not prompts.kept.any()
    assert (prompts.groupby("fact_set").size() >= 99).all() and prompts.fact.is_unique
    assert len(pd.read_parquet(tmp_path / "fact_layers.parquet")) == 0
    from pipeline.analyses.fact_localization import summary

    assert summary(*t.values()).startswith("statements: 0 of ")
    findings = pd.read_parquet(tmp_path / "fact_localization_findings.parquet")
    assert (findings.verdict == "not resolved at this sample size").all()  # nothing kept: nothing resolved


def test_text_outside_the_cache_gets_the_corpus_separator_first(live, tmp_path):
    """Prompts run as cached documents begin: with the separator token of the split's corpus
    (its manifest), so the residual at the prompt's end is that of [separator] + prompt."""
    import json
    import shutil

    from pipeline.analyses.fact_localization import prompt_states
    from pipeline.analyses.live import forward, text_ids, tokenizer
    from pipeline.corpus import split_separator

    shutil.copy(live / "test.npz", tmp_path / "test.npz")
    assert split_separator(tmp_path / "test.npz") is None  # no manifest: none known
    (tmp_path / "manifest.json").write_text(json.dumps({"separator_id": 1}))
    sep = split_separator(tmp_path / "test.npz")
    tok, lv = tokenizer(live / "model"), load_live(live / "model", live / "affine")
    assert sep == 1 and text_ids(tok, "But thy", sep) == [1, *tok("But thy", add_special_tokens=False)["input_ids"]]
    states, _ = prompt_states(lv, tok, ["But thy"], sep)
    resid, _ = forward(lv, torch.tensor([text_ids(tok, "But thy", sep)]))
    assert torch.equal(states[0], resid[:, 0, -1])
    without, _ = prompt_states(lv, tok, ["But thy"], None)
    assert not torch.allclose(without, states)
