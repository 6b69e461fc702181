"""Translators, logit/tuned lenses, their file formats and the least-squares initialiser."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_llama, save_prepared, tiny_model
from torch.nn import functional as F

from pipeline.errors import LenspipeError
from pipeline.lens.kinds import names
from pipeline.lens.lstsq import LeastSquaresAccumulator, init_translator_lstsq
from pipeline.lens.reference import export_reference, import_reference
from pipeline.lens.translators import make_translator
from pipeline.lens.tuned import META_FILE, WEIGHTS_FILE, LogitLens, TunedLens
from pipeline.model.head import load_unembed_head
from pipeline.model.prepare import read_model_info

D, N_LAYERS = 32, 2  # tiny_model("llama"): hidden_size 32, 2 blocks
#: (kind, opts) covering every kind and the options that change the computation.
VARIANTS = [
    ("affine", {}),
    ("affine", {"bias": False}),
    ("linear", {}),
    ("scaling", {}),
    ("mlp", {}),
    ("mlp", {"hidden": 16, "depth": 2, "activation": "relu"}),
    ("mlp", {"bias": False}),
    ("mlp", {"affine": False}),  # lenses from before the affine path
]
IDS = ["-".join([k, *(f"{a}={b}" for a, b in o.items())]) for k, o in VARIANTS]
#: The fields of tuned_lens.nn.lenses.TunedLensConfig in tuned-lens 0.2.0.
REFERENCE_CONFIG_FIELDS = {
    "base_model_name_or_path",
    "d_model",
    "num_hidden_layers",
    "bias",
    "base_model_revision",
    "unembed_hash",
    "lens_type",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_prepared(tiny_model("llama"), tmp_path_factory.mktemp("lenses") / "llama")


@pytest.fixture(scope="module")
def head(model_dir):
    return load_unembed_head(model_dir)  # standalone: freezing it leaves the cached model alone


@pytest.fixture(scope="module")
def info(model_dir):
    return read_model_info(model_dir)


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def randomise(module, seed=1, scale=0.1):
    """Nonzero parameters, so that round trips and forward checks test something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def make_lens(head, info, kind="affine", layers=None, seed=1, **opts):
    lens = TunedLens.create(head, kind, d_model=D, n_layers=N_LAYERS, model_info=info, layers=layers, **opts)
    randomise(lens.translators, seed)
    return lens


# ------------------------------------------------------------------------ translators


def test_affine_and_linear_by_hand():
    h, W, b = randn(3, 5, D), randn(D, D, seed=1), randn(D, seed=2)
    affine, linear = make_translator("affine", D), make_translator("linear", D)
    with torch.no_grad():
        affine.weight.copy_(W)
        affine.bias.copy_(b)
        linear.weight.copy_(W)
    torch.testing.assert_close(affine(h), h + h @ W.T + b)
    torch.testing.assert_close(linear(h), h @ W.T)


def test_linear_has_no_bias_anywhere(head, info, tmp_path):
    """A 'linear' translator is W h: no bias parameter, none in its saved state or its
    affine map, and, since a linear map sends 0 to 0, the zero vector translates to zero
    at every layer of a saved and reloaded lens (an evaluation that added a bias fails)."""
    t = make_translator("linear", D)
    assert dict(t.named_parameters()).keys() == {"weight"} and t.opts == {} and not t.intercept
    with pytest.raises(LenspipeError, match="bad options"):
        make_translator("linear", D, bias=True)
    lens = make_lens(head, info, "linear")
    lens.save(tmp_path / "lens")
    assert set(load_file(str(tmp_path / "lens" / WEIGHTS_FILE))) == {f"{i}.weight" for i in range(N_LAYERS)}
    back = TunedLens.load(tmp_path / "lens", head=head)
    zero, h = torch.zeros(4, D), randn(4, D)
    for layer in range(N_LAYERS):
        assert torch.equal(back.translate(zero, layer), zero)
        assert torch.equal(back(zero, layer), head(zero))  # the logits of 0: no bias added before the head
        torch.testing.assert_close(back.translate(2.5 * h, layer), 2.5 * back.translate(h, layer))
        w, b = back.translators[str(layer)].affine_map()
        assert torch.equal(b, torch.zeros(D))
        torch.testing.assert_close(back.translate(h, layer), h + h @ w.T)


def test_an_mlp_lens_from_before_the_affine_path_still_loads(head, info, tmp_path):
    lens = make_lens(head, info, "mlp", affine=False)
    lens.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / META_FILE).read_text())
    del meta["translator_opts"]["affine"]  # as an older lenspipe wrote it
    (tmp_path / "old" / META_FILE).write_text(json.dumps(meta))
    loaded = TunedLens.load(tmp_path / "old", head=head)
    h = randn(3, D)
    with torch.no_grad():
        assert torch.equal(loaded(h, 1), lens(h, 1))
    assert loaded.translator(("block", 0)).affine is None


def test_an_old_linear_lens_with_a_bias_is_refused_clearly(head, info, tmp_path):
    lens = make_lens(head, info, "affine")
    lens.save(tmp_path / "old")
    meta = json.loads((tmp_path / "old" / META_FILE).read_text())
    meta |= {"kind": "linear", "translator_opts": {"bias": True}}
    (tmp_path / "old" / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(LenspipeError, match="older lenspipe.*had a bias.*retrain"):
        TunedLens.load(tmp_path / "old", head=head)


def test_scaling_by_hand():
    h, s, b = randn(4, D), randn(D, seed=1), randn(D, seed=2)
    t = make_translator("scaling", D)
    with torch.no_grad():
        t.scale.copy_(s)
        t.bias.copy_(b)
    torch.testing.assert_close(t(h), h * (1 + s) + b)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_mlp_by_hand(depth, residual, affine):
    h = randn(2, 3, D)
    t = randomise(make_translator("mlp", D, hidden=8, depth=depth, residual=residual, affine=affine))
    z = h
    for lin in t.net[::2]:  # Linear, act, Linear, act ...
        z = F.gelu(z @ lin.weight.T + lin.bias)  # (..., hidden)
    if affine:  # the affine path h -> A h + b; the branch's output layer has no bias of its own
        assert t.out.bias is None
        out = z @ t.out.weight.T + h @ t.affine.weight.T + t.affine.bias  # (..., d)
    else:
        out = z @ t.out.weight.T + t.out.bias  # (..., d)
    torch.testing.assert_close(t(h), h + out if residual else out)


def _fitted_stats(d_in=D, d_out=D, n=400):
    X, Y, _, _ = synthetic(n=n, d_in=d_in, d_out=d_out)
    acc = LeastSquaresAccumulator(d_in, n_out=d_out)
    acc.update(X, Y)
    return X, Y, acc


def test_mlp_starts_as_the_affine_least_squares_map():
    """The mlp's closed-form start is the affine lens's, bit for bit: its affine part from
    least squares, its branch's output layer at zero (so its KL steps start from there)."""
    X, _, acc = _fitted_stats()
    affine, mlp = make_translator("affine", D), randomise(make_translator("mlp", D, hidden=8))
    affine.fit_closed_form(acc, 1e-6)
    mlp.fit_closed_form(acc, 1e-6)
    h = X[:16].float()
    with torch.no_grad():
        assert torch.equal(mlp(h), affine(h))
        assert mlp.net[0].weight.abs().sum() > 0  # the branch's hidden layer stays random: it can learn
    with pytest.raises(LenspipeError, match="least-squares"):
        make_translator("mlp", D, affine=False).fit_closed_form(acc, 1e-6)


def test_scaling_starts_from_the_per_dimension_least_squares_fit():
    """Each output dimension regressed on its own input dimension (with an intercept), as
    numpy's polyfit does it; not the diagonal of the full fit."""
    import numpy as np

    X, Y, acc = _fitted_stats()
    t = make_translator("scaling", D)
    t.fit_closed_form(acc, 0.0)
    for i in (0, 7, D - 1):
        slope, intercept = np.polyfit(X[:, i].numpy(), Y[:, i].numpy(), 1)
        assert abs((1 + t.scale[i].item()) - slope) < 1e-4 * max(1, abs(slope))
        assert abs(t.bias[i].item() - intercept) < 1e-4 * max(1, abs(intercept))
    full_diagonal = acc.solve(0.0)[0].diagonal()
    assert not torch.allclose(1 + t.scale.detach(), full_diagonal, atol=1e-3)
    with pytest.raises(LenspipeError, match="as many inputs as outputs"):
        LeastSquaresAccumulator(4, n_out=3).solve_diagonal()


@pytest.mark.parametrize("kind,opts", VARIANTS, ids=IDS)
def test_init_is_identity_and_equals_logit_lens(head, info, kind, opts):
    h = randn(2, 4, D) * 3
    assert torch.equal(make_translator(kind, D, **opts)(h), h)
    lens = TunedLens.create(head, kind, d_model=D, n_layers=N_LAYERS, model_info=info, **opts)
    logit_lens = LogitLens(head)
    for layer in range(N_LAYERS + 1):  # layer n_layers is the model output: no translator
        assert torch.equal(lens.translate(h, layer), h)
        assert torch.equal(lens(h, layer), logit_lens(h, layer))


def test_unknown_kind_and_bad_options():
    with pytest.raises(LenspipeError, match="unknown translator kind 'conv'.*affine, linear, mlp, scaling"):
        make_translator("conv", D)
    with pytest.raises(LenspipeError, match="bad options"):
        make_translator("scaling", D, hidden=4)
    with pytest.raises(LenspipeError, match="depth"):
        make_translator("mlp", D, depth=3)
    assert set(names()) == {"affine", "linear", "mlp", "scaling"}


# ------------------------------------------------------------------------ lenses


@pytest.mark.parametrize("kind", names())
def test_only_translators_train(head, info, kind):
    lens = make_lens(head, info, kind)
    trainable = {n for n, p in lens.named_parameters() if p.requires_grad}
    assert trainable == {f"translators.{n}" for n, _ in lens.translators.named_parameters()}
    assert not any(p.requires_grad for p in lens.head.parameters())
    lens(randn(3, D), 1).logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in lens.head.parameters())
    assert all(p.grad is not None for p in lens.translators["1"].parameters())


def test_lens_rejects_bad_layers_and_widths(head, info):
    with pytest.raises(LenspipeError, match="layer 2 is the model's output"):
        TunedLens.create(head, "affine", d_model=D, n_layers=N_LAYERS, model_info=info, layers=[2])
    with pytest.raises(LenspipeError, match="d_model=48"):
        TunedLens.create(head, "affine", d_model=48, n_layers=N_LAYERS, model_info=info)
    with pytest.raises(LenspipeError, match="no translator for layer 1"):
        TunedLens.create(head, "affine", d_model=D, n_layers=N_LAYERS, model_info=info, layers=[0]).translate(
            randn(D), 1
        )


def test_merge_layer_groups(head, info):
    low, high = make_lens(head, info, "mlp", [0], seed=1), make_lens(head, info, "mlp", [1], seed=2)
    merged = low.merge(high)
    assert merged.layers == [0, 1]
    h = randn(5, D)
    assert torch.equal(merged(h, 0), low(h, 0)) and torch.equal(merged(h, 1), high(h, 1))
    with pytest.raises(LenspipeError, match=r"both have translators for layers \[1\]"):
        merged.merge(make_lens(head, info, "mlp", [1]))
    with pytest.raises(LenspipeError, match="different models or kinds"):
        low.merge(make_lens(head, info, "affine", [1]))
    with pytest.raises(LenspipeError, match="different models or kinds"):
        low.merge(make_lens(head, info, "mlp", [1], hidden=8))


@pytest.mark.parametrize("kind,opts", VARIANTS, ids=IDS)
def test_save_load_round_trip(head, info, model_dir, tmp_path, kind, opts):
    lens = make_lens(head, info, kind, **opts)
    lens.save(tmp_path / "lens", training_config={"lr": 1e-3}, metrics={"kl": [0.5, 0.25]})
    meta = json.loads((tmp_path / "lens" / "lens.json").read_text())
    assert meta["kind"] == kind and meta["layers"] == [0, 1] and meta["d_model"] == D
    assert meta["model"]["weights_sha256"] == info["weights_sha256"]
    assert meta["training_config"] == {"lr": 1e-3} and meta["metrics"] == {"kl": [0.5, 0.25]}
    assert {"format", "format_version", "translator_opts", "versions", "created"} <= set(meta)
    h = randn(3, 4, D)
    for loaded in (
        TunedLens.load(tmp_path / "lens", head=head),
        TunedLens.load(tmp_path / "lens", model_dir=model_dir),
    ):
        assert loaded.kind == kind and loaded.opts == lens.opts
        for layer in lens.layers:
            assert torch.equal(loaded(h, layer), lens(h, layer))
    assert not list(tmp_path.glob(".*partial"))  # written atomically, nothing left behind


def test_load_onto_another_model_fails(head, info, tmp_path):
    make_lens(head, info).save(tmp_path / "lens")
    other = save_prepared(make_llama(vocab_size=199, seed=1, hidden_size=32), tmp_path / "other")
    wide = save_prepared(make_llama(vocab_size=199, seed=1, hidden_size=48), tmp_path / "wide")
    with pytest.raises(LenspipeError, match="trained on model 'llama'") as err:
        TunedLens.load(tmp_path / "lens", model_dir=other)
    assert info["weights_sha256"] in str(err.value)
    assert read_model_info(other)["weights_sha256"] in str(err.value)
    with pytest.raises(LenspipeError, match="d_model 48"):
        TunedLens.load(tmp_path / "lens", model_dir=wide)
    with pytest.raises(LenspipeError, match="needs the unembedding head or the model_dir"):
        TunedLens.load(tmp_path / "lens")
    with pytest.raises(LenspipeError, match="not a saved lens"):
        TunedLens.load(tmp_path / "other", head=head)


# ------------------------------------------------------------------------ tuned-lens 0.2.x


def test_reference_export_import(head, info, tmp_path):
    lens = make_lens(head, info, "affine")
    export_reference(lens, tmp_path / "ref")
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert set(config) == REFERENCE_CONFIG_FIELDS
    assert config["lens_type"] == "linear_tuned_lens" and config["bias"] is True
    assert (config["d_model"], config["num_hidden_layers"]) == (D, N_LAYERS)
    state = torch.load(tmp_path / "ref" / "params.pt", weights_only=True)
    # tuned-lens saves layer_translators.state_dict(): a ModuleList of nn.Linear, no prefix.
    assert set(state) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    assert state["0.weight"].shape == (D, D) and state["0.bias"].shape == (D,)
    assert torch.equal(state["1.weight"], lens.translators["1"].weight)
    back = import_reference(tmp_path / "ref", head, info)
    assert back.kind == "affine" and back.layers == [0, 1] and back.origin["format"] == "tuned-lens"
    h = randn(3, D)
    for layer in range(N_LAYERS):
        assert torch.equal(back.translate(h, layer), lens.translate(h, layer))


@pytest.mark.parametrize("kind", ["linear", "scaling"])
def test_reference_export_of_other_affine_kinds(head, info, tmp_path, kind):
    lens = make_lens(head, info, kind)
    export_reference(lens, tmp_path / "ref")
    back = import_reference(tmp_path / "ref", head, info)
    h = randn(3, D)
    torch.testing.assert_close(back.translate(h, 1), lens.translate(h, 1), rtol=1e-5, atol=1e-5)


def test_reference_export_refuses(head, info, tmp_path):
    with pytest.raises(LenspipeError, match="affine translators only"):
        export_reference(make_lens(head, info, "mlp"), tmp_path / "ref")
    with pytest.raises(LenspipeError, match="needs translators for all layers"):
        export_reference(make_lens(head, info, "affine", [1]), tmp_path / "ref")
    assert not (tmp_path / "ref").exists()


# ------------------------------------------------------------------------ least squares


def synthetic(n=600, d_in=D, d_out=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) / d_in**0.5
    c = torch.randn(d_out, generator=g, dtype=torch.float64)
    # A large common offset, like a residual stream's massive mean direction.
    X = torch.randn(n, d_in, generator=g, dtype=torch.float64) + 50.0
    Y = X @ A.T + c + 1e-7 * torch.randn(n, d_out, generator=g, dtype=torch.float64)
    return X, Y, A, c


def test_least_squares_recovers_known_map():
    X, Y, A, c = synthetic(d_in=12, d_out=7)
    acc = LeastSquaresAccumulator(12, n_out=7)
    acc.update(X.float(), Y.float())
    W, b = acc.solve()
    assert W.dtype == b.dtype == torch.float32 and W.shape == (7, 12)
    # float32 inputs: the data are rounded at ~50 * 6e-8, hence the slack.
    torch.testing.assert_close(W.double(), A, rtol=0, atol=1e-4)
    torch.testing.assert_close(b.double(), c, rtol=0, atol=1e-4 * 50)
    exact = LeastSquaresAccumulator(12, n_out=7)
    exact.update(X, Y)
    W64, b64 = exact.solve()
    torch.testing.assert_close(W64.double(), A, rtol=0, atol=1e-5)
    torch.testing.assert_close(b64.double(), c, rtol=0, atol=1e-4)


def test_least_squares_streaming_equals_batch():
    X, Y, _, _ = synthetic()
    one = LeastSquaresAccumulator(D)
    one.update(X, Y)
    many = LeastSquaresAccumulator(D)
    for xs, ys in zip(X.split([1, 99, 200, 300]), Y.split([1, 99, 200, 300])):
        many.update(xs.reshape(-1, 1, D), ys.reshape(-1, 1, D))  # leading dims are flattened
    assert many.n == one.n == len(X)
    torch.testing.assert_close(many.cxx, one.cxx, rtol=1e-10, atol=1e-8)
    for a, b in zip(many.solve(), one.solve()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(LenspipeError, match="at least 2 samples"):
        LeastSquaresAccumulator(D).solve()


def test_init_translator_lstsq():
    X, Y, A, c = synthetic()
    acc = LeastSquaresAccumulator(D)
    acc.update(X, Y)
    W, b = acc.solve()
    h = X[:20].float()
    t = make_translator("affine", D)
    init_translator_lstsq(t, W, b)
    with torch.no_grad():
        torch.testing.assert_close(t(h).double(), h.double() @ A.T + c, rtol=0, atol=1e-3)
    with pytest.raises(LenspipeError, match="not 'mlp'"):
        init_translator_lstsq(make_translator("mlp", D, affine=False), W, b)
    for kind, opts in (("affine", {"bias": False}), ("linear", {})):
        with pytest.raises(LenspipeError, match="nonzero intercept"):
            init_translator_lstsq(make_translator(kind, D, **opts), W, b)
    with pytest.raises(LenspipeError, match="shapes"):
        init_translator_lstsq(make_translator("affine", D), W[:3], b)


def test_least_squares_without_intercept_is_the_uncentred_fit():
    """``solve(intercept=False)`` (the start of 'linear' translators) is the fit of Y by
    X W^T alone: what numpy's lstsq gives without a column of ones, and b = 0."""
    X, Y, _, _ = synthetic(d_in=12, d_out=7)
    acc = LeastSquaresAccumulator(12, n_out=7)
    for xs, ys in zip(X.split(100), Y.split(100)):
        acc.update(xs, ys)
    W, b = acc.solve(ridge=0.0, intercept=False)
    expected = torch.linalg.lstsq(X, Y).solution.T  # (d_out, d_in), no intercept column
    assert torch.equal(b, torch.zeros(7))
    torch.testing.assert_close(W.double(), expected, rtol=0, atol=1e-4)
    assert not torch.allclose(W, acc.solve(ridge=0.0)[0], atol=1e-3)  # the centred fit differs
    t = make_translator("linear", 12)
    with pytest.raises(LenspipeError, match="shapes"):
        init_translator_lstsq(t, W, b)  # 7 outputs for 12 inputs
    t = make_translator("linear", 7)
    sq = LeastSquaresAccumulator(7)
    sq.update(X[:, :7], Y)
    init_translator_lstsq(t, *sq.solve(intercept=False))
    torch.testing.assert_close(t(X[:5, :7].float()), X[:5, :7].float() @ t.weight.T)
