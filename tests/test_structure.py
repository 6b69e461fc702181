"""The code's shape: no import cycle in pipeline/ (lazy imports included), and one
registry per choice that several files need, which those files read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline.errors import LenspipeError

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "pipeline"


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _targets(module: str, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    package = module if known[module].name == "__init__.py" else module.rsplit(".", 1)[0]
    if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    named = {f"{base}.{a.name}" for a in node.names} & set(known)  # ``from . import paths``
    return ({base} & set(known)) | named


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at the top or inside a function."""
    known = modules()
    graph = {}
    for name, path in known.items():
        nodes = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.Import, ast.ImportFrom))]
        graph[name] = set().union(*(_targets(name, n, known) for n in nodes)) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(u: str) -> list[str] | None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                return path[path.index(v) :] + [v]
            if v not in state and (found := visit(v)):
                return found
        path.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_no_import_cycle_not_even_through_lazy_imports():
    # A cycle hidden behind imports inside functions (store -> store_verify -> store) still
    # ties the modules together: neither can be understood, tested or moved alone.
    graph = import_graph()
    assert "pipeline.store.reader" in graph and len(graph) > 30
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_a_lazy_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# ------------------------------------------------------------------------ one registry of translator kinds


def test_the_schema_allows_exactly_the_registered_translator_kinds():
    from pipeline.config import config_schema
    from pipeline.lens import kinds

    schema = config_schema()  # generated from the typed config, the registry's names its choices
    train, analyses = (schema["properties"][k]["properties"] for k in ("train", "analyses"))
    assert train["kinds"]["items"]["enum"] == kinds.names()
    assert analyses["translator"]["enum"] == [*kinds.names(), None]


def test_every_registered_kind_is_what_the_registry_says():
    import torch

    from pipeline.lens import kinds
    from pipeline.lens.lstsq import LeastSquaresAccumulator
    from pipeline.lens.translators import make_translator

    for kind in kinds.KINDS.values():
        t = make_translator(kind.name, 4, **({"hidden": 3} if kind.options else {}))
        assert t.kind == kind.name and set(kind.options) <= set(t.opts)
        h = torch.randn(5, 4)
        with torch.no_grad():
            for p in t.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        if kind.linear_map:  # affine_map is the translator, exactly
            w, b = t.affine_map(torch.float64)
            torch.testing.assert_close(h.double() + h.double() @ w.T + b, t(h).double(), rtol=1e-6, atol=1e-6)
        else:
            with pytest.raises(LenspipeError, match="no affine map"):
                t.affine_map()
        if kind.lstsq:  # a closed-form start that fits an exact map of its own class
            x = torch.randn(64, 4, dtype=torch.float64)
            w = torch.diag(torch.randn(4)) if kind.name == "scaling" else torch.randn(4, 4)
            b = torch.randn(4) if t.intercept else torch.zeros(4)
            acc = LeastSquaresAccumulator(4)
            acc.update(x, x @ w.double().T + b.double())
            t.fit_closed_form(acc, 0.0)
            torch.testing.assert_close(t(h), h @ w.T + b, rtol=1e-4, atol=1e-4)
        else:
            with pytest.raises(LenspipeError, match="least-squares"):
                t.set_affine_map(torch.eye(4), torch.zeros(4))


def test_the_package_docstrings_name_every_module():
    """pipeline/__init__.py names each top-level module and subpackage; a subpackage's
    __init__ names each of its modules (a new module is listed where a reader looks first)."""
    import importlib

    for package in [PACKAGE, *[p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()]]:
        doc = importlib.import_module(".".join(package.relative_to(REPO).parts)).__doc__
        listed = {line.split("``")[1] for line in doc.splitlines() if line.startswith("- ``")}
        present = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
        present |= {p.name for p in package.iterdir() if (p / "__init__.py").is_file()}
        assert listed == present, (package.name, sorted(present - listed), sorted(listed - present))


# ------------------------------------------------------------------------ one table of analyses


def test_each_analysis_has_its_rule_module_function_run_and_summary():
    import dataclasses
    import inspect
    import re

    from pipeline.analyses import ANALYSES, INPUTS
    from pipeline.config import AnalysesConfig

    # one rule each, made from the registry (rules/analyses.smk loops over it)
    assert re.search(
        r"^for analysis in ANALYSES:\n\n    rule:\n        name:\n            analysis.rule$",
        (REPO / "rules" / "analyses.smk").read_text(),
        flags=re.M,
    )
    assert all(set(a.inputs) <= set(INPUTS) for a in ANALYSES)
    fields = {f.name for f in dataclasses.fields(AnalysesConfig)}
    for a in ANALYSES:
        module = a.module()
        assert callable(getattr(module, a.rule)) and callable(module.summary), a.rule
        assert module.POWER.startswith("Power.") and "Power." not in (module.__doc__ or ""), a.rule
        run = inspect.signature(module.run).parameters
        assert [p for p in run if run[p].kind is inspect.Parameter.KEYWORD_ONLY] == list(a.settings), a.rule
        assert set(a.settings) <= fields, a.rule
        assert len(inspect.signature(module.summary).parameters) == len(a.tables), a.rule
