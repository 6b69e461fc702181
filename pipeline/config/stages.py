"""The config's stage sections: ``extract``, ``train``, ``evaluate``, ``analyses``, ``report``."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from .. import positions as P
from ..errors import ConfigError
from ..lens import kinds
from ..store.dtypes import DTYPES
from ..store.layout import COMPRESSIONS
from .fields import check, setting

SPLITS = ("train", "validation", "test")
STORE_DTYPES = tuple(DTYPES)
#: ``device`` settings: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE = r"auto|cpu|cuda(:[0-9]+)?"


@dataclass
class ExtractConfig:
    max_tokens: dict[str, int | None] = setting(
        factory=lambda: {"train": 24576, "validation": 4096, "test": 8192}, keys=SPLITS, ge=1
    )
    """Token budget per split (rounded down to whole sequences); ``null`` = the whole split.
    Sequences are drawn at random (``seed``) across the split, then kept in corpus order."""
    seed: int = 0
    """Seed of the sequence selection under a token budget."""
    batch_size: int = setting(8, ge=1)
    """Sequences per forward pass."""
    dtype: str = setting("bfloat16", choices=lambda: list(DTYPES))
    """Storage dtype: ``bfloat16`` (default: float32's range, so residual norms of ~1e4
    and beyond cannot overflow), ``float16`` (more mantissa, max 65,504: overflow stops the
    run with an error), ``float32``, or 8 bits a value with a float32 scale per layer and
    token: ``fp8`` (float8 e4m3fn) or ``int8`` (half the bytes of bfloat16; they cannot
    overflow; their cost to lens quality is measured in docs/explanation/compact-stores.md)."""
    positions: list[str] = setting(factory=lambda: list(P.DEFAULT), choices=P.names)
    """Lens positions to store (pipeline.positions): ``block`` (the residual between blocks,
    always) and ``attention`` (inside each block, after its attention sublayer, before its
    MLP: another ``n_layers`` states a token, so about twice the bytes; every lens is then
    trained and evaluated there too)."""
    device: str = setting("auto", pattern=DEVICE)
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    compute_dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"))
    """dtype of the forward pass: ``auto`` = float32 on CPU (bf16 matmuls are ~400x slower
    on this CPU), bfloat16 on CUDA."""
    shard_tokens: int = setting(4096, ge=1)
    """Tokens per shard (one shard = all layers for these tokens, one file, one writer);
    a multiple of ``chunk_tokens`` and of the corpus ``seq_len``."""
    chunk_tokens: int = setting(512, ge=1)
    """Tokens per inner chunk (one layer): the unit a one-layer read decompresses."""
    compression: str = setting("zstd", choices=COMPRESSIONS)
    """``zstd`` (saves ~22% on bf16 activations), ``blosc-lz4-bitshuffle`` (~17%, at ~3x
    zstd's encode and decode rates: for machines with few cores), ``blosc-zstd`` or
    ``blosc-lz4`` (byte shuffle), or ``none``."""
    level: int = setting(3, ge=0, le=22)
    """Compression level."""

    parts: int = setting(1, ge=1)
    """Extraction jobs per split: each writes whole shards of its own sequence range
    (rule ``extract_part``); ``assemble_store`` links them into one store. 1 = one job."""

    def __post_init__(self) -> None:
        check(self, "extract")
        try:
            self.positions = list(P.check(self.positions))  # in depth order, whatever the config's
        except (TypeError, ValueError) as e:
            raise ConfigError(f"extract.positions: {e}") from None
        if self.shard_tokens % self.chunk_tokens:
            raise ConfigError(
                f"extract.shard_tokens ({self.shard_tokens}) must be a positive multiple of "
                f"chunk_tokens ({self.chunk_tokens})"
            )

    def store_settings(self) -> dict:
        """What shapes a store besides its budget: every field but ``device`` and ``max_tokens``,
        and ``positions`` only where it is not the default, so a store of block states has the
        provenance (and fingerprint) of a store from before positions, and caches made then
        stay valid."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("device", "max_tokens")}
        if tuple(self.positions) == P.DEFAULT:
            del out["positions"]
        return out

    def budget(self, split: str, seq_len: int) -> int | None:
        """Number of sequences to extract for ``split`` (None = all)."""
        tokens = self.max_tokens.get(split)
        return None if tokens is None else max(1, tokens // seq_len)


@dataclass
class TrainConfig:
    kinds: list[str] = setting(factory=lambda: ["affine"], choices=kinds.names)
    """Translator kinds to train, one lens each (registered in pipeline.lens.kinds):
    affine (h + Wh + b), linear (Wh, no bias), mlp (h + MLP(h)), scaling (h * s + b), and any
    kind a plugin registers."""
    layers: Literal["all"] | list[int] = setting("all", ge=0)
    """Layers that get a translator: ``all`` (0..n_layers-1) or a list."""
    layer_groups: int = setting(1, ge=1)
    """Split those layers into this many contiguous groups, each trained by its own job
    (rule ``train_group``: separate cluster jobs), then merged into one lens (rule
    ``merge_lens``). 1 = one job per lens."""
    loss: str = setting("kl", choices=("kl", "ce"))
    """``kl``: KL(final model distribution || lens distribution), the reference's default;
    ``ce``: cross-entropy to the next token."""
    init: str = setting("auto", choices=("auto", "lstsq", "identity"))
    """``auto`` = least squares for affine/linear, identity otherwise; ``lstsq``; ``identity``
    (the logit lens, as the reference starts)."""
    ridge: float = setting(1e-6, ge=0)
    """Ridge of the least-squares fit, relative to the mean input variance."""
    steps: int = setting(12, ge=0)
    """Optimiser steps (0 = least squares only)."""
    batch_tokens: int = setting(512, ge=1)
    """Tokens per step."""
    optimizer: str = setting("adam", choices=("sgd", "adam"))
    """``sgd`` (Nesterov momentum, as the reference) or ``adam``."""
    lr_scale: float = setting(0.3, gt=0)
    """Multiplies the default learning rate (1.0 for SGD, as an effective rate: PyTorch's
    momentum scales it by 1/(1-momentum), which is undone; 1e-3 for Adam)."""
    momentum: float = setting(0.9, ge=0, lt=1)
    """SGD momentum / Adam beta1."""
    weight_decay: float = setting(1e-3, ge=0)
    """L2 weight decay toward the identity (the logit lens) for every kind: affine, mlp and
    scaling translators are the identity at zero parameters; a linear translator's W is
    decayed toward I."""
    step_scale: str = setting("residual", choices=("none", "residual"))
    """``residual``: each layer's gradient step is scaled by the size of its residual stream
    relative to the output's (SGD: ``(s_L / s_l)^2`` for weights, ``s_L^2`` for biases; Adam:
    their square roots; see pipeline.lens.optim), so that one learning rate suits every
    layer; ``none``: one step size for all layers, as the reference. Every kind (an mlp's
    weights take its affine part's multipliers)."""
    warmup_steps: int = setting(0, ge=0)
    """Linear warm-up steps before the linear decay to zero."""
    clip_grad: float = setting(1.0, ge=0)
    """Gradient-norm clipping, per layer's translator (0 = off); the reference clips all
    layers jointly, which made a layer's steps depend on the layers sharing its job."""
    buffer_shards: int = setting(2, ge=1)
    """Store shards held in memory for shuffling (tokens are shuffled within the buffer,
    shard order is shuffled per epoch)."""
    val_tokens: int = setting(512, ge=1)
    """Validation tokens for early stopping and the training log: whole sequences, one
    drawn (``seed``) from each of equal parts of the validation store."""
    eval_every: int = setting(4, ge=1)
    """Validate every this many steps (and at the start and the end)."""
    patience: int = setting(2, ge=0)
    """A layer stops training after this many validations without improvement; training
    ends when every layer has stopped or after ``steps`` (0 = never stop early)."""
    checkpoint_every: int = setting(4, ge=0)
    """Write a resumable checkpoint every this many steps (0 = never)."""
    seed: int = 0
    """Seed of the data order and of the validation sequences."""
    mlp_hidden: int | None = setting(None, ge=1)
    """Hidden width of mlp translators (default d_model)."""
    mlp_depth: int = setting(1, choices=(1, 2))
    """Hidden layers of mlp translators (1 or 2)."""
    branch_lr: float = setting(0.01, ge=0)
    """Learning rate of an mlp's branch (its hidden layers, beside the affine part) relative
    to the rest of the translator. At the affine part's rate, the default's 12 Adam steps move
    every branch weight at once and left the mlp lens 1.5% above the affine one (layer 6 of
    SmolLM2, branch_lr 0.1) to 3% (1.0); at 0.01 its validation KL is within 0.2% of
    affine's at every layer of SmolLM2 (0.03: 0.47%). Long runs, where the branch pays, set
    their own (benchmarks/convergence.py uses 1)."""
    device: str = setting("auto", pattern=DEVICE)
    """``auto`` (CUDA if available), ``cpu``, ``cuda[:N]``."""

    def __post_init__(self) -> None:
        check(self, "train")
        if not self.kinds:
            raise ConfigError(f"train.kinds is empty; kinds are {kinds.names()}")
        if not self.layers:
            raise ConfigError("train.layers must be 'all' or a non-empty list of layer indices")
        lstsq = [k.name for k in kinds.KINDS.values() if k.lstsq]
        if self.init == "lstsq" and set(self.kinds) - set(lstsq):
            raise ConfigError(f"train.init: lstsq applies to {'/'.join(lstsq)} translators only; use auto")
        if self.warmup_steps > self.steps:
            raise ConfigError("train.warmup_steps must be in [0, steps]")

    def group_layers(self, n_layers: int, group: int) -> list[int]:
        """The layers of group ``group`` (0-based) of ``layer_groups`` contiguous groups."""
        layers = self.layer_list(n_layers)
        if self.layer_groups > len(layers):
            raise ConfigError(f"train.layer_groups={self.layer_groups} exceeds the {len(layers)} layers to train")
        size, extra = divmod(len(layers), self.layer_groups)
        start = group * size + min(group, extra)
        return layers[start : start + size + (group < extra)]

    def layer_list(self, n_layers: int) -> list[int]:
        if self.layers == "all":
            return list(range(n_layers))
        bad = [i for i in self.layers if not 0 <= i < n_layers]
        if bad:
            raise ConfigError(f"train.layers {bad} out of range: the model's lens layers are 0..{n_layers - 1}")
        return sorted(set(self.layers))


#: Largest evaluation (in tokens) for which ``token_metrics: auto`` writes the per-token table.
TOKEN_TABLE_AUTO_MAX = 65536


@dataclass
class EvaluateConfig:
    split: str = setting("test", choices=SPLITS)
    """Held-out split to evaluate on."""
    max_tokens: int | None = setting(4096, ge=1)
    """Tokens of the split's store to evaluate: whole sequences, one drawn (``seed``) from
    each of equal parts of the store, so every document region is represented (the store
    keeps corpus order); null = the whole store. Each token costs one
    (d_model x vocab) matmul per layer and lens: 4,096 tokens, 31 layers and 2 lenses take
    about 3 minutes on 2 CPU cores."""
    chunk_tokens: int = setting(1024, ge=1)
    """Tokens per dask task (a multiple of seq_len); bounds each task's memory."""
    topk: int = setting(5, ge=1)
    """k of the top-k agreement metric (final top-1 within the lens top-k)."""
    bootstrap: int = setting(1000, ge=10)
    """Bootstrap resamples (over sequences) for the 95% confidence intervals."""
    calibration_bins: int = setting(10, ge=1)
    """Equal-width confidence bins of the calibration table and ECE."""
    token_metrics: bool | Literal["auto"] = "auto"
    """Write the per-token table (tokens x layers x lenses rows): ``auto`` = only when at
    most ``TOKEN_TABLE_AUTO_MAX`` tokens are evaluated; or true / false."""
    scheduler: str | None = None
    """Address of a dask.distributed scheduler (``tcp://host:8786``); null = dask's local
    threaded scheduler with the rule's threads."""
    seed: int = 0
    """Seed of the evaluated sequences and of the bootstrap."""

    def __post_init__(self) -> None:
        check(self, "evaluate")

    def want_token_table(self, n_tokens: int) -> bool:
        if self.token_metrics == "auto":
            return n_tokens <= TOKEN_TABLE_AUTO_MAX
        return bool(self.token_metrics)


@dataclass
class AnalysesConfig:
    enabled: bool = True
    """Run the analysis rules (prediction depth, layer contributions, translator anatomy,
    token categories, layer transfer, causal fidelity, anomaly detection, fact localization,
    attention vs MLP, model comparison) and put them in the report."""
    translator: str | None = setting(None, choices=kinds.names)
    """Tuned lens the analyses use; null = the first of ``train.kinds``. Translator
    anatomy needs a kind registered as a linear map (affine, linear, scaling)."""
    taus: list[float] = setting(factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99], gt=0, le=1)
    """Confidence thresholds of the early-exit curve."""
    skip_tokens: int = setting(2048, ge=1)
    """Held-out tokens (whole evaluated sequences, spread over the evaluation) on which each
    block is skipped to measure its real removal cost: 8 sequences of SmolLM2's 256 tokens,
    the fewest a finding resolves on (pipeline.analyses.layer_contributions). Each skip
    runs the model from that block on (pipeline.model.resume)."""
    transfer_tokens: int = setting(256, ge=1)
    """Tokens sampled for the layer-transfer matrix."""
    transfer_stride: int = setting(3, ge=1)
    """Use every n-th layer in the transfer matrix (its cost grows with the square of the
    layers used: stride 2 costs SmolLM2 ~2.2x the default stride 3, all 30 layers ~9x)."""
    causal_layers: int = setting(3, ge=1)
    """Layers (spread over the depth) at which causal fidelity extracts and ablates directions."""
    causal_directions: int = setting(32, ge=1)
    """Directions extracted per layer for causal fidelity (each costs the model's blocks from
    that layer on, on ``causal_tokens`` tokens): the Spearman over them excludes 0 for a
    true correlation of 0.5 from ~18 directions on (pipeline.analyses.causal_fidelity)."""
    causal_random: int = setting(8, ge=1)
    """Random directions per layer, the baseline the extracted ones are compared with."""
    causal_tokens: int = setting(256, ge=1)
    """Held-out tokens (whole sequences) the ablations are measured on; as many others fit
    the directions."""
    anomaly_sequences: int = setting(200, ge=1)
    """Windows per class for anomaly detection's main question: normal, control and injected
    windows of the test split, and as many normal validation windows to fit the detector
    on (200 per class: an AUROC CI half-width of 0.057 at 0.5)."""
    anomaly_other: int = setting(32, ge=1)
    """Windows of each of the far anomalies, shuffled tokens and code (resolved with fewer)."""
    anomaly_tokens: int = setting(32, ge=1)
    """Tokens per window for anomaly detection (at most the corpus's seq_len)."""
    anomaly_stride: int = setting(6, ge=1)
    """Anomaly detection's trajectory features use every n-th lens layer."""

    def __post_init__(self) -> None:
        check(self, "analyses")
        if not self.taus:
            raise ConfigError("analyses.taus must be a non-empty list of numbers in (0, 1]")


@dataclass
class ReportConfig:
    prompts: list[str] = setting(
        factory=lambda: ["To be, or not to be, that is the question:", "The capital of France is"]
    )
    """Prompts whose prediction trajectories the report plots (the model runs on the first
    24 tokens of each; they are not in the cache)."""

    def __post_init__(self) -> None:
        check(self, "report")
        if not all(self.prompts):
            raise ConfigError("report.prompts must be a list of non-empty strings")
