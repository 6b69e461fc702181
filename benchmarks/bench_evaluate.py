"""Evaluation's compute against the bare unembedding + softmax on the same shapes (issue 13).

    .venv/bin/python benchmarks/bench_evaluate.py [--tokens 1024 --layers 4 --d-model 576
        --vocab 49152 --rounds 3]

One chunk of ``--tokens`` tokens (whole sequences of 256) through ``evaluate_tensors`` (what
each evaluation task runs once its chunk is read: every lens at every layer through the head,
every metric, the calibration bins and the per-token table's part), with the default
settings (logit lens + an affine tuned lens, top-5, per-token table on, as at the default's
4,096 tokens). Shapes default to SmolLM2-135M's (d_model 576, vocabulary 49,152); fewer
layers than its 30 change nothing per lens-layer and keep the run short.

The bare arm, on the same residuals, is what any evaluation must at least do per lens and
layer: the head (final norm + unembedding matmul) and one softmax, each into a buffer kept
across calls (so the bare arm pays no page faults either). Rounds alternate the two arms;
the best round of each is kept. Prints token-layers/s of both and, last,
``ratio=X`` = evaluate / bare (issue 13's target: >= 0.8), after the time of each pass of
``logit_stats`` over the (tokens x vocab) logits, which is what the gap is made of, and the
speed-up of its cache-sized row blocks (an "unblocked" arm: the same code with every pass
over all rows at once, as before).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline import metrics as M
from pipeline.evaluate import Job, evaluate_tensors
from pipeline.lens.tuned import LogitLens, TunedLens
from pipeline.metrics import fused
from pipeline.model.head import UnembedHead
from pipeline.tables import LOGIT

SEQ_LEN = 256


def lenses(d_model: int, vocab: int, n_layers: int) -> dict:
    g = torch.Generator().manual_seed(0)
    unembed = nn.Linear(d_model, vocab, bias=False)
    unembed.weight.data = torch.randn(vocab, d_model, generator=g) / d_model**0.5
    head = UnembedHead(nn.RMSNorm(d_model), None, unembed).eval()
    tuned = TunedLens.create(head, "affine", d_model=d_model, n_layers=n_layers, model_info={})
    for t in tuned.translators.values():  # a trained lens is not the identity
        W = torch.eye(d_model) + 0.05 * torch.randn(d_model, d_model, generator=g)
        t.set_affine_map(W, 0.1 * torch.randn(d_model, generator=g))
    return {LOGIT: LogitLens(head), "affine": tuned.eval()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    lens = lenses(a.d_model, a.vocab, a.layers)
    n = a.tokens - a.tokens % SEQ_LEN
    x = torch.randn(a.layers + 1, n, a.d_model) * torch.linspace(1, 8, a.layers + 1)[:, None, None]
    ids = torch.randint(0, a.vocab, (n,))
    seqs = tuple(range(n // SEQ_LEN))
    token_bytes = np.full(n, 4, np.int64)
    lens_layers = 1 + 2 * a.layers  # the model's output + logit and tuned lens at every layer
    head = lens[LOGIT].head
    z_buf, q_buf = torch.empty(n, a.vocab), torch.empty(n, a.vocab)

    def bare() -> None:
        for _ in range(lens_layers):
            torch.softmax(head(x[0], out=z_buf), dim=-1, out=q_buf)

    with tempfile.TemporaryDirectory() as tmp:
        job = Job(
            store="", model_dir="", lens_dirs=(), seq_len=SEQ_LEN, n_layers=a.layers, topk=5, n_bins=10, token_dir=tmp
        )

        def evaluate() -> None:
            evaluate_tensors(job, lens, x, ids, seqs, token_bytes, 0)

        def unblocked() -> None:  # the same, each pass over all rows at once (before issue 13's blocks)
            blocks, fused.CACHE_BLOCK_BYTES = fused.CACHE_BLOCK_BYTES, 1 << 62
            try:
                evaluate()
            finally:
                fused.CACHE_BLOCK_BYTES = blocks

        arms = {"bare": bare, "evaluate": evaluate, "unblocked": unblocked}
        best = dict.fromkeys(arms, float("inf"))
        with torch.no_grad():
            for fn in arms.values():  # warm-up: buffers, thread pools
                fn()
            for _ in range(a.rounds):
                for name, fn in arms.items():
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)
        print(
            f"threads={torch.get_num_threads()} tokens={n} lens-layers={lens_layers} d_model={a.d_model} "
            f"vocab={a.vocab}"
        )
        for name, s in best.items():
            print(
                f"{name:9s} {n * lens_layers / s:10,.0f} token-layers/s  "
                f"({s / lens_layers * 1e3:.0f} ms per lens-layer)"
            )
        passes(lens, x, ids, z_buf)
        print(f"blocked/unblocked={best['unblocked'] / best['evaluate']:.2f} (speed-up of cache-sized row blocks)")
        print(f"ratio={best['bare'] / best['evaluate']:.2f}")


def passes(lens: dict, x: torch.Tensor, ids: torch.Tensor, z: torch.Tensor) -> None:
    """What one lens-layer of evaluate spends beyond the bare arm, pass by pass, each pass
    run over the cache-sized row blocks logit_stats uses, into one block's buffers (a pass
    timed alone also pays its block's trip to memory, which logit_stats pays once)."""
    head, ws = lens[LOGIT].head, M.Workspace()
    final = M.final_stats(head(x[-1]))
    head(x[0], out=z)
    blocks = M.row_blocks(z)
    q, tmp = ws.like("q", z[blocks[0]]), ws.like("tmp", z[blocks[0]])  # one block's buffers, reused
    t = z[:, :1].clone()

    def rows(b: slice) -> int:
        return b.stop - b.start

    steps = {
        "head (matmul)": lambda b: head(x[0], out=z) if b == blocks[0] else None,
        "softmax": lambda b: torch.softmax(z[b], -1, out=q[: rows(b)]),
        "argmax (segment maxima)": lambda b: fused._argmax_rows(z[b]),
        "sum q": lambda b: q[: rows(b)].sum(-1),
        "<q, z> (entropy)": lambda b: torch.mul(q[: rows(b)], z[b], out=tmp[: rows(b)]).sum(-1),
        "<p, z> (KL)": lambda b: torch.mul(final["p"][b], z[b], out=tmp[: rows(b)]).sum(-1),
        "rank: > (x2: top-k, next token)": lambda b: torch.gt(z[b], t[b], out=tmp[: rows(b)]).sum(-1),
        "rank: == (x2)": lambda b: torch.eq(z[b], t[b], out=tmp[: rows(b)]).sum(-1),
        "logit_stats (all)": lambda b: (
            M.logit_stats(z, final, ids, 5, with_rank=True, ws=ws) if b == blocks[0] else None
        ),
    }
    print(f"  passes over {len(blocks)} blocks of {blocks[0].stop} rows:")
    for name, fn in steps.items():
        for b in blocks:
            fn(b)
        t0 = time.perf_counter()
        for _ in range(3):
            for b in blocks:
                fn(b)
        print(f"  {name:32s} {(time.perf_counter() - t0) / 3 * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
