"""The package's layers, read from its source with `ast` (every import, module-level or inside a function):
no import circles between files; scheduler/ and sim/ free of JAX; the engine and the model know no ranker and no
training; server/ and train/ never import each other."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "ltr_jax"
ACCELERATOR_LIBS = ("jax", "jaxlib", "flax", "optax", "orbax")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """Every module ``name`` imports: ltr_jax modules resolved to files, others by their top-level name."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES)
    return {m if m.startswith("ltr_jax") else m.split(".")[0] for m in out}


GRAPH = {name: {m for m in imports_of(name) if m in MODULES and m != name} for name in MODULES}


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the groups of modules that import each other, directly or through others."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_walk_sees_the_package():
    assert {"ltr_jax.engine.engine", "ltr_jax.engine.ranking", "ltr_jax.models.llama", "ltr_jax.server.app"} <= set(
        MODULES)
    assert "ltr_jax.models.ranker" in GRAPH["ltr_jax.engine.ranking"]  # lazy and relative imports are resolved
    assert "jax" in imports_of("ltr_jax.engine.engine")


def test_no_import_circles_between_files():
    circles = [g for g in strongly_connected(GRAPH) if len(g) > 1]
    assert circles == [], f"modules importing each other: {circles}"


def test_a_circle_is_detected():  # the check above can fail
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"], ["d"]]


@pytest.mark.parametrize("package", ["ltr_jax.scheduler", "ltr_jax.sim"])
def test_pure_python_packages_import_no_accelerator_library(package):
    for name in MODULES:
        if name == package or name.startswith(package + "."):
            bad = imports_of(name) & set(ACCELERATOR_LIBS)
            assert not bad, f"{name} imports {sorted(bad)}"


def forbidden(importer_prefixes: tuple[str, ...], imported_prefixes: tuple[str, ...]) -> list[tuple[str, str]]:
    def under(name, prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return sorted((a, b) for a in MODULES if under(a, importer_prefixes)
                  for b in GRAPH[a] if under(b, imported_prefixes))


def test_the_engine_and_the_model_know_no_ranker_and_no_training():
    assert forbidden(("ltr_jax.engine.engine", "ltr_jax.models.llama"),
                     ("ltr_jax.models.ranker", "ltr_jax.models.ranker_checkpoint", "ltr_jax.train")) == []


def test_arrows_point_down():
    assert forbidden(("ltr_jax.server",), ("ltr_jax.train",)) == []
    assert forbidden(("ltr_jax.train",), ("ltr_jax.server",)) == []
    assert forbidden(("ltr_jax.scheduler",), ("ltr_jax.engine", "ltr_jax.models", "ltr_jax.sim", "ltr_jax.server",
                                               "ltr_jax.train", "ltr_jax.bench", "ltr_jax.config")) == []
    assert forbidden(("ltr_jax.models",), ("ltr_jax.engine", "ltr_jax.server", "ltr_jax.train", "ltr_jax.bench",
                                            "ltr_jax.sim", "ltr_jax.scheduler")) == []
    assert forbidden(("ltr_jax.engine",), ("ltr_jax.server", "ltr_jax.train", "ltr_jax.bench", "ltr_jax.sim")) == []
