"""``lenspipe``: every stage of the pipeline from the command line, outside Snakemake.

Each stage's subcommand has its rule's name (with dashes), calls the same library
function, reads the same ``config/config.yaml`` and writes the same paths, so a stage run
here is one the workflow need not run again. A user mistake is one message and exit
status 2, never a traceback; ``lenspipe SUBCOMMAND --help`` shows an example.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import paths
from .allocator import keep_freed_memory
from .analyses import ANALYSES
from .config import SPLITS, load_config
from .errors import LenspipeError
from .logs import setup_logging, user_errors
from .paths import Artifacts

M, C = "--model smollm2-135m", "--corpus shakespeare"  # the examples' names: the default config's
NAME_HELP = {
    "model": "a model name from the config (models:)",
    "corpus": "a corpus name from the config (corpora:)",
    "kind": "a translator kind (train.kinds; pipeline/lens/kinds.py and plugins register them)",
}


def _config(args):
    """The config, after checking the names given on the command line exist in it.

    First, so that a typo in --model or --corpus is named as such, not as some downstream
    file that does not exist.
    """
    cfg = load_config(args.config)
    if getattr(args, "model", None) is not None:
        cfg.model(args.model)
    if getattr(args, "corpus", None) is not None:
        cfg.corpus(args.corpus)
    return cfg


def _artifacts(args):
    cfg = _config(args)
    if getattr(args, "model", None) is not None:
        cfg = cfg.for_model(args.model)  # its own settings (models.<name>.overrides), as the rules do
    return cfg, Artifacts.of(cfg, getattr(args, "model", None), getattr(args, "corpus", None))


def _one_of(index: int, count: int, option: str, setting: str) -> int:
    """A --part or --group index, checked against the config's count of them."""
    if not 0 <= index < count:
        raise LenspipeError(f"{option} {index}: the config's {setting} is {count}, so it is one of 0..{count - 1}")
    return index


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# ------------------------------------------------------------------------ prepare, extract


def _prepare_model(args) -> None:
    from .model.prepare import prepare_model

    cfg, a = _artifacts(args)
    info = prepare_model(
        cfg.model(args.model), Path(args.out or a.fill(paths.MODEL_DIR)), Path(a.fill(paths.CACHE_DIR))
    )
    _print({k: info[k] for k in ("name", "n_layers", "d_model", "vocab", "weights_sha256", "smoke_test")})


def _prepare_corpus(args) -> None:
    from .corpus import prepare_corpus

    cfg, a = _artifacts(args)
    manifest = prepare_corpus(
        cfg.corpus(args.corpus),
        a.need("model_dir"),
        Path(args.out or a.fill(paths.CORPUS_DIR)),
        Path(a.fill(paths.CACHE_DIR)),
    )
    _print({s: {k: v[k] for k in ("n_seq", "n_tokens", "n_bytes")} for s, v in manifest["splits"].items()})


def _extract(args) -> None:
    from .extract import extract, extract_part
    from .provenance import write_json_atomic

    cfg, a = _artifacts(args)
    part = {} if args.part is None else {"part": _one_of(args.part, cfg.extract.parts, "--part", "extract.parts")}
    store = Path(args.out or a.fill(paths.STORE_PART if part else paths.STORE, split=args.split, **part))
    inputs = (a.need("model_dir"), a.need("split", split=args.split), store, cfg.extract, args.split)
    summary = extract(*inputs) if not part else extract_part(*inputs, args.part)
    if not args.out:  # the rule's output too, so the workflow sees the store as made
        write_json_atomic(
            a.fill(paths.STORE_PART_DONE if part else paths.STORE_DONE, split=args.split, **part), summary
        )
    _print(summary)


def _assemble_store(args) -> None:
    from .provenance import write_json_atomic
    from .store.parts import assemble_store

    cfg, a = _artifacts(args)
    parts = [a.need("store_part", split=args.split, part=i) for i in range(cfg.extract.parts)]
    summary = assemble_store(parts, Path(a.fill(paths.STORE, split=args.split)))
    write_json_atomic(a.fill(paths.STORE_DONE, split=args.split), summary)
    _print(summary)


# ------------------------------------------------------------------------ train, evaluate, report


def _train(args) -> None:
    from dataclasses import replace

    from .lens import kinds
    from .train import train, train_group

    cfg, a = _artifacts(args)
    if args.corpus not in cfg.train_corpora:
        raise LenspipeError(
            f"corpus {args.corpus!r} is evaluate_only: no lens is trained on it "
            f"(set corpora.{args.corpus}.evaluate_only to false to train one)"
        )
    kinds.get(args.kind)  # an unknown kind is named (the config's plugins are loaded: theirs count)
    train_cfg = replace(cfg.train, kinds=[args.kind])
    stores = (a.need("store", split="train"), a.need("store", split="validation"), a.need("model_dir"))
    if args.group is None:
        metrics = train(*stores, Path(a.fill(paths.LENS_DIR, kind=args.kind)), train_cfg, args.kind)
    else:
        group = _one_of(args.group, cfg.train.layer_groups, "--group", "train.layer_groups")
        out = Path(a.fill(paths.LENS_GROUP_DIR, kind=args.kind, group=group))
        metrics = train_group(*stores, out, train_cfg, args.kind, group)
    _print({k: metrics[k] for k in ("val_kl", "val_kl_logit_lens", "steps", "seconds", "init")})


def _merge_lens(args) -> None:
    from .merge import merge_lens

    cfg, a = _artifacts(args)
    groups = [a.need("lens_group", kind=args.kind, group=g) for g in range(cfg.train.layer_groups)]
    lens = merge_lens(groups, a.need("model_dir"), Path(a.fill(paths.LENS_DIR, kind=args.kind)))
    _print({"lens": a.fill(paths.LENS_DIR, kind=args.kind), "layers": lens.layers})


def _evaluate(args) -> None:
    from .evaluate import evaluate

    cfg, a = _artifacts(args)
    train = args.train_corpus or args.corpus  # rule evaluate_across where it is another corpus
    if train not in cfg.train_corpora:
        cfg.corpus(train)  # an unknown name is named as such
        raise LenspipeError(
            f"corpus {train!r} is evaluate_only: no lens is trained on it; give "
            f"--train-corpus one of {', '.join(cfg.train_corpora)}"
        )
    lens_dirs = {k: a.need("lens", corpus=train, kind=k) for k in cfg.train.kinds}
    identity = {
        "model": args.model,
        "revision": cfg.model(args.model).revision,
        "corpus": args.corpus,
        "train_corpus": train,
        "split": cfg.evaluate.split,
    }
    out = paths.TABLES_DIR if train == args.corpus else paths.ACROSS_DIR
    evaluate(
        a.need("store"),
        a.need("split"),
        a.need("model_dir"),
        lens_dirs,
        cfg.evaluate_config(args.corpus),
        Path(a.fill(out, train_corpus=train)),
        identity,
        threads=args.threads,
    )
    from .report import print_summary

    print_summary(
        [a.fill(paths.layer_metrics_pattern(train, args.corpus), train_corpus=train)], a.fill(paths.REPORT_DIR)
    )


def _report(args) -> None:
    from .report import report

    cfg, a = _artifacts(args)
    runs = [Artifacts.of(cfg, m, c) for m, c in a.runs]
    out = report(runs, cfg.train.kinds, Path(a.fill(paths.REPORT_DIR)), cfg.report.prompts, cfg.analyses.enabled)
    print(f"report: {out} (and report.md)")


def _analysis(analysis):
    def run(args) -> None:
        cfg, a = _artifacts(args)
        analysis.run(a, analysis.settings_of(cfg.analyses))
        for path in analysis.outputs(a.analyses_dir):
            print(path)

    return run


def _trajectory(args) -> None:
    from .lens.tuned import read_lens_meta
    from .trajectory import trajectory

    model_dir = Path(args.model)
    if not (model_dir / "lenspipe_model.json").is_file():  # not a prepared model dir: a config name
        cfg, a = _artifacts(args)
        model_dir = a.need("model_dir")
    if not args.prompt.strip():
        raise LenspipeError("the prompt is empty; give the text whose trajectory to show")
    lens_dirs = {}
    for d in args.lens:
        kind = read_lens_meta(Path(d))["kind"]  # a directory without lens.json is named
        lens_dirs[kind if kind not in lens_dirs else str(d)] = Path(d)
    from transformers import AutoTokenizer

    from .corpus import separator_id

    # the corpora's default separator (BOS, else EOS): what every cached document starts with
    sep = separator_id(AutoTokenizer.from_pretrained(model_dir), "auto")
    print(trajectory(model_dir, lens_dirs, args.prompt, Path(args.out), sep))
    print(f"figure: {args.out}", file=sys.stderr)


def _view(args) -> None:
    from .view.app import serve

    serve(_config(args), args.host, args.port)


# ------------------------------------------------------------------------ stores and models


def _verify(args) -> None:
    from .store.verify import verify

    _print(verify(args.store))
    print(f"OK: {args.store} is complete and every checksum matches", file=sys.stderr)


def _info(args) -> None:
    from .store.info import format_info, store_info

    info = store_info(args.store)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))


def _export(args) -> None:
    from .store.export import export_store

    out = args.out or str(Path(args.store).with_suffix("." + ("zip" if args.to == "zip" else "h5")))
    _print(export_store(args.store, out, args.to))


def _import(args) -> None:
    from .store.export import import_store

    _print(import_store(args.file, args.store))
    print(f"OK: {args.store} rebuilt from {args.file}; every checksum matches", file=sys.stderr)


def _export_head(args) -> None:
    from .model.prepare import export_head

    _print(export_head(args.model_dir, args.out))


# ------------------------------------------------------------------------ the parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lenspipe",
        description="lenspipe: every stage of the pipeline from the "
        "command line, outside Snakemake, on the same config and paths.",
        epilog="`lenspipe SUBCOMMAND --help` shows each one's options and an example.",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("--config", default="config/config.yaml", help="the experiment config (default: %(default)s)")

    def add(name, func, text, example, *names, parents=(config,)):
        """A subcommand: its one-line help, an example, and the config names it takes."""
        s = sub.add_parser(
            name,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            parents=list(parents),
            epilog=f"example:\n  lenspipe {name} {example}".rstrip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        for n in names:
            s.add_argument(f"--{n}", required=True, help=NAME_HELP[n])
        s.set_defaults(func=func)
        return s

    s = add("prepare-model", _prepare_model, "convert or copy a model into a local HF directory", M, "model")
    s.add_argument("--out", help="output directory (default: data/models/<model>)")
    s = add(
        "prepare-corpus",
        _prepare_corpus,
        "split, tokenize and pack a corpus with a model's tokenizer",
        f"{M} {C}",
        "model",
        "corpus",
    )
    s.add_argument("--out", help="output directory (default: data/corpora/<corpus>/<model>)")
    s = add(
        "extract",
        _extract,
        "store every layer's residual stream of one split (or of one part of it)",
        f"{M} {C} --split test",
        "model",
        "corpus",
    )
    s.add_argument("--split", required=True, choices=SPLITS)
    s.add_argument("--part", type=int, help="extract only part PART of extract.parts (rule extract_part)")
    s.add_argument("--out", help="store path (default: data/stores/<model>/<corpus>/<split>.zarr)")
    s = add(
        "assemble-store",
        _assemble_store,
        "link a split's extracted parts into one store",
        f"{M} {C} --split train",
        "model",
        "corpus",
    )
    s.add_argument("--split", required=True, choices=SPLITS)
    s = add(
        "train",
        _train,
        "train one tuned lens (one translator kind) from the stores",
        f"{M} {C} --kind affine",
        "model",
        "corpus",
        "kind",
    )
    s.add_argument("--group", type=int, help="train only layer group GROUP of train.layer_groups (rule train_group)")
    add(
        "merge-lens",
        _merge_lens,
        "merge the layer-group lenses of one kind into one lens",
        f"{M} {C} --kind affine",
        "model",
        "corpus",
        "kind",
    )
    s = add(
        "evaluate",
        _evaluate,
        "evaluate the logit lens and every trained lens on the held-out split",
        f"{M} {C}",
        "model",
        "corpus",
    )
    s.add_argument(
        "--train-corpus",
        help="evaluate the lenses trained on this corpus instead of --corpus's own "
        "(rule evaluate_across: a cell of the lens x corpus matrix)",
    )
    s.add_argument("--threads", type=int, default=2, help="torch/dask threads (default: %(default)s)")
    add("report", _report, "write the HTML + Markdown report of every run of the config", "")
    for a in ANALYSES:
        names = ("model", "corpus") if a.per_run else ()
        add(
            a.command,
            _analysis(a),
            f"analysis: {a.title[0].lower() + a.title[1:]} (tables: {', '.join(a.tables)})",
            f"{M} {C}" if a.per_run else "",
            *names,
        )
    s = add(
        "trajectory",
        _trajectory,
        "print a prompt's top-1 token per layer for the logit and tuned lenses, "
        "and draw its trajectory (the prompt is preceded by the tokenizer's BOS, else EOS, token: "
        "the default corpus separator)",
        f'{M} --lens data/lenses/smollm2-135m/shakespeare/affine "The capital of France is" --out fig.png',
    )
    s.add_argument("--model", required=True, help="model name from the config, or a prepared model directory")
    s.add_argument("--lens", required=True, action="append", help="a tuned lens directory (repeat for more)")
    s.add_argument("prompt", help="the text")
    s.add_argument("--out", default="trajectory.png", help="the figure (default: %(default)s)")

    s = add(
        "view",
        _view,
        "explore a run in the browser: prompt trajectories, the cached held-out tokens, "
        "every table and finding, at http://127.0.0.1:8765/",
        "--port 8765",
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default: %(default)s, this machine only; 0.0.0.0 opens it to the network)",
    )
    s.add_argument("--port", type=int, default=8765, help="port (default: %(default)s)")

    s = add(
        "verify",
        _verify,
        "check a store end to end (shapes, completeness, checksums, finiteness)",
        "data/stores/smollm2-135m/shakespeare/test.zarr",
        parents=(),
    )
    s.add_argument("store", help="store path, URL, .zip or .h5 export")
    s = add(
        "info",
        _info,
        "summarise a store: model, corpus, tokens, layers, dtype, size, completeness",
        "data/stores/smollm2-135m/shakespeare/test.zarr",
        parents=(),
    )
    s.add_argument("store", help="store path or URL")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s = add(
        "export",
        _export,
        "write a verified store as one file (zip = zarr ZipStore, or HDF5)",
        "data/stores/smollm2-135m/shakespeare/test.zarr --to zip",
        parents=(),
    )
    s.add_argument("store", help="store path")
    s.add_argument("--to", required=True, choices=["zip", "hdf5"])
    s.add_argument("--out", help="output file (default: the store path with .zip or .h5)")
    s = add(
        "import",
        _import,
        "rebuild a zarr store from an exported .zip or .h5 file, then verify it",
        "test.h5 /elsewhere/test.zarr",
        parents=(),
    )
    s.add_argument("file", help="exported file")
    s.add_argument("store", help="new store path")
    s = add(
        "export-head",
        _export_head,
        "write a model dir with only the final norm and unembedding (to share with a cache)",
        "data/models/smollm2-135m head/",
        parents=(),
    )
    s.add_argument("model_dir", help="prepared model directory")
    s.add_argument("out", help="output directory")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # see pipeline.allocator
    setup_logging(level=10 if args.verbose else 20)
    with user_errors():
        args.func(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
