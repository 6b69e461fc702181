"""Tables and the figure of the convergence study (``convergence.py report``).

The converged KL of a kind at a layer is the lowest test KL that any long run of that kind
reached there; a long run counts as converged when its validation KL moved by less than
0.5% over its last quarter of steps (``pipeline.lens.stopping``). CPU seconds on the
figure are per layer: a run's process CPU time divided by its layers, spread evenly over
its steps (each step costs the same; the closed-form pass, a few seconds, is left out).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from convergence import CORPUS, load, paths

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.lens.stopping import CONVERGED_CHANGE, last_quarter_change, study_entry


def results(model: str) -> dict[str, dict]:
    return {f.stem: json.loads(f.read_text()) for f in sorted(paths(model)["runs"].glob("*.json"))}


def converged_kl(res: dict[str, dict], kind: str) -> dict[str, tuple[float, str, bool]]:
    """Per layer: (lowest test KL of a long run of ``kind``, the run, whether it converged)."""
    best: dict[str, tuple[float, str, bool]] = {}
    for name, r in res.items():
        if not r["long"] or r["kind"] != kind:
            continue
        for layer, kl in r["test_kl"].items():
            if layer.startswith("logit"):
                continue
            change = last_quarter_change([tuple(x) for x in r["val_curve"][layer]])
            done = change is not None and abs(change) < CONVERGED_CHANGE
            if layer not in best or kl < best[layer][0]:
                best[layer] = (kl, name, done)
    return best


def table(res: dict[str, dict]) -> str:
    import pandas as pd

    conv = converged_kl(res, "affine")
    conv_mlp = converged_kl(res, "mlp")
    cols = {
        "default before": "default-before",
        "default after": "default",
        "least squares (24,576 tok)": "lstsq-default",
        "least squares (262,144 tok)": "lstsq-big",
        "mlp default": "default-mlp",
        "scaling default": "default-scaling",
    }
    rows = []
    for layer in sorted(conv, key=int):
        row = {
            "layer": int(layer),
            "converged": conv[layer][0],
            "by": conv[layer][1],
            "converged (< 0.5% last quarter)": "yes" if conv[layer][2] else "no",
        }
        for col, run in cols.items():
            row[col] = res.get(run, {}).get("test_kl", {}).get(layer)
        for col in ("default before", "default after"):
            row[f"ratio {col.split()[1]}"] = row[col] / row["converged"] if row[col] else None
        row["mlp converged"] = conv_mlp.get(layer, (None,))[0]
        row["logit lens"] = res.get("lstsq-big", {}).get("test_kl", {}).get(f"logit.{layer}")
        rows.append(row)
    return pd.DataFrame(rows).round(4).to_markdown(index=False)


def curves_figure(res: dict[str, dict], path: Path, layers: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conv = converged_kl(res, "affine")
    fig, axes = plt.subplots(1, len(layers), figsize=(6 * len(layers), 5), squeeze=False)
    for ax, layer in zip(axes[0], layers):
        for name, r in res.items():
            if layer not in r["val_curve"] or not r["steps"]:
                continue
            per_layer = r["cpu_s"] / len(r["val_curve"])
            steps = max(r["steps"], 1)
            xs = [max(s, 0.5) * per_layer / steps for s, _ in r["val_curve"][layer]]
            ys = [v for _, v in r["val_curve"][layer]]
            style = "-" if r["long"] else "o--"
            ax.plot(xs, ys, style, ms=3, label=name)
        if layer in conv:
            ax.set_title(f"layer {layer} (converged test KL {conv[layer][0]:.3f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("CPU seconds per layer (2 cores)")
        ax.set_ylabel("validation KL [nats]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=5, loc="upper right", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def record(model: str, res: dict[str, dict]) -> None:
    """Write the converged KL into pipeline/lens/converged.json (lens.json and the report)."""
    from pipeline.store.reader import open_store

    p = paths(model)
    sha = json.loads((p["model"] / "lenspipe_model.json").read_text())["weights_sha256"]
    kinds = {kind: {layer: v[0] for layer, v in converged_kl(res, kind).items()} for kind in ("affine", "mlp")}
    study_entry(
        sha,
        open_store(p["default"]).attrs.get("fingerprint"),
        open_store(p["test"]).attrs.get("fingerprint"),
        min(4096, open_store(p["test"]).n_tokens),  # test_kl's sample (Gemma's store: 2,048)
        {k: v for k, v in kinds.items() if v},
        {"model": model, "corpus": CORPUS, "by": "benchmarks/convergence.py", "results": "benchmarks/RESULTS.md"},
    )


def report(model: str, figure: Path) -> None:
    res = results(model)
    print(table(res))
    print()
    for name, r in res.items():
        print(
            f"{name:28s} {r['wall_s']:7.0f} s wall {r['cpu_s']:7.0f} CPU s  steps {r['steps']:4d}  layers "
            + ",".join(r["val_curve"])
        )
    layers = sorted(converged_kl(res, "affine"), key=int)
    curves_figure(res, figure, [x for x in layers if x in ("6", "18", "29", "3", "12")] or layers[:3])
    record(model, res)
    print(f"\nfigure: {figure}; converged KL recorded in pipeline/lens/converged.json")
    if (load(model, "default") or {}).get("test_kl") is None:
        print("(no 'default' run yet: `convergence.py candidates` trains the config's default recipe)")
