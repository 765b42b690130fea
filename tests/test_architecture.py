"""Where things live: no import circle, aria2 code knows only aria2, SQL only in the store, file
deletion only in the files module. Read from the source with `ast`, so a move that breaks a rule
fails here before a reader has to find it."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOT_PRODUCTION = {"tests", "bench", "scripts", "data", ".venv", "venv", ".git", "node_modules"}
SQL = re.compile(
    r"\b(SELECT\b.+\bFROM|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|CREATE\s+(TABLE|INDEX)"
    r"|DROP\s+TABLE|PRAGMA\s+\w+|BEGIN\s+IMMEDIATE)\b",
    re.DOTALL,
)
DELETING_CALLS = {
    ("os", "remove"),
    ("os", "unlink"),
    ("os", "rmdir"),
    ("os", "removedirs"),
    ("shutil", "rmtree"),
}
DELETING_METHODS = {"unlink", "rmdir"}
# What aria2 code must not reach: uploads (rclone, media), Telegram, the web and the bot.
NOT_FOR_ARIA2 = {"uploads", "bot", "webstreamer", "pyrogram", "tgcrypto", "rclone_python"}


def production_modules() -> dict[str, Path]:
    modules: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        relative = path.relative_to(ROOT)
        if NOT_PRODUCTION & set(relative.parts):
            continue
        name = ".".join(relative.with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = production_modules()
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}


def imported_names(name: str) -> Iterator[str]:
    """Every module name `name` imports (relative imports resolved)."""
    package = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def project_imports(name: str) -> set[str]:
    found = set()
    for imported in imported_names(name):
        while imported and imported not in MODULES:
            imported = imported.rpartition(".")[0]
        if imported and imported != name:
            found.add(imported)
    return found


def import_circles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {name: project_imports(name) for name in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in graph:
        if name not in index:
            visit(name)
    return circles


def test_the_walk_sees_the_project() -> None:
    for expected in ("app", "db", "files", "aria2_client.client", "uploads.manager", "bot"):
        assert expected in MODULES
    assert "db" in project_imports("app")


def test_no_import_circle() -> None:
    assert import_circles() == []


def test_import_circles_are_found() -> None:
    """The detector itself: a circle added to the graph is reported."""
    MODULES["_probe_a"] = MODULES["_probe_b"] = ROOT / "__init__.py"
    TREES["_probe_a"] = ast.parse("import _probe_b")
    TREES["_probe_b"] = ast.parse("import _probe_a")
    try:
        assert ["_probe_a", "_probe_b"] in import_circles()
    finally:
        for probe in ("_probe_a", "_probe_b"):
            del MODULES[probe], TREES[probe]


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("aria2_client")))
def test_aria2_code_knows_only_aria2(name: str) -> None:
    roots = {imported.split(".")[0] for imported in imported_names(name)}
    assert not roots & NOT_FOR_ARIA2, f"{name} imports {sorted(roots & NOT_FOR_ARIA2)}"
    strings = [
        node.value
        for node in ast.walk(TREES[name])
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]
    for tool in ("ffprobe", "ffmpeg", "rclone"):
        assert not any(tool in text for text in strings), f"{name} mentions {tool}"


def sql_strings(name: str) -> list[str]:
    found = []
    for node in ast.walk(TREES[name]):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and SQL.search(node.value)
        ):
            found.append(node.value[:80])
        elif isinstance(node, ast.JoinedStr):
            text = "".join(
                part.value if isinstance(part, ast.Constant) else "x" for part in node.values
            )
            if SQL.search(text):
                found.append(text[:80])
    return found


def test_only_the_store_holds_sql() -> None:
    holders = {name: sql_strings(name) for name in MODULES if name != "db"}
    assert {name: found for name, found in holders.items() if found} == {}
    assert sql_strings("db"), "the pattern must recognise the store's own statements"


def deleting_calls(name: str) -> list[str]:
    found = []
    for node in ast.walk(TREES[name]):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        attribute = node.func.attr
        owner = node.func.value
        if isinstance(owner, ast.Name) and (owner.id, attribute) in DELETING_CALLS:
            found.append(f"{owner.id}.{attribute} (line {node.lineno})")
        elif attribute in DELETING_METHODS:
            found.append(f".{attribute}() (line {node.lineno})")
    return found


def test_only_the_files_module_deletes() -> None:
    deleters = {name: deleting_calls(name) for name in MODULES if name != "files"}
    assert {name: calls for name, calls in deleters.items() if calls} == {}
    assert deleting_calls("files"), "the check must recognise the files module's own deletions"
