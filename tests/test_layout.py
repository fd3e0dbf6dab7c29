"""The shape of the source tree: which way imports point, no cycles, short functions, a full map.

The library (core, registry, hosts, targets, io, methods, optim, ...) is built on by the
training recipe, and the recipe by the command line and the bench; never the other way round.
These checks read the sources with `ast` and import nothing, so they hold for code paths no
other test reaches (an import inside a rarely called function counts as much as one at the top).
"""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "peftlab"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 60

# Everything under src/peftlab that is not one of these is the library.
OUTSIDE_LIBRARY = ("peftlab.recipe", "peftlab.cli", "peftlab.__main__", "peftlab.bench")


def _module_name(path: pathlib.Path) -> str:
    """src/peftlab/io/files.py -> "peftlab.io.files"; a package's __init__.py is the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# A package's directory wins over a module file of the same name, as it does for `import`
# (a leftover io.py beside io/ is never imported: test_no_module_file_is_hidden_by_a_package).
MODULES = {_module_name(path): path
           for path in sorted(PACKAGE.rglob("*.py"), key=lambda path: (path.name == "__init__.py", path))}


def _within(module: str, packages: tuple[str, ...]) -> bool:
    """Whether `module` is one of `packages` or inside one of them."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, top_level_only: bool):
    """Import statements and `importlib.import_module("...")` calls of a module.

    `top_level_only`: only those that run when the module is imported (not inside a function
    body, not under `if TYPE_CHECKING:`), the ones that can make an import cycle.
    """
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.Call) and _dynamic_import_target(node) is not None:
            yield node
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if top_level_only and isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend(node.orelse)
            continue
        pending.extend(ast.iter_child_nodes(node))


def _dynamic_import_target(call: ast.Call) -> str | None:
    """The module of `importlib.import_module("peftlab.x")` or `import_module("peftlab.x")`."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name != "import_module" or not call.args:
        return None
    first = call.args[0]
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def _resolve(node: ast.AST, module: str) -> set[str]:
    """The peftlab modules one import names, relative imports made absolute.

    `from . import x` names the submodule `x` when there is one, else the package itself.
    """
    is_package = MODULES[module].name == "__init__.py"
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.Call):
        return {_dynamic_import_target(node)}
    if node.level == 0:
        base = node.module
    else:  # the package the dots count up from: a package's own __init__ is level 1 of itself
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    names = {f"{base}.{alias.name}" for alias in node.names}
    submodules = {name for name in names if name in MODULES}
    return submodules | ({base} if names - submodules else set())


def _peftlab_imports(module: str, top_level_only: bool = False) -> set[str]:
    """Every peftlab module `module` imports (itself excluded)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: set[str] = set()
    for node in _import_nodes(tree, top_level_only):
        found |= {name for name in _resolve(node, module) if _within(name, ("peftlab",))}
    return found - {module}


def test_no_module_file_is_hidden_by_a_package():
    hidden = [path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py")
              if path.name != "__init__.py" and (path.with_suffix("") / "__init__.py").is_file()]
    assert not hidden, f"never imported, a package of the same name stands beside them: {hidden}"


LIBRARY = sorted(m for m in MODULES if not _within(m, OUTSIDE_LIBRARY))
RECIPE = sorted(m for m in MODULES if _within(m, ("peftlab.recipe",)))


def test_the_tree_is_where_these_checks_look():
    # A moved package would make every check below pass on nothing.
    assert {"peftlab", "peftlab.core", "peftlab.registry", "peftlab.recipe", "peftlab.cli"} <= set(MODULES)
    assert "peftlab.methods.lora" in LIBRARY and "peftlab.recipe.trainer" in RECIPE


@pytest.mark.parametrize("module", LIBRARY)
def test_the_library_never_imports_the_recipe_cli_or_bench(module):
    wrong = sorted(m for m in _peftlab_imports(module) if _within(m, OUTSIDE_LIBRARY))
    assert not wrong, f"{MODULES[module].relative_to(ROOT)} imports {wrong}: the library must not depend on them"


@pytest.mark.parametrize("module", RECIPE)
def test_the_recipe_never_imports_the_cli_or_bench(module):
    wrong = sorted(m for m in _peftlab_imports(module)
                   if _within(m, ("peftlab.cli", "peftlab.__main__", "peftlab.bench")))
    assert not wrong, f"{MODULES[module].relative_to(ROOT)} imports {wrong}: the recipe must not depend on them"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as [a, b, ..., a], or None (depth-first, three colours)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for after in sorted(graph.get(node, ())):
            if state.get(after) == "open":
                return path[path.index(after):] + [after]
            if after not in state and (cycle := visit(after)):
                return cycle
        path.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_finder_sees_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_at_module_level():
    graph = {module: _peftlab_imports(module, top_level_only=True) & set(MODULES) for module in MODULES}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_function_is_longer_than_a_screen():
    too_long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)


def _named_in(text: str, relative: str) -> bool:
    """Whether `text` names the path `relative` (whole, not as the tail of a longer path)."""
    return re.search(rf"(?<![\w/.-]){re.escape(relative)}(?![\w/-])", text) is not None


def test_every_module_is_on_the_map():
    """docs/architecture.md names each module by its path under src/peftlab (`recipe/trainer.py`).

    A package's own __init__.py counts as named when its directory is (`recipe/`).
    """
    text = ARCHITECTURE.read_text()
    missing = []
    for path in sorted(MODULES.values()):
        relative = path.relative_to(PACKAGE).as_posix()
        package_dir = relative.removesuffix("__init__.py")
        named = _named_in(text, relative) or (relative != "__init__.py" and package_dir != relative
                                              and _named_in(text, package_dir))
        if not named:
            missing.append(relative)
    assert not missing, f"{ARCHITECTURE.relative_to(ROOT)} does not name: {', '.join(missing)}"
