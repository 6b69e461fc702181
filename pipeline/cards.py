"""Cards that travel with the artifacts: a ``README.md`` for a lens directory and for an
exported cache, with hub-style YAML metadata (model, revision, corpus, tokens, dtype,
licence, lenspipe version) and the per-layer KL table, so that the folder can be uploaded to
a model or dataset hub as it is and read by someone who never ran lenspipe.

The card is written from what the artifact records (``lens.json``; the store's attributes
and, where the workflow evaluated it, the run's ``layer_metrics.parquet``): it adds no fact
of its own.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from .embedded import EMBEDDED_MODELS, embedded_name

CARD = "README.md"
#: Hub licence identifiers of the embedded models' licences.
_HUB_LICENCES = {"Apache-2.0": "apache-2.0", "Gemma": "gemma"}


def _licence(source: str | None) -> tuple[str, str]:
    """(hub licence id, the licence in words) of a model source."""
    name = embedded_name(source or "")
    text = EMBEDDED_MODELS[name].licence if name in EMBEDDED_MODELS else None
    if not text:
        return "other", f"the licence of the model `{source}` (lenspipe records none for it)"
    hub = next((v for k, v in _HUB_LICENCES.items() if text.startswith(k)), "other")
    return hub, text


def _version() -> str:
    try:
        return metadata.version("lenspipe")
    except metadata.PackageNotFoundError:  # a checkout without `pip install -e .`
        return "unknown"


def _front_matter(meta: dict[str, Any]) -> str:
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def _kl_rows(val: dict, logit: dict, init: dict, stopping: dict) -> list[str]:
    rows = ["| layer | tuned KL | logit-lens KL | closed-form start | how it stopped |", "|---|---|---|---|---|"]
    for layer, kl in val.items():
        how = (stopping or {}).get(layer, {}).get("reason", "")
        rows.append(
            f"| {layer} | {kl:.3f} | {logit.get(layer, float('nan')):.3f} | "
            f"{init.get(layer, float('nan')):.3f} | {how} |"
        )
    return rows


def lens_card(lens_json: dict[str, Any], corpus: str | None = None) -> str:
    """The card of a lens directory, from its ``lens.json``."""
    model, cfg, m = lens_json.get("model", {}), lens_json.get("training_config") or {}, lens_json.get("metrics") or {}
    hub, words = _licence(model.get("source"))
    meta = {
        "library_name": "lenspipe",
        "license": hub,
        "tags": ["tuned-lens", "interpretability", "lenspipe"],
        "lenspipe": {
            "kind": lens_json.get("kind"),
            "model": model.get("name"),
            "model_source": model.get("source"),
            "revision": model.get("revision"),
            "weights_sha256": model.get("weights_sha256"),
            "corpus": corpus,
            "train_store_fingerprint": m.get("train_store_fingerprint"),
            "steps": m.get("steps"),
            "layers": lens_json.get("layers"),
            "lenspipe_version": _version(),
        },
    }
    body = [
        f"# Tuned lens ({lens_json.get('kind')}) for {model.get('name')}",
        "",
        f"A tuned lens (Belrose et al. 2023, arXiv:2303.08112) trained by lenspipe: one "
        f"`{lens_json.get('kind')}` translator per layer of `{model.get('source')}` (d_model "
        f"{lens_json.get('d_model')}, {lens_json.get('n_layers')} layers), trained from cached activations"
        + (f" of the corpus `{corpus}`" if corpus else "")
        + f" with {cfg.get('optimizer')} for {m.get('steps')} steps of {cfg.get('batch_tokens')} tokens "
        f"from its closed-form start (`{m.get('init')}`).",
        "",
        "Load it with lenspipe (`pipeline.lens.tuned.TunedLens.load(path, model_dir=...)`); it refuses "
        "any model whose weights hash differs from the one above.",
        "",
        "## Validation KL per layer (nats)",
        "",
        "KL from the model's output distribution to the lens's, on held-out validation tokens "
        f"({len(m.get('val_sequences') or [])} sequences):",
        "",
        *_kl_rows(
            m.get("val_kl") or {}, m.get("val_kl_logit_lens") or {}, m.get("val_kl_init") or {}, m.get("stopping") or {}
        ),
        "",
        "## Licence",
        "",
        f"The lens is derived from the model and is shared under its licence: {words}.",
        "",
    ]
    return _front_matter(meta) + "\n" + "\n".join(body)


def corpus_of(lens_dir: Path) -> str | None:
    """The corpus a lens directory was trained on, where it lies where the workflow puts
    lenses (``lenses/<model>/<corpus>/<kind>``, ``pipeline.paths.LENS_DIR``)."""
    parents = Path(lens_dir).resolve().parents
    return parents[0].name if len(parents) > 2 and parents[2].name == "lenses" else None


def store_card(store, export_name: str, tables: Path | None = None) -> str:
    """The card of an exported cache: the store's own record and, where the workflow
    evaluated lenses on it, the per-layer KL of its ``layer_metrics`` table."""
    attrs = store.attrs
    prov = attrs.get("provenance") or {}
    # a store written outside the workflow may name its model and corpus in a word
    model, corpus = ({"name": v} if isinstance(v, str) else v or {} for v in (prov.get("model"), prov.get("corpus")))
    hub, words = _licence(model.get("source"))
    meta = {
        "library_name": "lenspipe",
        "license": hub,
        "tags": ["activations", "residual-stream", "tuned-lens", "lenspipe"],
        "lenspipe": {
            "file": export_name,
            "model": model.get("name"),
            "model_source": model.get("source"),
            "revision": model.get("revision"),
            "weights_sha256": model.get("weights_sha256"),
            "split": corpus.get("split"),
            "tokens": int(store.n_tokens),
            "seq_len": attrs.get("seq_len"),
            "d_model": attrs.get("d_model"),
            "n_layers": attrs.get("n_layers"),
            "dtype": attrs.get("dtype"),
            "fingerprint": attrs.get("fingerprint"),
            "lenspipe_version": _version(),
        },
    }
    body = [
        f"# Activation cache: {model.get('name')}, {corpus.get('split')} split",
        "",
        f"The residual stream of every layer of `{model.get('source')}` ({attrs.get('n_layers')} layers + the "
        f"embeddings, d_model {attrs.get('d_model')}) on {int(store.n_tokens):,} tokens "
        f"({attrs.get('dtype')}), written by lenspipe's `extract` stage with full provenance. "
        f"`lenspipe import {export_name} STORE` unpacks it and `lenspipe verify STORE` checks every checksum; "
        "lenspipe then trains and evaluates lenses from it without running the model.",
        "",
    ]
    if tables is not None and tables.is_file():
        import pandas as pd

        df = pd.read_parquet(tables)
        df = df[df.position == "block"] if "position" in df.columns else df
        df = df[df.lens != "model"].assign(name=lambda d: d.translator.fillna(d.lens).where(d.lens == "tuned", d.lens))
        split = ", ".join(map(str, df.split.unique())) if "split" in df.columns else "held-out"
        piv = df.pivot_table(index="layer", columns="name", values="kl")
        body += [
            f"## KL per layer (nats): the lenses trained on this corpus, on its {split} split",
            "",
            "| layer | " + " | ".join(map(str, piv.columns)) + " |",
            "|---" * (len(piv.columns) + 1) + "|",
        ]
        body += [f"| {layer} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for layer, row in piv.iterrows()]
        body += [""]
    body += ["## Licence", "", f"Activations are derived from the model and shared under its licence: {words}.", ""]
    return _front_matter(meta) + "\n" + "\n".join(body)
