"""How far a trained lens is from its optimum: how each lens position's training ended,
and the converged KL of its kind where the convergence study measured one.

``benchmarks/convergence.py`` trains long runs until the validation KL stops moving and
writes the lowest test KL any of them reached per (model, test store, kind, layer) into
``converged.json`` beside this module. A lens trained on the same model and data is then
compared with it: ``lens.json`` carries the number, the report the ratio (evaluated KL /
converged KL, on the same test tokens).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONVERGED_FILE = Path(__file__).with_name("converged.json")
#: The convergence criterion: the validation KL moved by less than this over the last
#: quarter of the steps (relative).
CONVERGED_CHANGE = 0.005


def last_quarter_change(curve: list[tuple[int, float]]) -> float | None:
    """Relative change of the validation KL over the last quarter of the steps: from the
    last validation at or before 3/4 of the last step to the last (None: fewer than two)."""
    if len(curve) < 2 or curve[-1][0] == 0:
        return None
    end_step, end = curve[-1]
    start = [v for s, v in curve if s <= 0.75 * end_step][-1]
    return (end - start) / start if start else None


def stopping(history: list[dict], best_val: dict, bad_evals: dict, steps_run: int, cfg) -> dict[tuple, dict]:
    """Per lens position (position, layer): why its training ended, the step of its best
    validation (the translator kept), and the validation's relative change over the last
    quarter of its steps."""
    curves: dict[tuple, list[tuple[int, float]]] = {}
    for row in history:
        if row.get("val_kl") is not None:
            curves.setdefault((row["position"], row["layer"]), []).append((row["step"], row["val_kl"]))
    out = {}
    for key, curve in curves.items():
        curve.sort()
        if cfg.steps == 0:
            reason = "closed form only (steps: 0)"
        elif cfg.patience and bad_evals.get(key, 0) >= cfg.patience:
            reason = f"early stop: {cfg.patience} validations without gain"
        else:
            reason = "steps exhausted" if steps_run >= cfg.steps else "stopped with the other layers"
        best = min((s for s, v in curve if v == best_val[key]), default=None) if key in best_val else None
        out[key] = {
            "reason": reason,
            "best_step": best,
            "last_step": curve[-1][0],
            "val_change_last_quarter": last_quarter_change(curve),
        }
    return out


def converged(
    model_sha: str | None, kind: str, fingerprint: str | None, field: str, tokens: int | None = None
) -> dict[str, float]:
    """The converged KL per layer label of ``kind`` for a model (weights sha256) and a store
    fingerprint in ``field`` (``train_store``: the study's default training data, for
    lens.json; ``test_store``: its test tokens, for the report, which must also have
    evaluated the same number of ``tokens``); {} where unmeasured."""
    if not CONVERGED_FILE.is_file() or not model_sha or not fingerprint:
        return {}
    for entry in json.loads(CONVERGED_FILE.read_text()):
        if (
            entry["model_sha256"] == model_sha
            and entry.get(field) == fingerprint
            and tokens in (None, entry["test_tokens"])
        ):
            return entry["kinds"].get(kind, {})
    return {}


def training_table(layer_metrics, provenance: dict, lens_metas: dict[str, dict]):
    """The report's table: per kind and layer (block position), how training ended, the
    evaluated KL and, where the study measured it on these test tokens, the converged KL
    and the ratio."""
    import pandas as pd

    rows = []
    for kind, meta in lens_metas.items():
        stops = (meta.get("metrics") or {}).get("stopping") or {}
        best = converged(
            (meta.get("model") or {}).get("weights_sha256"),
            kind,
            provenance.get("store_fingerprint"),
            "test_store",
            (provenance.get("evaluate_config") or {}).get("max_tokens"),
        )
        at = layer_metrics[(layer_metrics.lens == "tuned") & (layer_metrics.translator == kind)]
        if "position" in at.columns:
            at = at[at.position == "block"]
        for layer, kl in zip(at.layer, at.kl):
            stop, ref = stops.get(str(layer), {}), best.get(str(layer))
            change = stop.get("val_change_last_quarter")
            rows.append(
                {
                    "kind": kind,
                    "layer": int(layer),
                    "stopped": stop.get("reason", "?"),
                    "best step": stop.get("best_step"),
                    "val change, last quarter": None if change is None else f"{100 * change:+.2f}%",
                    "KL": round(kl, 4),
                    "converged KL": ref,
                    "ratio to converged": None if ref is None else round(kl / ref, 3),
                }
            )
    return pd.DataFrame(rows)


def study_entry(
    model_sha: str,
    train_store: str,
    test_store: str,
    tokens: int,
    kinds: dict[str, dict[str, float]],
    source: dict[str, Any],
) -> None:
    """Record (replace) the study's converged KL for one model and its data."""
    entries = json.loads(CONVERGED_FILE.read_text()) if CONVERGED_FILE.is_file() else []
    entries = [e for e in entries if not (e["model_sha256"] == model_sha and e["test_store"] == test_store)]
    entries.append(
        {
            "model_sha256": model_sha,
            "train_store": train_store,
            "test_store": test_store,
            "test_tokens": tokens,
            "kinds": kinds,
            "source": source,
        }
    )
    CONVERGED_FILE.write_text(json.dumps(entries, indent=1) + "\n")
