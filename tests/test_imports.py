"""The package's import graph, lazy (function-level) imports included, has no circle.

Each module of ``localize`` (with ``localize.passes`` and ``localize.kernels``, which live in the
top-level ``passes/`` and ``kernels/`` folders) is parsed, not imported; every ``import`` statement
anywhere in it is an edge. Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``, so
those count as edges too, except the module's own enclosing packages: Python has started them
before the module runs, and a package ``__init__`` that re-exports its children is the normal
pattern. An explicit ``from localize import X`` inside the package is an edge like any other.
A circle is reported with every module on it.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"localize": ROOT / "localize", "localize.passes": ROOT / "passes", "localize.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            if name.startswith("localize.passes") and package == "localize" or name.startswith(
                "localize.kernels"
            ) and package == "localize":
                continue
            found[name] = path
    return found


def _resolve(module: str, level: int, current: str, is_package: bool) -> str:
    if level == 0:
        return module
    base = current.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _walk_runtime(tree: ast.AST):
    """Every node, except under ``if TYPE_CHECKING:`` (those imports never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            test = getattr(child, "test", None) if isinstance(child, ast.If) else None
            if test is not None and "TYPE_CHECKING" in ast.unparse(test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def import_graph() -> nx.DiGraph:
    """Module -> modules it imports (and the packages whose ``__init__`` that runs)."""
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)

    def add(src: str, target: str) -> None:
        parts = target.split(".")
        own = {".".join(src.split(".")[:i]) for i in range(1, src.count(".") + 1)}
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            # the target itself always; an enclosing package's __init__ unless it encloses src too
            if name in modules and name != src and (i == len(parts) or name not in own):
                graph.add_edge(src, name)

    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _walk_runtime(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(name, alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, name, is_package)
                for alias in node.names:  # `from pkg import submodule` imports the submodule
                    full = f"{base}.{alias.name}"
                    add(name, full if full in modules else base)
    return graph


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert len(graph) > 30
    # a lazy (function-level) import is an edge like any other: the CLI imports the artifacts lazily
    assert graph.has_edge("localize.cli.main", "localize.codegen.artifacts")


def test_no_import_circles():
    graph = import_graph()
    cycles = list(nx.simple_cycles(graph))
    shown = "\n".join(" -> ".join(c + [c[0]]) for c in sorted(cycles, key=len)[:20])
    assert not cycles, f"{len(cycles)} import circle(s):\n{shown}"


def test_kernels_import_nothing_of_localize_but_errors():
    graph = import_graph()
    for module in graph:
        if not module.startswith("localize.kernels"):
            continue
        for dep in graph.successors(module):
            assert dep.startswith("localize.kernels") or dep in ("localize", "localize.errors"), (module, dep)


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return set(out.stdout.split())


def test_kernels_and_the_program_runtime_load_no_compiler():
    """program.py's imports (the runtime ops, optimizers, data order, model-file loader) and
    localize.kernels load neither the compiler, nor the passes, nor networkx."""
    heavy = {"localize.compiler.transform", "localize.compiler.tracer", "localize.passes", "networkx"}
    kernels = _loaded_after("import localize.kernels")
    assert not heavy & kernels and {m for m in kernels if m.startswith("localize")} <= (
        {"localize", "localize._checkout", "localize.errors", "localize.version"}
        | {m for m in kernels if m.startswith("localize.kernels")}
    )
    program = _loaded_after(
        "import localize.runtime.ops, localize.runtime.optim, localize.data, localize.codegen.restore, "
        "localize.compiler.model_file"
    )
    assert not heavy & program, sorted(heavy & program)


def test_a_checkout_root_on_the_path_does_not_shadow_the_pypi_kernels_package(tmp_path):
    """Started in the checkout's root (``python -c``/``-m`` put it first on sys.path), ``import kernels``
    finds this project's kernels/ folder; once localize is imported it finds the installed package of
    that name (transformers >= 5.25 imports Hugging Face's ``kernels``), here a stand-in."""
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("WHO = 'installed'\n")
    env = {**os.environ, "PYTHONPATH": str(site)}

    def where(statement: str) -> str:
        code = f"{statement}; import kernels; print(getattr(kernels, 'WHO', kernels.__file__))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
        return out.stdout.strip() or out.stderr.strip().splitlines()[-1]

    assert str(ROOT / "kernels") in where("import sys")  # the shadowing, without localize
    assert where("import localize") == "installed"


def test_every_module_imports():
    """Each module loads on its own: a name moved between modules cannot hide behind a lazy import."""
    names = [n for n in import_graph() if not n.endswith("__main__")]
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - collect them all
            failed.append(f"{name}: {type(e).__name__}: {e}")
    assert not failed, "\n".join(failed)


def test_an_integration_without_its_library_names_the_extra():
    """The base install has no lightning: importing the integration says which extra brings it."""
    code = (
        "import sys; sys.modules['lightning'] = None\n"
        "from localize.extras import MissingExtra\n"
        "try:\n    import localize.integrations.lightning\nexcept MissingExtra as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert "pip install 'localize-learning[lightning]'" in out.stdout, out.stdout + out.stderr
