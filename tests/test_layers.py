"""The anomgen packages form layers: an import never goes up, sideways to a sibling, or round a circle.

Every import of every module under ``anomgen/`` is read from its syntax tree: at the top of the module and inside
functions alike (a lazy import is still an edge), ``import x`` and ``from x import y``, relative imports resolved.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "anomgen"

#: ground first; names on one line are one layer (siblings: neither imports the other, except inside the ground,
#: whose small modules may build on each other as long as they make no circle)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("files", "errors", "pixels", "seeding", "pretrained", "progress"),
    ("data",),
    ("encoders", "metrics"),
    ("detectors", "diffusion"),
    ("quality", "generators"),
    ("selection",),
    ("runtime", "visualize"),
)
GROUND = LAYERS[0]
#: any other top-level module of anomgen sits above every package
TOP = len(LAYERS)

#: (importer, imported) pairs forbidden although the order would allow them: a generator never calls a detector; the
#: two meet only through the synthetic set on disk (DESIGN.md)
FORBIDDEN = {("generators", "detectors")}

#: edges that are known to break the order, each with why it is still there
KNOWN_EXCEPTIONS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under anomgen/."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported dotted name) for every import in the module, relative ones resolved; ``from a import b`` gives
    ``a.b`` when that is a module of anomgen, else ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else target))
    return found


def _layer(package: str) -> int:
    for i, names in enumerate(LAYERS):
        if package in names:
            return i
    return TOP


def _package(dotted: str) -> str | None:
    """The anomgen package (or top-level module) of a dotted name; None outside anomgen or for anomgen itself."""
    parts = dotted.split(".")
    return parts[1] if parts[0] == "anomgen" and len(parts) > 1 else None


def _edges():
    for name, path in MODULES.items():
        rel = path.relative_to(ROOT.parent).as_posix()
        for line, target in _imports(name, path):
            yield name, rel, line, target


def test_every_package_has_a_layer():
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    unplaced = sorted(packages - {n for layer in LAYERS for n in layer})
    assert not unplaced, f"packages with no place in LAYERS (add them to tests/test_layers.py): {unplaced}"


def test_imports_follow_the_layers():
    broken = []
    for name, rel, line, target in _edges():
        src, dst = _package(name), _package(target)
        if src is None or dst is None or src == dst:
            continue
        if (rel, dst) in KNOWN_EXCEPTIONS:
            continue
        a, b = _layer(src), _layer(dst)
        if b > a:
            broken.append(f"{rel}:{line}: {src} (layer {a}) imports {target} (higher layer {b})")
        elif b == a and a != 0:
            broken.append(f"{rel}:{line}: {src} imports its sibling {target} (both layer {a})")
        elif (src, dst) in FORBIDDEN:
            broken.append(f"{rel}:{line}: {src} imports {target}: {src} and {dst} meet only through the synthetic set")
    assert not broken, "imports against the layer order:\n" + "\n".join(broken)


def test_no_exceptions_left_unused():
    used = set()
    for name, rel, _, target in _edges():
        dst = _package(target)
        if (rel, dst) in KNOWN_EXCEPTIONS:
            used.add((rel, dst))
    assert used == KNOWN_EXCEPTIONS, f"exceptions no longer needed (remove them): {sorted(KNOWN_EXCEPTIONS - used)}"


def test_no_import_cycles():
    """No circle of imports between modules (a package's ``__init__`` counts as a module)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    where: dict[tuple[str, str], str] = {}
    for name, rel, line, target in _edges():
        if target in MODULES and target != name:
            graph[name].add(target)
            where.setdefault((name, target), f"{rel}:{line}")
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                loop = stack[stack.index(nxt):] + [nxt]
                cycles.append(" -> ".join(f"{a} ({where[(a, b)]})" for a, b in zip(loop, loop[1:])) + f" -> {nxt}")
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("forbidden", ["lightning", "pytorch_lightning"])
def test_anomgen_never_imports_lightning(forbidden):
    found = [f"{rel}:{line}: imports {target}" for _, rel, line, target in _edges()
             if target.split(".")[0] == forbidden]
    assert not found, f"anomgen must not import {forbidden}:\n" + "\n".join(found)
