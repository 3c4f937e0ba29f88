"""The package's layers: each module imports only from the layers below it (function-local
imports included), there is no import cycle, and no module imports another module's private
name. The layers, from the bottom up, are listed in :data:`LAYERS` (the README's library table
describes the same order)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dmlnb"

#: group -> layer (0 is the bottom). A module belongs to the group of its longest matching prefix.
LAYERS = {
    "dmlnb.defaults": 0, "dmlnb._validate": 0, "dmlnb.progress": 0,
    "dmlnb.config": 1,
    "dmlnb.data": 2, "dmlnb.views": 2, "dmlnb.backbones": 2, "dmlnb.losses": 2,
    "dmlnb.metrics": 2, "dmlnb.model": 2.5,
    "dmlnb.runs": 3,
    "dmlnb.distributed": 4, "dmlnb.ssr": 4,
    "dmlnb.experiment": 5,
    "dmlnb.train": 6,
    "dmlnb.viz": 7, "dmlnb.diagram": 7, "dmlnb.measure": 7.5, "dmlnb.widgets": 8, "dmlnb.ranking_explorer": 8.5,
    "dmlnb.gallery": 8,
    "dmlnb.execute": 8.5, "dmlnb.sweep": 9, "dmlnb.notebook": 9,
    "dmlnb.study": 10, "dmlnb.demo": 10, "dmlnb.recipe": 10, "dmlnb.figures": 10,
    "dmlnb.data.cli": 10, "dmlnb.cli": 11, "dmlnb.__main__": 12, "dmlnb": 13,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _group(name: str) -> str:
    best = max((g for g in LAYERS if name == g or name.startswith(g + ".")), key=len,
               default=None)
    assert best is not None, f"{name} is in no layer: add it to LAYERS (and the README table)"
    return best


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` of every import of a dmlnb module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.startswith("dmlnb")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("dmlnb"):
                names = [a.name for a in node.names]
                # `from dmlnb import train` imports the module dmlnb.train
                subs = [n for n in names if (PACKAGE.parent / (mod + "." + n).replace(".", "/")).with_suffix(".py").exists()
                        or (PACKAGE.parent / (mod + "." + n).replace(".", "/") / "__init__.py").exists()]
                for n in subs:
                    out.append((f"{mod}.{n}", [], node.lineno))
                rest = [n for n in names if n not in subs]
                if rest or not subs:
                    out.append((mod, rest, node.lineno))
    return out


def _graph() -> dict[str, list[tuple[str, list[str], int]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_imports_only_from_below():
    bad = []
    for mod, imports in _graph().items():
        me = _group(mod)
        for target, _, line in imports:
            if target == "dmlnb":
                continue
            them = _group(target)
            if them == me:
                continue
            if LAYERS[them] >= LAYERS[me]:
                bad.append(f"{mod}:{line} imports {target} (layer {LAYERS[them]} >= {LAYERS[me]})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in imps if t != m and t != "dmlnb"} for m, imps in _graph().items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_no_module_imports_a_private_name_of_another():
    bad = [f"{mod}:{line} imports {n} from {target}"
           for mod, imports in _graph().items() for target, names, line in imports
           for n in names if n.startswith("_") and target != mod]
    private_modules = [f"{mod}:{line} imports {target}"
                       for mod, imports in _graph().items() for target, _, line in imports
                       if target.rpartition(".")[2].startswith("_") and target != "dmlnb._validate"
                       and not target.startswith(mod.rpartition(".")[0] + "._")]
    assert not bad and not private_modules, "\n".join(bad + private_modules)
