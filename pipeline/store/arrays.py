"""A store's group and arrays as the writer creates them, and the checks before it resumes
one: its attributes, the fingerprint of its parameters, the arrays' fill values, a foreign
directory refused, the consolidated metadata written when it completes."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import zarr

from .. import positions as P
from ..errors import StoreError
from ..provenance import now_utc, package_versions, sha256_json
from .dtypes import SCALE_DTYPE, SCALE_FILL
from .encoding import TOKEN_FILL, compressors
from .layout import FORMAT, LOCK_NAME, StoreParams, array_names, check_schema


def create_arrays(group: zarr.Group, p: StoreParams) -> None:
    """``resid``, ``tokens``, the attention position's ``attn`` if stored and, for a scaled
    dtype, each one's row scales: each sharded by tokens, one shard file per ``shard_tokens``
    tokens (see :mod:`pipeline.store.layout`)."""
    spec = p.spec
    for a in p.value_arrays():
        if a.is_scale:
            # One float32 per row of its values: values = float32(q) * scale[..., None].
            of = P.POSITIONS[a.position].array
            group.create_array(
                a.name,
                shape=a.shape(p),
                dtype=SCALE_DTYPE,
                shards=a.shape(p, p.shard_tokens),
                chunks=(1, p.chunk_tokens),
                compressors=compressors(p.compression, p.level, SCALE_DTYPE.itemsize),
                fill_value=SCALE_FILL,
                dimension_names=("layer", "token"),
                attributes={"of": of, "per": "row"},
                overwrite=True,
            )
            continue
        scale = P.POSITIONS[a.position].scale_array
        group.create_array(
            a.name,
            shape=a.shape(p),
            dtype=spec.stored,
            shards=a.shape(p, p.shard_tokens),
            chunks=(1, p.chunk_tokens, p.d_model),
            compressors=compressors(p.compression, p.level, spec.stored.itemsize),
            fill_value=spec.fill,
            dimension_names=("layer", "token", "feature"),
            attributes={
                "encoding": spec.encoding,
                "dtype": p.dtype,
                **({"scale": scale} if spec.scaled else {}),
                **({"position": a.position} if a.position != P.BLOCK.name else {}),
            },
            overwrite=True,
        )
        if a.name == P.BLOCK.array:  # the tokens after resid, in the order zarr.json has always listed them
            group.create_array(
                "tokens",
                shape=(p.n_tokens,),
                dtype="int32",
                chunks=(p.shard_tokens,),
                compressors=compressors(p.compression, p.level, 4),
                fill_value=TOKEN_FILL,
                dimension_names=("token",),
                overwrite=True,
            )


def ensure_arrays(group: zarr.Group, p: StoreParams) -> None:
    """Create the arrays unless present (a crash can fall between group and arrays)."""
    try:
        for name in array_names(p):
            group[name]
    except KeyError:
        create_arrays(group, p)


def own_fill_values(group: zarr.Group, p: StoreParams) -> bool:
    """Whether the arrays have the fill values above (False: a store begun before them)."""
    resid, tokens = group["resid"].metadata.fill_value, group["tokens"].metadata.fill_value
    want = np.array(p.spec.fill, dtype=p.spec.stored)
    same = np.array_equal(np.asarray(resid, want.dtype), want, equal_nan=want.dtype.kind == "f")
    return bool(same and int(tokens) == TOKEN_FILL)


def initial_attrs(p: StoreParams, provenance: dict, fingerprint: str) -> dict:
    return {
        "format": FORMAT,
        "schema_version": p.schema_version,
        "fingerprint": fingerprint,
        "params": p.as_attrs(),
        "provenance": provenance,
        "dtype": p.dtype,
        "encoding": p.spec.encoding,
        "d_model": p.d_model,
        "n_layers": p.n_layers,
        "n_tokens": p.n_tokens,
        "seq_len": p.seq_len,
        "package_versions": package_versions(),
        "created": now_utc(),
        "finished": None,
        "complete": False,
    }


def fingerprint(p: StoreParams, provenance: dict) -> str:
    try:
        return sha256_json({"params": p.as_attrs(), "provenance": provenance})
    except TypeError as e:
        raise StoreError(f"store provenance must be JSON-serialisable: {e}") from e


def check_resumable(root: Path, attrs: dict, p: StoreParams, provenance: dict) -> None:
    check_schema(attrs, str(root))
    if attrs.get("fingerprint") == fingerprint(p, provenance):
        return
    old = {**attrs.get("params", {}), **{f"provenance.{k}": v for k, v in attrs.get("provenance", {}).items()}}
    new = {**p.as_attrs(), **{f"provenance.{k}": v for k, v in provenance.items()}}
    diffs = [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)
    ]
    raise StoreError(
        f"the store at {root} was written with different parameters "
        f"({'; '.join(diffs) or 'fingerprint differs'}); delete the store or "
        "change the output path"
    )


def refuse_foreign_dir(root: Path) -> None:
    if (root / "zarr.json").exists() or not root.exists():
        return
    if not root.is_dir():
        raise StoreError(f"{root} exists and is not a directory; choose another store path")
    foreign = sorted(p.name for p in root.iterdir() if p.name != LOCK_NAME)
    if foreign:
        raise StoreError(
            f"{root} exists and is not a lenspipe activation store (it holds "
            f"{', '.join(foreign[:5])}); refusing to write into it; choose a new path"
        )


def consolidate(root: Path) -> None:
    # Consolidated metadata lets a remote open cost one request. Zarr warns that it is not
    # in the v3 spec, and that our sidecar files are not zarr nodes; both are expected.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Consolidated metadata is currently", zarr.errors.ZarrUserWarning)
        warnings.filterwarnings("ignore", "Object at .* is not recognized", zarr.errors.ZarrUserWarning)
        zarr.consolidate_metadata(str(root))
