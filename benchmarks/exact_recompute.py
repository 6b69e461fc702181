"""Recompute the default run's reported KLs in float64 and print how far each one is.

    .venv/bin/python benchmarks/exact_recompute.py [--layers 0,10,20,29]

Reads the saved lens, the stores and the evaluation table of the embedded default
(`make run` first). For each chosen layer: the lens.json validation KL against a float64
recomputation on the same validation sequences (``val_sequences``), and the
layer_metrics KL of the tuned and logit lens against float64 on the same evaluated
sequences (provenance ``evaluated``). Heads, translators, activations and softmaxes are
all float64. Last line: ``max_abs_err_val=X max_abs_err_eval=Y`` (nats).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from pipeline.lens.tuned import LogitLens, TunedLens
from pipeline.model.head import load_unembed_head
from pipeline.sampling import read_sequences
from pipeline.store.reader import open_store
from pipeline.tables import read_provenance

DATA = Path(__file__).resolve().parents[1] / "data"
RUN = "smollm2-135m/shakespeare"


@torch.no_grad()
def mean_kl64(lens, store, seqs: list[int], layer: int, rows: int = 256) -> float:
    """Mean over tokens of KL(model || lens) at ``layer``, everything in float64."""
    x = read_sequences(store, [layer, store.n_layers], seqs).double()  # (2, n, d_model)
    total = 0.0
    for s in range(0, x.shape[1], rows):
        final = torch.log_softmax(lens.head(x[1, s : s + rows]), -1)  # (rows, vocab)
        logq = torch.log_softmax(lens(x[0, s : s + rows], layer), -1)
        total += (final.exp() * (final - logq)).sum().item()
    return total / x.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,10,20,29")
    ap.add_argument("--data", type=Path, default=DATA, help="data_dir of the run (default: data/)")
    args = ap.parse_args()
    layers = [int(i) for i in args.layers.split(",")]
    data = args.data
    model_dir, lens_dir = data / "models/smollm2-135m", data / f"lenses/{RUN}/affine"
    head = load_unembed_head(model_dir).double()
    tuned = TunedLens.load(lens_dir, head=head, model_dir=model_dir).double().eval()
    lenses = {"tuned": tuned, "logit": LogitLens(head)}
    lens_json = json.loads((lens_dir / "lens.json").read_text())
    meta = lens_json["metrics"]
    val_store = open_store(data / f"stores/{RUN}/validation.zarr")
    # lenses from before the sequences were recorded validated on the store's first tokens
    val_seqs = meta.get("val_sequences") or list(range(lens_json["training_config"]["val_tokens"] // val_store.seq_len))
    err_val = 0.0
    print("validation KL (lens.json vs float64)")
    for layer in layers:
        exact = mean_kl64(tuned, val_store, val_seqs, layer)
        got = meta["val_kl"][str(layer)]
        err_val = max(err_val, abs(got - exact))
        print(f"  layer {layer:2d}: recorded {got:.6f}  float64 {exact:.6f}  diff {got - exact:+.2e}")
    tables = data / f"tables/{RUN}/layer_metrics.parquet"
    lm, prov = pd.read_parquet(tables), read_provenance(tables)
    test_store = open_store(data / f"stores/{RUN}/test.zarr")
    # tables from before the sample was recorded evaluated the store's first max_tokens
    ev = prov.get("evaluated") or {
        "sequences": list(range(prov["evaluate_config"]["max_tokens"] // test_store.seq_len)),
        "documents": "the store's first sequences",
    }
    ev["n_tokens"] = len(ev["sequences"]) * test_store.seq_len
    err_eval = 0.0
    print(f"evaluation KL (layer_metrics vs float64, {ev['n_tokens']} tokens: {ev['documents']})")
    for name, lens in lenses.items():
        for layer in layers:
            exact = mean_kl64(lens, test_store, ev["sequences"], layer)
            got = float(lm[(lm.lens == name) & (lm.layer == layer)].kl.iloc[0])
            err_eval = max(err_eval, abs(got - exact))
            print(f"  {name:5s} layer {layer:2d}: table {got:.6f}  float64 {exact:.6f}  diff {got - exact:+.2e}")
    print(f"max_abs_err_val={err_val:.2e} max_abs_err_eval={err_eval:.2e}")


if __name__ == "__main__":
    main()
