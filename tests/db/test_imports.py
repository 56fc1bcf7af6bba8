"""Imports point one way: no circle between the modules of `kiln.db`, and the API never imports the
web UI. Read from the source (every import but `if TYPE_CHECKING:` ones), so a circle fails here even
while Python's import order happens to tolerate it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules `path` imports; `from pkg import mod` counts as `pkg.mod` when that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module → the modules under `root` it imports."""
    paths = [p for p in root.rglob("*.py") if "versions" not in p.parts]
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) & known for p in paths}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once, as the path that closes it (depth-first, sorted for stable output)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        for target in sorted(graph.get(node, ())):
            if target in path:
                circle = path[path.index(target):] + [target]
                if frozenset(circle) not in seen:
                    seen.add(frozenset(circle))
                    found.append(circle)
            elif target not in done:
                visit(target, [*path, target])
        done.add(node)

    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return found


def test_the_circle_finder_finds_circles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"b"}}) == []


def test_no_import_circle_between_db_modules() -> None:
    graph = import_graph(SRC / "kiln" / "db")
    assert "kiln.db.models" in graph.get("kiln.db.web_models", set()), graph  # the reader reads
    assert cycles(graph) == [], f"import circles in kiln.db: {cycles(graph)}"


def test_the_metadata_has_every_table_and_models_alone_has_no_web_tables() -> None:
    code = (
        "import sys, kiln.db.models as m;"
        "assert 'kiln.db.web_models' not in sys.modules, 'models imports web_models';"
        "assert 'web_sessions' not in m.Base.metadata.tables;"
        "from kiln.db.metadata import metadata;"
        "print(' '.join(sorted(metadata.tables)))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert {"users", "jobs", "web_conversations", "web_messages", "web_sessions"} <= set(result.stdout.split())


def test_the_migrations_make_exactly_the_metadata(empty_database_url: str) -> None:
    """What Alembic autogenerates against (every module of tables) is what the migrations built."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from kiln.db.engine import make_engine
    from kiln.db.metadata import metadata
    from kiln.db.migrate import upgrade

    upgrade(empty_database_url)
    engine = make_engine(empty_database_url)
    try:
        with engine.connect() as connection:
            assert compare_metadata(MigrationContext.configure(connection), metadata) == []
    finally:
        engine.dispose()


def test_the_api_never_imports_the_web_ui() -> None:
    api = SRC / "kiln" / "api"
    known = {module_name(p) for p in (SRC / "kiln").rglob("*.py")}
    offenders = {
        module_name(path): sorted(m for m in imported_modules(path, known) if m.split(".")[:2] == ["kiln", "web"])
        for path in api.rglob("*.py")
    }
    offenders = {name: mods for name, mods in offenders.items() if mods}
    assert offenders == {}, f"kiln.api imports the web UI: {offenders}"
