"""``lenspipe``: run the pipeline's stages outside Snakemake.

Each subcommand calls the same library function as the Snakemake rule of the same name,
reading the same ``config/config.yaml``; outputs go to the same paths by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import paths
from .config import load_config
from .logs import setup_logging, user_errors


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


def _prepare_model(args) -> None:
    from .model import prepare_model

    cfg = _config(args)
    data = cfg.data_dir
    out = args.out or paths.fill(paths.MODEL_DIR, data_dir=data, model=args.model)
    info = prepare_model(cfg.model(args.model), Path(out), Path(paths.fill(paths.CACHE_DIR, data_dir=data)))
    print(json.dumps({k: info[k] for k in ("name", "n_layers", "d_model", "vocab", "weights_sha256", "smoke_test")}, indent=2))


def _prepare_corpus(args) -> None:
    from .corpus import prepare_corpus

    cfg = _config(args)
    data = cfg.data_dir
    model_dir = paths.fill(paths.MODEL_DIR, data_dir=data, model=args.model)
    out = args.out or paths.fill(paths.CORPUS_DIR, data_dir=data, corpus=args.corpus, model=args.model)
    manifest = prepare_corpus(cfg.corpus(args.corpus), Path(model_dir), Path(out),
                              Path(paths.fill(paths.CACHE_DIR, data_dir=data)))
    print(json.dumps({s: {k: v[k] for k in ("n_seq", "n_tokens", "n_bytes")} for s, v in manifest["splits"].items()}, indent=2))


def _extract(args) -> None:
    from .extract import extract

    cfg = _config(args)
    kw = dict(data_dir=cfg.data_dir, model=args.model, corpus=args.corpus, split=args.split)
    store = args.out or paths.fill(paths.STORE, **kw)
    summary = extract(Path(paths.fill(paths.MODEL_DIR, **kw)), Path(paths.fill(paths.CORPUS_SPLIT, **kw)),
                      Path(store), cfg.extract, args.split)
    print(json.dumps(summary, indent=2))


def _verify(args) -> None:
    from .store.verify import verify

    summary = verify(args.store)
    print(json.dumps(summary, indent=2, default=str))
    print(f"OK: {args.store} is complete and every checksum matches", file=sys.stderr)


def _info(args) -> None:
    from .store.info import format_info, store_info

    info = store_info(args.store)
    print(json.dumps(info, indent=2, default=str) if args.json else format_info(info))


def _export(args) -> None:
    from .store.export import export_store

    out = args.out or str(Path(args.store).with_suffix("." + ("zip" if args.to == "zip" else "h5")))
    print(json.dumps(export_store(args.store, out, args.to), indent=2))


def _import(args) -> None:
    from .store.export import import_store

    summary = import_store(args.file, args.store)
    print(json.dumps(summary, indent=2, default=str))
    print(f"OK: {args.store} rebuilt from {args.file}; every checksum matches", file=sys.stderr)


def _export_head(args) -> None:
    from .model import export_head

    print(json.dumps(export_head(args.model_dir, args.out), indent=2))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lenspipe", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("prepare-model", help="convert/copy a model into a local HF directory")
    s.add_argument("--config", default="config/config.yaml")
    s.add_argument("--model", required=True, help="model name from the config")
    s.add_argument("--out", help="output directory (default: data/models/<model>)")
    s.set_defaults(func=_prepare_model)

    s = sub.add_parser("prepare-corpus", help="split, tokenize and pack a corpus")
    s.add_argument("--config", default="config/config.yaml")
    s.add_argument("--model", required=True, help="model name (its tokenizer is used)")
    s.add_argument("--corpus", required=True, help="corpus name from the config")
    s.add_argument("--out", help="output directory (default: data/corpora/<corpus>/<model>)")
    s.set_defaults(func=_prepare_corpus)

    s = sub.add_parser("extract", help="store every layer's residual stream of one split")
    s.add_argument("--config", default="config/config.yaml")
    s.add_argument("--model", required=True)
    s.add_argument("--corpus", required=True)
    s.add_argument("--split", required=True, choices=["train", "validation", "test"])
    s.add_argument("--out", help="store path (default: data/stores/<model>/<corpus>/<split>.zarr)")
    s.set_defaults(func=_extract)

    s = sub.add_parser("verify", help="check a store end to end (shapes, completeness, checksums, finiteness)")
    s.add_argument("store", help="store path or URL")
    s.set_defaults(func=_verify)

    s = sub.add_parser("info", help="summarise a store: model, corpus, tokens, layers, dtype, size, completeness")
    s.add_argument("store", help="store path or URL")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(func=_info)

    s = sub.add_parser("export", help="write a verified store as one file (zip = zarr ZipStore, or HDF5)")
    s.add_argument("store", help="store path")
    s.add_argument("--to", required=True, choices=["zip", "hdf5"])
    s.add_argument("--out", help="output file (default: the store path with .zip or .h5)")
    s.set_defaults(func=_export)

    s = sub.add_parser("import", help="rebuild a zarr store from an exported .zip or .h5 file, then verify it")
    s.add_argument("file", help="exported file")
    s.add_argument("store", help="new store path")
    s.set_defaults(func=_import)

    s = sub.add_parser("export-head", help="a model dir with only the final norm + unembedding (to share with a cache)")
    s.add_argument("model_dir", help="prepared model directory")
    s.add_argument("out", help="output directory")
    s.set_defaults(func=_export_head)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(level=10 if args.verbose else 20)
    with user_errors():
        args.func(args)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
