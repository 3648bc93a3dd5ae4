"""The house rules the code keeps (STYLE.md): no module over 500 lines, no function over 80, no cycle
among the imports a module makes when it is loaded (imports inside a function are the way to defer one),
and every import, inside a function or for types too, pointing one way: down the layers that
docs/CONTRACTS.md states under "Import directions"."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gemmascope"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
CONTRACTS = PACKAGE.parents[1] / "docs" / "CONTRACTS.md"

# The layers, lowest first (docs/CONTRACTS.md, "Import directions"): a module of one may import, when it
# loads, inside a function or for types, only the layers before its own ("gemmascope" is the package
# itself: its version, and the architectures it registers).
LAYERS = [
    "errors", "limits", "values", "ranks", "corpus", "models", "warm", "sampled", "sites", "sae", "sparse_step", "architectures",
    "clt", "gemmascope", "runs", "formats", "releases", "activations", "evals", "features", "train", "steer",
    "effects", "bias", "attribution", "opening", "outputs", "server", "suite", "demo", "cli",
]  # fmt: skip


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _load_time_imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package modules `name` imports while it loads: its top-level statements, not function bodies,
    and not imports under `if TYPE_CHECKING:`."""
    deps: set[str] = set()
    package = (
        name
        if (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").exists()
        else name.rpartition(".")[0]
    )

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in known else base)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []) or [])
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return {d for d in deps if d in known and d != name}


def _every_import(name: str, tree: ast.Module, known: set[str]) -> set[tuple[str, int]]:
    """`(module, line)` of every package module `name` imports anywhere: at load, in a function, under
    `if TYPE_CHECKING:`."""
    package = (
        name
        if (PACKAGE.parent / Path(*name.split(".")) / "__init__.py").exists()
        else name.rpartition(".")[0]
    )
    deps: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            deps.update(
                (f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, node.lineno) for a in node.names
            )
        elif isinstance(node, ast.Import):
            deps.update((a.name, node.lineno) for a in node.names)
    return {(d, line) for d, line in deps if d in known and d != name}


def _layer(module: str) -> str:
    """The layer a module belongs to: `gemmascope.train.loop` -> `train`, the package -> `gemmascope`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_no_module_over_500_lines_and_no_function_over_80() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "over the house limits:\n" + "\n".join(too_long)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of a module graph, each as the path that closes it."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep) :] + [dep])
            elif dep not in state:
                walk(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name)
    return cycles


def test_no_import_cycle_at_load_time() -> None:
    trees = _modules()
    known = set(trees)
    cycles = _cycles({name: _load_time_imports(name, tree, known) for name, tree in trees.items()})
    assert not cycles, "import cycles at load time:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_import_cycle_inside_functions_either() -> None:
    """An import inside a function defers loading; it does not make a cycle acceptable (between
    layers `test_every_import_points_down_the_layers` rules them out; this catches them inside a
    package too)."""
    trees = _modules()
    known = set(trees)
    graph = {name: {dep for dep, _ in _every_import(name, tree, known)} for name, tree in trees.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_module_says_what_it_owns() -> None:
    missing = [name for name, tree in _modules().items() if not ast.get_docstring(tree)]
    assert not missing, f"modules without a docstring at the top: {missing}"


def test_every_import_points_down_the_layers() -> None:
    trees = _modules()
    known = set(trees)
    unplaced = sorted({_layer(name) for name in trees} - set(LAYERS))
    assert not unplaced, f"modules in no layer (place them in LAYERS and docs/CONTRACTS.md): {unplaced}"
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    upward = []
    for name, tree in sorted(trees.items()):
        for dep, line in sorted(_every_import(name, tree, known)):
            if _layer(dep) != _layer(name) and rank[_layer(dep)] > rank[_layer(name)]:
                upward.append(f"{name}:{line} imports {dep} ({_layer(dep)} is above {_layer(name)})")
    assert not upward, "imports against the layers (docs/CONTRACTS.md, Import directions):\n" + "\n".join(
        upward
    )


def test_contracts_state_the_layers_the_code_keeps() -> None:
    """The layers in docs/CONTRACTS.md's "Import directions" block, one line a layer group, names
    before the `|`, are LAYERS in order."""
    text = CONTRACTS.read_text()
    block = text.split("## Import directions", 1)[1].split("```", 2)[1]
    stated = [word for line in block.splitlines() for word in line.split("|", 1)[0].split()]
    assert stated == LAYERS
