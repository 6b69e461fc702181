"""Assemble extraction parts into one store (rule ``assemble_store``).

Each part is an ordinary store of whole shards of one sequence range, written by its own
job (``extract.parts``; see ``extract.part_range``). Assembly hard-links every part's
shard files into one store in order, renumbers their progress records (the checksums stay)
and finalizes it as usual (consolidated metadata, SHA256SUMS, COMPLETE last). The result
is indistinguishable from a store written by one job, except for an ``assembled_from``
provenance entry; readers need nothing new. An interrupted assembly resumes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import StoreError
from .layout import record_name
from .reader import open_store
from .writer import StoreWriter

log = logging.getLogger(__name__)


def assemble_store(part_stores: list[Path], dest: Path) -> dict:
    stores = [open_store(p) for p in part_stores]  # each must be complete
    base, parts = [], []
    for s in stores:
        prov = dict(s.provenance)
        parts.append(prov.pop("part", None))
        base.append(prov)
    if any(p is None for p in parts) or [p["index"] for p in parts] != list(range(len(parts))):
        raise StoreError(f"{part_stores} are not the parts 0..{len(parts) - 1} of one extraction, in order")
    if any(b != base[0] for b in base) or any(p["of"] != len(parts) for p in parts):
        raise StoreError("the parts come from different extractions (their provenance differs); re-extract them")
    if any(a["sequences"][1] != b["sequences"][0] for a, b in zip(parts, parts[1:])):
        raise StoreError("the parts' sequence ranges are not contiguous")
    params = dict(stores[0].attrs["params"])
    for s in stores[1:]:
        if {k: v for k, v in s.attrs["params"].items() if k != "n_tokens"} != {
            k: v for k, v in params.items() if k != "n_tokens"
        }:
            raise StoreError(f"{s.location.zarr_store} has another layout than {stores[0].location.zarr_store}")
    params["n_tokens"] = sum(s.n_tokens for s in stores)
    provenance = base[0] | {"assembled_from": {"parts": len(parts), "stores": [str(p) for p in part_stores]}}
    with StoreWriter.open(dest, **params, provenance=provenance, background=False) as w:
        if w.already_complete:
            return {"store": str(dest), "n_tokens": params["n_tokens"], "parts": len(parts)}
        done, shard = len(w._records), 0
        for s in stores:
            for i in range(s.params.n_shards):
                if shard >= done:  # a resumed assembly skips the shards it already took
                    w.adopt_shard(Path(s.location.root), i, s.location.read_json(record_name(i)))
                shard += 1
    log.info("assembled %d parts into %s (%d tokens)", len(parts), dest, params["n_tokens"])
    return {"store": str(dest), "n_tokens": params["n_tokens"], "parts": len(parts)}
