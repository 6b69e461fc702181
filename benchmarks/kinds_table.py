"""Every translator kind with the default recipe, at every layer: the kinds table.

    .venv/bin/python benchmarks/kinds_table.py [--kinds affine mlp scaling] [--out data/kinds]

Trains each kind with the config's ``train`` settings (``config/config.yaml``) on the
default run's stores (``make run`` first), evaluates them together with the config's
``evaluate`` settings on the test store, and prints held-out KL per layer for every kind
and the logit lens, then checks the order a fair comparison should give:
mlp <= affine (within 0.5%) and affine <= scaling <= logit lens, layer by layer. A lens
already trained under ``--out`` with the same settings is reused.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import load_config  # noqa: E402

MODEL, CORPUS = "smollm2-135m", "shakespeare"


def main() -> None:
    import pandas as pd

    from pipeline.evaluate import evaluate
    from pipeline.lens.tuned import read_lens_meta
    from pipeline.train import train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kinds", nargs="+", default=["affine", "mlp", "scaling"])
    ap.add_argument("--out", type=Path, default=ROOT / "data/kinds")
    args = ap.parse_args()
    cfg = load_config(ROOT / "config/config.yaml")
    data = ROOT / "data"
    stores, model = data / "stores" / MODEL / CORPUS, data / "models" / MODEL
    lenses = {}
    for kind in args.kinds:
        out = args.out / "lenses" / kind
        if not out.exists():
            t0 = time.monotonic()
            train(stores / "train.zarr", stores / "validation.zarr", model, out, cfg.train, kind)
            print(f"{kind}: trained in {time.monotonic() - t0:.0f} s", flush=True)
        elif read_lens_meta(out)["training_config"] != {**cfg.train.__dict__, "kind": kind}:
            raise SystemExit(f"{out} was trained with other settings: remove it")
        lenses[kind] = out
    ident = {"model": MODEL, "revision": None, "corpus": CORPUS, "split": "test"}
    evaluate(stores / "test.zarr", data / "corpora" / CORPUS / MODEL / "test.npz", model, lenses,
             cfg.evaluate, args.out / "tables", ident, threads=2)
    df = pd.read_parquet(args.out / "tables" / "layer_metrics.parquet")
    df = df[df.lens != "model"].assign(name=lambda d: d.translator.where(d.lens == "tuned", "logit lens"))
    table = df.pivot_table(index="layer", columns="name", values="kl")[[*args.kinds, "logit lens"]]
    print(table.round(3).to_markdown())
    print("mean |", " | ".join(f"{table[c].mean():.3f}" for c in table.columns))
    checks = {"mlp <= affine x 1.005": ("mlp", "affine", 1.005), "affine <= scaling": ("affine", "scaling", 1.0),
              "scaling <= logit lens": ("scaling", "logit lens", 1.0)}
    for name, (a, b, slack) in checks.items():
        if a in table and b in table:
            bad = table.index[table[a] > slack * table[b]].tolist()
            print(f"{name}: {'every layer' if not bad else f'fails at layers {bad}'}")


if __name__ == "__main__":
    main()
