"""train: fit tuned-lens translators from an activation store, never re-running the model.

Per step, one batch of tokens is read for every trained layer plus the last layer; the
target distribution (the model's own, from the stored last layer through the frozen head)
is computed once and shared by all layers. Layers are processed one after another so only
one (batch, vocab) logits tensor is alive at a time. Affine/linear translators start from a
closed-form least-squares fit of the last layer's residual (the reference starts from the
identity); see the README for the measured effect.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .batches import TokenBatches
from .config import TrainConfig
from .devices import resolve_device
from .errors import StoreError
from .lenses import LeastSquaresAccumulator, LogitLens, TunedLens, init_translator_lstsq, read_lens_meta
from .model import read_model_info
from .progress import Progress
from .provenance import exclusive_output, package_versions, sha256_json
from .store import ActivationStore, open_store
from .surgery import load_unembed_head
from .train_log import write_train_log

log = logging.getLogger(__name__)


class KLFromLogits(torch.autograd.Function):
    """Mean KL(p || softmax(z)) over rows, with a fused backward: dKL/dz = softmax(z) - p.

    Autograd through log_softmax + multiply + sum would keep several (batch, vocab)
    tensors; here only z is saved. ``neg_entropy`` = sum p log p over the batch is
    constant per batch and computed once for all layers.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, p: torch.Tensor, neg_entropy: torch.Tensor) -> torch.Tensor:
        if z.dtype in (torch.bfloat16, torch.float16):
            z = z.float()  # (batch, vocab); float32 softmax even under bf16 autocast
        lse = torch.logsumexp(z, dim=-1)  # (batch,)
        ctx.save_for_backward(z, p, lse)
        # sum p (log p - z + lse) = neg_entropy - <p, z> + sum lse   (rows of p sum to 1)
        return (neg_entropy - torch.dot(p.reshape(-1), z.reshape(-1)) + lse.sum()) / z.shape[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, p, lse = ctx.saved_tensors
        g = torch.exp(z - lse[:, None])  # softmax(z): (batch, vocab)
        g.sub_(p).mul_(grad / z.shape[0])
        return g, None, None


def kl_loss(z: torch.Tensor, target_logp: torch.Tensor) -> torch.Tensor:
    """Mean KL(target || softmax(z)); a convenience for one-off use (train shares p)."""
    p = target_logp.exp()
    return KLFromLogits.apply(z, p, torch.dot(p.reshape(-1), target_logp.reshape(-1)))


@dataclass
class Targets:
    p: torch.Tensor  # (batch, vocab) final-model probabilities
    neg_entropy: torch.Tensor  # () sum over the batch of sum_v p log p


@torch.no_grad()
def targets(head, h_last: torch.Tensor) -> Targets:
    logp = torch.log_softmax(head(h_last).float(), dim=-1)  # (batch, vocab)
    p = logp.exp()
    return Targets(p, torch.dot(p.reshape(-1), logp.reshape(-1)))


def autocast(device: torch.device):
    """bf16 autocast on CUDA (the unembedding matmuls dominate); plain float32 on CPU,
    where bf16 matmuls are hundreds of times slower. Softmax and KL stay float32."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def check_store_model(store: ActivationStore, model_dir: Path) -> dict[str, Any]:
    """The model info of ``model_dir``, after checking the store was extracted from it."""
    info = read_model_info(model_dir)
    theirs = store.provenance.get("model", {}).get("weights_sha256")
    if theirs != info["weights_sha256"]:
        raise StoreError(f"the store {store.location.zarr_store} was extracted from model weights "
                         f"{theirs}, but {model_dir} holds {info['weights_sha256']}: use the model the "
                         "store was made from")
    if store.d_model != info["d_model"] or store.n_layers != info["n_layers"]:
        raise StoreError("the store's d_model/n_layers do not match the model's")
    return info


# ----------------------------------------------------------------------------- setup

def _lens_opts(cfg: TrainConfig, kind: str) -> dict[str, Any]:
    if kind == "mlp":
        return {"hidden": cfg.mlp_hidden, "depth": cfg.mlp_depth}
    return {}


def _init_kind(cfg: TrainConfig, kind: str) -> str:
    return ("lstsq" if kind in ("affine", "linear") else "identity") if cfg.init == "auto" else cfg.init


@torch.no_grad()
def fit_least_squares(lens: TunedLens, store: ActivationStore, cfg: TrainConfig, device) -> None:
    """Set each affine/linear translator to the least-squares map layer -> last layer."""
    layers = lens.layers
    accs = {i: LeastSquaresAccumulator(lens.d_model, device=device) for i in layers}
    shard = store.attrs["params"]["shard_tokens"]
    with Progress(store.n_tokens, "least squares", unit="tok") as bar:
        for s in range(0, store.n_tokens, shard):
            e = min(s + shard, store.n_tokens)
            x = store.layers(layers + [store.n_layers], s, e).to(device)  # (k+1, n, d)
            for j, i in enumerate(layers):
                accs[i].update(x[j], x[-1])
            bar.update(e - s)
    for i in layers:
        init_translator_lstsq(lens.translators[str(i)], *accs[i].solve(cfg.ridge))


def make_optimizer(params, cfg: TrainConfig):
    if cfg.optimizer == "sgd":
        # PyTorch's momentum scales the step by 1/(1 - momentum); undo it so lr_scale=1 is
        # an effective rate of 1, as the reference does.
        opt = torch.optim.SGD(params, lr=cfg.lr_scale * (1 - cfg.momentum), momentum=cfg.momentum,
                              nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=cfg.lr_scale * 1e-3, betas=(cfg.momentum, 0.999),
                               amsgrad=True, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, 1 - (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


# ----------------------------------------------------------------------------- validation

class Validation:
    """A fixed slice of the validation store, with its targets, kept in memory."""

    def __init__(self, store: ActivationStore, layers: list[int], n_tokens: int, head, device, chunk: int):
        n = min(n_tokens, store.n_tokens)
        self.layers, self.chunk = layers, chunk
        self.x = store.layers(layers + [store.n_layers], 0, n).to(device)  # (k+1, n, d)
        self.targets = [targets(head, self.x[-1, s:s + chunk]) for s in range(0, n, chunk)]

    @torch.no_grad()
    def kl(self, lens) -> dict[int, float]:
        out = {}
        for j, layer in enumerate(self.layers):
            total = 0.0
            for c, t in enumerate(self.targets):
                z = lens(self.x[j, c * self.chunk:(c + 1) * self.chunk], layer)  # (chunk, vocab)
                total += KLFromLogits.apply(z, t.p, t.neg_entropy).item() * t.p.shape[0]
            out[layer] = total / self.x.shape[1]
        return out


# ----------------------------------------------------------------------------- state

@dataclass
class TrainState:
    step: int = 0
    best_val: dict[int, float] = field(default_factory=dict)
    best_state: dict[int, dict] = field(default_factory=dict)
    bad_evals: int = 0
    history: list[dict] = field(default_factory=list)
    logit_lens_val: dict[int, float] = field(default_factory=dict)
    init_val: dict[int, float] = field(default_factory=dict)

    def record_validation(self, lens: TunedLens, val: dict[int, float], step: int) -> None:
        improved = False
        for layer, v in val.items():
            self.history.append({"step": step, "layer": layer, "val_kl": v})
            if v < self.best_val.get(layer, float("inf")) * (1 - 1e-4):
                self.best_val[layer] = v
                self.best_state[layer] = {k: t.detach().clone()
                                          for k, t in lens.translators[str(layer)].state_dict().items()}
                improved = True
        self.bad_evals = 0 if improved else self.bad_evals + 1


def _ckpt_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.ckpt.pt"


def _save_ckpt(path: Path, fingerprint: str, lens, opt, sched, state: TrainState) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": fingerprint, "translators": lens.translators.state_dict(),
                "opt": opt.state_dict(), "sched": sched.state_dict(), "state": asdict(state)}, tmp)
    os.replace(tmp, path)


def _load_ckpt(path: Path, fingerprint: str, lens, opt, sched) -> TrainState | None:
    if not path.exists():
        return None
    ckpt = torch.load(path, weights_only=False)
    if ckpt.get("fingerprint") != fingerprint:
        log.warning("ignoring checkpoint %s from another configuration", path)
        return None
    lens.translators.load_state_dict(ckpt["translators"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    s = ckpt["state"]
    s["best_val"] = {int(k): v for k, v in s["best_val"].items()}
    s["best_state"] = {int(k): v for k, v in s["best_state"].items()}
    for key in ("logit_lens_val", "init_val"):
        s[key] = {int(k): v for k, v in s[key].items()}
    log.info("resuming from step %d (%s)", s["step"], path)
    return TrainState(**s)


# ----------------------------------------------------------------------------- loop

def train_step(lens: TunedLens, x: torch.Tensor, layers: list[int], cfg: TrainConfig,
               labels: tuple[torch.Tensor, torch.Tensor] | None) -> dict[int, float]:
    """One batch for every layer: x (k+1, batch, d_model); returns the loss per layer."""
    losses = {}
    t = targets(lens.head, x[-1]) if cfg.loss == "kl" else None
    for j, layer in enumerate(layers):
        with autocast(x.device):
            z = lens(x[j], layer)  # (batch, vocab)
        if t is not None:
            loss = KLFromLogits.apply(z, t.p, t.neg_entropy)
        else:
            ids, keep = labels
            loss = torch.nn.functional.cross_entropy(z[keep].float(), ids[keep])
        loss.backward()
        losses[layer] = loss.item()
    return losses


def _next_token_labels(store: ActivationStore, tokens: torch.Tensor, idx: torch.Tensor):
    """Next-token ids for global token indices; the last position of a sequence has none."""
    keep = (idx % store.seq_len) != store.seq_len - 1  # (batch,)
    nxt = torch.clamp(idx + 1, max=store.n_tokens - 1)
    return tokens[nxt], keep


def run_training(lens: TunedLens, store: ActivationStore, val: Validation, cfg: TrainConfig,
                 state: TrainState, opt, sched, ckpt: tuple[Path, str], device) -> TrainState:
    layers = lens.layers
    batches = TokenBatches(store, layers + [store.n_layers], cfg.batch_tokens, cfg.buffer_shards, cfg.seed, device)
    tokens = store.tokens() if cfg.loss == "ce" else None
    params = [p for p in lens.translators.parameters() if p.requires_grad]
    with Progress(cfg.steps, f"train {lens.kind}", unit="step", initial=state.step) as bar:
        for x, idx in batches.iterate(state.step):
            if state.step >= cfg.steps or (cfg.patience and state.bad_evals >= cfg.patience):
                break
            labels = _next_token_labels(store, tokens, idx) if tokens is not None else None
            labels = tuple(t.to(device) for t in labels) if labels is not None else None
            losses = train_step(lens, x.to(device), layers, cfg, labels)
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            opt.zero_grad(set_to_none=True)
            lr = sched.get_last_lr()[0]
            sched.step()
            state.step += 1
            state.history += [{"step": state.step, "layer": i, "train_loss": v, "lr": lr} for i, v in losses.items()]
            if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
                state.record_validation(lens, val.kl(lens), state.step)
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                _save_ckpt(ckpt[0], ckpt[1], lens, opt, sched, state)
            bar.update(1, loss=f"{sum(losses.values()) / len(losses):.3f}")
    return state


def train(store_path: Path, val_store_path: Path, model_dir: Path, out_dir: Path,
          cfg: TrainConfig, kind: str) -> dict[str, Any]:
    """Train one ``kind`` lens from the stores; write it to ``out_dir``. Resumable.

    One process at a time per ``out_dir``: a second one is refused (it would share the
    checkpoint and race on the final rename).
    """
    with exclusive_output(out_dir, "the lens"):
        return _train(store_path, val_store_path, model_dir, Path(out_dir), cfg, kind)


def train_group(store_path: Path, val_store_path: Path, model_dir: Path, out_dir: Path,
                cfg: TrainConfig, kind: str, group: int) -> dict[str, Any]:
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
    lens = TunedLens.create(head, kind, d_model=store.d_model, n_layers=store.n_layers, model_info=info,
                            layers=layers, **_lens_opts(cfg, kind)).to(device)
    opt, sched = make_optimizer([p for p in lens.translators.parameters()], cfg)
    fingerprint = sha256_json({"cfg": asdict(cfg), "kind": kind, "store": store.attrs.get("fingerprint"),
                               "val": val_store.attrs.get("fingerprint"), "model": info["weights_sha256"]})
    ckpt = (_ckpt_path(Path(out_dir)), fingerprint)
    val = Validation(val_store, layers, cfg.val_tokens, head, device, cfg.batch_tokens)
    state = _load_ckpt(ckpt[0], fingerprint, lens, opt, sched)
    if state is None:
        state = TrainState(logit_lens_val=val.kl(LogitLens(head)))
        if _init_kind(cfg, kind) == "lstsq":
            fit_least_squares(lens, store, cfg, device)
        state.init_val = val.kl(lens)
        state.record_validation(lens, state.init_val, 0)
    state = run_training(lens, store, val, cfg, state, opt, sched, ckpt, device)
    return _finish(lens, state, cfg, kind, Path(out_dir), store, ckpt[0], time.monotonic() - t0)


def _finish(lens, state: TrainState, cfg, kind, out_dir: Path, store, ckpt: Path, seconds: float):
    """Keep each layer's best validated translator, save the lens and its training log."""
    for layer, tensors in state.best_state.items():
        lens.translators[str(layer)].load_state_dict(tensors)
    metrics = {"val_kl": {str(k): v for k, v in sorted(state.best_val.items())},
               "val_kl_logit_lens": {str(k): v for k, v in sorted(state.logit_lens_val.items())},
               "val_kl_init": {str(k): v for k, v in sorted(state.init_val.items())},
               "steps": state.step, "seconds": seconds, "init": _init_kind(cfg, kind),
               "train_store": str(store.location.zarr_store), "train_store_fingerprint": store.attrs.get("fingerprint")}
    lens.save(out_dir, training_config=asdict(cfg) | {"kind": kind}, metrics=metrics)
    write_train_log(out_dir / "train_log.parquet", state.history, kind,
                    {"training_config": asdict(cfg) | {"kind": kind}, "model": store.provenance.get("model"),
                     "train_store_fingerprint": metrics["train_store_fingerprint"],
                     "translators_sha256": read_lens_meta(out_dir).get("translators_sha256"),
                     "versions": package_versions()})
    ckpt.unlink(missing_ok=True)
    mean = lambda d: sum(d.values()) / max(len(d), 1)  # noqa: E731
    log.info("%s lens: mean validation KL %.3f nats (logit lens %.3f) after %d steps in %.0f s",
             kind, mean(state.best_val), mean(state.logit_lens_val), state.step, seconds)
    return metrics
