"""Train one affine lens with given TrainConfig settings and evaluate it on held-out tokens.

    .venv/bin/python benchmarks/gemma_recipes.py MODEL NAME key=value ... [eval_tokens=N]

e.g. the recipes of benchmarks/RESULTS.md ("A KL-trained lens for Gemma-3"):

    gemma-3-270m ls steps=0 batch_tokens=256 val_tokens=256 eval_tokens=2048
    gemma-3-270m kl steps=8 batch_tokens=128 val_tokens=256 step_scale=residual lr_scale=0.01 eval_tokens=2048
    gemma-3-270m adamres optimizer=adam steps=8 batch_tokens=128 val_tokens=256 step_scale=residual \
        lr_scale=0.025 eval_tokens=2048

Reads the stores and prepared model of a finished run under data/ (the two-architectures
config), writes the lens and its layer_metrics table under /tmp/lenspipe-recipes/MODEL-NAME and
prints the held-out KL per layer.
"""

import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import EvaluateConfig, TrainConfig
from pipeline.evaluate import evaluate
from pipeline.train import train


def main() -> None:
    model, name = sys.argv[1], sys.argv[2]
    kw = {k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}  # 8, 0.01, [13, 17], adam
    eval_tokens = kw.pop("eval_tokens", 4096)
    data = ROOT / "data"
    stores, model_dir = data / f"stores/{model}/shakespeare", data / f"models/{model}"
    out = Path(f"/tmp/lenspipe-recipes/{model}-{name}")
    t = time.time()
    train(stores / "train.zarr", stores / "validation.zarr", model_dir, out, TrainConfig(**kw), "affine")
    print(name, "train", f"{time.time() - t:.0f}s", flush=True)
    evaluate(
        stores / "test.zarr",
        data / f"corpora/shakespeare/{model}/test.npz",
        model_dir,
        {"affine": out},
        EvaluateConfig(max_tokens=eval_tokens, chunk_tokens=256, token_metrics=False),
        out / "tables",
        {"model": model, "revision": None, "corpus": "shakespeare", "split": "test"},
        threads=2,
    )
    df = pd.read_parquet(out / "tables/layer_metrics.parquet")
    kl = df[df.lens == "tuned"].set_index("layer").kl
    print(name, "test mean tuned KL", kl.mean(), flush=True)
    print(kl.round(4).to_string(), flush=True)


if __name__ == "__main__":
    main()
