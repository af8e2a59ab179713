"""The house has floors: densefuse's modules import each other one way only, and never a task package.

The module graph is read from the source with ``ast`` (not by importing), so an import inside a function
counts as much as one at the top of a file: both run sooner or later, and a circle through a function-level
import only hides until someone calls it. ``from pkg import name`` points at ``pkg.name`` when that is a
module, else at ``pkg``; a registry's ``register_lazy("name", "module:attr")`` points at ``module``.
"""
from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import densefuse

ROOT = Path(densefuse.__file__).resolve().parent

#: Modules whose circles are tolerated: none (the config package on the ground floor reads tasks and model
#: builders through the registry, never by importing them).
ALLOWED_IN_CYCLES: set[str] = set()


def module_name(path: Path, root: Path = ROOT) -> str:
    """Dotted name of a source file under ``root`` (a package's ``__init__.py`` is the package)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _targets(node: ast.AST, package: str, modules: set[str]) -> list[str]:
    """Absolute names a node imports (relative imports resolved against ``package``)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            parts = package.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "register_lazy"
            and len(node.args) == 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
        return [node.args[1].value.partition(":")[0]]
    return []


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``module -> modules it imports``, every name of the graph and of its edges a module under ``root``;
    imports of other packages are left out, except that a top-level name outside ``root`` is kept when it
    is a ``densefuse_*`` package (so the test below sees them)."""
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    modules = set(files)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _targets(node, package, modules):
                if target.split(".")[0].startswith("densefuse_"):
                    graph[name].add(target)
                    continue
                while target not in modules and "." in target:
                    target = target.rpartition(".")[0]
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]], allowed: set[str] = frozenset()) -> list[str]:
    """One import cycle avoiding the ``allowed`` modules (``[a, b, ..., a]``), or ``[]`` when there is none."""
    kept = {m: {d for d in deps if d not in allowed and d in graph} for m, deps in graph.items() if m not in allowed}
    try:
        TopologicalSorter(kept).prepare()
    except CycleError as err:
        return list(reversed(err.args[1]))
    return []


def test_the_graph_sees_function_level_relative_and_lazy_imports(tmp_path):
    pkg = tmp_path / "house"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .low import x\n")
    (pkg / "low.py").write_text("x = 1\n\ndef f():\n    from .sub import high\n    return high\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "high.py").write_text("from .. import low\nfrom ..low import x\nimport densefuse_tasks.seg\n")
    (pkg / "reg.py").write_text("R.register_lazy('k', 'house.sub.high:thing')\n")
    graph = import_graph(pkg)
    assert graph == {
        "house": {"house.low"},
        "house.low": {"house.sub.high"},
        "house.sub": set(),
        "house.sub.high": {"house.low", "densefuse_tasks.seg"},
        "house.reg": {"house.sub.high"},
    }
    cycle = find_cycle(graph)
    assert cycle[0] == cycle[-1] and set(cycle) == {"house.low", "house.sub.high"}
    assert find_cycle(graph, {"house.low"}) == []


def test_densefuse_has_no_import_cycle():
    graph = import_graph()
    assert {"densefuse.calibration", "densefuse.equalizer", "densefuse.fusion", "densefuse.tasks"} <= set(graph)
    assert "densefuse.equalizer" in graph["densefuse.fusion"]  # the walk sees the real edges
    cycle = find_cycle(graph, ALLOWED_IN_CYCLES)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_equalizer_is_the_bottom_floor_of_calibration():
    """equalizer <- fusion <- calibration: the module-level math never reaches up to the model-level API."""
    graph = import_graph()
    assert not graph["densefuse.equalizer"] & {"densefuse.fusion", "densefuse.calibration"}
    assert "densefuse.calibration" not in graph["densefuse.fusion"]


def test_no_module_forwards_names_lazily():
    """A module-level ``__getattr__`` re-export hides where a name lives (and the import it makes is the
    kind of edge that closed circles): every import names the defining module."""
    lazy = [module_name(p, ROOT) for p in sorted(ROOT.rglob("*.py"))
            if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(p.read_text()).body)]
    assert lazy == []


def _top_level_names(tree: ast.Module) -> tuple[set[str], set[str]]:
    """``(names a module defines, names it imports)`` at its top level."""
    defined, imported = set(), set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            defined |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            imported |= {a.asname or a.name.split(".")[0] for a in node.names}
    return defined, imported


def test_imports_name_the_defining_module():
    """``from .fusion import valid_pixels`` where fusion only imported it from the equalizer would tie
    calibration to fusion for nothing: a name comes from the module that defines it. Packages'
    ``__init__`` re-exports (the public API) are meant to be imported from."""
    files = {module_name(p, ROOT): p for p in sorted(ROOT.rglob("*.py"))}
    trees = {m: ast.parse(p.read_text(encoding="utf-8")) for m, p in files.items()}
    passed_on = []
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(trees[name]):
            if not isinstance(node, ast.ImportFrom) or not node.level:
                continue
            (base,) = _targets(ast.ImportFrom(module=node.module, names=[ast.alias("_")], level=node.level),
                               package, set(files))
            if base not in files or files[base].name == "__init__.py":
                continue
            defined, imported = _top_level_names(trees[base])
            passed_on += [f"{name}: {a.name} from {base}" for a in node.names
                          if a.name in imported and a.name not in defined and f"{base}.{a.name}" not in files]
    assert passed_on == []


def test_densefuse_never_imports_a_task_package():
    graph = import_graph()
    up = {m: sorted(d for d in deps if d.startswith("densefuse_")) for m, deps in graph.items()}
    assert not {m: d for m, d in up.items() if d}, "densefuse/ imports a task package"


def test_the_public_api_still_imports():
    names = ["Fusion", "ScaleEqualizer", "Task", "build_model", "calibrate", "equalize", "equalizers",
             "export_plain", "fold", "get_task", "load_config", "measure", "register_task", "set_mode", "smp"]
    assert all(hasattr(densefuse, n) for n in names) and set(names) <= set(densefuse.__all__)
