"""Shuffled token batches streamed from an activation store, with bounded memory.

Consecutive tokens of a sequence are highly correlated, so batches must mix sequences:
each epoch visits the store's shards in a seeded random order, holds ``buffer_shards`` of
them in memory, and cuts a random permutation of the buffered tokens into batches. The
plan of an epoch is a pure function of (seed, epoch), so a resumed run replays exactly the
batches an uninterrupted run would have seen, and can skip to any step without reading
the skipped data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LenspipeError
from ..positions import as_key
from .reader import ActivationStore


@dataclass
class Buffer:
    ranges: list[tuple[int, int]]
    """Token ranges of the buffered shards in the store."""
    batches: list[np.ndarray]
    """Per batch: indices into the concatenation of ``ranges``."""


class TokenBatches:
    def __init__(
        self,
        store: ActivationStore,
        layers: list[int],
        batch_tokens: int,
        buffer_shards: int,
        seed: int,
        device: torch.device | str = "cpu",
    ):
        self.store, self.layers, self.batch_tokens = store, layers, batch_tokens
        self.device = torch.device(device)
        self.buffer_shards, self.seed = buffer_shards, seed
        shard = store.attrs["params"]["shard_tokens"]
        self.shards = [(s, min(s + shard, store.n_tokens)) for s in range(0, store.n_tokens, shard)]
        if store.n_tokens < batch_tokens:
            raise LenspipeError(
                f"the store holds {store.n_tokens} tokens, fewer than one batch of "
                f"{batch_tokens}; extract more tokens or lower train.batch_tokens"
            )
        if self.batches_per_epoch == 0:
            raise LenspipeError(
                f"buffers of {buffer_shards} shard(s) hold fewer than {batch_tokens} tokens; "
                "raise train.buffer_shards or lower train.batch_tokens"
            )

    def epoch_plan(self, epoch: int) -> list[Buffer]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.shards))
        plan = []
        for i in range(0, len(order), self.buffer_shards):
            ranges = [self.shards[j] for j in sorted(order[i : i + self.buffer_shards])]
            n = sum(e - s for s, e in ranges)
            perm = rng.permutation(n)
            k = n // self.batch_tokens  # the remainder waits for another epoch's grouping
            plan.append(Buffer(ranges, [perm[j * self.batch_tokens : (j + 1) * self.batch_tokens] for j in range(k)]))
        return plan

    @property
    def batches_per_epoch(self) -> int:
        return sum(len(b.batches) for b in self.epoch_plan(0))

    def _load(self, buf: Buffer) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [as_key(k) for k in self.layers]  # block layers, or lens positions (position, layer)
        parts = [self.store.states(keys, s, e) for s, e in buf.ranges]  # (k, n_i, d)
        index = torch.cat([torch.arange(s, e) for s, e in buf.ranges])  # (n,) store token index
        # One transfer per buffer; batches are then gathered on the device (on a GPU the
        # per-batch host-side gather was the bottleneck).
        return torch.cat(parts, dim=1).to(self.device), index  # (k, n, d), (n,)

    def _todo(self, start_step: int) -> Iterator[tuple[Buffer, int]]:
        """(buffer, its first step) for every buffer that holds a step >= start_step."""
        step, epoch = 0, 0
        while True:
            for buf in self.epoch_plan(epoch):
                if step + len(buf.batches) > start_step:
                    yield buf, step
                step += len(buf.batches)  # skipped buffers are never read
            epoch += 1

    def iterate(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield batches forever from ``start_step``: activations (len(layers), batch_tokens,
        d_model) float32 on the device and the store index of each token (batch_tokens,).

        The next buffer is read in a background thread while the current one trains.
        """
        from concurrent.futures import ThreadPoolExecutor

        todo = self._todo(start_step)
        with ThreadPoolExecutor(1, "lenspipe-batches") as pool:
            buf, step = next(todo)
            pending = pool.submit(self._load, buf)
            while True:
                data, index = pending.result()
                nxt, nxt_step = next(todo)
                pending = pool.submit(self._load, nxt)
                for j, idx in enumerate(buf.batches):
                    if step + j >= start_step:
                        sel = torch.from_numpy(idx)
                        yield data[:, sel.to(data.device)], index[sel]
                buf, step = nxt, nxt_step
