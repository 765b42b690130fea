"""The store on both backends, for the store's own tests.

`store_backend` is parametrized over SQLite (a file in the test's folder) and PostgreSQL (a fresh
database on the session's throwaway server, see postgres.py): a test that asks for it runs once
on each. Its `peek` reads and writes the database the way another process would (a plain
sqlite3 connection; an asyncpg connection on a thread of its own), synchronously, so it can be
called from the hub's synchronous `publish` and from hypothesis examples alike.
"""

from __future__ import annotations

import abc
import asyncio
import sqlite3
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from db import Database, PostgresLocation, _numbered
from events import EventHub

T = TypeVar("T")
Row = tuple[Any, ...]


class Peek(abc.ABC):
    """Another connection to the store's database (what another process would see)."""

    @abc.abstractmethod
    def fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]: ...

    @abc.abstractmethod
    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    def tables(self) -> set[str]: ...

    @abc.abstractmethod
    def schema(self) -> list[Row]:
        """Every table, column and index (to see a schema left as it was)."""

    @abc.abstractmethod
    def schema_version(self) -> int: ...

    @abc.abstractmethod
    def set_schema_version(self, version: int) -> None: ...

    def row(self, table: str, item_id: int) -> Row:
        rows = self.fetch(f"SELECT * FROM {table} WHERE id = ?", (item_id,))
        assert len(rows) == 1
        return rows[0]

    def count(self, table: str) -> int:
        return int(self.fetch(f"SELECT COUNT(*) FROM {table}")[0][0])

    def history(self) -> list[Row]:
        return self.fetch("SELECT * FROM status_history ORDER BY id")


class SQLitePeek(Peek):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:  # not before the test creates the file
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=10, check_same_thread=False
            )
        return self._conn

    def fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        return [tuple(row) for row in self.conn.execute(sql, params).fetchall()]

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        self.conn.execute(sql, params)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def tables(self) -> set[str]:
        return {r[0] for r in self.fetch("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def schema(self) -> list[Row]:
        return self.fetch("SELECT type, name, sql FROM sqlite_master ORDER BY name")

    def schema_version(self) -> int:
        return int(self.fetch("PRAGMA user_version")[0][0])

    def set_schema_version(self, version: int) -> None:
        self.execute(f"PRAGMA user_version = {version}")


class PostgresPeek(Peek):
    """An asyncpg connection driven from a thread with its own event loop."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._conn: asyncpg.Connection | None = None

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    @property
    def conn(self) -> asyncpg.Connection:
        if self._conn is None:
            self._conn = self._run(asyncpg.connect(self.url, timeout=10))
        return self._conn

    def fetch(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        conn = self.conn
        return [tuple(row) for row in self._run(conn.fetch(_numbered(sql), *params))]

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        conn = self.conn
        self._run(conn.execute(_numbered(sql), *params))

    def close(self) -> None:
        if self._conn is not None:
            self._run(self._conn.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def tables(self) -> set[str]:
        rows = self.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        return {r[0] for r in rows}

    def schema(self) -> list[Row]:
        columns = self.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_schema = current_schema()"
            " ORDER BY table_name, column_name"
        )
        indexes = self.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"
            " ORDER BY indexname"
        )
        return columns + indexes

    def schema_version(self) -> int:
        return int(self.fetch("SELECT version FROM mistrelay_schema")[0][0])

    def set_schema_version(self, version: int) -> None:
        self.execute("UPDATE mistrelay_schema SET version = ?", (version,))


@dataclass
class StoreBackend:
    """One backend for a test: where the database is, a peek at it, and the driver's errors."""

    name: str  # "sqlite" | "postgresql"
    location: Path | PostgresLocation
    peek: Peek
    check_violation: type[Exception]
    foreign_key_violation: type[Exception]
    undefined_column: type[Exception]

    def database(self, hub: EventHub | None = None) -> Database:
        return Database(self.location, hub=hub)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreBackend]:
    if request.param == "sqlite":
        path = tmp_path / "m.db"
        backend = StoreBackend(
            "sqlite",
            path,
            SQLitePeek(path),
            sqlite3.IntegrityError,
            sqlite3.IntegrityError,
            sqlite3.OperationalError,
        )
    else:
        url: str = request.getfixturevalue("postgres_url")
        backend = StoreBackend(
            "postgresql",
            PostgresLocation(url, url),
            PostgresPeek(url),
            asyncpg.CheckViolationError,
            asyncpg.ForeignKeyViolationError,
            asyncpg.UndefinedColumnError,
        )
    try:
        yield backend
    finally:
        backend.peek.close()


@pytest.fixture
def peek(store_backend: StoreBackend) -> Peek:
    return store_backend.peek
