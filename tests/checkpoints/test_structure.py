"""Arrows point down: checkpoints/ imports model/ (and data_pipeline/), never pretrain/, and no two
of the project's modules import each other, directly or round a longer circle (function-level
imports included)."""
import ast
from pathlib import Path

from tests.pretrain.conftest import REPO

PACKAGE = REPO / "checkpoints"
PROJECT_PACKAGES = ("model", "kernels", "data_pipeline", "checkpoints", "pretrain", "launch", "benchmarks")


def _imports(path: Path) -> set[str]:
    """Every module `path` imports anywhere in its body, as absolute dotted names."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from . import layout`
    return found


def _modules(*packages: Path) -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for package in packages or (PACKAGE,) for p in package.rglob("*.py")}


def test_checkpoints_never_import_pretrain():
    offenders = {name: sorted(i for i in _imports(path) if i == "pretrain" or i.startswith("pretrain."))
                 for name, path in _modules().items()}
    assert not {k: v for k, v in offenders.items() if v}


def test_no_import_cycles_in_the_project():
    modules = _modules(*(REPO / name for name in PROJECT_PACKAGES))
    graph = {name: {i for i in _imports(path) if i in modules and i != name} for name, path in modules.items()}
    for name, deps in graph.items():  # a module runs after its packages' __init__s: `from . import x` is no circle
        deps -= {package for package in deps if name.startswith(package + ".")}

    def cycle_from(start, node, seen):
        for nxt in graph[node]:
            if nxt == start:
                return [node, nxt]
            if nxt not in seen:
                seen.add(nxt)
                if (rest := cycle_from(start, nxt, seen)) is not None:
                    return [node, *rest]
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, {m}))]
    assert not cycles, f"import cycles: {cycles}"
