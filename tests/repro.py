"""Compare two runs' outputs value by value: every Parquet table and every lens weight
bitwise (or within a tolerance), and the lens.json metrics. Used by the reproducibility
tests, and from the command line to compare two data dirs:

    python tests/repro.py DATA_A DATA_B        # e.g. before and after a refactoring

Schema metadata (paths, timings) is not compared; nor are lens.json's timings and paths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

#: lens.json metrics that name where or how long, not what was computed.
RUN_SPECIFIC = ("seconds", "train_store", "group_dirs")


def values(data: Path, under: tuple[str, ...] = ("",)) -> dict[str, object]:
    """Every Parquet table (as a DataFrame) and every lens's translator bytes under ``data``
    (only below the subfolders ``under``, when given)."""
    import pandas as pd
    from safetensors.torch import load_file

    roots = [Path(data) / u for u in under]
    out: dict[str, object] = {}
    for root in roots:
        for p in sorted(root.rglob("*.parquet")):
            out[str(p.relative_to(data))] = pd.read_parquet(p)
        for p in sorted(root.rglob("translators.safetensors")):
            out[str(p.relative_to(data))] = {k: v.numpy().tobytes() for k, v in load_file(p).items()}
    return out


def assert_same_values(a: dict, b: dict, rtol: float = 0.0) -> int:
    """Bitwise equality (NaN equals NaN), or within ``rtol``; returns how many values were compared."""
    import numpy as np
    import pandas as pd

    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    n = 0
    for k in a:
        if isinstance(a[k], pd.DataFrame):
            pd.testing.assert_frame_equal(a[k], b[k], check_exact=not rtol, rtol=rtol or 1e-5, atol=0, obj=k)
            n += a[k].size
        else:
            assert a[k].keys() == b[k].keys(), k
            for name in a[k]:
                x, y = (np.frombuffer(v[name], np.float32) for v in (a[k], b[k]))
                assert (x.tobytes() == y.tobytes()) if not rtol else np.allclose(x, y, rtol=rtol, atol=rtol), (k, name)
                n += len(x)
    return n


def lens_metrics(data: Path) -> dict[str, dict]:
    """Each lens.json's metrics, without what depends on where and when it ran."""
    out = {}
    for p in sorted(Path(data).rglob("lens.json")):
        metrics = json.loads(p.read_text()).get("metrics") or {}
        out[str(p.relative_to(data))] = {k: v for k, v in metrics.items() if k not in RUN_SPECIFIC}
    return out


def main(a: str, b: str) -> None:
    under = ("lenses", "tables", "analyses")  # what a run computes (stores are compared by verify)
    va, vb = values(Path(a), under), values(Path(b), under)
    n = assert_same_values(va, vb)
    tables = sum(not isinstance(v, dict) for v in va.values())
    ma, mb = lens_metrics(Path(a)), lens_metrics(Path(b))
    assert ma == mb, "lens.json metrics differ"
    print(
        f"bitwise equal: {n} values in {tables} Parquet tables and {len(va) - tables} lens weight files; "
        f"lens.json metrics equal: {_leaves(ma)} values in {len(ma)} lenses ({', '.join(ma)})"
    )


def _leaves(obj) -> int:
    if isinstance(obj, dict):
        return sum(_leaves(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(_leaves(v) for v in obj)
    return 1


if __name__ == "__main__":
    main(*sys.argv[1:3])
