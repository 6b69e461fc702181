"""What an 8-bit store costs a tuned lens: the default lens trained and evaluated from
bfloat16, fp8 and int8 stores of the same tokens.

    nice -n 10 python benchmarks/store_dtype_quality.py [--data data] [--out /tmp/lenspipe-dtype-quality]
        [--dtypes bfloat16,fp8,int8] [--no-float32]

For each dtype: the default budgets' train / validation / test stores of SmolLM2-135M on
Shakespeare are extracted (the default ExtractConfig, only ``dtype`` changed: the same
sequences), the default affine lens trained (default TrainConfig) and evaluated (default
EvaluateConfig, without the per-token table) (a) on that dtype's own test store and (b) on
the bfloat16 test store, so that what the training data costs is apart from what the
evaluation input costs. With a float32 test store (default; ``--no-float32`` skips it)
every lens is also evaluated on float32 values, the exact residual stream, which prices
bfloat16's own rounding.

Printed: per layer, the tuned-lens KL of each dtype and its difference from bfloat16's in
nats and in % of bfloat16's tuned KL, the logit-lens KL difference, and their means; bytes
per token on disk (zstd-3, as extracted) and uncompressed; the logits check of each store
(head(stored last layer) vs the model's logits: max abs error and mean KL, as extraction
records it); and, per layer, what the 8-bit rounding does to the values against the float32
store: relative RMS error, the share of values that round to 0 beside those that are 0, and
how far the largest feature of a row stands above the row's RMS. All results also go to
``<out>/quality.json``. Steps already done in ``--out`` are reused (stores resume, lenses
and tables are kept).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.config import EvaluateConfig, ExtractConfig, TrainConfig
from pipeline.evaluate import evaluate
from pipeline.extract import extract
from pipeline.store.dtypes import DTYPES
from pipeline.store.info import measure_compression
from pipeline.store.reader import open_store
from pipeline.train import train

MODEL, CORPUS, KIND = "smollm2-135m", "shakespeare", "affine"
SPLITS = ("train", "validation", "test")


def extract_all(data: Path, out: Path, dtype: str, splits=SPLITS) -> dict[str, dict]:
    """The dtype's stores of ``splits`` under ``out/stores/<dtype>/``; their extraction summaries."""
    model_dir = data / "models" / MODEL
    summaries = {}
    for split in splits:
        store = out / "stores" / dtype / f"{split}.zarr"
        done = store.with_suffix(".extract.json")
        if not done.exists() or not (store / "COMPLETE").exists():
            summary = extract(
                model_dir,
                data / "corpora" / CORPUS / MODEL / f"{split}.npz",
                store,
                dataclasses.replace(ExtractConfig(), dtype=dtype),
                split,
            )
            done.write_text(json.dumps(summary))
        summaries[split] = json.loads(done.read_text())
    return summaries


def train_lens(data: Path, out: Path, dtype: str) -> Path:
    lens = out / "lenses" / dtype
    if not (lens / "lens.json").exists():
        stores = out / "stores" / dtype
        train(stores / "train.zarr", stores / "validation.zarr", data / "models" / MODEL, lens, TrainConfig(), KIND)
    return lens


def evaluate_on(data: Path, out: Path, lens_dtype: str, store_dtype: str) -> pd.DataFrame:
    """layer_metrics of the ``lens_dtype`` lens (and the logit lens) on the ``store_dtype`` test store."""
    tables = out / "tables" / f"lens-{lens_dtype}-on-{store_dtype}"
    if not (tables / "layer_metrics.parquet").exists():
        cfg = dataclasses.replace(EvaluateConfig(), token_metrics=False)
        identity = {"model": MODEL, "revision": None, "corpus": CORPUS, "train_corpus": CORPUS, "split": cfg.split}
        evaluate(
            out / "stores" / store_dtype / "test.zarr",
            data / "corpora" / CORPUS / MODEL / "test.npz",
            data / "models" / MODEL,
            {KIND: out / "lenses" / lens_dtype},
            cfg,
            tables,
            identity,
            threads=torch.get_num_threads(),
        )
    return pd.read_parquet(tables / "layer_metrics.parquet")


def kl_by_layer(table: pd.DataFrame, lens: str) -> pd.Series:
    rows = table[table["lens"] == lens]
    return rows.set_index("layer")["kl"].sort_index()


def bytes_per_token(out: Path, dtype: str) -> dict[str, float]:
    store = out / "stores" / dtype / "train.zarr"
    s = open_store(store)
    sizes = measure_compression(store)
    return {
        "stored": sizes["stored_bytes"] / s.n_tokens,
        "uncompressed": DTYPES[dtype].bytes_per_token(s.n_layers, s.d_model),
    }


def rounding_by_layer(out: Path, dtype: str, n_tokens: int = 4096) -> pd.DataFrame:
    """Per layer, the dtype's stored test values against the float32 store's: the mean over
    rows of each row's relative RMS error (every row weighs alike: over the whole layer the
    sink rows would dominate), the share of values stored as 0 and the share exactly 0 in
    float32, the median over rows of max|x| / rms(x) (outlier features within a row), and
    the largest row absmax over the median one (outlier rows: attention sinks)."""
    exact, rounded = (open_store(out / "stores" / d / "test.zarr") for d in ("float32", dtype))
    rows = []
    for layer in range(exact.n_layers + 1):
        x, y = exact.layers(layer, 0, n_tokens).double(), rounded.layers(layer, 0, n_tokens).double()
        absmax = x.abs().amax(-1)
        rms = x.pow(2).mean(-1).sqrt()
        row_err = (y - x).pow(2).mean(-1).sqrt() / rms.clamp_min(1e-30)
        rows.append(
            {
                "layer": layer,
                "row_rel_rms_err": float(row_err.mean()),
                "zero_frac": float((y == 0).double().mean()),
                "exact_zero_frac": float((x == 0).double().mean()),
                "peak_over_rms": float((absmax / rms.clamp_min(1e-30)).median()),
                "sink_over_median_row": float(absmax.max() / absmax.median()),
            }
        )
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, floats: str = "{:.4f}") -> str:
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    body = "".join(
        "| " + " | ".join(floats.format(v) if isinstance(v, float) else str(v) for v in row) + " |\n"
        for row in df.itertuples(index=False)
    )
    return head + body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("data"), help="data_dir of a prepared default run (make run)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/lenspipe-dtype-quality"))
    ap.add_argument("--dtypes", default="bfloat16,fp8,int8")
    ap.add_argument("--no-float32", action="store_true", help="skip the float32 test store and its evaluations")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "bfloat16":
        ap.error("--dtypes must start with bfloat16, the baseline")
    t0 = time.monotonic()
    checks = {d: extract_all(args.data, args.out, d)["test"] for d in dtypes}
    if not args.no_float32:
        checks["float32"] = extract_all(args.data, args.out, "float32", ("test",))["test"]
    for d in dtypes:
        train_lens(args.data, args.out, d)
    evals = ["bfloat16"] + ([] if args.no_float32 else ["float32"])
    tables = {(d, s): evaluate_on(args.data, args.out, d, s) for d in dtypes for s in dict.fromkeys([d, *evals])}
    seconds = time.monotonic() - t0

    base = kl_by_layer(tables["bfloat16", "bfloat16"], "tuned")
    base_logit = kl_by_layer(tables["bfloat16", "bfloat16"], "logit")
    per_layer = pd.DataFrame({"layer": base.index, "bf16 tuned": base.values})
    summary = {}
    for d in dtypes[1:]:
        own, on_bf16 = kl_by_layer(tables[d, d], "tuned"), kl_by_layer(tables[d, "bfloat16"], "tuned")
        per_layer[f"{d} tuned"] = own.values
        per_layer[f"{d} - bf16"] = (own - base).values
        per_layer[f"{d} %"] = (100 * (own - base) / base).values
        per_layer[f"{d} lens on bf16 %"] = (100 * (on_bf16 - base) / base).values
        per_layer[f"{d} logit - bf16"] = (kl_by_layer(tables[d, d], "logit") - base_logit).values
        summary[d] = {
            "mean_tuned_kl": float(own.mean()),
            "mean_diff_nats": float((own - base).mean()),
            "mean_diff_pct_of_mean": float(100 * (own - base).mean() / base.mean()),
            "mean_of_layer_pct": float((100 * (own - base) / base).mean()),
            "max_layer_pct": float((100 * (own - base) / base).max()),
            "lens_on_bf16_mean_diff_pct": float(100 * (on_bf16 - base).mean() / base.mean()),
            "logit_mean_diff_nats": float((kl_by_layer(tables[d, d], "logit") - base_logit).mean()),
        }
    summary["bfloat16"] = {"mean_tuned_kl": float(base.mean()), "mean_logit_kl": float(base_logit.mean())}
    if not args.no_float32:
        for d in dtypes:
            on32 = kl_by_layer(tables[d, "float32"], "tuned")
            summary[d]["on_float32_mean_tuned_kl"] = float(on32.mean())
        summary["float32_logit_mean_kl"] = float(kl_by_layer(tables["bfloat16", "float32"], "logit").mean())

    print("\n## Per layer: held-out tuned-lens KL (nats), each dtype's lens on its own test store, vs bf16\n")
    print(markdown(per_layer))
    means = pd.DataFrame([{"dtype": d, **{k: v for k, v in summary[d].items()}} for d in dtypes])
    print("## Means over layers\n")
    print(markdown(means))
    sizes = {d: bytes_per_token(args.out, d) for d in dtypes}
    print("## Bytes per token (train store) and the logits check (test store, first 64 positions)\n")
    print(
        markdown(
            pd.DataFrame(
                [
                    {
                        "dtype": d,
                        "on disk (zstd-3)": sizes[d]["stored"],
                        "uncompressed": float(sizes[d]["uncompressed"]),
                        "vs bf16 on disk": sizes[d]["stored"] / sizes["bfloat16"]["stored"],
                        "logits max abs err": checks[d]["stored_logits_max_err"],
                        "logits KL (nats)": checks[d]["stored_logits_kl"],
                    }
                    for d in checks
                    if d in sizes
                ]
            ),
            "{:.4g}",
        )
    )
    rounding = {}
    if not args.no_float32:
        print(f"float32 store's logits check: max abs err {checks['float32']['stored_logits_max_err']:.3g}\n")
        for d in dtypes:
            r = rounding_by_layer(args.out, d)
            rounding[d] = r.to_dict("records")
            print(f"## What {d} rounding does, per layer (test store vs float32, first 4,096 tokens)\n")
            print(markdown(r, "{:.4g}"))
    print(f"total {seconds / 60:.1f} min")
    (args.out / "quality.json").write_text(
        json.dumps(
            {
                "per_layer": per_layer.to_dict("records"),
                "summary": summary,
                "bytes_per_token": sizes,
                "checks": checks,
                "rounding": rounding,
                "seconds": seconds,
                "dtypes": dtypes,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
