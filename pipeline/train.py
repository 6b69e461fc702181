"""train: fit tuned-lens translators from an activation store, never re-running the model.

A lens gets a translator at every trained layer of every position the store holds
(``pipeline.positions``: the block residual, and inside each block after its attention
where extracted); each lens position (position, layer) is trained, validated and stopped on
its own, so a block translator is the same whether or not attention ones train beside it.
Per step, one batch of tokens is read for every trained lens position plus the last layer; the
target distribution (the model's own, from the stored last layer through the frozen head)
is computed once and shared by all layers. Layers are processed one after another so only
one (batch, vocab) logits tensor is alive at a time. Affine/linear translators start from a
closed-form least-squares fit of the last layer's residual (the reference starts from the
identity); see docs/explanation/training.md for the measured effect.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import metrics as M
from . import positions as P
from .config import TrainConfig
from .devices import resolve_device
from .errors import StoreError
from .lens import kinds
from .lens.lstsq import LeastSquaresAccumulator
from .lens.optim import make_optimizer, optimizer_step, residual_scales, step_multipliers
from .lens.stopping import converged, stopping
from .lens.tuned import LogitLens, TunedLens, logits_into, read_lens_meta
from .model.head import load_unembed_head
from .model.prepare import read_model_info
from .progress import Progress
from .provenance import exclusive_output, package_versions, sha256_json
from .sampling import read_sequences, spread_sequences
from .store.batches import TokenBatches
from .store.reader import ActivationStore, check_store_model, open_store
from .train_log import write_train_log

log = logging.getLogger(__name__)


class KLFromLogits(torch.autograd.Function):
    """Mean KL(p || softmax(z)) over rows (float64), with a fused backward:
    dKL/dz = softmax(z) - p.

    Autograd through log_softmax + multiply + sum would keep several (batch, vocab)
    tensors; here only z is saved. When z is an intermediate result (the head's output in
    training) the gradient is computed in z's own storage: the head's matmul needs its
    inputs, not its output, for its backward, and anything else that saved z would make
    autograd refuse (an error, never a wrong gradient). So backward runs once per graph,
    and z holds the gradient afterwards. Forward and backward run over cache-sized blocks
    of rows (``metrics.row_blocks``), the forward's temporary being this thread's reused
    buffer (``metrics.workspace``): each fresh (batch, vocab) one was a 100 MB allocation,
    page-faulted in by the kernel. The target's side
    (``metrics.target_stats``: p and per-row sum p log p) is computed once per batch for all
    layers. Each row's KL is one cascade-summed reduction and rows are summed in float64
    (``metrics.kl_rows``): exact to ~1e-7 and independent of the thread count (see
    pipeline.metrics).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
        # the graph's own tensor: neither a leaf nor a view of one (or of anything)
        ctx.in_place = z.grad_fn is not None and z._base is None
        if z.dtype in (torch.bfloat16, torch.float16):
            z, ctx.in_place = z.float(), True  # (batch, vocab); float32 softmax even under bf16 autocast
        kl, lse = M.kl_and_lse(z, {"p": p, "neg_entropy": neg_entropy})  # (batch,) x 2
        ctx.save_for_backward(z, p, lse)
        return kl.sum() / z.shape[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, p, lse = ctx.saved_tensors
        g = z if ctx.in_place else torch.empty_like(z)  # (batch, vocab)
        scale = float(grad) / z.shape[0]
        for b in M.row_blocks(z):  # cache-sized blocks: one trip to memory for all four passes
            torch.sub(z[b], lse[b, None], out=g[b]).exp_().sub_(p[b]).mul_(scale)  # softmax(z) - p
        return g, None, None


def kl_loss(z: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || softmax(z)); a convenience for one-off use (train shares p)."""
    t = M.target_stats(target_logp)
    return KLFromLogits.apply(z, t["p"], t["neg_entropy"])


@dataclass
class Targets:
    p: torch.Tensor  # (batch, vocab) final-model probabilities, rows summing to 1
    neg_entropy: torch.Tensor  # (batch,) sum_v p log p per row

    def kl(self, z: torch.Tensor) -> torch.Tensor:
        """(batch,) float64 KL(p || softmax(z)) per row, no gradient."""
        return M.kl_from_logits(z.float(), {"p": self.p, "neg_entropy": self.neg_entropy})


@torch.no_grad()
def targets(head, h_last: torch.Tensor) -> Targets:
    t = M.target_stats(M.log_probs(head(h_last).float()))  # (batch, vocab) -> p, per-row sum p log p
    return Targets(t["p"], t["neg_entropy"])


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the unembedding matmuls dominate); plain float32 on CPU,
    where bf16 matmuls are hundreds of times slower. Softmax and KL stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ----------------------------------------------------------------------------- setup


def _init_kind(cfg: TrainConfig, kind: str) -> str:
    return ("lstsq" if kinds.get(kind).lstsq else "identity") if cfg.init == "auto" else cfg.init


@torch.no_grad()
def fit_least_squares(lens: TunedLens, store: ActivationStore, cfg: TrainConfig, device) -> dict:
    """Set each translator to its closed-form start (``Translator.fit_closed_form``) from one
    pass over the store; returns the statistics per lens position."""
    accs = least_squares_stats(lens, store, device)
    for key, acc in accs.items():
        lens.translator(key).fit_closed_form(acc, cfg.ridge)
    return accs


@torch.no_grad()
def least_squares_stats(lens: TunedLens, store: ActivationStore, device) -> dict[P.Key, LeastSquaresAccumulator]:
    """The streamed statistics of a fit of each lens position -> the last layer, over the
    whole store: O(tokens x d_model^2), no vocabulary matmul."""
    keys = lens.keys()
    accs = {key: LeastSquaresAccumulator(lens.d_model, device=device) for key in keys}
    shard = store.attrs["params"]["shard_tokens"]
    with Progress(store.n_tokens, "least squares", unit="tok") as bar:
        for s in range(0, store.n_tokens, shard):
            e = min(s + shard, store.n_tokens)
            x = store.states(keys + [_last(store)], s, e).to(device)  # (k+1, n, d)
            for j, key in enumerate(keys):
                accs[key].update(x[j], x[-1])
            bar.update(e - s)
    return accs


def _last(store: ActivationStore) -> P.Key:
    """The last block's output: the targets' lens position."""
    return (P.BLOCK.name, store.n_layers)


# ----------------------------------------------------------------------------- validation


class Validation:
    """Whole sequences of the validation store, spread over all of it (seeded), with their
    targets, kept in memory."""

    def __init__(self, store: ActivationStore, keys: list[P.Key], n_tokens: int, head, device, chunk: int, seed: int):
        n_seq = store.n_tokens // store.seq_len
        self.sequences = spread_sequences(n_seq, max(1, n_tokens // store.seq_len), seed)
        self.keys, self.chunk = keys, chunk
        self.x = read_sequences(store, keys + [_last(store)], self.sequences).to(device)  # (k+1, n, d)
        n = self.x.shape[1]
        self.targets = [targets(head, self.x[-1, s : s + chunk]) for s in range(0, n, chunk)]

    @torch.no_grad()
    def kl(self, lens, keys: list[P.Key] | None = None) -> dict[P.Key, float]:
        """Mean KL per lens position (all of them, or ``keys``), summed in float64."""
        out = {}
        for j, key in enumerate(self.keys):
            if keys is not None and key not in keys:
                continue
            total = 0.0
            for c, t in enumerate(self.targets):
                h = self.x[j, c * self.chunk : (c + 1) * self.chunk]  # (chunk, d)
                total += t.kl(logits_into(lens, h, key[1], key[0])).sum().item()
            out[key] = total / self.x.shape[1]
        return out


# ----------------------------------------------------------------------------- state

#: Bump when TrainState or the checkpoint contents change: an older checkpoint is ignored.
CHECKPOINT_FORMAT = 4  # 3: 'linear' translators lost their bias; 4: keyed by lens position


@dataclass
class TrainState:
    """Per lens position (position, layer): the best validation and its translator, and
    the validations in a row without improvement (early stopping is per lens position)."""

    step: int = 0
    best_val: dict[P.Key, float] = field(default_factory=dict)
    best_state: dict[P.Key, dict] = field(default_factory=dict)
    bad_evals: dict[P.Key, int] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    logit_lens_val: dict[P.Key, float] = field(default_factory=dict)
    init_val: dict[P.Key, float] = field(default_factory=dict)

    def record_validation(self, lens: TunedLens, val: dict[P.Key, float], step: int) -> None:
        for key, v in val.items():
            self.history.append({"step": step, "position": key[0], "layer": key[1], "val_kl": v})
            if v < self.best_val.get(key, float("inf")) * (1 - 1e-4):
                self.best_val[key] = v
                self.best_state[key] = {k: t.detach().clone() for k, t in lens.translator(key).state_dict().items()}
                self.bad_evals[key] = 0
            else:
                self.bad_evals[key] = self.bad_evals.get(key, 0) + 1

    def active(self, keys: list[P.Key], patience: int) -> list[P.Key]:
        """The lens positions still training: each stops after ``patience`` validations
        without improvement (0 = never), whatever the others of its job do."""
        return [k for k in keys if not patience or self.bad_evals.get(k, 0) < patience]


def _ckpt_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.ckpt.pt"


def _save_ckpt(path: Path, fingerprint: str, lens, opt, sched, state: TrainState) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "fingerprint": fingerprint,
            "translators": lens.translator_state(),
            "opt": opt.state_dict(),
            "sched": sched.state_dict(),
            "state": asdict(state),
        },
        tmp,
    )
    os.replace(tmp, path)


def _load_ckpt(path: Path, fingerprint: str, lens, opt, sched) -> TrainState | None:
    if not path.exists():
        return None
    ckpt = torch.load(path, weights_only=False)
    if ckpt.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s from another configuration", path)
        return None
    lens.load_translator_state(ckpt["translators"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    s = ckpt["state"]
    for key in ("best_val", "best_state", "bad_evals", "logit_lens_val", "init_val"):
        s[key] = {(str(p), int(layer)): v for (p, layer), v in s[key].items()}
    log.info("resuming from step %d (%s)", s["step"], path)
    return TrainState(**s)


# ----------------------------------------------------------------------------- loop


def train_step(
    lens: TunedLens,
    x: torch.Tensor,
    keys: list[P.Key],
    cfg: TrainConfig,
    labels: tuple[torch.Tensor, torch.Tensor] | None,
    active: list[P.Key] | None = None,
) -> dict[P.Key, float]:
    """One batch for every active lens position (default: all): x (k+1, batch, d_model), row
    j for ``keys[j]`` (a bare layer: its block position), the last row the last layer;
    returns the loss per active lens position."""
    losses = {}
    keys = [P.as_key(k) for k in keys]
    active = None if active is None else [P.as_key(k) for k in active]
    t = targets(lens.head, x[-1]) if cfg.loss == "kl" else None
    for j, key in enumerate(keys):
        if active is not None and key not in active:
            continue
        with autocast(x.device):
            z = lens(x[j], key[1], key[0])  # (batch, vocab)
        if t is not None:
            loss = KLFromLogits.apply(z, t.p, t.neg_entropy)
        else:
            ids, keep = labels
            loss = torch.nn.functional.cross_entropy(z[keep].float(), ids[keep])
        loss.backward()
        losses[key] = loss.item()
    return losses


def _next_token_labels(store: ActivationStore, tokens: torch.Tensor, idx: torch.Tensor):
    """Next-token ids for global token indices; the last position of a sequence has none."""
    keep = (idx % store.seq_len) != store.seq_len - 1  # (batch,)
    nxt = torch.clamp(idx + 1, max=store.n_tokens - 1)
    return tokens[nxt], keep


def run_training(
    lens: TunedLens,
    store: ActivationStore,
    val: Validation,
    cfg: TrainConfig,
    state: TrainState,
    opt,
    sched,
    ckpt: tuple[Path, str],
    device,
    multipliers: dict[P.Key, tuple[float, float]] | None = None,
) -> TrainState:
    keys = lens.keys()
    batches = TokenBatches(store, keys + [_last(store)], cfg.batch_tokens, cfg.buffer_shards, cfg.seed, device)
    tokens = store.tokens() if cfg.loss == "ce" else None
    with Progress(cfg.steps, f"train {lens.kind}", unit="step", initial=state.step) as bar:
        for x, idx in batches.iterate(state.step):
            active = state.active(keys, cfg.patience)
            if state.step >= cfg.steps or not active:
                break
            labels = _next_token_labels(store, tokens, idx) if tokens is not None else None
            labels = tuple(t.to(device) for t in labels) if labels is not None else None
            losses = train_step(lens, x.to(device), keys, cfg, labels, active)
            optimizer_step(lens, active, opt, cfg, multipliers)
            lr = sched.get_last_lr()[0]
            sched.step()
            state.step += 1
            state.history += [
                {"step": state.step, "position": k[0], "layer": k[1], "train_loss": v, "lr": lr}
                for k, v in losses.items()
            ]
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                state.record_validation(lens, val.kl(lens, active), state.step)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                _save_ckpt(ckpt[0], ckpt[1], lens, opt, sched, state)
            bar.update(1, loss=f"{sum(losses.values()) / len(losses):.3f}", layers=len(active))
    return state


def train(
    store_path: Path, val_store_path: Path, model_dir: Path, out_dir: Path, cfg: TrainConfig, kind: str
) -> dict[str, Any]:
    """Train one ``kind`` lens from the stores; write it to ``out_dir``. Resumable.

    One process at a time per ``out_dir``: a second one is refused (it would share the
    checkpoint and race on the final rename).
    """
    with exclusive_output(out_dir, "the lens"):
        return _train(store_path, val_store_path, model_dir, Path(out_dir), cfg, kind)


def train_group(
    store_path: Path, val_store_path: Path, model_dir: Path, out_dir: Path, cfg: TrainConfig, kind: str, group: int
) -> dict[str, Any]:
    """Train group ``group`` of ``cfg.layer_groups`` (a separate job); see pipeline.merge."""
    from dataclasses import replace

    layers = cfg.group_layers(read_model_info(model_dir)["n_layers"], group)
    log.info("layer group %d of %d: layers %s", group, cfg.layer_groups, layers)
    return train(store_path, val_store_path, model_dir, out_dir, replace(cfg, layers=layers, layer_groups=1), kind)


def _train(store_path, val_store_path, model_dir, out_dir: Path, cfg: TrainConfig, kind: str) -> dict[str, Any]:
    t0 = time.monotonic()
    store, val_store = open_store(store_path), open_store(val_store_path)
    info = check_store_model(store, model_dir)
    check_store_model(val_store, model_dir)
    device = resolve_device(cfg.device, "train.device")
    head = load_unembed_head(model_dir).to(device)
    layers = cfg.layer_list(store.n_layers)
    inside = P.ATTENTION.name in store.positions  # the store decides: every position it holds is trained
    lens = TunedLens.create(
        head,
        kind,
        d_model=store.d_model,
        n_layers=store.n_layers,
        model_info=info,
        layers=layers,
        attention_layers=layers if inside else None,
        seed=cfg.seed,
        **kinds.get(kind).options_from(cfg),
    ).to(device)
    keys = lens.keys()
    opt, sched = make_optimizer(lens, cfg)
    fingerprint = sha256_json(
        {
            "cfg": asdict(cfg),
            "kind": kind,
            "store": store.attrs.get("fingerprint"),
            "checkpoint_format": CHECKPOINT_FORMAT,
            "val": val_store.attrs.get("fingerprint"),
            "model": info["weights_sha256"],
        }
    )
    ckpt = (_ckpt_path(Path(out_dir)), fingerprint)
    if inside and P.ATTENTION.name not in val_store.positions:
        raise StoreError(
            f"the train store holds the attention position but the validation store "
            f"{val_store.location.zarr_store} does not: extract both with the same extract.positions"
        )
    val = Validation(val_store, keys, cfg.val_tokens, head, device, cfg.batch_tokens, cfg.seed)
    state = _load_ckpt(ckpt[0], fingerprint, lens, opt, sched)
    if state is None:
        state = TrainState(logit_lens_val=val.kl(LogitLens(head)))
        if _init_kind(cfg, kind) == "lstsq":
            fit_least_squares(lens, store, cfg, device)
        state.init_val = val.kl(lens)
        state.record_validation(lens, state.init_val, 0)
    scales = residual_scales(store, keys) if cfg.step_scale == "residual" else None
    state = run_training(lens, store, val, cfg, state, opt, sched, ckpt, device, step_multipliers(lens, scales))
    return _finish(lens, state, cfg, kind, Path(out_dir), store, val, ckpt[0], time.monotonic() - t0, scales)


def _finish(
    lens,
    state: TrainState,
    cfg,
    kind,
    out_dir: Path,
    store,
    val: Validation,
    ckpt: Path,
    seconds: float,
    scales: dict[int, float] | None = None,
):
    """Keep each lens position's best validated translator, save the lens and its training log."""
    for key, tensors in state.best_state.items():
        lens.translator(key).load_state_dict(tensors)

    def by_label(values: dict) -> dict[str, float]:  # "12" (block 12), "attn.12": in depth order
        return {P.label(k): v for k, v in sorted(values.items(), key=lambda kv: P.depth_rank(kv[0]))}

    metrics = {
        "val_kl": by_label(state.best_val),
        "val_kl_logit_lens": by_label(state.logit_lens_val),
        "val_kl_init": by_label(state.init_val),
        "steps": state.step,
        "seconds": seconds,
        "init": _init_kind(cfg, kind),
        "train_store": str(store.location.zarr_store),
        "train_store_fingerprint": store.attrs.get("fingerprint"),
        "val_sequences": [int(i) for i in val.sequences],
        "residual_scales": by_label(scales) if scales else None,
        "stopping": by_label(stopping(state.history, state.best_val, state.bad_evals, state.step, cfg)),
        # the convergence study's test KL for this model, kind and training data, where measured
        "converged_test_kl": converged(
            lens.model_info.get("weights_sha256"), kind, store.attrs.get("fingerprint"), "train_store"
        )
        or None,
    }
    lens.save(out_dir, training_config=asdict(cfg) | {"kind": kind}, metrics=metrics)
    write_train_log(
        out_dir / "train_log.parquet",
        state.history,
        kind,
        {
            "training_config": asdict(cfg) | {"kind": kind},
            "model": store.provenance.get("model"),
            "train_store_fingerprint": metrics["train_store_fingerprint"],
            "translators_sha256": read_lens_meta(out_dir).get("translators_sha256"),
            "versions": package_versions(),
        },
    )
    ckpt.unlink(missing_ok=True)
    for position in lens.positions:

        def mean(values: dict, position=position) -> float:
            at = [v for k, v in values.items() if k[0] == position]
            return sum(at) / max(len(at), 1)

        log.info(
            "%s lens (%s position): mean validation KL %.3f nats (logit lens %.3f) after %d steps in %.0f s",
            kind,
            position,
            mean(state.best_val),
            mean(state.logit_lens_val),
            state.step,
            seconds,
        )
    return metrics
