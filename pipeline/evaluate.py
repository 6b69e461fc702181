"""evaluate: logit lens vs tuned lenses on a held-out split, chunk-parallel with dask.

Each dask task reads one chunk of whole sequences from the store (all layers, at every lens
position it holds: ``pipeline.positions``), runs every lens at every lens position through
the frozen head, and returns per-sequence sums of each metric
(so confidence intervals can be bootstrapped over sequences), calibration bins, and, when
enabled, writes its own part of the per-token table. Memory is bounded by the chunk size
whatever the split's size; the local threaded scheduler is the default and a
dask.distributed scheduler address in the config sends the tasks to a cluster.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import metrics as M
from . import positions as P
from .config import EvaluateConfig
from .corpus import load_split
from .errors import StoreError
from .lens.tuned import LogitLens, TunedLens, logits_into, read_lens_meta
from .model.head import load_unembed_head
from .progress import Progress
from .provenance import exclusive_output, package_versions
from .sampling import (
    document_counts,
    format_documents,
    read_sequence_tokens,
    read_sequences,
    split_sequences,
    spread_sequences,
    token_index,
)
from .store.reader import check_store_model, open_store
from .tables import LOGIT, MODEL, calibration_table, layer_metrics_table, lens_identity, write_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    store: str
    model_dir: str
    lens_dirs: tuple[tuple[str, str], ...]  # (kind, path)
    seq_len: int
    n_layers: int
    topk: int
    n_bins: int
    token_dir: str | None
    identity: tuple[tuple[str, str], ...] = ()
    provenance: str = "{}"  # JSON, stored in every per-token part's metadata
    positions: tuple[str, ...] = P.DEFAULT  # the store's lens positions: every one is evaluated


#: A result's key: (lens name, position, layer).
ResultKey = tuple[str, str, int]


def result_order(key: ResultKey) -> tuple:
    """Lens by lens, each in depth order (block 0, attention 0, block 1, ...)."""
    return key[0], P.depth_rank(key[1:])


@dataclass
class ChunkResult:
    sums: dict[ResultKey, dict[str, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)
    calibration: dict[ResultKey, M.CalibrationBins] = field(default_factory=dict)


@functools.lru_cache(maxsize=4)
def _lenses(model_dir: str, lens_dirs: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    """Head and lenses, loaded once per worker process (dask tasks reuse them)."""
    head = load_unembed_head(model_dir)
    lenses: dict[str, Any] = {LOGIT: LogitLens(head)}
    for kind, path in lens_dirs:
        lenses[kind] = TunedLens.load(path, head=head, model_dir=model_dir).eval()
    return lenses


def _per_seq(values: torch.Tensor, mask: torch.Tensor | None, seq_len: int):
    mask = torch.ones_like(values, dtype=torch.bool) if mask is None else mask
    sums, counts = M.per_sequence_sums(values.double(), mask, seq_len)
    return sums.numpy(), counts.numpy()


def _metric_values(st: dict[str, torch.Tensor], chunk: Chunk) -> dict[str, tuple]:
    """Per-token values and the mask each metric is averaged under (None = all tokens)."""
    m = chunk.mask
    return {
        "kl": (st["kl"], None),
        "ce": (st["ce"], m),
        "acc": ((st["top1"] == chunk.next_ids).double(), m),
        "agree_top1": (st["agree_top1"].double(), None),
        "agree_topk": (st["agree_topk"].double(), None),
        "entropy": (st["entropy"], None),
        "nats_per_byte": (st["ce"], m),
    }


def _add(result: ChunkResult, key, vals: dict, chunk: Chunk, seq_len: int) -> None:
    out = {}
    for name, (v, m) in vals.items():
        out[name] = _per_seq(v, m, seq_len)
    # a ratio of sums: CE nats over the bytes of the predicted tokens
    out["nats_per_byte"] = (out["nats_per_byte"][0], chunk.byte_counts)
    result.sums[key] = out


@dataclass
class Chunk:
    """The per-chunk inputs every lens shares."""

    x: dict[str, torch.Tensor]  # per position: block (L+1, n, d_model), attention (L, n, d_model)
    ids: torch.Tensor  # (n,)
    next_ids: torch.Tensor  # (n,)
    mask: torch.Tensor  # (n,) next token exists
    final: dict[str, torch.Tensor]  # the model's p (n, vocab), neg_entropy (n,), top1 (n,)
    index: np.ndarray  # (n,) store index of each token
    byte_counts: np.ndarray  # (n_seq,) bytes of the predicted tokens per sequence


def _evaluate_one(result: ChunkResult, key, z, chunk: Chunk, job: Job, tokens: list) -> torch.Tensor:
    """Metrics of one lens at one layer from its logits z (n, vocab); returns its top-1 ids."""
    st = M.logit_stats(z, chunk.final, chunk.next_ids, job.topk, with_rank=bool(job.token_dir))
    vals = _metric_values(st, chunk)
    _add(result, key, vals, chunk, job.seq_len)
    cal = M.CalibrationBins(job.n_bins)
    cal.update(st["top1_prob"], st["top1"] == chunk.next_ids, chunk.mask)
    result.calibration[key] = cal
    if job.token_dir:
        tokens.append(_token_rows(key, chunk, st))
    return st["top1"]


@torch.no_grad()
def evaluate_chunk(job: Job, seqs: tuple[int, ...], token_bytes: np.ndarray, part: int) -> ChunkResult:
    """All lenses x all lens positions on the whole store sequences ``seqs``."""
    store = open_store(job.store)
    x = {
        position: read_sequences(
            store, [(position, layer) for layer in range(P.POSITIONS[position].n_states(job.n_layers))], seqs
        )
        for position in job.positions
    }  # block (L+1, n, d_model), attention (L, n, d_model)
    ids = read_sequence_tokens(store, seqs)  # (n,)
    return evaluate_tensors(job, _lenses(job.model_dir, job.lens_dirs), x, ids, seqs, token_bytes, part)


def _lens_keys(name: str, lens, job: Job) -> list[P.Key]:
    """The lens positions a lens is evaluated at, in depth order: the logit lens at every
    one of the store's, a tuned lens where it has a translator (and the store the states)."""
    if name == LOGIT:
        return P.depth_order(job.n_layers, job.positions)
    return [k for k in lens.keys() if k[0] in job.positions]


@torch.no_grad()
def evaluate_tensors(
    job: Job,
    lenses: dict[str, Any],
    x: dict[str, torch.Tensor] | torch.Tensor,
    ids: torch.Tensor,
    seqs: tuple[int, ...],
    token_bytes: np.ndarray,
    part: int,
) -> ChunkResult:
    """The compute of :func:`evaluate_chunk` on the states ``x`` already read (per position:
    block (L+1, n, d_model), attention (L, n, d_model); a tensor: the block's) and token ids
    (n,) (benchmarks/bench_evaluate.py times it alone)."""
    x = x if isinstance(x, dict) else {P.BLOCK.name: x}
    next_ids, mask = M.next_token_targets(ids, job.seq_len)  # (n,), (n,)
    final_logits = logits_into(lenses[LOGIT], x[P.BLOCK.name][-1], job.n_layers)  # (n, vocab), a reused buffer
    nbytes = torch.from_numpy(np.roll(token_bytes, -1)).double()  # bytes of the next token
    chunk = Chunk(
        x,
        ids,
        next_ids,
        mask,
        M.final_stats(final_logits),
        token_index(seqs, job.seq_len),
        _per_seq(nbytes, mask, job.seq_len)[0],
    )
    result, tokens = ChunkResult(), []
    _evaluate_one(result, (MODEL, P.BLOCK.name, job.n_layers), final_logits, chunk, job, tokens)
    for name, lens in lenses.items():
        keys = _lens_keys(name, lens, job)
        tops = {
            (position, layer): _evaluate_one(
                result,
                (name, position, layer),
                logits_into(lens, x[position][layer], layer, position),
                chunk,
                job,
                tokens,
            )
            for position, layer in keys
        }
        for key, a in tops.items():  # consistency: top-1 kept by the next lens layer
            b = tops.get(_successor(key, keys, job.n_layers), chunk.final["top1"])
            result.sums[(name, *key)]["consistency"] = _per_seq((a == b).double(), None, job.seq_len)
    if job.token_dir:
        _write_token_part(job, tokens, part)
    return result


def _successor(key: P.Key, keys: list[P.Key], n_layers: int) -> P.Key:
    """The next block position of the lens after ``key`` (its consistency's reference): the
    next block layer it has, the model's output after the last."""
    later = [layer for position, layer in keys if position == P.BLOCK.name and layer > key[1]]
    return P.BLOCK.name, min(later, default=n_layers)


def _token_rows(key: ResultKey, chunk: Chunk, st: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    n, mask = len(chunk.ids), chunk.mask.numpy()
    return {
        "lens": np.full(n, key[0]),
        "layer": np.full(n, key[2], np.int32),
        "position": np.full(n, key[1]),
        "token_index": chunk.index,
        "token_id": chunk.ids.numpy().astype(np.int32),
        "next_token_id": np.where(mask, chunk.next_ids.numpy(), -1).astype(np.int32),
        "top1_id": st["top1"].numpy().astype(np.int32),
        "top1_prob": st["top1_prob"].float().numpy(),
        "next_token_rank": np.where(mask, st["rank"].numpy(), -1).astype(np.int32),
        "kl": st["kl"].float().numpy(),
    }


def _write_token_part(job: Job, rows: list[dict], part: int) -> None:
    """This chunk's rows of the per-token table, one file per lens (hive-partitioned)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    model = dict(job.identity).get("model", "model")
    for lens in sorted({r["lens"][0] for r in rows}):
        mine = [r for r in rows if r["lens"][0] == lens]
        table = pa.Table.from_pydict({k: np.concatenate([r[k] for r in mine]) for k in mine[0] if k != "lens"})
        kind, translator = lens_identity(lens)
        out = Path(job.token_dir) / f"model={model}" / f"lens={kind}" / f"translator={translator or 'none'}"
        out.mkdir(parents=True, exist_ok=True)
        pq.write_table(
            table.replace_schema_metadata({"lenspipe": job.provenance}),
            out / f"part-{part:05d}.parquet",
            compression="zstd",
        )


def _combine(results: list[ChunkResult]) -> ChunkResult:
    out = ChunkResult()
    for r in results:
        for key, metrics in r.sums.items():
            dst = out.sums.setdefault(key, {})
            for name, (s, c) in metrics.items():
                if name in dst:
                    dst[name] = (np.concatenate([dst[name][0], s]), np.concatenate([dst[name][1], c]))
                else:
                    dst[name] = (s, c)
        for key, cal in r.calibration.items():
            out.calibration[key] = out.calibration[key].merge(cal) if key in out.calibration else cal
    return out


def summarize(combined: ChunkResult, cfg: EvaluateConfig) -> list[dict[str, Any]]:
    """One dict per (lens, position, layer): point estimates, bootstrap CIs, derived metrics."""
    rows = []
    for (lens, position, layer), metrics in sorted(combined.sums.items(), key=lambda kv: result_order(kv[0])):
        row: dict[str, Any] = {
            "lens": lens,
            "position": position,
            "layer": layer,
            "n_tokens": int(metrics["kl"][1].sum()),
            "n_predicted": int(metrics["ce"][1].sum()),
        }
        for name, (s, c) in metrics.items():
            row[name] = float(s.sum() / max(c.sum(), 1e-12))
            lo, hi = M.bootstrap_ci(torch.from_numpy(s), torch.from_numpy(c), n_boot=cfg.bootstrap, seed=cfg.seed)
            row[f"{name}_lo"], row[f"{name}_hi"] = float(lo), float(hi)
        row["ppl"] = math.exp(row["ce"])
        for name in ("nats_per_byte", "nats_per_byte_lo", "nats_per_byte_hi"):
            row[name.replace("nats_per_byte", "bpb")] = row.pop(name) / math.log(2)
        row["ece"] = float(combined.calibration[(lens, position, layer)].ece())
        rows.append(row)
    return rows


def _plan(store, cfg: EvaluateConfig) -> list[tuple[int, ...]]:
    """Chunks of store sequence indices: ``max_tokens`` worth of whole sequences spread over
    the whole store (seeded), never its first sequences (the store keeps corpus order)."""
    if cfg.max_tokens is not None and cfg.max_tokens < store.seq_len:
        raise StoreError(f"evaluate.max_tokens ({cfg.max_tokens}) is less than one sequence ({store.seq_len})")
    k = None if cfg.max_tokens is None else cfg.max_tokens // store.seq_len
    seqs = [int(i) for i in spread_sequences(store.n_tokens // store.seq_len, k, cfg.seed)]
    per = max(1, cfg.chunk_tokens // store.seq_len)
    return [tuple(seqs[i : i + per]) for i in range(0, len(seqs), per)]


@dataclass
class SplitTokens:
    """Per store token, what the packed split knows about it."""

    token_bytes: np.ndarray  # (n_tokens,) UTF-8 bytes the token covers
    doc_index: np.ndarray  # (n_tokens,) index into doc_ids
    doc_ids: list[str]


def _split_tokens(store, split_path: Path) -> SplitTokens:
    """Bytes and document of every store token, from the packed split (checked to be the
    same tokens)."""
    packed = load_split(split_path)
    sel = store.provenance.get("seq_index", "all")
    idx = np.arange(len(packed.tokens)) if sel == "all" else np.asarray(sel)
    if packed.meta["fingerprint"] != store.provenance.get("corpus", {}).get("fingerprint") or not np.array_equal(
        packed.tokens[idx].reshape(-1), store.tokens().numpy()
    ):
        raise StoreError(
            f"the store {store.location.zarr_store} was not extracted from {split_path}: "
            "their tokens differ (another corpus, split or tokenizer)"
        )
    return SplitTokens(
        packed.token_bytes[idx].reshape(-1), packed.doc_index[idx].reshape(-1), list(packed.meta["doc_ids"])
    )


def evaluated_sample(store, plan: list[tuple[int, ...]], split: SplitTokens) -> dict[str, Any]:
    """What was evaluated, for the tables' provenance: the store's and the packed split's
    sequence indices and the tokens taken from each document."""
    seqs = [s for chunk in plan for s in chunk]
    idx = token_index(seqs, store.seq_len)
    docs = document_counts(split.doc_index[idx], split.doc_ids)
    return {
        "sequences": seqs,
        "split_sequences": split_sequences(store, seqs),
        "n_tokens": len(idx),
        "n_bytes": int(split.token_bytes[idx].sum()),
        "documents": docs,
    }


def evaluate_lenses(
    store_path: Path,
    split_path: Path,
    model_dir: Path,
    lens_dirs: dict[str, Path],
    cfg: EvaluateConfig,
    token_dir: Path | None,
    identity: dict[str, str],
    threads: int = 1,
):
    """Evaluate every lens on the store; returns (rows, calibration tables, sample), the
    sample as :func:`evaluated_sample` describes it."""
    import dask

    store = open_store(store_path)
    check_store_model(store, model_dir)
    split = _split_tokens(store, split_path)
    plan = _plan(store, cfg)
    sample = evaluated_sample(store, plan, split)
    job = Job(
        str(store_path),
        str(model_dir),
        tuple((k, str(v)) for k, v in sorted(lens_dirs.items())),
        store.seq_len,
        store.n_layers,
        cfg.topk,
        cfg.calibration_bins,
        str(token_dir) if token_dir and cfg.want_token_table(sample["n_tokens"]) else None,
        tuple(sorted(identity.items())),
        json.dumps(
            {
                "identity": identity,
                "evaluate_config": asdict(cfg),
                "store": str(store_path),
                "store_fingerprint": store.attrs.get("fingerprint"),
                "versions": package_versions(),
            },
            default=str,
        ),
        store.positions,
    )
    tasks = [
        dask.delayed(evaluate_chunk)(job, seqs, split.token_bytes[token_index(seqs, store.seq_len)], i)
        for i, seqs in enumerate(plan)
    ]
    log.info(
        "evaluating %d lens(es) x %d lens positions (%s) on %d tokens (%s) in %d chunks",
        len(lens_dirs) + 1,
        len(P.depth_order(store.n_layers, store.positions)),
        ", ".join(store.positions),
        sample["n_tokens"],
        format_documents(sample["documents"]),
        len(tasks),
    )
    combined = _combine(_compute(tasks, cfg, threads))
    return summarize(combined, cfg), {k: v.table() for k, v in combined.calibration.items()}, sample


def evaluate(
    store_path: Path,
    split_path: Path,
    model_dir: Path,
    lens_dirs: dict[str, Path],
    cfg: EvaluateConfig,
    out_dir: Path,
    identity: dict[str, str],
    threads: int = 1,
) -> list[dict]:
    """Evaluate and write ``out_dir``/{layer_metrics,calibration}.parquet (+ token_metrics/).

    One process at a time per ``out_dir`` (a second one is refused).
    """
    with exclusive_output(out_dir, "the evaluation tables"):
        return _evaluate(store_path, split_path, model_dir, lens_dirs, cfg, Path(out_dir), identity, threads)


def _evaluate(
    store_path,
    split_path,
    model_dir,
    lens_dirs,
    cfg: EvaluateConfig,
    out_dir: Path,
    identity: dict[str, str],
    threads: int,
) -> list[dict]:
    import shutil

    t0 = time.monotonic()
    token_dir = out_dir / "token_metrics"
    shutil.rmtree(token_dir, ignore_errors=True)
    rows, calib, sample = evaluate_lenses(
        store_path, split_path, model_dir, lens_dirs, cfg, token_dir, identity, threads
    )
    store = open_store(store_path)
    tokens_per_byte = sample["n_tokens"] / max(sample["n_bytes"], 1)
    provenance = {
        "identity": identity,
        "evaluate_config": asdict(cfg),
        "store": str(store_path),
        "store_fingerprint": store.attrs.get("fingerprint"),
        "model": store.provenance.get("model"),
        "lenses": {k: read_lens_meta(Path(v)).get("translators_sha256") for k, v in lens_dirs.items()},
        "tokens_per_byte": tokens_per_byte,
        "evaluated": sample,
        "versions": package_versions(),
        "seconds": time.monotonic() - t0,
    }
    write_table(calibration_table(calib, identity, store.n_layers, provenance), out_dir / "calibration.parquet")
    write_table(
        layer_metrics_table(
            rows, identity, store.n_layers, tokens_per_byte, provenance, format_documents(sample["documents"])
        ),
        out_dir / "layer_metrics.parquet",
    )
    log.info("evaluation written to %s in %.0f s", out_dir, time.monotonic() - t0)
    return rows


def _compute(tasks, cfg: EvaluateConfig, threads: int) -> list[ChunkResult]:
    import dask
    from dask.callbacks import Callback

    with Progress(len(tasks), "evaluate", unit="chunk", interval=0) as bar:
        if cfg.scheduler:
            from distributed import Client, as_completed

            with Client(cfg.scheduler) as client:
                futures = client.compute(tasks)
                for _ in as_completed(futures):
                    bar.update(1)
                return client.gather(futures)

        def done(key, *_):
            if str(key).startswith(("evaluate_chunk", "('evaluate_chunk")):
                bar.update(1)

        # torch already uses every core inside one task; more tasks at once would contend
        with Callback(posttask=done):
            return list(dask.compute(*tasks, scheduler="threads", num_workers=max(1, threads // 2)))
