"""Layout rules, read with `ast` (compared against: docs/ARCHITECTURE.md and the rules below).

docs/ARCHITECTURE.md: two layers, one direction of imports (`sparsek` imports
`cutedsl_kernels`, never the reverse). The restructure adds the rest:

1. `cutedsl_kernels/` (device code) imports neither `torch` nor `sparsek`, anywhere in a file.
2. `sparsek/` imports neither `perf` nor `tests`.
3. The modules of the `sparsek` package import each other without a cycle.
4. Nothing outside a module imports its underscore names (`from X import _name`), and host,
   device and perf code never reach them as attributes of a module (`ops._launcher`).
5. No source file of `cutedsl_kernels/` is longer than 800 lines.

CPU only and fast: the sources are parsed, never imported (no torch, no CuTe DSL). Every
failure lists each offending `file:line` with what it imports. The checkers take the
repository root as an argument, so the last tests run them on a small synthetic tree to show
that each rule can fail.
"""

from __future__ import annotations

import ast
import functools
import textwrap
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("sparsek", "cutedsl_kernels", "perf", "tests")
SKIPPED_DIRS = ("__pycache__",)
MAX_KERNEL_FILE_LINES = 800
# Nodes that open a scope of their own: their names are not the enclosing scope's.
SCOPE_NODES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.ClassDef,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)


# ----------------------------------------------------------------------------- files, modules


def is_skipped_dir(name: str) -> bool:
    """Caches, and hidden folders (virtual environments, local scratch): not the project's."""
    return name in SKIPPED_DIRS or name.startswith(".")


def python_files(root: Path, top: str) -> list[Path]:
    """Every `*.py` file under `root/top`, outside caches and virtual environments."""
    return sorted(
        path
        for path in (root / top).rglob("*.py")
        if not any(is_skipped_dir(part) for part in path.relative_to(root).parts[:-1])
    )


def relative(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def module_name(root: Path, path: Path) -> str:
    """`sparsek/ops.py` -> `sparsek.ops`; a package's `__init__.py` is the package itself."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def module_path(root: Path, dotted: str) -> Path | None:
    """The file `a/b.py` or package `a/b/__init__.py` that `dotted` names under `root`.

    A directory of `*.py` files without an `__init__.py` (such as `tests/`) is a namespace
    package and counts too.
    """
    if not dotted:
        return None
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.parent / f"{base.name}.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    if base.is_dir() and not is_skipped_dir(base.name) and any(base.glob("*.py")):
        return base
    return None


def is_project_module(root: Path, dotted: str) -> bool:
    return dotted.split(".")[0] in PROJECT_PACKAGES and module_path(root, dotted) is not None


def is_within(module: str, packages: Iterable[str]) -> bool:
    """`module` is one of `packages` or a submodule of one."""
    return any(module == package or module.startswith(f"{package}.") for package in packages)


def is_private(name: str) -> bool:
    """An underscore name; dunders (`__version__`, `__doc__`) are public."""
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ----------------------------------------------------------------------------- import resolution


def search_dirs(root: Path, path: Path) -> list[Path]:
    """Where a file's absolute imports are found: the directories pytest (rootdir-based
    `prepend` mode) puts on `sys.path` for it, i.e. each ancestor without an `__init__.py`,
    nearest first, then the repository root. For a file inside a package that is the root
    alone; `tests/test_op.py`'s `from fake_launch import ...` finds `tests/fake_launch.py`.
    """
    dirs = [
        directory
        for directory in path.parents
        if directory != root
        and directory.is_relative_to(root)
        and not (directory / "__init__.py").exists()
    ]
    return [*dirs, root]


def qualify(root: Path, path: Path, dotted: str) -> str:
    """The repository-wide name of an absolute import (`fake_launch` -> `tests.fake_launch`);
    names found nowhere in the repository (torch, the standard library) stay as they are."""
    for directory in search_dirs(root, path):
        if module_path(directory, dotted.split(".")[0]) is not None:
            prefix = ".".join(directory.relative_to(root).parts)
            return f"{prefix}.{dotted}" if prefix else dotted
    return dotted


def from_module(root: Path, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a `from ... import` names, relative imports resolved."""
    if node.level == 0:
        return qualify(root, path, node.module or "")
    package = module_name(root, path).split(".")
    if path.name != "__init__.py":
        package.pop()
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


@dataclass(frozen=True)
class ImportRecord:
    """One imported name: `import a.b`, or one name of `from a.b import c`."""

    path: Path
    line: int
    statement: str  # the statement as written, up to its names: `from a.b import`, `import`
    item: str  # this record's name as written: `c`, `c as d`, `a.b` ("" for a dynamic import)
    module: str  # the absolute module named: `a.b` for both forms
    name: str | None  # `c` of `from a.b import c` ("*" for a star import); None for `import`
    bound: str | None  # the name the import binds in its scope
    binds: str | None  # the dotted name that `bound` refers to (`a` for `import a.b`)
    type_checking: bool  # inside `if TYPE_CHECKING:`, so never run


def records_of(
    root: Path, path: Path, node: ast.Import | ast.ImportFrom, type_checking: bool
) -> Iterator[ImportRecord]:
    """One record per name of an `import` / `from ... import` statement."""
    for alias in node.names:
        suffix = f" as {alias.asname}" if alias.asname else ""
        if isinstance(node, ast.Import):
            module = qualify(root, path, alias.name)
            depth = alias.name.count(".")
            top = ".".join(module.split(".")[: module.count(".") + 1 - depth])
            yield ImportRecord(
                path,
                node.lineno,
                "import",
                f"{alias.name}{suffix}",
                module,
                None,
                alias.asname or alias.name.split(".")[0],
                module if alias.asname else top,
                type_checking,
            )
        else:
            module = from_module(root, path, node)
            written = "." * node.level + (node.module or "")
            yield ImportRecord(
                path,
                node.lineno,
                f"from {written} import",
                f"{alias.name}{suffix}",
                module,
                alias.name,
                None if alias.name == "*" else alias.asname or alias.name,
                None if alias.name == "*" else f"{module}.{alias.name}",
                type_checking,
            )


def dynamic_import(node: ast.Call) -> str | None:
    """The module of `importlib.import_module("m")` / `__import__("m")` with a literal name."""
    func = node.func
    called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    if called not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return None if first.value.startswith(".") else first.value
    return None


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def walk_imports(
    root: Path, path: Path, node: ast.AST, type_checking: bool
) -> Iterator[ImportRecord]:
    """Every import under `node`: module level, in functions, classes and branches."""
    if isinstance(node, ast.If) and is_type_checking(node.test):
        for statement in node.body:
            yield from walk_imports(root, path, statement, True)
        for statement in node.orelse:  # the `else:` branch runs
            yield from walk_imports(root, path, statement, type_checking)
        return
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield from records_of(root, path, node, type_checking)
        return
    if isinstance(node, ast.Call) and (module := dynamic_import(node)):
        text = ast.unparse(node)
        yield ImportRecord(path, node.lineno, text, "", module, None, None, None, type_checking)
    for child in ast.iter_child_nodes(node):
        yield from walk_imports(root, path, child, type_checking)


def file_imports(root: Path, path: Path) -> list[ImportRecord]:
    return list(walk_imports(root, path, parse(path), False))


def loaded_module(root: Path, record: ImportRecord) -> str:
    """The module an import makes Python run: `a.b`, or `a.b.c` for `from a.b import c` when
    `c` is a submodule. Parent packages (`a`'s `__init__`) Python runs on the way are left out:
    only explicit imports count."""
    if record.name not in (None, "*"):
        submodule = f"{record.module}.{record.name}"
        if module_path(root, submodule) is not None:
            return submodule
    return record.module


def describe(root: Path, record: ImportRecord) -> tuple[str, int, str]:
    return relative(root, record.path), record.line, f"{record.statement} {record.item}".strip()


def report(rows: Iterable[tuple[str, int, str]]) -> list[str]:
    return [f"{path}:{line}: {text}" for path, line, text in sorted(set(rows))]


# ----------------------------------------------------------------------------- rules 1 and 2


def forbidden_imports(root: Path, top: str, forbidden: tuple[str, ...]) -> list[str]:
    """Imports of `forbidden` packages (or their submodules) from any file under `root/top`."""
    return report(
        describe(root, record)
        for path in python_files(root, top)
        for record in file_imports(root, path)
        if is_within(record.module, forbidden)
    )


# ----------------------------------------------------------------------------- rule 3

Graph = dict[str, dict[str, list[ImportRecord]]]


def import_graph(root: Path, package: str) -> Graph:
    """module -> imported module -> the imports making that edge, within `package`."""
    nodes = {module_name(root, path): path for path in python_files(root, package)}
    graph: Graph = {name: {} for name in nodes}
    for name, path in nodes.items():
        for record in file_imports(root, path):
            target = loaded_module(root, record)
            if not record.type_checking and target in nodes:
                graph[name].setdefault(target, []).append(record)
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """Tarjan's strongly connected components, each sorted, in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


MAX_CYCLES_SHOWN = 20  # chains listed per component (its imports are all listed regardless)


def simple_cycles(graph: Graph, members: list[str]) -> list[list[str]]:
    """The elementary cycles inside one component, each found once, from its smallest module."""
    cycles: list[list[str]] = []

    def extend(path: list[str]) -> None:
        for target in sorted(graph[path[-1]]):
            if len(cycles) >= MAX_CYCLES_SHOWN:
                return
            if target == path[0]:
                cycles.append([*path, target])
            elif target in members and target > path[0] and target not in path:
                extend([*path, target])

    for start in members:
        extend([start])
    return cycles


def cycle_edges(root: Path, graph: Graph, members: list[str]) -> list[str]:
    """Every import inside a component, one line per statement and imported module."""
    rows = []
    for source in members:
        for target, records in graph[source].items():
            if target not in members:
                continue
            by_line: dict[tuple[int, str], list[str]] = {}
            for record in records:
                by_line.setdefault((record.line, record.statement), []).append(record.item)
            for (line, statement), items in by_line.items():
                text = f"{statement} {', '.join(items)}".strip()
                rows.append((relative(root, records[0].path), line, text))
    return report(rows)


def import_cycles(root: Path, package: str) -> list[str]:
    """Each strongly connected component of more than one module (or a module importing
    itself): its modules, its cycles as chains of module names, and every import inside it."""
    graph = import_graph(root, package)
    found = []
    for members in strongly_connected(graph):
        if len(members) == 1 and members[0] not in graph[members[0]]:
            continue
        chains = [" -> ".join(cycle) for cycle in simple_cycles(graph, members)]
        lines = [
            f"import cycle among {', '.join(members)}:",
            *(f"  cycle: {chain}" for chain in chains),
            *(f"  {edge}" for edge in cycle_edges(root, graph, members)),
        ]
        found.append("\n".join(lines))
    return found


# ----------------------------------------------------------------------------- rule 4


def private_name_imports(root: Path, tops: Iterable[str]) -> list[str]:
    """`from X import _name` where X is a project module other than the importing file."""
    return report(
        describe(root, record)
        for top in tops
        for path in python_files(root, top)
        for record in file_imports(root, path)
        if record.name is not None
        and is_private(record.name)
        and is_project_module(root, record.module)
        and record.module != module_name(root, path)
    )


def scope_nodes(scope: ast.AST) -> Iterator[ast.AST]:
    """The nodes of one scope; nested scopes are yielded but not entered."""
    for child in ast.iter_child_nodes(scope):
        yield child
        if not isinstance(child, SCOPE_NODES):
            yield from scope_nodes(child)


def bound_names(node: ast.AST) -> list[str]:
    """The names a node other than an import binds in its scope."""
    if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
        return [node.id]
    if isinstance(node, ast.arg):
        return [node.arg]
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.ExceptHandler) and node.name:
        return [node.name]
    return []


def scope_bindings(root: Path, path: Path, scope: ast.AST) -> dict[str, str | None]:
    """name -> the project module it is bound to in this scope, or None for anything else
    (a parameter, an assignment, an import of a non-module); an import of a module wins."""
    modules: dict[str, str] = {}
    others: dict[str, str | None] = {}
    for node in scope_nodes(scope):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for record in records_of(root, path, node, False):
                if record.bound is None:
                    continue
                if record.binds is not None and is_project_module(root, record.binds):
                    modules[record.bound] = record.binds
                else:
                    others[record.bound] = None
        else:
            others.update(dict.fromkeys(bound_names(node)))
    return {**others, **modules}


Scopes = list[tuple[dict[str, str | None], bool]]  # (bindings, is a class body), innermost last


def resolve_module(root: Path, expr: ast.expr, scopes: Scopes) -> str | None:
    """The project module `expr` denotes: a name bound to one, or a submodule attribute of one
    (`sparsek.ops`); None for anything else (`self`, a tensor, an unknown name)."""
    if isinstance(expr, ast.Name):
        for bindings, _ in reversed(scopes):
            if expr.id in bindings:
                return bindings[expr.id]
        return None
    if isinstance(expr, ast.Attribute):
        base = resolve_module(root, expr.value, scopes)
        if base is not None and module_path(root, f"{base}.{expr.attr}") is not None:
            return f"{base}.{expr.attr}"
    return None


def private_attributes_in(root: Path, path: Path) -> list[tuple[str, int, str]]:
    """`alias._name` where `alias` is a project module other than this file's own."""
    own = module_name(root, path)
    found: list[tuple[str, int, str]] = []

    def visit(scope: ast.AST, scopes: Scopes) -> None:
        for node in scope_nodes(scope):
            if isinstance(node, SCOPE_NODES):
                visible = [entry for entry in scopes if not entry[1]]  # class bodies are not
                inner = (scope_bindings(root, path, node), isinstance(node, ast.ClassDef))
                visit(node, [*visible, inner])
            elif isinstance(node, ast.Attribute) and is_private(node.attr):
                module = resolve_module(root, node.value, scopes)
                if module is not None and module != own:
                    text = f"{ast.unparse(node)} ({module}.{node.attr})"
                    found.append((relative(root, path), node.lineno, text))

    tree = parse(path)
    visit(tree, [(scope_bindings(root, path, tree), False)])
    return found


def private_attribute_uses(root: Path, tops: Iterable[str]) -> list[str]:
    return report(
        row
        for top in tops
        for path in python_files(root, top)
        for row in private_attributes_in(root, path)
    )


# ----------------------------------------------------------------------------- rule 5


def long_files(root: Path, top: str, limit: int) -> list[str]:
    rows = []
    for path in python_files(root, top):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > limit:
            rows.append((relative(root, path), lines, f"{lines} lines (limit {limit})"))
    return report(rows)


# ----------------------------------------------------------------------------- the rules


@pytest.fixture
def _clean_registry_memo() -> None:
    """Replaces tests/conftest.py's autouse fixture of that name here: it imports
    `sparsek.registry` (and so torch), which these source-only tests never need."""


def fail_on(title: str, violations: list[str]) -> None:
    """Fails with every violation listed (pytest's own assertion rewriting would elide them)."""
    if violations:
        pytest.fail(f"{title} ({len(violations)}):\n" + "\n".join(violations), pytrace=False)


def test_device_code_imports_neither_torch_nor_sparsek() -> None:
    violations = forbidden_imports(REPO, "cutedsl_kernels", ("torch", "sparsek"))
    fail_on("cutedsl_kernels/ imports torch or sparsek", violations)


def test_host_code_imports_neither_perf_nor_tests() -> None:
    violations = forbidden_imports(REPO, "sparsek", ("perf", "tests"))
    fail_on("sparsek/ imports perf or tests", violations)


def test_no_import_cycle_in_sparsek() -> None:
    cycles = import_cycles(REPO, "sparsek")
    fail_on("import cycles among sparsek's modules", cycles)


def test_no_underscore_name_imported_from_another_module() -> None:
    violations = private_name_imports(REPO, PROJECT_PACKAGES)
    fail_on("underscore names imported from other modules", violations)


def test_no_underscore_attribute_of_another_module() -> None:
    violations = private_attribute_uses(REPO, ("sparsek", "cutedsl_kernels", "perf"))
    fail_on("underscore attributes of other modules", violations)


def test_kernel_files_are_short() -> None:
    violations = long_files(REPO, "cutedsl_kernels", MAX_KERNEL_FILE_LINES)
    fail_on("cutedsl_kernels/ files over the limit", violations)


def test_the_rules_see_the_code_base() -> None:
    """Guards against the rules passing vacuously (wrong root, nothing parsed)."""
    graph = import_graph(REPO, "sparsek")
    assert len(graph) > 1 and graph["sparsek.api"], "sparsek.api imports other modules"
    assert python_files(REPO, "cutedsl_kernels")
    assert qualify(REPO, Path(__file__), "test_structure") == "tests.test_structure"


# ----------------------------------------------------------------------------- the checkers fail

SYNTHETIC_TREE = {
    "sparsek/__init__.py": """\
        from sparsek import d
        from sparsek.a import public
        """,
    "sparsek/a.py": """\
        from typing import TYPE_CHECKING

        from sparsek import b
        import perf.tool

        if TYPE_CHECKING:
            from sparsek import c


        def public() -> None: ...


        _hidden = 1
        """,
    "sparsek/b.py": """\
        from sparsek.c import public as again


        def late():
            from . import a
        """,
    "sparsek/c.py": "from sparsek.a import public\n",
    "sparsek/d.py": "import sparsek.e\n",
    "sparsek/e.py": "",
    "sparsek/s.py": "from sparsek import s\n",
    "sparsek/bad.py": "import tests.helper\n",
    "perf/__init__.py": "",
    "perf/tool.py": """\
        import sparsek
        import sparsek.a as mod
        from sparsek import a as _a
        from sparsek.a import _hidden, __doc__

        mod._hidden
        sparsek.a._hidden
        _a._hidden
        sparsek.__version__


        class K:
            mod = None
            in_class = mod._class_attribute

            def method(self):
                return self._x, mod._in_method


        def shadowed(mod):
            return mod._parameter


        def local_import():
            from sparsek import b

            return b._local, [b._comp for b in range(3)]
        """,
    "tests/helper.py": "_secret = 1\n",
    "tests/test_x.py": """\
        import sparsek.a as mod
        from helper import _secret

        mod._hidden
        """,
    "cutedsl_kernels/__init__.py": "",
    "cutedsl_kernels/k.py": """\
        import importlib


        def f():
            import torch.nn
            from sparsek import a
            from cutedsl_kernels import _private
            importlib.import_module("torch")
        """,
    "cutedsl_kernels/long.py": "x = 1\n" * (MAX_KERNEL_FILE_LINES + 1),
    "cutedsl_kernels/at_limit.py": "x = 1\n" * MAX_KERNEL_FILE_LINES,
}


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    for name, text in SYNTHETIC_TREE.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return tmp_path


def test_forbidden_imports_are_reported(synthetic: Path) -> None:
    assert forbidden_imports(synthetic, "cutedsl_kernels", ("torch", "sparsek")) == [
        "cutedsl_kernels/k.py:5: import torch.nn",
        "cutedsl_kernels/k.py:6: from sparsek import a",
        "cutedsl_kernels/k.py:8: importlib.import_module('torch')",
    ]
    assert forbidden_imports(synthetic, "sparsek", ("perf", "tests")) == [
        "sparsek/a.py:4: import perf.tool",
        "sparsek/bad.py:1: import tests.helper",
    ]


def test_import_cycles_are_reported(synthetic: Path) -> None:
    # a -> b (module level), b -> a (relative, in a function), b -> c -> a, s -> s; not
    # a -> c (under TYPE_CHECKING), nor d -> sparsek (`import sparsek.e` runs `sparsek`
    # implicitly), which would close sparsek -> d -> sparsek.
    assert import_cycles(synthetic, "sparsek") == [
        "import cycle among sparsek.a, sparsek.b, sparsek.c:\n"
        "  cycle: sparsek.a -> sparsek.b -> sparsek.a\n"
        "  cycle: sparsek.a -> sparsek.b -> sparsek.c -> sparsek.a\n"
        "  sparsek/a.py:3: from sparsek import b\n"
        "  sparsek/b.py:1: from sparsek.c import public as again\n"
        "  sparsek/b.py:5: from . import a\n"
        "  sparsek/c.py:1: from sparsek.a import public",
        "import cycle among sparsek.s:\n"
        "  cycle: sparsek.s -> sparsek.s\n"
        "  sparsek/s.py:1: from sparsek import s",
    ]


def test_underscore_imports_and_attributes_are_reported(synthetic: Path) -> None:
    assert private_name_imports(synthetic, PROJECT_PACKAGES) == [
        "cutedsl_kernels/k.py:7: from cutedsl_kernels import _private",
        "perf/tool.py:4: from sparsek.a import _hidden",
        "tests/test_x.py:2: from helper import _secret",
    ]
    assert private_attribute_uses(synthetic, ("sparsek", "cutedsl_kernels", "perf")) == [
        "perf/tool.py:6: mod._hidden (sparsek.a._hidden)",
        "perf/tool.py:7: sparsek.a._hidden (sparsek.a._hidden)",
        "perf/tool.py:8: _a._hidden (sparsek.a._hidden)",
        "perf/tool.py:17: mod._in_method (sparsek.a._in_method)",
        "perf/tool.py:27: b._local (sparsek.b._local)",
    ]


def test_long_kernel_files_are_reported(synthetic: Path) -> None:
    assert long_files(synthetic, "cutedsl_kernels", MAX_KERNEL_FILE_LINES) == [
        "cutedsl_kernels/long.py:801: 801 lines (limit 800)",
    ]
