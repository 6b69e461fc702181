"""train: the fused KL loss, every translator kind, determinism, resume, bad input."""

import pyarrow.parquet as pq
import pytest
import torch
from tiny import VOCAB, make_llama, save_prepared, tiny_model, write_packed_split

import pipeline.train as tr
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.errors import ConfigError, StoreError
from pipeline.extract import extract
from pipeline.lenses import TunedLens
from pipeline.train import KLFromLogits, kl_loss, train

SMALL_EXTRACT = ExtractConfig(batch_size=4, shard_tokens=64, chunk_tokens=32, max_tokens={"train": None, "test": None},
                              dtype="float32")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    # a large init makes the tiny model's predictions peaked, so lenses have something to learn
    model_dir = save_prepared(make_llama(VOCAB, initializer_range=0.3), root / "model")
    for split, n_seq, seed in (("train", 24, 0), ("test", 8, 1)):
        packed = write_packed_split(root / f"{split}.npz", n_seq=n_seq, seq_len=16, vocab=VOCAB, seed=seed)
        extract(model_dir, packed, root / f"{split}.zarr", SMALL_EXTRACT, split)
    return root, model_dir


def cfg(**kw):
    base = dict(steps=6, batch_tokens=64, val_tokens=64, eval_every=2, patience=0, checkpoint_every=2)
    return TrainConfig(**(base | kw))


def run(tiny_run, out, kind="affine", **kw):
    root, model_dir = tiny_run
    metrics = train(root / "train.zarr", root / "test.zarr", model_dir, out, cfg(**kw), kind)
    return metrics, TunedLens.load(out, model_dir=model_dir)


def test_fused_kl_matches_autograd_and_distributions():
    torch.manual_seed(0)
    z = torch.randn(5, 11, dtype=torch.float64, requires_grad=True)
    target = torch.log_softmax(torch.randn(5, 11, dtype=torch.float64), -1)
    fused = kl_loss(z, target)
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=target),
                                            torch.distributions.Categorical(logits=z)).mean()
    torch.testing.assert_close(fused, ref)
    (g,) = torch.autograd.grad(fused, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g, g_ref)
    p = target.exp()
    assert torch.autograd.gradcheck(lambda x: KLFromLogits.apply(x, p, (p * target).sum()), (z,))


@pytest.mark.parametrize("kind", ["affine", "linear", "mlp", "scaling"])
def test_every_kind_trains_saves_and_logs(tiny_run, tmp_path, kind):
    metrics, lens = run(tiny_run, tmp_path / kind, kind)
    assert lens.kind == kind and lens.layers == [0, 1]
    for layer in ("0", "1"):
        assert metrics["val_kl"][layer] <= metrics["val_kl_init"][layer]
    table = pq.read_table(tmp_path / kind / "train_log.parquet").to_pandas()
    assert set(table.layer) == {0, 1} and table.step.max() == 6
    assert table.val_kl.notna().sum() == 2 * 4  # steps 0, 2, 4, 6
    assert (table.dropna(subset=["train_loss"]).train_loss >= 0).all()


def test_least_squares_init_beats_logit_lens(tiny_run, tmp_path):
    metrics, _ = run(tiny_run, tmp_path / "ls", steps=0)
    assert metrics["init"] == "lstsq"
    for layer, v in metrics["val_kl_init"].items():
        assert v < metrics["val_kl_logit_lens"][layer]


def _params(lens):
    return {k: v.clone() for k, v in lens.translators.state_dict().items()}


def test_deterministic_with_seed_and_seed_matters(tiny_run, tmp_path):
    _, a = run(tiny_run, tmp_path / "a", init="identity", seed=3)
    _, b = run(tiny_run, tmp_path / "b", init="identity", seed=3)
    _, c = run(tiny_run, tmp_path / "c", init="identity", seed=4)
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_interrupted_training_resumes_to_identical_lens(tiny_run, tmp_path, monkeypatch):
    _, ref = run(tiny_run, tmp_path / "ref", init="identity", optimizer="adam")
    calls = {"n": 0}
    real = tr.train_step

    def crash_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_run, tmp_path / "x", init="identity", optimizer="adam")
    assert (tmp_path / ".x.ckpt.pt").exists() and not (tmp_path / "x").exists()
    monkeypatch.setattr(tr, "train_step", real)
    _, resumed = run(tiny_run, tmp_path / "x", init="identity", optimizer="adam")
    p_ref, p_res = _params(ref), _params(resumed)
    assert all(torch.equal(p_ref[k], p_res[k]) for k in p_ref)
    assert not (tmp_path / ".x.ckpt.pt").exists()


def test_layer_groups_merge(tiny_run, tmp_path):
    _, a = run(tiny_run, tmp_path / "g0", layers=[0])
    _, b = run(tiny_run, tmp_path / "g1", layers=[1])
    assert a.merge(b).layers == [0, 1]


def test_bad_input(tiny_run, tmp_path):
    root, _ = tiny_run
    other = save_prepared(tiny_model("qwen3"), tmp_path / "other")
    with pytest.raises(StoreError, match="extracted from model weights"):
        train(root / "train.zarr", root / "test.zarr", other, tmp_path / "o", cfg(), "affine")
    with pytest.raises(ConfigError, match="unknown"):
        TrainConfig(kinds=["quadratic"])
    with pytest.raises(ConfigError, match="non-empty list"):
        TrainConfig(layers=[])
    with pytest.raises(ConfigError, match="out of range"):
        run(tiny_run, tmp_path / "o", layers=[0, 7])


def test_layer_groups_split_evenly_and_merge_into_one_lens(tiny_run, tmp_path):
    from pipeline.merge import merge_lens
    from pipeline.train import train_group

    groups = TrainConfig(layer_groups=3)
    assert [groups.group_layers(8, g) for g in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    with pytest.raises(ConfigError, match="exceeds the 2 layers"):
        groups.group_layers(2, 0)
    root, model_dir = tiny_run
    for g in (0, 1):
        train_group(root / "train.zarr", root / "test.zarr", model_dir, tmp_path / f"g{g}", cfg(layer_groups=2), "affine", g)
    merged = merge_lens([tmp_path / "g0", tmp_path / "g1"], model_dir, tmp_path / "lens")
    assert merged.layers == [0, 1]
    again = TunedLens.load(tmp_path / "lens", model_dir=model_dir)
    parts = [TunedLens.load(tmp_path / f"g{g}", model_dir=model_dir) for g in (0, 1)]
    for g, part in enumerate(parts):
        assert torch.equal(again.translators[str(g)].weight, part.translators[str(g)].weight)
    log = pq.read_table(tmp_path / "lens" / "train_log.parquet").to_pandas()
    assert set(log.layer) == {0, 1} and log.step.max() == 6
