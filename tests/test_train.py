"""train: the fused KL loss, every translator kind, determinism, resume, bad input."""

import pyarrow.parquet as pq
import pytest
import torch
from tiny import VOCAB, make_llama, save_prepared, tiny_model, write_packed_split

import pipeline.train as tr
from pipeline.config import ExtractConfig, TrainConfig
from pipeline.errors import ConfigError, StoreError
from pipeline.extract import extract
from pipeline.lens.tuned import TunedLens
from pipeline.train import KLFromLogits, kl_loss, train

SMALL_EXTRACT = ExtractConfig(
    batch_size=4, shard_tokens=64, chunk_tokens=32, max_tokens={"train": None, "test": None}, dtype="float32"
)


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
    # the reference's optimiser (SGD at rate 1, one step size for all layers): these tests were
    # sized for it, and the default recipe's small Adam steps barely move a tiny model in 6
    base = dict(
        steps=6,
        batch_tokens=64,
        val_tokens=64,
        eval_every=2,
        patience=0,
        checkpoint_every=2,
        optimizer="sgd",
        lr_scale=1.0,
        step_scale="none",
    )
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
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=target), torch.distributions.Categorical(logits=z)
    ).mean()
    torch.testing.assert_close(fused, ref)
    (g,) = torch.autograd.grad(fused, z)
    (g_ref,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(g, g_ref)
    p = target.exp()
    assert torch.autograd.gradcheck(lambda x: KLFromLogits.apply(x, p, (p * target).sum(-1)), (z,))


def test_fused_kl_in_place_backward_gives_the_autograd_gradient():
    """Logits that are an intermediate result (as the head's output in training) get their
    gradient computed in their own storage: same gradient upstream as plain autograd."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(13, 8, generator=g, dtype=torch.float64)
    target = torch.log_softmax(torch.randn(6, 13, generator=g, dtype=torch.float64), -1)
    (fused,) = torch.autograd.grad(kl_loss(h @ W.T, target), h)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=target), torch.distributions.Categorical(logits=h @ W.T)
    ).mean()
    (want,) = torch.autograd.grad(ref, h)
    torch.testing.assert_close(fused, want)


@pytest.mark.parametrize("kind", ["affine", "linear", "mlp", "scaling"])
def test_every_kind_trains_saves_and_logs(tiny_run, tmp_path, kind):
    # from the logit lens (no least-squares start), so every step's progress is the optimiser's
    metrics, lens = run(tiny_run, tmp_path / kind, kind, init="identity", steps=16)
    assert lens.kind == kind and lens.layers == [0, 1]
    for layer in ("0", "1"):
        # The best validated translator is kept, so val_kl <= val_kl_init always holds; a
        # run that learns nothing (or diverges) keeps its start and fails this.
        assert metrics["val_kl"][layer] < 0.995 * metrics["val_kl_init"][layer]
    table = pq.read_table(tmp_path / kind / "train_log.parquet").to_pandas()
    assert set(table.layer) == {0, 1} and table.step.max() == 16
    assert table.val_kl.notna().sum() == 2 * 9  # steps 0, 2, ..., 16
    assert (table.dropna(subset=["train_loss"]).train_loss >= 0).all()


def test_linear_is_fitted_trained_and_evaluated_without_a_bias(tiny_run, tmp_path):
    """'linear' is W h end to end: its least-squares start is the fit without an intercept,
    training gives it no bias, and evaluation's KL is the KL of head(h W^T) computed here
    from the raw saved tensors (a bias added anywhere on the way fails one of these)."""
    import pandas as pd
    from safetensors.torch import load_file

    from pipeline.config import EvaluateConfig
    from pipeline.evaluate import evaluate
    from pipeline.lens.lstsq import LeastSquaresAccumulator
    from pipeline.metrics import kl_div, log_probs
    from pipeline.model.head import load_unembed_head
    from pipeline.store.reader import open_store

    root, model_dir = tiny_run
    store = open_store(root / "train.zarr")
    x = store.layers([0, 1, 2], 0, store.n_tokens)  # (3, n, d): layers 0, 1 and the last
    _, start = run(tiny_run, tmp_path / "start", "linear", steps=0)
    for layer in (0, 1):
        acc = LeastSquaresAccumulator(store.d_model)
        acc.update(x[layer], x[-1])
        w_start = load_file(str(tmp_path / "start" / "translators.safetensors"))[f"{layer}.weight"]
        torch.testing.assert_close(w_start, acc.solve(intercept=False)[0], rtol=1e-5, atol=1e-5)
    _, lens = run(tiny_run, tmp_path / "linear", "linear", steps=4)
    weights = load_file(str(tmp_path / "linear" / "translators.safetensors"))
    assert set(weights) == {"0.weight", "1.weight"}  # no bias tensor saved
    out = tmp_path / "tables"
    evaluate(
        root / "test.zarr",
        root / "test.npz",
        model_dir,
        {"linear": tmp_path / "linear"},
        EvaluateConfig(max_tokens=None, chunk_tokens=32, bootstrap=10),
        out,
        {"model": "tiny", "revision": None, "corpus": "rand", "split": "test"},
    )
    table = pd.read_parquet(out / "layer_metrics.parquet")
    head = load_unembed_head(model_dir)
    test = open_store(root / "test.zarr").layers([0, 1, 2], 0, open_store(root / "test.zarr").n_tokens)
    with torch.no_grad():
        final = log_probs(head(test[-1]))
        for layer in (0, 1):
            by_hand = kl_div(final, log_probs(head(test[layer] @ weights[f"{layer}.weight"].T))).double().mean()
            got = table[(table.translator == "linear") & (table.layer == layer)].kl.item()
            assert abs(got - by_hand.item()) < 1e-5 * max(1.0, by_hand.item())


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


@pytest.mark.parametrize("kind, init", [("affine", "identity"), ("mlp", "auto")])
def test_interrupted_training_resumes_to_identical_lens(tiny_run, tmp_path, monkeypatch, kind, init):
    """Also an mlp from its closed-form start."""
    _, ref = run(tiny_run, tmp_path / "ref", init=init, optimizer="adam", kind=kind)
    calls = {"n": 0}
    real = tr.train_step

    def crash_at_step_5(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tr, "train_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_run, tmp_path / "x", init=init, optimizer="adam", kind=kind)
    assert (tmp_path / ".x.ckpt.pt").exists() and not (tmp_path / "x").exists()
    monkeypatch.setattr(tr, "train_step", real)
    _, resumed = run(tiny_run, tmp_path / "x", init=init, optimizer="adam", kind=kind)
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
    with pytest.raises(ConfigError, match=r"train.kinds must be one of \[.*\], got 'quadratic'"):
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
        train_group(
            root / "train.zarr", root / "test.zarr", model_dir, tmp_path / f"g{g}", cfg(layer_groups=2), "affine", g
        )
    merged = merge_lens([tmp_path / "g0", tmp_path / "g1"], model_dir, tmp_path / "lens")
    assert merged.layers == [0, 1]
    again = TunedLens.load(tmp_path / "lens", model_dir=model_dir)
    parts = [TunedLens.load(tmp_path / f"g{g}", model_dir=model_dir) for g in (0, 1)]
    for g, part in enumerate(parts):
        assert torch.equal(again.translators[str(g)].weight, part.translators[str(g)].weight)
    log = pq.read_table(tmp_path / "lens" / "train_log.parquet").to_pandas()
    assert set(log.layer) == {0, 1} and log.step.max() == 6


def _batch_like_smollm2(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (512, 49152) float32 training batch: lens logits z and the model's log-probs."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(512, 49152, generator=g) * 3 + 10
    zf = torch.randn(512, 49152, generator=g) * 3 + 10
    zf[:, :5] += 11  # a peaked model distribution, as a trained LM's
    return z, torch.log_softmax(zf, -1)


def test_training_kl_is_exact_and_thread_independent():
    # A single float32 dot product over 512 x 49,152 values put every val_kl ~0.01 nats
    # high, and the value changed with the thread count.
    z, target = _batch_like_smollm2(0)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=target.double()), torch.distributions.Categorical(logits=z.double())
    ).mean()
    before, got = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(kl_loss(z, target))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], got[1])
    assert abs(got[0].item() - exact.item()) < 1e-5


@pytest.mark.parametrize("kind, init", [("affine", "identity"), ("mlp", "auto")])
def test_layer_groups_give_the_one_job_lens_bitwise(tiny_run, tmp_path, kind, init):
    # Clipping and early stopping once acted on all layers jointly, so a layer's steps
    # depended on which layers shared its job. Clipping (0.05: it acts on every step)
    # and patience are per layer now; an mlp's random branch is drawn per layer.
    kw = dict(init=init, steps=12, clip_grad=0.05, patience=1, eval_every=2, kind=kind)
    _, whole = run(tiny_run, tmp_path / "all", **kw)
    _, g0 = run(tiny_run, tmp_path / "g0", layers=[0], **kw)
    _, g1 = run(tiny_run, tmp_path / "g1", layers=[1], **kw)
    merged, ref = _params(g0.merge(g1)), _params(whole)
    assert merged.keys() == ref.keys() and all(torch.equal(merged[k], ref[k]) for k in ref)
    assert any(not torch.equal(v, torch.zeros_like(v)) for v in ref.values())  # it did train


def test_early_stopping_is_per_layer(tiny_run, tmp_path):
    # least-squares start: layer 1 is soon as good as it gets, layer 0 keeps improving
    metrics, _ = run(tiny_run, tmp_path / "es", steps=40, patience=1, eval_every=2)
    log = pq.read_table(tmp_path / "es" / "train_log.parquet").to_pandas()
    last_step = log.dropna(subset=["train_loss"]).groupby("layer").step.max()
    last_val = log.dropna(subset=["val_kl"]).groupby("layer").step.max()
    assert last_step[0] == metrics["steps"] == 40 and last_step[1] < 40  # layer 1 stopped alone
    assert last_val[1] == last_step[1]  # and was not validated after it stopped
    vals = log[(log.layer == 1)].dropna(subset=["val_kl"]).val_kl.to_numpy()
    assert vals[-1] >= vals[:-1].min() * (1 - 1e-4)  # its last validation did not improve


def test_weight_decay_pulls_every_kind_toward_the_identity(tiny_run):
    # W h + b ("linear") starts at W = I; plain L2 decay would pull W toward 0, away
    # from the logit lens.
    from pipeline.analyses.translator_anatomy import linear_map
    from pipeline.model.head import load_unembed_head

    head = load_unembed_head(tiny_run[1])
    d = head.unembed.weight.shape[1]
    for kind in ("affine", "linear", "scaling"):
        lens = TunedLens.create(head, kind, d_model=d, n_layers=2, model_info={}, layers=[0])
        with torch.no_grad():
            for p in lens.translators.parameters():
                p.add_(0.1)

        def dist(lens=lens):
            return (linear_map(lens.translators["0"])[0] - torch.eye(d)).norm().item()

        before = dist()
        opt, _ = tr.make_optimizer(lens, cfg(weight_decay=0.5, momentum=0.0, clip_grad=0))
        for p in lens.translators.parameters():
            p.grad = torch.zeros_like(p)  # no loss: only the decay moves the parameters
        tr.optimizer_step(lens, [0], opt, cfg(weight_decay=0.5, momentum=0.0, clip_grad=0))
        assert dist() == pytest.approx(0.5 * before, rel=1e-5), kind  # lr 1: (1 - lr*wd) of the way


@pytest.mark.parametrize("optimizer, power", [("sgd", 1.0), ("adam", 0.5)])
def test_step_multipliers_scale_each_step(tiny_run, optimizer, power):
    """``train.step_scale: residual``: with multipliers (w, b) SGD's first step on a weight is
    w times the plain step (b on a bias); Adam's, whose step ignores its gradient's scale,
    sqrt(w) and sqrt(b) times. Layers without a multiplier step as before."""
    from pipeline.model.head import load_unembed_head
    from pipeline.positions import as_key

    head = load_unembed_head(tiny_run[1])
    d = head.unembed.weight.shape[1]
    c = cfg(weight_decay=0.0, momentum=0.0, clip_grad=0, optimizer=optimizer)
    grads = {
        name: torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
        for i, (name, p) in enumerate(
            TunedLens.create(
                head, "affine", d_model=d, n_layers=2, model_info={}, layers=[0, 1]
            ).translators.named_parameters()
        )
    }

    def step(multipliers):
        lens = TunedLens.create(head, "affine", d_model=d, n_layers=2, model_info={}, layers=[0, 1])
        opt, _ = tr.make_optimizer(lens, c)
        for name, p in lens.translators.named_parameters():
            p.grad = grads[name].clone()
        tr.optimizer_step(lens, [0, 1], opt, c, multipliers)
        return {name: p.detach().clone() for name, p in lens.translators.named_parameters()}

    plain, scaled = step(None), step({as_key(0): (9.0, 4.0)})
    for name, p in scaled.items():
        m = (4.0 if name.endswith("bias") else 9.0) ** power if name.startswith("0.") else 1.0
        torch.testing.assert_close(p, plain[name] * m, rtol=1e-5, atol=1e-7, msg=name)
        assert plain[name].abs().max() > 0


def test_validation_sequences_spread_over_the_store(tiny_run, tmp_path):
    metrics, _ = run(tiny_run, tmp_path / "v", steps=0, val_tokens=32)  # 2 of the test store's 8 sequences
    first, second = metrics["val_sequences"]
    assert first < 4 <= second


def test_fused_kl_never_writes_into_a_view_of_the_callers_tensor():
    """Logits that are a view (here of a leaf) get a fresh gradient: the caller's values stay."""
    w = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    before = w.detach().clone()
    target = torch.log_softmax(torch.randn(4, 7, dtype=torch.float64), -1)
    kl_loss(w[:, :7], target).backward()
    assert torch.equal(w.detach(), before)


def test_every_kind_starts_from_its_closed_form(tiny_run, tmp_path):
    """init auto fits every built-in kind in closed form; the mlp starts as the affine
    least-squares lens on the same tokens (the same validation KL, to the bit), and the
    per-dimension scaling fit lies between the logit lens and the full affine fit."""
    starts = {kind: run(tiny_run, tmp_path / kind, kind=kind, steps=0)[0] for kind in ("affine", "mlp", "scaling")}
    assert {m["init"] for m in starts.values()} == {"lstsq"}
    assert starts["mlp"]["val_kl_init"] == starts["affine"]["val_kl_init"]
    for layer, logit in starts["affine"]["val_kl_logit_lens"].items():
        assert starts["affine"]["val_kl_init"][layer] <= starts["scaling"]["val_kl_init"][layer] < logit


def test_lens_json_says_how_each_layer_stopped(tiny_run, tmp_path):
    """Per layer: the reason training ended, the step of the translator kept, and the
    validation's change over the last quarter of the steps (the convergence criterion)."""
    from pipeline.lens.stopping import last_quarter_change

    metrics, _ = run(tiny_run, tmp_path / "all", steps=8, eval_every=2, patience=0)
    for s in metrics["stopping"].values():
        assert s["reason"] == "steps exhausted" and s["last_step"] == 8 and 0 <= s["best_step"] <= 8
        assert s["val_change_last_quarter"] is not None
    early, _ = run(tiny_run, tmp_path / "early", steps=40, eval_every=1, patience=1, lr_scale=30.0)
    assert any(s["reason"].startswith("early stop") and s["last_step"] < 40 for s in early["stopping"].values())
    closed, _ = run(tiny_run, tmp_path / "closed", steps=0)
    assert {s["reason"] for s in closed["stopping"].values()} == {"closed form only (steps: 0)"}
    assert last_quarter_change([(0, 2.0), (4, 1.5), (6, 1.2), (8, 1.197)]) == pytest.approx(-0.0025)
    assert last_quarter_change([(0, 2.0)]) is None


def test_a_lens_directory_carries_its_card(tiny_run, tmp_path):
    """README.md with hub-style YAML metadata and the per-layer KL table of lens.json."""
    import json

    import yaml

    metrics, lens = run(tiny_run, tmp_path / "lenses" / "tiny" / "notes" / "affine", steps=2)
    out = tmp_path / "lenses" / "tiny" / "notes" / "affine"
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "lenspipe" and meta["license"] == "other"  # a local model: no licence known
    card = meta["lenspipe"]
    assert card["kind"] == "affine" and card["corpus"] == "notes" and card["steps"] == metrics["steps"]
    assert card["weights_sha256"] == json.loads((out / "lens.json").read_text())["model"]["weights_sha256"]
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[1] for r in rows] == [f"{v:.3f}" for v in metrics["val_kl"].values()]
