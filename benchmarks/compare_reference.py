"""lenspipe's affine tuned lens vs the reference library (tuned-lens==0.2.0), same model, same tokens.

Driven by ``benchmarks/compare_reference.sh`` (which builds the reference's venv); three modes:

``export`` (main venv)
    The train store's token ids -> a (sequences, seq_len) int64 .npy, because the reference's
    venv has no zarr; plus a few stored residuals of the first sequence, so that the
    reference side can check that transformers 4.x computes the same model.

``train-reference`` (reference venv: torch 2.13 CPU, transformers 4.x, tuned-lens 0.2.0)
    Runs tuned-lens's OWN training loop, ``tuned_lens.scripts.train_loop.Train.execute``, with
    its own TunedLens (identity init), its own Optimizer config and its own KL loss, at its
    default hyperparameters (SGD, Nesterov momentum 0.9, lr_scale 1.0, weight decay 1e-3,
    linear decay with no warm-up, gradient clipping at 1.0, per_gpu_batch_size 1, seed 42)
    scaled to our budget: tokens_per_step 2,048 (8 sequences of 256, so 8 gradient
    accumulation micro-batches) x 12 steps = exactly one pass over the 24,576 training tokens.
    The patches, each also commented where it is applied:
      1. data: ``Train.data`` is a subclass of its ``ing.Data`` whose ``load`` returns our
         96 training sequences as a ``datasets.Dataset`` of ``input_ids`` (torch format), the
         shape its own ``chunk_and_tokenize`` returns, instead of loading and re-tokenizing
         text. The nats-to-bits-per-byte ratio it also returns is only used for wandb logging
         (off here), so it is a placeholder 1.0.
      2. autocast: ``torch.autocast`` is replaced (in this process) by a subclass that is
         disabled for device_type "cpu". Train.execute wraps each lens forward + loss in
         ``th.autocast(device.type, dtype=bfloat16)``, which on CPU runs the unembedding in
         bf16 (far slower than float32 on this CPU and less precise); on CUDA it would be
         unchanged. Our pipeline trains in float32 on CPU too.
      3. device: NO patch. Its ``Distributed.device`` is cuda if available else cpu, and the
         CPU torch wheel has no CUDA, so it picks the CPU by itself.
      4. loss logging: ``Train._log`` (which only writes to wandb, off here) is overridden
         to record the per-layer training losses of each step in memory; it changes nothing
         in the optimisation.
    The lens is saved by the reference's own ``TunedLens.save`` (config.json + params.pt).
    Before training (untimed), the patched model's forward pass on the first sequence is
    checked against the stored residuals and last layer (it fails loudly if transformers 4.x
    computes another model, e.g. without the rope_theta patch).
    Note: two runs do not give bit-identical lenses: its DataLoader2 shuffle, despite
    ``dl.seed(seed)``, visits the sequences in a different order each run.

``time-ours`` (main venv)
    Our whole path again, into scratch, timed: extraction of the train and validation
    stores, then training with the configuration in our lens.json (the script runs this and
    a second reference training back to back, so both wall times see the same machine load).

``evaluate`` (main venv)
    Our lens (``TunedLens.load``) and the reference's (``import_reference``) and
    the logit lens, on every token of the TEST store: per-layer mean KL(final || lens), the
    target being the model's own distribution from the stored last layer through the frozen
    head. Prints the table, the means and the wall times; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: Stored residuals of the first training sequence that the reference side compares with its
#: own forward pass (all < n_layers: HF's hidden_states[n_layers] is taken after the final
#: norm, the store's before); the last layer is compared through the unembedding instead.
CHECK_LAYERS = (1, 10, 20, 29)


# =============================================================================== export


def cmd_export(args) -> None:
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from pipeline.store.reader import open_store

    store = open_store(args.store)
    tokens = store.tokens().numpy().astype(np.int64)  # (n_tokens,)
    n_seq, rem = divmod(tokens.size, store.seq_len)
    if rem:
        raise SystemExit(f"{args.store}: {tokens.size} tokens is not a whole number of {store.seq_len}-token sequences")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, tokens.reshape(n_seq, store.seq_len))
    resid = store.layers(list(CHECK_LAYERS) + [store.n_layers], 0, store.seq_len).numpy()  # (k+1, seq, d)
    np.save(out.with_name(out.stem + "_check_resid.npy"), resid)
    print(f"exported {n_seq} sequences x {store.seq_len} tokens from {args.store} to {out}")


# =============================================================================== reference side


def cmd_train_reference(args) -> None:
    import numpy as np
    import torch
    import transformers
    import tuned_lens
    import tuned_lens.scripts.ingredients as ing
    from datasets import Dataset
    from tuned_lens.scripts.train_loop import LossChoice, Train

    # ---- patch 2: no bf16 autocast on CPU (see the module docstring). Train.execute calls
    # th.autocast(self.dist.device.type, dtype=th.bfloat16) inside its loop; `th` is the torch
    # module, so the class is swapped on torch itself, for this process only.
    real_autocast = torch.autocast

    class CPUAutocastOff(real_autocast):  # type: ignore[misc, valid-type]
        def __init__(self, device_type, dtype=None, enabled=True, cache_enabled=None):
            super().__init__(
                device_type, dtype=dtype, enabled=enabled and device_type != "cpu", cache_enabled=cache_enabled
            )

    torch.autocast = CPUAutocastOff

    tokens = np.load(args.tokens)  # (n_seq, seq_len) int64
    n_seq, seq_len = tokens.shape

    # ---- patch 1: the data = exactly our training sequences, no re-tokenization.
    class StoreTokens(ing.Data):
        def load(self, tokenizer):
            ds = Dataset.from_dict({"input_ids": tokens.tolist()})
            # as chunk_and_tokenize returns it; 1.0: nats_to_bpb only feeds wandb logging
            return ds.with_format("torch", columns=["input_ids"]), 1.0

    # ---- patch 4: record the losses that Train would send to wandb (off); no other effect.
    step_losses: list[dict[str, float]] = []

    class RecordingTrain(Train):
        def _log(self, opt, step, losses, tuned_lens, nats_to_bpb):
            step_losses.append({k: float(np.mean(v)) for k, v in losses.items()})

    # Patch 3 is the absence of one: Distributed.device picks the CPU by itself.
    dist = ing.Distributed()
    assert dist.device.type == "cpu", dist.device

    model_cfg = ing.Model(name=str(args.model))
    check = check_model(model_cfg, Path(args.tokens), tokens[0])

    steps = n_seq * seq_len // args.tokens_per_step
    train = RecordingTrain(
        model=model_cfg,
        data=StoreTokens(name=["<lenspipe train store tokens>"]),
        opt=ing.Optimizer(),  # the defaults: SGD, Nesterov 0.9, lr_scale 1.0, wd 1e-3, no warm-up
        dist=dist,  # per_gpu_batch_size 1 (default)
        output=Path(args.out),
        num_steps=steps,
        tokens_per_step=args.tokens_per_step,
        loss=LossChoice.KL,  # the default, spelled out
    )
    print(
        f"reference: tuned-lens {getattr(tuned_lens, '__version__', '0.2.0')}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
        f"{n_seq} sequences x {seq_len} tokens, {steps} steps x {args.tokens_per_step} tokens",
        flush=True,
    )
    load0, t0, cpu0 = _loadavg(), time.perf_counter(), time.process_time()
    train.execute()
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
    print(
        f"reference training wall time: {seconds:.1f} s (process CPU time {cpu_seconds:.1f} s; "
        f"load average before/after {load0} / {_loadavg()})",
        flush=True,
    )

    report = {
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "loadavg_before": load0,
        "loadavg_after": _loadavg(),
        "steps": steps,
        "tokens_per_step": args.tokens_per_step,
        "tokens_seen": steps * args.tokens_per_step,
        "train_tokens": int(tokens.size),
        "step_losses": step_losses,
        "model_check": check,
        "optimizer": {k: str(v) for k, v in vars(train.opt).items()},
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tuned_lens": _dist_version("tuned-lens"),
            "torchdata": _dist_version("torchdata"),
            "datasets": _dist_version("datasets"),
        },
        "threads": torch.get_num_threads(),
        "autocast_on_cpu": False,
    }
    (Path(args.out) / "lenspipe_benchmark.json").write_text(json.dumps(report, indent=2))


def check_model(model_cfg, tokens_path: Path, first_seq) -> dict:
    """The patched model under transformers 4.x must compute what the store holds."""
    import numpy as np
    import torch
    from tuned_lens.nn.unembed import Unembed

    model, _ = model_cfg.load(torch.device("cpu"))
    want = torch.from_numpy(np.load(tokens_path.with_name(tokens_path.stem + "_check_resid.npy")))  # (k+1, seq, d)
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(first_seq)[None], output_hidden_states=True)
        errs = {}
        for j, layer in enumerate(CHECK_LAYERS):  # the store is bf16: ~4e-3 relative rounding
            got = out.hidden_states[layer][0].float()  # (seq, d)
            errs[str(layer)] = ((got - want[j]).norm(dim=-1) / want[j].norm(dim=-1)).median().item()
        # the model's own next-token distribution vs the reference's Unembed of the stored last layer
        logp = out.logits[0].float().log_softmax(-1)  # (seq, vocab)
        logq = Unembed(model)(want[-1]).float().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    print(
        f"model check: median relative residual error per layer {errs}; "
        f"KL(HF 4.x logits || reference Unembed(stored last layer)) {kl:.2e} nats",
        flush=True,
    )
    if max(errs.values()) > 3e-2 or kl > 1e-2:
        raise SystemExit("the patched model does not reproduce the stored activations: not the same model")
    del model
    return {"median_relative_resid_err": errs, "kl_logits_vs_stored_last_layer": kl}


def _loadavg() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


# =============================================================================== our side, re-timed


def cmd_time_ours(args) -> None:
    """Our whole path, timed, into scratch space, for a wall-time comparison under the same
    machine conditions as a reference run (the machine is shared): extract the train and
    validation splits with the project config's extract settings (what our training reads),
    then train with the configuration recorded in our lens's lens.json."""
    import dataclasses
    import logging
    import os

    sys.path.insert(0, str(ROOT))
    from pipeline.config import TrainConfig, load_config
    from pipeline.extract import extract
    from pipeline.store.reader import open_store
    from pipeline.train import train

    logging.basicConfig(level=logging.INFO)
    out, real_stores = Path(args.out), Path(args.stores)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"loadavg_before": _loadavg(), "threads": os.cpu_count()}
    ext_cfg = load_config(args.config).extract
    stores = out / "stores"
    for split in ("train", "validation"):
        store_path = stores / f"{split}.zarr"
        if store_path.exists():
            import shutil

            shutil.rmtree(store_path)
        t0, cpu0 = time.perf_counter(), time.process_time()
        summary = extract(Path(args.model), Path(args.corpus) / f"{split}.npz", store_path, ext_cfg, split)
        report[f"extract_{split}"] = {
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0,
            "stage_seconds": summary.get("seconds"),
        }
        same = open_store(store_path).attrs.get("fingerprint") == open_store(real_stores / f"{split}.zarr").attrs.get(
            "fingerprint"
        )
        report[f"extract_{split}"]["same_fingerprint_as_real_store"] = same
        if not same:
            raise SystemExit(
                f"re-extracted {split} store differs from {real_stores / f'{split}.zarr'}: "
                "the config does not match what built the real stores"
            )
    meta = json.loads((Path(args.ours) / "lens.json").read_text())
    cfg_dict = dict(meta["training_config"])
    kind = cfg_dict.pop("kind")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in cfg_dict.items() if k in names})
    t0, cpu0 = time.perf_counter(), time.process_time()
    metrics = train(stores / "train.zarr", stores / "validation.zarr", Path(args.model), out / "lens", cfg, kind)
    report["train"] = {
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - cpu0,
        "metrics_seconds": metrics["seconds"],
    }
    report["loadavg_after"] = _loadavg()
    total = sum(report[k]["seconds"] for k in ("extract_train", "extract_validation", "train"))
    report["seconds"], report["cpu_seconds"] = (
        total,
        sum(report[k]["cpu_seconds"] for k in ("extract_train", "extract_validation", "train")),
    )
    (out / "retime.json").write_text(json.dumps(report, indent=2))
    print(
        f"ours, re-run: extract train {report['extract_train']['seconds']:.1f} s + validation "
        f"{report['extract_validation']['seconds']:.1f} s + train {report['train']['seconds']:.1f} s "
        f"= {total:.1f} s wall (process CPU {report['cpu_seconds']:.1f} s), load average "
        f"{report['loadavg_before']} -> {report['loadavg_after']}"
    )


# =============================================================================== evaluation


def cmd_evaluate(args) -> None:
    import torch

    sys.path.insert(0, str(ROOT))
    from pipeline.lens.reference import import_reference
    from pipeline.lens.tuned import LogitLens, TunedLens
    from pipeline.model.head import load_unembed_head
    from pipeline.model.prepare import read_model_info
    from pipeline.store.reader import open_store
    from pipeline.train import kl_loss

    model_dir, store = Path(args.model), open_store(args.store)
    head = load_unembed_head(model_dir)
    info = read_model_info(model_dir)
    if store.provenance.get("model", {}).get("weights_sha256") != info["weights_sha256"]:
        raise SystemExit(f"{args.store} was not extracted from {model_dir}")
    ours = TunedLens.load(args.ours, head=head, model_dir=model_dir)
    ref = import_reference(args.reference, head, info)
    lenses = {"logit": LogitLens(head), "reference": ref, "ours": ours}
    layers = list(range(store.n_layers))  # layer n_layers is the model's output: KL 0 for all
    sums = {name: [0.0] * len(layers) for name in lenses}
    n = min(store.n_tokens, args.max_tokens or store.n_tokens)
    t0 = time.perf_counter()
    with torch.no_grad():
        for s in range(0, n, args.chunk):
            e = min(s + args.chunk, n)
            x = store.layers(layers + [store.n_layers], s, e)  # (L+1, chunk, d)
            target = torch.log_softmax(head(x[-1]).float(), dim=-1)  # (chunk, vocab)
            for i in layers:
                for name, lens in lenses.items():
                    sums[name][i] += kl_loss(lens(x[i], i), target).item() * (e - s)
            print(f"  evaluated tokens {e}/{n} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    kl = {name: [v / n for v in vals] for name, vals in sums.items()}
    result = {
        "store": str(args.store),
        "tokens": n,
        "layers": layers,
        "kl": kl,
        "eval_seconds": time.perf_counter() - t0,
        "reference_meta": json.loads((Path(args.reference) / "lenspipe_benchmark.json").read_text()),
        "ours_meta": {
            k: v
            for k, v in json.loads((Path(args.ours) / "lens.json").read_text()).items()
            if k in ("training_config", "metrics", "created", "versions")
        },
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    print(report(result, args.bar, Path(args.extract_json), None))


def report(result: dict, bar: float, extract_json: Path, retime: dict | None) -> str:
    """The table, means and wall times from an evaluation result (and an optional re-timing
    of both trainings back to back, see `time-ours`)."""
    kl, layers, ref_meta = result["kl"], result["layers"], result["reference_meta"]
    ratio = [o / r for o, r in zip(kl["ours"], kl["reference"])]
    mean = {name: sum(v) / len(v) for name, v in kl.items()}
    over = [i for i, q in zip(layers, ratio) if q > bar]
    lines = [
        f"held-out KL(final || lens), nats/token, on all {result['tokens']} tokens of {result['store']}",
        "",
        "| layer | logit lens | reference | ours | ours/reference |",
        "|---:|---:|---:|---:|---:|",
    ]
    for j, i in enumerate(layers):
        lines.append(
            f"| {i} | {kl['logit'][j]:.4f} | {kl['reference'][j]:.4f} | {kl['ours'][j]:.4f} | {ratio[j]:.3f} |"
        )
    lines.append(
        f"| **mean** | {mean['logit']:.4f} | {mean['reference']:.4f} | {mean['ours']:.4f} | "
        f"{mean['ours'] / mean['reference']:.3f} |"
    )
    worst = max(range(len(ratio)), key=ratio.__getitem__)
    lines += [
        "",
        (
            f"ours/reference per layer: min {min(ratio):.3f}, max {ratio[worst]:.3f} (layer {layers[worst]}); "
            f"layers above {bar}x: {over if over else 'none'}"
        ),
    ]

    extract = json.loads(extract_json.read_text())["seconds"]
    val_json = extract_json.with_name("validation.extract.json")
    val_extract = json.loads(val_json.read_text())["seconds"] if val_json.is_file() else 0.0
    ours_train = result["ours_meta"]["metrics"]["seconds"]
    ref = ref_meta["seconds"]
    lines += [
        "",
        "wall time (s), as run:",
        f"  reference training (its loop; the model runs forward every step): {ref:.1f}"
        + (
            f"  [process CPU {ref_meta['cpu_seconds']:.1f}, load avg {ref_meta['loadavg_before']}"
            f" -> {ref_meta['loadavg_after']}]"
            if "cpu_seconds" in ref_meta
            else ""
        ),
        f"  ours, training from the stores (lens.json metrics.seconds):      {ours_train:.1f}",
        f"  ours, extraction of the train store (paid once, train.extract.json): {extract:.1f}",
        f"  ours, extraction of the validation store (read by training):     {val_extract:.1f}",
        (
            f"  ours/reference: training only {ours_train / ref:.3f}; training + extraction "
            f"{(ours_train + extract + val_extract) / ref:.3f}"
        ),
    ]
    if retime:
        r_ref, r_ours = retime["reference"], retime["ours"]
        ext = r_ours["extract_train"]["seconds"] + r_ours["extract_validation"]["seconds"]
        lines += [
            "",
            "wall time (s), re-run back to back on the same machine (`time-ours`, then the reference):",
            (
                f"  reference training: {r_ref['seconds']:.1f} [process CPU {r_ref['cpu_seconds']:.1f}; "
                f"load avg {r_ref['loadavg_before']} -> {r_ref['loadavg_after']}]"
            ),
            f"  ours, training:     {r_ours['train']['seconds']:.1f} "
            f"[process CPU {r_ours['train']['cpu_seconds']:.1f}]",
            (
                f"  ours, extraction of train + validation stores: {r_ours['extract_train']['seconds']:.1f} + "
                f"{r_ours['extract_validation']['seconds']:.1f} [load avg {r_ours['loadavg_before']} -> "
                f"{r_ours['loadavg_after']}]"
            ),
            (
                f"  ours/reference: training only {r_ours['train']['seconds'] / r_ref['seconds']:.3f}; "
                f"training + extraction {(r_ours['train']['seconds'] + ext) / r_ref['seconds']:.3f}"
            ),
        ]
    lines.append(f"(evaluation took {result['eval_seconds']:.0f} s)")
    return "\n".join(lines)


def cmd_report(args) -> None:
    result = json.loads(Path(args.result).read_text())
    retime = None
    if args.retime_reference and args.retime_ours:
        retime = {
            "reference": json.loads(Path(args.retime_reference).read_text()),
            "ours": json.loads(Path(args.retime_ours).read_text()),
        }
    print(report(result, args.bar, Path(args.extract_json), retime))


# =============================================================================== main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("export", help="train store tokens -> .npy (main venv)")
    e.add_argument("--store", required=True)
    e.add_argument("--out", required=True)
    t = sub.add_parser("train-reference", help="train the reference lens (reference venv)")
    t.add_argument("--model", required=True, help="the patched model copy")
    t.add_argument("--tokens", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--tokens-per-step", type=int, default=2048)
    o = sub.add_parser("time-ours", help="re-train our lens into scratch space, timed (main venv)")
    o.add_argument("--model", required=True)
    o.add_argument("--stores", required=True, help="the real stores (re-extraction must match them)")
    o.add_argument("--corpus", required=True, help="the prepared corpus dir (train.npz, validation.npz)")
    o.add_argument("--config", default=str(ROOT / "config/config.yaml"))
    o.add_argument("--ours", required=True, help="our lens (its lens.json gives the configuration)")
    o.add_argument("--out", required=True)
    v = sub.add_parser("evaluate", help="per-layer held-out KL of both lenses (main venv)")
    v.add_argument("--model", required=True)
    v.add_argument("--store", required=True)
    v.add_argument("--ours", required=True)
    v.add_argument("--reference", required=True)
    v.add_argument("--extract-json", required=True)
    v.add_argument("--out")
    v.add_argument("--chunk", type=int, default=512)
    v.add_argument("--bar", type=float, default=1.05)
    v.add_argument("--max-tokens", type=int, help="evaluate the first N tokens only (a smoke test)")
    r = sub.add_parser("report", help="print the table again from evaluate's JSON (main venv)")
    r.add_argument("--result", required=True)
    r.add_argument("--extract-json", required=True)
    r.add_argument("--retime-reference", help="lenspipe_benchmark.json of a re-timed reference training")
    r.add_argument("--retime-ours", help="retime.json of `time-ours`")
    r.add_argument("--bar", type=float, default=1.05)
    args = p.parse_args()
    {
        "export": cmd_export,
        "train-reference": cmd_train_reference,
        "time-ours": cmd_time_ours,
        "evaluate": cmd_evaluate,
        "report": cmd_report,
    }[args.cmd](args)


if __name__ == "__main__":
    main()
