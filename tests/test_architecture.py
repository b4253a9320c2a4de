"""The package's import graph: every module imports, the graph is acyclic, and subpackages import
one way only, lower to higher: nn -> curvature -> {theory, optim} -> experiments (backend and
data are below everything; theory and optim never import each other)."""
import ast
import importlib
import importlib.util
import pathlib
import re

import pytest

import kfc_ref

ROOT = pathlib.Path(kfc_ref.__file__).parent
#: subpackage (or top-level module) -> rank; a module may import only ranks <= its own, and
#: two different subpackages of the same rank may not import each other.
RANK = {"backend": 0, "validate": 0, "data": 0, "nn": 1, "comm": 1, "curvature": 2, "theory": 3,
        "optim": 3, "experiments": 4, "__main__": 5}


def module_names():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imported_modules(path, name):
    """kfc_ref modules imported by the file at ``path`` (module ``name``), at any depth."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kfc_ref"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.startswith("kfc_ref"):
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    found.add(full if _is_module(full) else base)
    return found


def _is_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def area(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


MODULES = dict(module_names())


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def layer_violations(modules: dict) -> list[str]:
    """'A imports B' for every import of ``modules`` ({name: path}) against the layer order."""
    bad = []
    for name, path in modules.items():
        src = area(name)
        if src is None:          # the top-level package re-exports the public API
            continue
        for target in imported_modules(path, name):
            dst = area(target)
            if dst is None or dst == src:
                continue
            if RANK[dst] >= RANK[src]:
                bad.append(f"{name} imports {target}")
    return sorted(bad)


def test_subpackages_import_one_way_only():
    bad = layer_violations(MODULES)
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_layer_check_sees_an_upward_and_a_sideways_import(tmp_path):
    """Negative control: nn importing experiments (upward) and optim importing theory (same
    rank, different subpackage) are both reported; a downward import is not."""
    up, side, down = (tmp_path / f"{n}.py" for n in ("up", "side", "down"))
    up.write_text("from kfc_ref.experiments import train\n")
    side.write_text("def f():\n    from kfc_ref.theory import sud\n")     # lazy counts too
    down.write_text("from kfc_ref.nn import layers\n")
    bad = layer_violations({"kfc_ref.nn.up": up, "kfc_ref.optim.side": side,
                            "kfc_ref.curvature.down": down})
    assert bad == ["kfc_ref.nn.up imports kfc_ref.experiments.train",
                   "kfc_ref.optim.side imports kfc_ref.theory.sud"]


def test_import_graph_is_acyclic():
    graph = {name: {t for t in imported_modules(path, name) if t in MODULES and t != name}
             for name, path in MODULES.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack + [node, nxt]))
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_only_the_backend_imports_cupy():
    """Directly or through importlib: no module but the backend names CuPy in an import."""
    pattern = re.compile(r"^\s*(import cupy|from cupy|import cupyx|from cupyx)"
                         r"|import_module\([\"']cupy",
                         re.M)
    users = sorted(name for name, path in MODULES.items() if pattern.search(path.read_text()))
    assert users == ["kfc_ref.backend"]


def test_every_subpackage_documents_itself():
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            mod = importlib.import_module(name)
            assert mod.__doc__ and len(mod.__doc__) > 80, f"{name} needs a docstring"
            assert hasattr(mod, "__all__"), f"{name} needs an __all__"
