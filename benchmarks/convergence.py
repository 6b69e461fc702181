"""The converged lens: how far each training recipe is from the best lens of its kind.

    .venv/bin/python benchmarks/convergence.py extract [--tokens 262144]
    .venv/bin/python benchmarks/convergence.py run | long | candidates | defaults [--only NAME ...] [--list]
    .venv/bin/python benchmarks/convergence.py report [--figure benchmarks/figures/convergence.png]

``extract`` writes a train store of ``--tokens`` tokens (10x the default run's 24,576)
beside the default run's (``data/convergence/<model>/<corpus>/train.zarr``) from the same
prepared model and split, with the config's extract settings. ``run`` trains the baselines
and the rate sweeps, ``long`` the best optimiser's long runs (once the sweeps are done),
``candidates`` short recipes on the default store, ``defaults`` the config's own recipe
per kind; each trains only the runs that have no result yet (a run resumes from its
checkpoint and is saved on its own, so an interrupted study continues where it stopped).
``report`` prints the per-layer table, draws validation KL against CPU seconds and
records the converged KL in ``pipeline/lens/converged.json``.

Each run trains one kind at a few layers (a lens position is trained and stopped on its
own, so a layer's translator does not depend on which layers train beside it) and is
scored by its test-play KL (4,096 tokens, whole sequences spread over all three test
plays) and its validation curve (1,024 tokens). The converged KL of a layer is the lowest
test KL any long run reached there; a long run counts as converged when its validation
KL changed by less than 0.5% over its last quarter of steps. CPU seconds are the
process's (user + system, both cores), interpolated linearly over the steps from the
run's total and its closed-form pass (the steps cost the same each).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import TrainConfig, load_config

DATA = ROOT / "data"
MODEL, CORPUS = "smollm2-135m", "shakespeare"
# branch_lr 1: the mlp's branch at the affine part's rate (the long runs predate the setting)
LONG = dict(val_tokens=1024, patience=0, checkpoint_every=25, branch_lr=1.0)


@dataclass
class Run:
    name: str
    store: str  # "default" (the run's 24,576 tokens) or "big" (the study's store)
    layers: list[int]
    train: dict = field(default_factory=dict)  # TrainConfig settings over the defaults
    kind: str = "affine"
    long: bool = False  # counts towards the converged KL

    def config(self) -> TrainConfig:
        return TrainConfig(**(STUDY_BASE | self.train | {"layers": self.layers, "kinds": [self.kind]}))


#: The TrainConfig defaults when the study ran (before its recipe became the default): each
#: run's settings are over these, so that a run re-made today is the run recorded.
STUDY_BASE = dict(steps=8, optimizer="sgd", lr_scale=1.0, step_scale="none", branch_lr=1.0)


#: Per model: the sweep's layer, the long runs' layers, the baselines' layers, steps per
#: optimiser and the three rates swept (lr_scale). Gemma-3-270M's step costs ~5x SmolLM2's
#: (vocabulary 262,144), its train store is 8,192 tokens (10x: 81,920).
STUDY = {
    MODEL: dict(
        sweep=18,
        layers=[6, 29],
        more=[0, 6, 12, 18, 24, 29],
        batch=512,
        steps={"adam": 250, "sgd": 250},
        rates={"adam": [1.0, 3.0, 10.0], "sgd": [0.3, 1.0, 3.0]},
    ),
    "gemma-3-270m": dict(
        sweep=12, layers=[3], more=[3, 12], batch=128, steps={"adam": 160}, rates={"adam": [0.01, 0.025, 0.1]}
    ),
}
OLD_DEFAULT = {
    MODEL: dict(steps=8, batch_tokens=512, optimizer="sgd", lr_scale=1.0, val_tokens=512),
    "gemma-3-270m": dict(
        steps=8,
        batch_tokens=128,
        val_tokens=256,
        optimizer="adam",
        step_scale="residual",
        lr_scale=0.025,
        checkpoint_every=0,
    ),
}


def _long(study: dict, opt: str, lr: float, **kw) -> dict:
    steps = study["steps"][opt]
    extra = {"step_scale": "residual"} if "gemma" in str(study.get("name", "")) else {}
    return (
        LONG
        | dict(steps=steps, optimizer=opt, lr_scale=lr, eval_every=max(1, steps // 16), batch_tokens=study["batch"])
        | extra
        | kw
    )


def experiment(model: str):
    """The config ``model`` runs under (its ``overrides`` merged): SmolLM2's is the default's."""
    return load_config(ROOT / "config/two-architectures.yaml").for_model(model)


def plan(model: str) -> list[Run]:
    """The study's baselines and rate sweeps (one layer), in the order they run."""
    study = STUDY[model] | {"name": model}
    more = study["more"]
    runs = [
        Run("default-before", "default", more, OLD_DEFAULT[model]),
        Run("lstsq-default", "default", more, dict(steps=0)),
        Run("lstsq-big", "big", more, dict(steps=0)),
        Run("scaling-closed-form", "default", more, dict(steps=0), kind="scaling"),
    ]
    for opt, rates in study["rates"].items():
        runs += [
            Run(f"{opt}-lr{lr:g}-sweep", "big", [study["sweep"]], _long(study, opt, lr), long=True) for lr in rates
        ]
    return runs


def best_rate(model: str, opt: str) -> float:
    """The sweep's rate with the lowest final validation KL (read from its results)."""
    scores = {}
    for run in plan(model):
        if run.name.startswith(f"{opt}-lr") and (res := load(model, run.name)):
            scores[run.train["lr_scale"]] = min(v for c in res["val_curve"].values() for _, v in c[-2:])
    if len(scores) < 3:
        raise SystemExit(f"the {opt} sweep is not complete: run it first")
    return min(scores, key=scores.get)


def best_optimizer(model: str) -> tuple[str, float]:
    """(optimiser, rate) whose sweep reached the lowest validation KL."""
    best = {}
    for opt in STUDY[model]["rates"]:
        lr = best_rate(model, opt)
        res = load(model, f"{opt}-lr{lr:g}-sweep")
        best[(opt, lr)] = min(v for c in res["val_curve"].values() for _, v in c[-2:])
    return min(best, key=best.get)


def long_runs(model: str) -> list[Run]:
    """The best optimiser at its best rate at the other layers (the sweep's layer is done),
    the mlp with it at every layer, and the reference's recipe; known once the sweeps ran."""
    study = STUDY[model] | {"name": model}
    opt, lr = best_optimizer(model)
    runs = [
        Run(f"{opt}-long", "big", study["layers"], _long(study, opt, lr), long=True),
        Run("mlp-long", "big", [study["sweep"], *study["layers"]], _long(study, opt, lr), kind="mlp", long=True),
    ]
    if "sgd" in study["steps"]:
        # the reference's recipe: identity start, Nesterov SGD at rate 1, its weight decay and clipping
        runs.append(
            Run("reference-recipe", "big", [study["sweep"]], _long(study, "sgd", 1.0, init="identity"), long=True)
        )
    return runs


def candidates(model: str, layers: list[int]) -> list[Run]:
    """Short recipes on the default store, from which the default is chosen (the default's
    24,576 tokens, its validation of 512 tokens and its early stopping). Gemma-3's: at the
    cost of its recipe in config/two-architectures.yaml (8 x 128 tokens)."""
    if model != MODEL:
        return gemma_candidates(model, layers)
    runs = [
        Run(f"short-{opt}-lr{lr:g}-{steps}", "default", layers, dict(steps=steps, optimizer=opt, lr_scale=lr))
        for opt, lr, steps in (
            ("adam", 1.0, 8),
            ("adam", 3.0, 8),
            ("adam", 1.0, 16),
            ("adam", 3.0, 16),
            ("sgd", 1.0, 16),
            ("adam", 1.0, 24),
            ("adam", 1.0, 48),
        )
    ]
    # without early stopping (each layer keeps its best validated translator all the same)
    runs += [
        Run(
            f"short-{opt}-lr{lr:g}-{steps}-patience0",
            "default",
            layers,
            dict(steps=steps, optimizer=opt, lr_scale=lr, patience=0),
        )
        for opt, lr, steps in (("adam", 1.0, 12), ("adam", 1.0, 16), ("adam", 3.0, 16))
    ]
    # steps scaled to each layer's residual (train.step_scale: residual): a late layer's
    # least-squares map is close to its optimum and Adam's first steps of 1e-3 overshoot it
    runs += [
        Run(
            f"short-adam-residual-lr{lr:g}-{steps}",
            "default",
            layers,
            dict(steps=steps, optimizer="adam", lr_scale=lr, step_scale="residual"),
        )
        for lr, steps in ((0.1, 16), (0.3, 16), (0.03, 16))
    ]
    return runs


def gemma_candidates(model: str, layers: list[int]) -> list[Run]:
    """Gemma-3's recipes within its budget (steps x batch tokens = 1,024), Adam scaled to the
    residual: the rate, and fewer larger batches against more smaller ones."""
    base = experiment(model).train
    return [
        Run(
            f"short-adam-residual-lr{lr:g}-{steps}x{batch}",
            "default",
            layers,
            asdict(base) | dict(steps=steps, batch_tokens=batch, lr_scale=lr, eval_every=max(1, steps // 4)),
        )
        for lr, steps, batch in ((0.025, 8, 128), (0.1, 8, 128), (0.3, 8, 128), (0.1, 16, 64), (0.1, 4, 256))
    ]


def defaults(model: str, layers: list[int]) -> list[Run]:
    """The config's own recipe for each kind (``default``, ``default-mlp``,
    ``default-scaling``); remove their results after changing the config."""
    train = asdict(experiment(model).train)
    return [
        Run("default" if kind == "affine" else f"default-{kind}", "default", layers, dict(train), kind=kind)
        for kind in ("affine", "mlp", "scaling")
    ]


# ----------------------------------------------------------------------------- running


def paths(model: str, corpus: str = CORPUS) -> dict[str, Path]:
    stores = DATA / "stores" / model / corpus
    big = DATA / "convergence" / model / corpus
    return {
        "default": stores / "train.zarr",
        "big": big / "train.zarr",
        "validation": stores / "validation.zarr",
        "test": stores / "test.zarr",
        "model": DATA / "models" / model,
        "split": DATA / "corpora" / corpus / model,
        "runs": big / "runs",
        "lenses": big / "lenses",
    }


def load(model: str, name: str) -> dict | None:
    f = paths(model)["runs"] / f"{name}.json"
    return json.loads(f.read_text()) if f.exists() else None


def run_one(model: str, run: Run) -> dict:
    import pandas as pd

    from pipeline.train import train

    p = paths(model)
    out = p["lenses"] / run.name
    cfg = run.config()
    t0, c0 = time.monotonic(), time.process_time()
    metrics = train(p[run.store], p["validation"], p["model"], out, cfg, run.kind)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    log = pd.read_parquet(out / "train_log.parquet").dropna(subset=["val_kl"])
    curve = {
        str(layer): [[int(s), float(v)] for s, v in zip(g["step"], g["val_kl"])] for layer, g in log.groupby("layer")
    }
    res = {
        "name": run.name,
        "kind": run.kind,
        "store": run.store,
        "long": run.long,
        "train": asdict(cfg),
        "wall_s": wall,
        "cpu_s": cpu,
        "steps": metrics["steps"],
        "val_curve": curve,
        "test_kl": test_kl(model, out),
        "val_kl": metrics["val_kl"],
        "val_kl_init": metrics["val_kl_init"],
        "logit_val_kl": metrics["val_kl_logit_lens"],
        "machine": machine(),
        # the process's peak so far: run a run alone (--only) for its own peak
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    p["runs"].mkdir(parents=True, exist_ok=True)
    (p["runs"] / f"{run.name}.json").write_text(json.dumps(res, indent=1))
    return res


def test_kl(model: str, lens_dir: Path, tokens: int = 4096) -> dict[str, float]:
    """Mean KL per layer on ``tokens`` test tokens (whole sequences spread over the store)."""
    from pipeline.lens.tuned import LogitLens, TunedLens
    from pipeline.store.reader import open_store
    from pipeline.train import Validation

    p = paths(model)
    lens = TunedLens.load(lens_dir, model_dir=p["model"])
    store = open_store(p["test"])  # Gemma's test store holds 2,048 tokens: all of them
    val = Validation(store, lens.keys(), min(tokens, store.n_tokens), lens.head, "cpu", 512, seed=0)
    kl = {str(k[1]): v for k, v in val.kl(lens).items()}
    return kl | {f"logit.{k[1]}": v for k, v in val.kl(LogitLens(lens.head)).items()}


def machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def extract_big(model: str, tokens: int) -> None:
    from pipeline.extract import extract

    cfg = experiment(model).extract
    cfg = replace(cfg, max_tokens={"train": tokens})
    p = paths(model)
    t0, c0 = time.monotonic(), time.process_time()
    summary = extract(p["model"], p["split"] / "train.npz", p["big"], cfg, "train")
    (p["big"].parent / "extract.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "wall_s": time.monotonic() - t0,
                "cpu_s": time.process_time() - c0,
                "tokens": tokens,
                "machine": machine(),
            },
            indent=1,
            default=str,
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["extract", "run", "long", "candidates", "defaults", "report"])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--tokens", type=int, default=262_144)
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--layers", type=int, nargs="+", default=[6, 18, 29])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--figure", type=Path, default=ROOT / "benchmarks/figures/convergence.png")
    args = ap.parse_args()
    if args.what == "extract":
        return extract_big(args.model, args.tokens)
    if args.what == "report":
        from convergence_report import report

        return report(args.model, args.figure)
    chosen = {
        "run": plan,
        "long": long_runs,
        "candidates": lambda m: candidates(m, args.layers),
        "defaults": lambda m: defaults(m, args.layers),
    }
    runs = chosen[args.what](args.model)
    for run in runs:
        if args.only and run.name not in args.only:
            continue
        done = load(args.model, run.name)
        if args.list or done:
            print(f"{run.name:32s} {'done' if done else 'to do'}")
            continue
        res = run_one(args.model, run)
        print(
            f"{run.name}: {res['wall_s']:.0f} s wall, {res['cpu_s']:.0f} CPU s; test KL "
            + ", ".join(f"{k} {v:.3f}" for k, v in res["test_kl"].items() if not k.startswith("logit")),
            flush=True,
        )


if __name__ == "__main__":
    main()
