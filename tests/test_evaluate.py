"""evaluate + tables: invariants of the Parquet tables, the dask.distributed path, bad input."""

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny import VOCAB, make_llama, save_prepared, write_packed_split

from pipeline.config import EvaluateConfig, ExtractConfig, TrainConfig
from pipeline.errors import StoreError
from pipeline.evaluate import evaluate
from pipeline.extract import extract
from pipeline.tables import read_provenance
from pipeline.train import train

IDENT = {"model": "tiny", "revision": None, "corpus": "rand", "split": "test"}
SEQ = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model_dir = save_prepared(make_llama(VOCAB, initializer_range=0.3), root / "model")
    ecfg = ExtractConfig(
        batch_size=4, shard_tokens=64, chunk_tokens=32, dtype="float32", max_tokens={"train": None, "test": None}
    )
    for split, n_seq, seed in (("train", 16, 0), ("test", 8, 1)):
        # test: 4 documents of 2 sequences each, tokens of 1-4 bytes
        write_packed_split(
            root / f"{split}.npz",
            n_seq=n_seq,
            seq_len=SEQ,
            vocab=VOCAB,
            seed=seed,
            n_docs=4 if split == "test" else 1,
            varied_bytes=split == "test",
        )
        extract(model_dir, root / f"{split}.npz", root / f"{split}.zarr", ecfg, split)
    tcfg = TrainConfig(steps=2, batch_tokens=32, val_tokens=32, eval_every=1, checkpoint_every=0)
    train(root / "train.zarr", root / "test.zarr", model_dir, root / "affine", tcfg, "affine")
    return root, model_dir


def run(setup, out, **kw):
    root, model_dir = setup
    cfg = EvaluateConfig(**({"max_tokens": None, "chunk_tokens": 32, "bootstrap": 50} | kw))
    evaluate(root / "test.zarr", root / "test.npz", model_dir, {"affine": root / "affine"}, cfg, out, IDENT)
    return pd.read_parquet(out / "layer_metrics.parquet")


def test_layer_metrics_table_invariants(setup, tmp_path):
    df = run(setup, tmp_path)
    schema = pq.read_schema(tmp_path / "layer_metrics.parquet")
    assert schema.field("layer").type == pa.int64() and schema.field("kl").type == pa.float64()
    assert set(df.lens) == {"logit", "tuned", "model"}
    assert sorted(df[df.lens == "logit"].layer) == [0, 1] and sorted(df[df.lens == "tuned"].layer) == [0, 1]
    model = df[df.lens == "model"].iloc[0]
    assert model.layer == 2 and model.kl == pytest.approx(0, abs=1e-6) and model.agree_top1 == 1
    assert (df.n_tokens == 8 * SEQ).all() and (df.n_predicted == 8 * (SEQ - 1)).all()
    assert (df.kl >= 0).all() and df[["acc", "agree_top1", "agree_topk"]].apply(lambda c: c.between(0, 1)).all().all()
    assert (df.agree_topk >= df.agree_top1).all()
    for m in ("kl", "ce", "acc"):
        assert (df[f"{m}_lo"] <= df[m] + 1e-9).all() and (df[m] <= df[f"{m}_hi"] + 1e-9).all()
    assert np.allclose(df.ppl, np.exp(df.ce))
    # bits per byte = CE nats over all predicted tokens / ln 2 / the bytes of those (next) tokens
    nbytes = np.load(setup[0] / "test.npz")["token_bytes"]
    assert len(set(nbytes.ravel())) > 1
    assert np.allclose(df.bpb, df.ce * df.n_predicted / math.log(2) / nbytes[:, 1:].sum())
    tuned, logit = df[df.lens == "tuned"].set_index("layer"), df[df.lens == "logit"].set_index("layer")
    assert (tuned.kl < logit.kl).all()
    prov = read_provenance(tmp_path / "layer_metrics.parquet")
    assert prov["identity"] == IDENT and prov["lenses"]["affine"] and prov["versions"]["torch"]


def test_calibration_and_token_tables(setup, tmp_path):
    df = run(setup, tmp_path)
    cal = pd.read_parquet(tmp_path / "calibration.parquet")
    counts = cal.groupby(["lens", "layer"])["count"].sum()
    assert (counts == 8 * (SEQ - 1)).all()
    tok = pd.read_parquet(tmp_path / "token_metrics")
    assert len(tok) == 8 * SEQ * (2 + 2 + 1)  # logit 2 layers, tuned 2 layers, model 1
    assert (tok.kl >= 0).all() and tok.top1_prob.between(0, 1).all()
    last = tok[tok.next_token_id < 0]
    assert (last.next_token_rank == -1).all() and len(last) == 8 * 5
    assert set(tok.translator.astype(str)) == {"none", "affine"}
    mean_kl = tok[(tok.lens == "tuned") & (tok.layer == 0)].kl.mean()
    assert mean_kl == pytest.approx(df[(df.lens == "tuned") & (df.layer == 0)].kl.iloc[0], rel=1e-4)


def test_distributed_scheduler_gives_same_numbers(setup, tmp_path):
    from distributed import LocalCluster

    local = run(setup, tmp_path / "local", token_metrics=False)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
        remote = run(setup, tmp_path / "dist", token_metrics=False, scheduler=cluster.scheduler_address)
    pd.testing.assert_frame_equal(local, remote)


def test_store_from_other_corpus_is_refused(setup, tmp_path):
    root, model_dir = setup
    other = write_packed_split(tmp_path / "other.npz", n_seq=8, seq_len=SEQ, vocab=VOCAB, seed=9)
    with pytest.raises(StoreError, match="not extracted from"):
        evaluate(root / "test.zarr", other, model_dir, {}, EvaluateConfig(), tmp_path, IDENT)


def test_report_plots_every_lens_from_the_tables(setup, tmp_path):
    from pipeline.report import calibration_by_lens, plot_calibration, plot_layer_metrics

    df = run(setup, tmp_path)
    cal = pd.read_parquet(tmp_path / "calibration.parquet")
    groups = calibration_by_lens(cal)
    assert set(groups) == {("logit", ""), ("tuned", "affine")}
    assert all(g["count"].sum() > 0 for g in groups.values())
    plot_calibration(cal, tmp_path / "cal.png", 2, "tiny")
    plot_layer_metrics(df, tmp_path / "layers.png", "tiny")
    assert (tmp_path / "cal.png").stat().st_size > 10_000 and (tmp_path / "layers.png").stat().st_size > 10_000


def test_token_table_auto_switch():
    assert EvaluateConfig().want_token_table(4096)
    assert not EvaluateConfig().want_token_table(10**6)
    assert EvaluateConfig(token_metrics=True).want_token_table(10**6)
    assert not EvaluateConfig(token_metrics=False).want_token_table(10)


def test_evaluation_samples_whole_sequences_across_the_store(setup, tmp_path):
    # The store keeps corpus order: its first sequences are its first documents only.
    # 2 of 8 sequences (4 documents of 2) must come one from each half of the store.
    df = run(setup, tmp_path, max_tokens=2 * SEQ)
    ev = read_provenance(tmp_path / "layer_metrics.parquet")["evaluated"]
    first, second = ev["sequences"]
    assert first < 4 <= second and ev["split_sequences"] == ev["sequences"]  # the store holds the whole split
    docs = {f"doc{first // 2}": SEQ, f"doc{second // 2}": SEQ}
    assert ev["documents"] == docs and ev["n_tokens"] == 2 * SEQ
    assert (df.documents == ", ".join(f"{k}={v}" for k, v in docs.items())).all()
    assert (df.n_tokens == 2 * SEQ).all()
    tok = pd.read_parquet(tmp_path / "token_metrics")
    assert set(tok.token_index) == {s * SEQ + p for s in (first, second) for p in range(SEQ)}
    again = run(setup, tmp_path / "again", max_tokens=2 * SEQ)  # deterministic for a seed
    assert read_provenance(tmp_path / "again" / "layer_metrics.parquet")["evaluated"] == ev
    pd.testing.assert_frame_equal(df, again)


def test_report_says_how_each_layer_stopped_and_its_ratio_to_converged(setup, tmp_path, monkeypatch):
    """The report's training table: per layer the stop reason from lens.json, the evaluated
    KL and, for a model and test store the convergence study measured (a converged.json
    entry), the converged KL and the ratio; nothing for another test store."""
    import pipeline.lens.stopping as stopping
    from pipeline.lens.tuned import read_lens_meta
    from pipeline.store.reader import open_store

    root, _ = setup
    df = run(setup, tmp_path)
    prov = read_provenance(tmp_path / "layer_metrics.parquet")
    meta = read_lens_meta(root / "affine")
    monkeypatch.setattr(stopping, "CONVERGED_FILE", tmp_path / "converged.json")
    table = stopping.training_table(df, prov, {"affine": meta})
    stops = meta["metrics"]["stopping"]
    assert list(table.stopped) == [stops["0"]["reason"], stops["1"]["reason"]]
    assert table["converged KL"].isna().all()
    stopping.study_entry(
        meta["model"]["weights_sha256"],
        open_store(root / "train.zarr").attrs["fingerprint"],
        prov["store_fingerprint"],
        prov["evaluate_config"]["max_tokens"],
        {"affine": {"0": 0.5, "1": 0.25}},
        {"by": "test"},
    )
    table = stopping.training_table(df, prov, {"affine": meta})
    kl = df[(df.lens == "tuned")].set_index("layer").kl
    assert table["ratio to converged"].tolist() == [round(kl[0] / 0.5, 3), round(kl[1] / 0.25, 3)]
    assert stopping.converged(meta["model"]["weights_sha256"], "affine", "another store", "test_store") == {}
