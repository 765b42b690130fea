"""The store: schema, migrations, every read and write, and the status machines.

Callers see the :class:`Store` protocol and the records of ``records.py``; :class:`Database` is
the store, on SQLite (one file in WAL mode: one writer connection, each write a ``BEGIN
IMMEDIATE`` transaction, reads on a second connection) or on PostgreSQL (``database.url``: a pool
of asyncpg connections). :func:`open_store` picks the backend from the configuration. The SQL is
one text for both wherever the dialects agree; the few differences are spelt out below. Writes
go one at a time through one lock. Status changes happen only here, through
``_Tx.transition``, which refuses what the machines below do not allow and appends every change
to ``status_history``. After a write commits, events carrying the committed records (read in the
same transaction) are published on the hub given to :class:`Database` — this module knows
nothing about the web server or the bot, and does no file work beyond its own database file.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Generic, Literal, Protocol, Self, TypeVar, get_args
from urllib.parse import unquote, urlsplit

import aiosqlite
import asyncpg
from loguru import logger

from configer import DatabaseConfig
from events import EventHub, EventKind
from files import discard
from records import (
    ARCHIVE_ACTIONS,
    ApiToken,
    ArchiveOption,
    BotNotice,
    ChangeOutcome,
    DownloadChange,
    DownloadGroup,
    DownloadRemoved,
    DownloadRow,
    DownloadSearch,
    DownloadSnapshot,
    DownloadStatistics,
    EventData,
    HistoryEntry,
    ImportBatch,
    ImportedDownload,
    ImportedUpload,
    ImportResult,
    NewDownload,
    NodeHeartbeat,
    NodeRow,
    ProgressUpdate,
    SettingsChange,
    SourceType,
    Statistics,
    TgMediaRecord,
    TorrentFile,
    UploadRow,
    UploadStatistics,
    WebSession,
)

SCHEMA_VERSION = 12
APPLICATION_ID = 0x4D52_4C59  # "MRLY": marks a file as a MistRelay database

SOURCE_TYPES: tuple[str, ...] = get_args(SourceType)

# --- the status machines (ARCHITECTURE.md) ------------------------------------------------------

DOWNLOAD_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"waiting", "downloading", "failed", "cancelled"}),
    # → pending: the node running it died; the job goes back to the queue (a cluster).
    "waiting": frozenset({"downloading", "paused", "failed", "cancelled", "pending"}),
    "downloading": frozenset({"paused", "completed", "failed", "cancelled", "pending"}),
    "paused": frozenset({"waiting", "downloading", "failed", "cancelled", "pending"}),
    "completed": frozenset(),
    "failed": frozenset({"pending"}),
    "cancelled": frozenset({"pending"}),
}
UPLOAD_TRANSITIONS: dict[str, frozenset[str]] = {
    "waiting_download": frozenset({"pending", "cancelled"}),
    # pending/paused → failed: the node holding the file stayed away longer than upload_wait.
    "pending": frozenset({"uploading", "cancelled", "failed"}),
    "uploading": frozenset({"completed", "failed", "paused", "cancelled", "pending"}),
    "paused": frozenset({"pending", "cancelled", "failed"}),
    "completed": frozenset(),
    "failed": frozenset({"pending"}),
    "cancelled": frozenset({"pending"}),
}
MACHINES: dict[str, dict[str, frozenset[str]]] = {
    "download": DOWNLOAD_TRANSITIONS,
    "upload": UPLOAD_TRANSITIONS,
}
DOWNLOAD_STATUSES = tuple(DOWNLOAD_TRANSITIONS)
UPLOAD_STATUSES = tuple(UPLOAD_TRANSITIONS)
ACTIVE_DOWNLOAD_STATUSES = ("pending", "waiting", "downloading", "paused")
FINAL_DOWNLOAD_STATUSES = ("completed", "failed", "cancelled")


def allowed_sources(entity: str, target: str) -> tuple[str, ...]:
    """The statuses from which `entity` may move to `target`."""
    return tuple(src for src, targets in MACHINES[entity].items() if target in targets)


def _download_steps(current: str, target: str) -> tuple[str, ...] | None:
    """The statuses a download passes through from `current` to `target`: the target alone when
    the machine allows it directly, else by way of `downloading` when that is allowed (aria2
    finished a job the row still had as waiting or paused); None when neither is."""
    if current == target:
        return ()
    if target in DOWNLOAD_TRANSITIONS.get(current, frozenset()):
        return (target,)
    if "downloading" in DOWNLOAD_TRANSITIONS.get(current, frozenset()) and (
        target in DOWNLOAD_TRANSITIONS["downloading"]
    ):
        return ("downloading", target)
    return None


# What a person may ask of a row now, in the order the page and the bot show them. Each action
# is a transition of the machine above (tests/test_state_machines.py holds them together).
_DOWNLOAD_ACTIONS: dict[str, tuple[str, ...]] = {
    "pending": ("cancel",),
    "waiting": ("pause", "cancel"),
    "downloading": ("pause", "cancel"),
    "paused": ("resume", "cancel"),
    "completed": (),
    "failed": ("retry",),
    "cancelled": ("retry",),
}
_UPLOAD_ACTIONS: dict[str, tuple[str, ...]] = {
    "waiting_download": ("cancel",),
    "pending": ("cancel",),
    "uploading": ("cancel",),
    "paused": ("cancel",),
    "completed": (),
    "failed": ("retry",),
    "cancelled": ("retry",),
}


def download_actions(status: str) -> tuple[str, ...]:
    """`pause`, `resume`, `retry`, `cancel`: those a download in `status` allows, in that order."""
    return _DOWNLOAD_ACTIONS.get(status, ())


def upload_actions(status: str) -> tuple[str, ...]:
    """`retry`, `cancel`: those an upload in `status` allows."""
    return _UPLOAD_ACTIONS.get(status, ())


class StoreError(Exception):
    """Base of the store's errors."""


class TransitionError(StoreError):
    """A status change that the machine does not allow; nothing was written."""

    def __init__(self, entity: str, item_id: int, current: str | None, target: str) -> None:
        self.entity, self.item_id, self.current, self.target = entity, item_id, current, target
        where = "does not exist" if current is None else f"is {current}"
        super().__init__(f"{entity} {item_id} {where}: cannot become {target}")


class NotFound(StoreError):
    def __init__(self, entity: str, key: object) -> None:
        super().__init__(f"{entity} {key} not found")
        self.entity, self.key = entity, key


class StoreNotEmpty(StoreError):
    """A database to copy the store into holds rows, or tables that are not the store's."""


class DuplicateDownload(StoreError):
    """The same source is already queued or downloading."""

    def __init__(self, existing_id: int, source_key: str) -> None:
        super().__init__(f"already queued as download {existing_id}")
        self.existing_id, self.source_key = existing_id, source_key


def utc_now() -> str:
    """A UTC timestamp with its offset, e.g. 2026-11-24T05:00:00.123+00:00."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def parse_utc(text: str) -> datetime | None:
    """A timestamp of the store as an aware datetime (one without offset is taken as UTC);
    None when it is not a timestamp."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


# --- the connection seam: statements on either backend ----------------------------------------
#
# The store's SQL is one text for both backends wherever the dialects agree: `?` placeholders
# (numbered `$1, $2, …` for asyncpg), `RETURNING`, `UPDATE … FROM`, `ON CONFLICT`, `CAST(? AS
# BIGINT)` where a parameter's type must be said. What differs is said where it differs: the
# column types of the schema (`_POSTGRES_TYPES`), the step of schema 3, and how each backend
# keeps its schema version and identity (`_SQLiteBackend`, `_PostgresBackend`).

Dialect = Literal["sqlite", "postgresql"]


class _Row(Protocol):
    """A row as either driver returns it (sqlite3.Row, asyncpg.Record): by position, by column
    name, sliced, iterated."""

    def __getitem__(self, key: Any, /) -> Any: ...
    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...
    def keys(self) -> Iterable[str]: ...


class _Statements(Protocol):
    """Statements on one connection (in a write transaction) or on the read side."""

    committed: bool  # set by the backend once the transaction's COMMIT has finished

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None: ...
    async def fetch_all(self, sql: str, params: Sequence[object] = ()) -> Sequence[_Row]: ...
    async def fetch_one(self, sql: str, params: Sequence[object] = ()) -> _Row | None: ...


_StatementsT = TypeVar("_StatementsT", bound=_Statements)
_T = TypeVar("_T")
_PLACEHOLDER = re.compile(r"\?")


@functools.lru_cache(maxsize=512)
def _numbered(sql: str) -> str:
    """`sql` with its `?` placeholders numbered `$1, $2, …` for PostgreSQL. The store's SQL
    never has a `?` inside a string literal: one there is refused rather than numbered."""
    pieces = sql.split("'")
    if any("?" in literal for literal in pieces[1::2]):
        raise ValueError(f"a ? inside a string literal: {sql[:80]}")
    numbers = itertools.count(1)
    return "'".join(
        _PLACEHOLDER.sub(lambda _: f"${next(numbers)}", piece) if index % 2 == 0 else piece
        for index, piece in enumerate(pieces)
    )


class _SQLiteStatements:
    def __init__(self, conn: aiosqlite.Connection) -> None:
        self.conn = conn
        self.committed = False

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        cursor = await self.conn.execute(sql, params)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self.conn.executemany(sql, rows)

    async def fetch_all(self, sql: str, params: Sequence[object] = ()) -> Sequence[_Row]:
        return list(await self.conn.execute_fetchall(sql, params))

    async def fetch_one(self, sql: str, params: Sequence[object] = ()) -> _Row | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None


class _SQLiteDirectStatements:
    """The writer's own sqlite3 connection, used only from inside its thread (see
    `_SQLiteBackend.run`): each statement runs at once, so a body that awaits nothing but these
    never suspends."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.committed = False

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return self.conn.execute(sql, params).rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        self.conn.executemany(sql, rows)

    async def fetch_all(self, sql: str, params: Sequence[object] = ()) -> Sequence[_Row]:
        rows: list[_Row] = self.conn.execute(sql, params).fetchall()
        return rows

    async def fetch_one(self, sql: str, params: Sequence[object] = ()) -> _Row | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None


def _run_to_end(body: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine that never suspends (its awaits complete at once) to its result, with
    no event loop: how a transaction's body runs inside the SQLite writer's thread."""
    try:
        body.send(None)
    except StopIteration as finished:
        result: _T = finished.value
        return result
    body.close()
    raise StoreError("a one-trip transaction waited on something other than its statements")


class _PostgresStatements:
    """On one connection (a write transaction) or on the pool (reads): both answer the same."""

    def __init__(self, target: asyncpg.Connection | asyncpg.Pool) -> None:
        self.target = target
        self.committed = False

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        status: str = await self.target.execute(_numbered(sql), *params)
        changed = status.rpartition(" ")[2]  # "UPDATE 3", "INSERT 0 1", "DELETE 0"
        return int(changed) if changed.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self.target.executemany(_numbered(sql), rows)

    async def fetch_all(self, sql: str, params: Sequence[object] = ()) -> Sequence[_Row]:
        rows: list[_Row] = await self.target.fetch(_numbered(sql), *params)
        return rows

    async def fetch_one(self, sql: str, params: Sequence[object] = ()) -> _Row | None:
        row: _Row | None = await self.target.fetchrow(_numbered(sql), *params)
        return row


# --- schema ------------------------------------------------------------------------------------
#
# Versioned steps, each applied in one transaction by the store itself when it opens, on both
# backends, forward from whatever released version the database has (1, 2, …). Written by hand
# rather than with Alembic: Alembic needs SQLAlchemy (a second database layer) in the runtime
# and runs as a separate command with its own version table, while these few steps run at open
# through the same connections and transactions as everything else, and both SQLite and
# PostgreSQL make DDL transactional, so a step is applied whole or not at all.

_SCHEMA_1 = """
CREATE TABLE tg_media (
    file_unique_id TEXT PRIMARY KEY,
    file_id        TEXT NOT NULL,
    chat_id        INTEGER NOT NULL,
    message_id     INTEGER NOT NULL,
    media_type     TEXT NOT NULL,
    sender_id      INTEGER,
    sender_name    TEXT,
    file_name      TEXT,
    mime_type      TEXT,
    file_size      INTEGER,
    duration       INTEGER,
    width          INTEGER,
    height         INTEGER,
    caption        TEXT,
    media_group_id TEXT,
    message_date   TEXT,
    dc_id          INTEGER,
    created_at     TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
CREATE TABLE downloads (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    gid                 TEXT UNIQUE,
    file_unique_id      TEXT REFERENCES tg_media(file_unique_id) ON DELETE CASCADE,
    source_type         TEXT NOT NULL
        CHECK (source_type IN ('telegram', 'http', 'ftp', 'magnet', 'torrent')),
    source_key          TEXT NOT NULL,
    source_url          TEXT,
    torrent_data        BLOB,
    info_hash           TEXT,
    status              TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'waiting', 'downloading', 'paused',
                          'completed', 'failed', 'cancelled')),
    file_name           TEXT,
    local_path          TEXT,
    total_length        INTEGER NOT NULL DEFAULT 0,
    completed_length    INTEGER NOT NULL DEFAULT 0,
    download_speed      INTEGER NOT NULL DEFAULT 0,
    error_message       TEXT,
    error_code          TEXT,
    owner_id            INTEGER,
    chat_id             INTEGER,
    message_id          INTEGER,
    group_key           TEXT NOT NULL,
    progress_message_id INTEGER,
    files_json          TEXT,
    media_info_json     TEXT,
    created_at          TEXT NOT NULL,
    started_at          TEXT,
    completed_at        TEXT,
    updated_at          TEXT NOT NULL
);
CREATE UNIQUE INDEX downloads_one_active_per_source ON downloads(source_key)
    WHERE status IN ('pending', 'waiting', 'downloading', 'paused');
CREATE INDEX downloads_by_status ON downloads(status);
CREATE INDEX downloads_by_group ON downloads(group_key, id);
CREATE INDEX downloads_by_owner ON downloads(owner_id, id);
CREATE INDEX downloads_by_media ON downloads(file_unique_id);
CREATE TABLE download_gids (
    gid         TEXT PRIMARY KEY,
    download_id INTEGER NOT NULL REFERENCES downloads(id) ON DELETE CASCADE,
    reason      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
CREATE INDEX download_gids_by_download ON download_gids(download_id);
CREATE TABLE uploads (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    download_id     INTEGER NOT NULL REFERENCES downloads(id) ON DELETE CASCADE,
    upload_target   TEXT NOT NULL,
    target_type     TEXT NOT NULL CHECK (target_type IN ('rclone', 'telegram')),
    status          TEXT NOT NULL DEFAULT 'waiting_download'
        CHECK (status IN ('pending', 'waiting_download', 'uploading', 'paused',
                          'completed', 'failed', 'cancelled')),
    remote_path     TEXT,
    uploaded_size   INTEGER NOT NULL DEFAULT 0,
    total_size      INTEGER NOT NULL DEFAULT 0,
    upload_speed    REAL NOT NULL DEFAULT 0,
    retry_count     INTEGER NOT NULL DEFAULT 0,
    max_retries     INTEGER NOT NULL DEFAULT 3,
    failure_reason  TEXT,
    error_message   TEXT,
    error_code      TEXT,
    verified_size   INTEGER,
    verified_hash   TEXT,
    verified_at     TEXT,
    next_attempt_at TEXT,
    created_at      TEXT NOT NULL,
    started_at      TEXT,
    completed_at    TEXT,
    cleaned_at      TEXT,
    updated_at      TEXT NOT NULL,
    UNIQUE (download_id, upload_target)
);
CREATE INDEX uploads_by_status ON uploads(status);
CREATE INDEX uploads_by_target ON uploads(upload_target, status);
CREATE TABLE status_history (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    entity      TEXT NOT NULL CHECK (entity IN ('download', 'upload')),
    entity_id   INTEGER NOT NULL,
    from_status TEXT,
    to_status   TEXT NOT NULL,
    reason      TEXT,
    at          TEXT NOT NULL
);
CREATE INDEX status_history_by_entity ON status_history(entity, entity_id, id);
CREATE TABLE config_settings (
    key        TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
"""

# PostgreSQL's names for SQLite's column types. SQLite's INTEGER is 64 bits (sizes, Telegram
# chat ids); PostgreSQL's REAL would be 32 bits.
_POSTGRES_TYPES = (
    ("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    ("INTEGER", "BIGINT"),
    ("REAL", "DOUBLE PRECISION"),
    ("BLOB", "BYTEA"),
)


_POSTGRES_TYPE = {"INTEGER": "BIGINT", "BLOB": "BYTEA"}  # of one parameter


async def _run_script(sql: _Statements, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            await sql.execute(statement.strip())


async def _run_schema(sql: _Statements, dialect: Dialect, script: str) -> None:
    """A schema script written with SQLite's column types, in the dialect's types."""
    if dialect == "postgresql":
        for sqlite_type, postgres_type in _POSTGRES_TYPES:
            script = re.sub(rf"\b{sqlite_type}\b", postgres_type, script)
    await _run_script(sql, script)


_Step = Callable[[_Statements, Dialect], Awaitable[None]]


def _script_step(script: str) -> _Step:
    """A schema step that is only a script (in SQLite's types; see _run_schema)."""

    async def step(sql: _Statements, dialect: Dialect) -> None:
        await _run_schema(sql, dialect, script)

    return step


async def _schema_2(sql: _Statements, dialect: Dialect) -> None:
    """Schema 1 kept a scheduled upload retry as `failed` with next_attempt_at; `failed` is
    final now and a scheduled retry waits as `pending`."""
    now = utc_now()
    await sql.execute(
        "INSERT INTO status_history (entity, entity_id, from_status, to_status, reason, at)"
        " SELECT 'upload', id, 'failed', 'pending', 'retry scheduled (migrated)', ?"
        " FROM uploads WHERE status = 'failed' AND next_attempt_at IS NOT NULL ORDER BY id",
        (now,),
    )
    await sql.execute(
        "UPDATE uploads SET status = 'pending', updated_at = ?"
        " WHERE status = 'failed' AND next_attempt_at IS NOT NULL",
        (now,),
    )


# Schema 3: the gids of a download are numbered in the order they were learnt (SQLite's hidden
# rowid kept that order before; PostgreSQL has no such column).
_SCHEMA_3_SQLITE = """
ALTER TABLE download_gids RENAME TO download_gids_schema_2;
CREATE TABLE download_gids (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    gid         TEXT NOT NULL UNIQUE,
    download_id INTEGER NOT NULL REFERENCES downloads(id) ON DELETE CASCADE,
    reason      TEXT NOT NULL,
    created_at  TEXT NOT NULL
);
INSERT INTO download_gids (gid, download_id, reason, created_at)
    SELECT gid, download_id, reason, created_at FROM download_gids_schema_2 ORDER BY rowid;
DROP TABLE download_gids_schema_2;
CREATE INDEX download_gids_by_download ON download_gids(download_id)
"""
# Rows already there (never updated, so in the order they were written) are numbered in table
# order. And every poll cycle rewrites the progress of the active downloads: with room left on
# each page, PostgreSQL updates a row in place of its page without touching the seven indexes
# (a "HOT" update) — measured here, a 1000-row progress batch at 10k rows took 4 ms instead of
# 20-45 ms on full pages.
_SCHEMA_3_POSTGRES = """
ALTER TABLE download_gids DROP CONSTRAINT download_gids_pkey;
ALTER TABLE download_gids ADD COLUMN id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY;
ALTER TABLE download_gids ADD CONSTRAINT download_gids_gid_key UNIQUE (gid);
ALTER TABLE downloads SET (fillfactor = 70)
"""


async def _schema_3(sql: _Statements, dialect: Dialect) -> None:
    await _run_script(sql, _SCHEMA_3_SQLITE if dialect == "sqlite" else _SCHEMA_3_POSTGRES)


# Schema 4: a cluster. Each node registers in `nodes`; a job records the node that claimed it;
# secrets every node must share (the link signing key, the web token) live in `shared_secrets`.
_SCHEMA_4 = """
CREATE TABLE nodes (
    name         TEXT PRIMARY KEY,
    instance     TEXT NOT NULL,
    public_url   TEXT NOT NULL,
    slots        INTEGER NOT NULL DEFAULT 0,
    disk_free    INTEGER NOT NULL DEFAULT 0,
    leader       INTEGER NOT NULL DEFAULT 0,
    started_at   TEXT NOT NULL,
    heartbeat_at TEXT NOT NULL,
    stopped_at   TEXT
);
CREATE TABLE shared_secrets (
    name       TEXT PRIMARY KEY,
    value      TEXT NOT NULL,
    created_at TEXT NOT NULL
);
ALTER TABLE downloads ADD COLUMN node TEXT;
CREATE INDEX downloads_by_node ON downloads(node, status)
"""


# Schema 5: dashboard sessions kept on the server (revocable), and the bot's outbox: what a chat
# is owed for a download that reached a final status, written with that status change.
_SCHEMA_5 = """
CREATE TABLE web_sessions (
    token_hash   TEXT PRIMARY KEY,
    created_at   TEXT NOT NULL,
    last_used_at TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    revoked_at   TEXT,
    address      TEXT,
    user_agent   TEXT
);
CREATE TABLE bot_notices (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    download_id  INTEGER NOT NULL REFERENCES downloads(id) ON DELETE CASCADE,
    chat_id      INTEGER NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('completed', 'failed', 'cancelled')),
    created_at   TEXT NOT NULL,
    delivered_at TEXT
);
CREATE INDEX bot_notices_undelivered ON bot_notices(id) WHERE delivered_at IS NULL
"""


# Schema 6: the rows an import took from another store (`app.py import-upstream`), by their
# origin there, so that importing the same database again adds only what is new; and where the
# main bot forwarded a Telegram file for the worker bots (its copy in the storage channel), so
# that it is forwarded once per file and channel.
_SCHEMA_6 = """
CREATE TABLE imported_rows (
    origin      TEXT PRIMARY KEY,
    entity      TEXT NOT NULL CHECK (entity IN ('download', 'upload')),
    local_id    INTEGER NOT NULL,
    imported_at TEXT NOT NULL
);
CREATE TABLE tg_storage_messages (
    file_unique_id TEXT PRIMARY KEY REFERENCES tg_media(file_unique_id) ON DELETE CASCADE,
    chat_id        INTEGER NOT NULL,
    message_id     INTEGER NOT NULL,
    created_at     TEXT NOT NULL
)
"""


# Schema 7: statistics kept as running totals. `store_totals` holds, per entity, upload target
# ('' for downloads) and status, the number of rows and the sums the statistics show. Triggers
# keep it in the transaction of every insert, change and delete, whatever statement makes it (a
# cascade too), so the statistics read a few rows instead of grouping every download and
# upload. Speeds are summed as whole bytes/s so that the sums stay exact. And an index on
# (status, id) walks one status newest first (the page's filtered list).
_SCHEMA_7 = """
CREATE TABLE store_totals (
    entity  TEXT NOT NULL CHECK (entity IN ('download', 'upload')),
    target  TEXT NOT NULL,
    status  TEXT NOT NULL,
    items   INTEGER NOT NULL DEFAULT 0,
    bytes   INTEGER NOT NULL DEFAULT 0,
    speed   INTEGER NOT NULL DEFAULT 0,
    cleaned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (entity, target, status)
);
DROP INDEX downloads_by_status;
CREATE INDEX downloads_by_status ON downloads(status, id)
"""


@dataclass(frozen=True)
class _Totalled:
    """A table whose rows `store_totals` sums, what one row (`{r}`) adds to its total, and the
    condition (one parameter: a Telegram user) that keeps the rows of one owner's jobs."""

    table: str
    entity: str
    target: str
    bytes: str
    speed: str
    cleaned: str
    owned: str

    @property
    def sums(self) -> tuple[str, str, str]:
        return (self.bytes, self.speed, self.cleaned)

    def values(self, r: str, sign: str = "") -> str:
        """One row's part of the totals, as `_TOTALS_COLUMNS`; `sign` '-' takes it away."""
        return ", ".join(
            (
                f"'{self.entity}'",
                self.target.format(r=r),
                f"{r}.status",
                f"{sign}1",
                *(f"{sign}({term.format(r=r)})" for term in self.sums),
            )
        )

    def recount(self, where: str = "") -> str:
        """The totals counted from every row of the table (what `store_totals` must hold), or
        from the rows `where` keeps."""
        sums = ", ".join(f"COALESCE(SUM({t.format(r='r')}), 0)" for t in self.sums)
        return (
            f"SELECT '{self.entity}', {self.target.format(r='r')}, r.status, COUNT(*), {sums}"
            f" FROM {self.table} AS r{where} GROUP BY 2, 3"
        )


# The uploads of one Telegram user's jobs (the parameter): the owner index, then the uploads'
# (download_id, upload_target) key.
_OWNED_UPLOADS = "download_id IN (SELECT id FROM downloads WHERE owner_id = ?)"
_TOTALLED = (
    _Totalled(
        "downloads",
        "download",
        "''",
        "{r}.total_length",
        "{r}.download_speed",
        "0",
        " WHERE r.owner_id = ?",
    ),
    _Totalled(
        "uploads",
        "upload",
        "{r}.upload_target",
        "{r}.total_size",
        "CAST(ROUND({r}.upload_speed) AS BIGINT)",
        "CASE WHEN {r}.cleaned_at IS NULL THEN 0 ELSE 1 END",
        f" WHERE r.{_OWNED_UPLOADS}",
    ),
)
_TOTALS_COLUMNS = "entity, target, status, items, bytes, speed, cleaned"
_TOTALS_NOW = f"SELECT {_TOTALS_COLUMNS} FROM store_totals"
# One user's totals, counted from the rows of their jobs: the running totals are everyone's.
_OWNER_TOTALS = " UNION ALL ".join(t.recount(t.owned) for t in _TOTALLED)
_TOTALS_ADD = (
    " ON CONFLICT (entity, target, status) DO UPDATE SET"
    " items = store_totals.items + excluded.items, bytes = store_totals.bytes + excluded.bytes,"
    " speed = store_totals.speed + excluded.speed,"
    " cleaned = store_totals.cleaned + excluded.cleaned"
)


def _sqlite_totals_triggers(t: _Totalled) -> list[str]:
    """Row triggers (SQLite has no statement triggers). A row that keeps its status and target
    (a poll cycle's progress: a thousand rows a batch) adds its change in one upsert; a row that
    moves takes itself from one total and adds itself to another."""
    insert = f"INSERT INTO store_totals ({_TOTALS_COLUMNS}) VALUES"

    def differ(term: str) -> str:
        return f"({term.format(r='OLD')}) IS NOT ({term.format(r='NEW')})"

    moved = " OR ".join(differ(term) for term in ("{r}.status", t.target) if term != "''")
    changed = " OR ".join(differ(term) for term in t.sums if term != "0")
    deltas = ", ".join(f"({term.format(r='NEW')}) - ({term.format(r='OLD')})" for term in t.sums)
    same = f"'{t.entity}', {t.target.format(r='NEW')}, NEW.status, 0, {deltas}"
    return [
        f"CREATE TRIGGER {t.table}_totals_insert AFTER INSERT ON {t.table} BEGIN"
        f" {insert} ({t.values('NEW')}){_TOTALS_ADD}; END",
        f"CREATE TRIGGER {t.table}_totals_delete AFTER DELETE ON {t.table} BEGIN"
        f" {insert} ({t.values('OLD', '-')}){_TOTALS_ADD}; END",
        f"CREATE TRIGGER {t.table}_totals_move AFTER UPDATE ON {t.table} WHEN {moved} BEGIN"
        f" {insert} ({t.values('OLD', '-')}){_TOTALS_ADD};"
        f" {insert} ({t.values('NEW')}){_TOTALS_ADD}; END",
        f"CREATE TRIGGER {t.table}_totals_change AFTER UPDATE ON {t.table}"
        f" WHEN NOT ({moved}) AND ({changed}) BEGIN {insert} ({same}){_TOTALS_ADD}; END",
    ]


def _postgres_totals_triggers(t: _Totalled) -> list[str]:
    """Statement triggers over the transition tables: one upsert per statement, whatever the
    number of rows it wrote. The groups are upserted in key order, so that two writers lock
    the same totals in the same order."""
    new_rows = f"SELECT {t.values('n')} FROM new_rows AS n"
    old_rows = f"SELECT {t.values('o', '-')} FROM old_rows AS o"
    parts = {
        "INSERT": ("NEW TABLE AS new_rows", new_rows),
        "DELETE": ("OLD TABLE AS old_rows", old_rows),
        "UPDATE": (
            "OLD TABLE AS old_rows NEW TABLE AS new_rows",
            f"{new_rows} UNION ALL {old_rows}",
        ),
    }
    statements = []
    for operation, (tables, rows) in parts.items():
        name = f"{t.table}_totals_{operation.lower()}"
        statements += [
            f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" INSERT INTO store_totals ({_TOTALS_COLUMNS})"
            f" SELECT entity, target, status, SUM(items), SUM(bytes), SUM(speed), SUM(cleaned)"
            f" FROM ({rows}) AS d ({_TOTALS_COLUMNS}) GROUP BY entity, target, status"
            " HAVING SUM(items) <> 0 OR SUM(bytes) <> 0 OR SUM(speed) <> 0 OR SUM(cleaned) <> 0"
            f" ORDER BY entity, target, status{_TOTALS_ADD}; RETURN NULL; END $$",
            f"CREATE TRIGGER {name} AFTER {operation} ON {t.table} REFERENCING {tables}"
            f" FOR EACH STATEMENT EXECUTE FUNCTION {name}()",
        ]
    return statements


async def _schema_7(sql: _Statements, dialect: Dialect) -> None:
    await _run_schema(sql, dialect, _SCHEMA_7)
    for totalled in _TOTALLED:
        triggers = (
            _sqlite_totals_triggers(totalled)
            if dialect == "sqlite"
            else _postgres_totals_triggers(totalled)
        )
        for statement in triggers:
            await sql.execute(statement)
        await sql.execute(f"INSERT INTO store_totals ({_TOTALS_COLUMNS}) {totalled.recount()}")


# Schema 8 (settings changes): every live setting changed from the page, the API or the bot: who
# (a dashboard session, the API token or a Telegram user), when, and the values (secrets as ***).
_SCHEMA_8 = """
CREATE TABLE settings_changes (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    changed_at TEXT NOT NULL,
    changed_by TEXT NOT NULL,
    key        TEXT NOT NULL,
    old_value  TEXT NOT NULL,
    new_value  TEXT NOT NULL
)
"""


# Schema 9 (archive options): a job may ask for its archive to be extracted, or its folder to be
# zipped, before it is uploaded; the password stays only until the extraction ran, and the
# prepared path is what its uploads send (cleaned up with the job's file).
_SCHEMA_9 = """
CREATE TABLE download_archive_options (
    download_id   INTEGER PRIMARY KEY REFERENCES downloads(id) ON DELETE CASCADE,
    action        TEXT NOT NULL CHECK (action IN ('extract', 'zip')),
    password      TEXT,
    prepared_path TEXT,
    created_at    TEXT NOT NULL
)
"""


# Schema 10 (job destinations): the upload targets a job's owner chose when adding it, a JSON
# list of target names; an empty list keeps the file here only. A job without a row here goes
# to the targets whose `match` takes it. An upload keeps the link its remote made for the file
# (`rclone link`), when the remote can make one.
_SCHEMA_10 = """
CREATE TABLE download_targets (
    download_id  INTEGER PRIMARY KEY REFERENCES downloads(id) ON DELETE CASCADE,
    targets_json TEXT NOT NULL,
    created_at   TEXT NOT NULL
);
ALTER TABLE uploads ADD COLUMN public_link TEXT
"""


# Schema 11 (finding downloads): the flat list filters by source and by upload target, each
# read newest first along an index ending in the download's id (keyset paging).
_SCHEMA_11 = """
CREATE INDEX downloads_by_source ON downloads(source_type, id);
CREATE INDEX uploads_by_target_download ON uploads(upload_target, download_id)
"""


# Schema 12 (per-user sign-in): a session made by a one-time sign-in link carries its Telegram
# user (NULL: signed in with web.token); each link's nonce is kept once used, so it works once.
# Personal API tokens are kept by their SHA-256, with the user they act for.
_SCHEMA_12 = """
CREATE TABLE api_tokens (
    token_hash   TEXT PRIMARY KEY,
    user_id      INTEGER,
    name         TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    last_used_at TEXT,
    revoked_at   TEXT
);
ALTER TABLE web_sessions ADD COLUMN user_id INTEGER;
CREATE TABLE web_sign_in_links (
    nonce       TEXT PRIMARY KEY,
    user_id     INTEGER NOT NULL,
    used_at     TEXT NOT NULL,
    expires_at  TEXT NOT NULL
)
"""


_MIGRATIONS: dict[int, _Step] = {
    1: _script_step(_SCHEMA_1),
    2: _schema_2,
    3: _schema_3,
    4: _script_step(_SCHEMA_4),
    5: _script_step(_SCHEMA_5),
    6: _script_step(_SCHEMA_6),
    7: _schema_7,
    8: _script_step(_SCHEMA_8),
    9: _script_step(_SCHEMA_9),
    10: _script_step(_SCHEMA_10),
    11: _script_step(_SCHEMA_11),
    12: _script_step(_SCHEMA_12),
}

# The tables the steps above make, each with its key, in an order their foreign keys allow
# filling them: a copy of the store into another database goes in this order.
_STORE_TABLES: dict[str, str] = {
    "tg_media": "file_unique_id",
    "tg_storage_messages": "file_unique_id",
    "downloads": "id",
    "download_gids": "id",
    "uploads": "id",
    "status_history": "id",
    "config_settings": "key",
    "nodes": "name",
    "shared_secrets": "name",
    "web_sessions": "token_hash",
    "bot_notices": "id",
    "imported_rows": "origin",
    "settings_changes": "id",
    "download_archive_options": "download_id",
    "download_targets": "download_id",
    "web_sign_in_links": "nonce",
    "api_tokens": "token_hash",
}
# Tables the store keeps from the others' rows (by triggers): never copied, rebuilt by the
# target's own triggers as the rows above go in.
_DERIVED_TABLES = frozenset({"store_totals"})


# --- the two backends --------------------------------------------------------------------------

_POSTGRES_CONNECT_TIMEOUT = 10.0  # seconds, when database.url gives no connect_timeout
_POSTGRES_POOL_SIZE = 8
_POSTGRES_APPLICATION = "mistrelay"  # in the version table: what APPLICATION_ID is to a file
_POSTGRES_SCHEMA_LOCK = APPLICATION_ID  # advisory lock: one process migrates at a time

# What the drivers raise beyond StoreError: a statement refused, a connection lost.
DRIVER_ERRORS: tuple[type[Exception], ...] = (
    sqlite3.Error,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)


# Everything a store call may raise when the database is away or refuses: for loops that must
# go on (and try again later) whatever one call met.
STORE_ERRORS: tuple[type[Exception], ...] = (StoreError, *DRIVER_ERRORS, OSError)


class StoreUnavailable(StoreError):
    """The database server cannot be reached or refused the connection."""


@dataclass(frozen=True)
class PostgresLocation:
    """A PostgreSQL database: the client's URL (with the password, so never shown), the URL as
    shown in messages and logs (password masked), and the connect timeout in seconds."""

    dsn: str = field(repr=False)
    shown: str
    connect_timeout: float = _POSTGRES_CONNECT_TIMEOUT


def _known_version(where: str, version: int) -> int:
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{where}: schema version {version} is newer than this MistRelay "
            f"({SCHEMA_VERSION}); upgrade MistRelay"
        )
    return version


@asynccontextmanager
async def _transaction(
    sql: _StatementsT,
    begin: Callable[[], Awaitable[object]],
    commit: Callable[[], Awaitable[object]],
    roll_back: Callable[[], Awaitable[None]],
) -> AsyncIterator[_StatementsT]:
    """BEGIN, the caller's statements, COMMIT (ROLLBACK on any error). BEGIN and COMMIT run to
    their end even if this task is cancelled meanwhile, so no transaction is left open and a
    commit that happened is known (`sql.committed`) and its events get published."""
    started = asyncio.ensure_future(begin())
    try:
        await asyncio.shield(started)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await started
        await roll_back()
        raise
    try:
        yield sql
    except BaseException:
        await roll_back()
        raise
    done = asyncio.ensure_future(commit())
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await done
        sql.committed = True
        raise
    sql.committed = True


class _Backend(Protocol):
    """Where the store's statements run: connections, transactions, schema version, identity."""

    dialect: Dialect
    where: str  # the file, or the URL with its password masked: for messages and logs

    async def connect(self) -> int:
        """Connect; the schema version found (0: an empty database). StoreError, with nothing
        changed, for a database that is not MistRelay's or is newer than this MistRelay."""
        ...

    async def close(self) -> None: ...
    def transaction(self) -> AbstractAsyncContextManager[_Statements]: ...

    async def run(self, body: Callable[[_Statements], Coroutine[Any, Any, _T]]) -> _T:
        """One transaction around `body`, whose awaits are only its statements: BEGIN, `body`,
        COMMIT (ROLLBACK if it raises), run to the end even if the caller is cancelled."""
        ...

    def reads(self) -> _Statements: ...
    async def schema_version(self) -> int: ...

    async def locked_version(self, sql: _Statements) -> int:
        """The schema version, read in a write transaction that other processes' migrations
        wait for."""
        ...

    async def set_version(self, sql: _Statements, version: int) -> None: ...
    def is_duplicate_source(self, error: Exception) -> bool:
        """Whether `error` is the one-active-job-per-source index refusing a row."""
        ...

    async def tables(self, sql: _Statements) -> set[str]:
        """The tables in the database, the backend's own bookkeeping left out."""
        ...

    async def columns(self, sql: _Statements, table: str) -> tuple[str, ...]: ...

    async def last_id(self, sql: _Statements, table: str) -> int:
        """The highest id the numbering of `table` has handed out (0: none yet). Ids of deleted
        rows count: they are never handed out again."""
        ...

    async def set_last_id(self, sql: _Statements, table: str, last_id: int) -> None:
        """Number the next row of `table` after `last_id`."""
        ...


class _SQLiteBackend:
    """One file in WAL mode: one writer connection, each transaction `BEGIN IMMEDIATE` (another
    process waits on the file lock instead of failing half-way), and one read-only connection."""

    dialect: Dialect = "sqlite"

    def __init__(self, path: Path, busy_timeout_ms: int) -> None:
        self.path = path
        self.where = str(path)
        self._busy_timeout_ms = busy_timeout_ms
        self.writer: aiosqlite.Connection | None = None
        self._reader: _SQLiteStatements | None = None

    async def _connection(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        await conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        await conn.execute("PRAGMA foreign_keys = ON")
        await conn.execute("PRAGMA synchronous = NORMAL")
        # RETURNING collects its rows in a temporary table before the first one is read.
        await conn.execute("PRAGMA temp_store = MEMORY")
        return conn

    async def connect(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = await self._connection()
        # Refuse a foreign file before touching it (switching to WAL would modify it).
        version = await self._check_identity()
        mode = await self._pragma("journal_mode = WAL")
        if str(mode).lower() != "wal":
            raise StoreError(f"{self.path}: could not enable WAL journal mode")
        reader = await self._connection()
        await reader.execute("PRAGMA query_only = ON")
        self._reader = _SQLiteStatements(reader)
        return version

    async def close(self) -> None:
        for conn in (self._reader.conn if self._reader else None, self.writer):
            if conn is not None:
                await conn.close()
        self._reader = self.writer = None

    async def _pragma(self, statement: str) -> object:
        assert self.writer is not None
        row = await (await self.writer.execute(f"PRAGMA {statement}")).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: PRAGMA {statement} gave no answer")
        return row[0]

    async def _check_identity(self) -> int:
        app_id = await self._pragma("application_id")
        version = int(str(await self._pragma("user_version")))
        if app_id != APPLICATION_ID:
            assert self.writer is not None
            tables = await (
                await self.writer.execute("SELECT COUNT(*) FROM sqlite_master")
            ).fetchone()
            if version > 0 or (tables is not None and tables[0] > 0):
                raise StoreError(f"{self.path}: not a MistRelay database")
        return _known_version(self.where, version)

    def transaction(self) -> AbstractAsyncContextManager[_Statements]:
        writer = self.writer
        if writer is None:
            raise StoreError("database is not open")

        async def begin() -> None:
            if writer.in_transaction:
                await writer.execute("ROLLBACK")
            await writer.execute("BEGIN IMMEDIATE")

        async def roll_back() -> None:
            if writer.in_transaction:
                await writer.execute("ROLLBACK")

        return _transaction(
            _SQLiteStatements(writer), begin, lambda: writer.execute("COMMIT"), roll_back
        )

    async def run(self, body: Callable[[_Statements], Coroutine[Any, Any, _T]]) -> _T:
        # The whole transaction in ONE trip to the writer's thread: a thread hop costs about
        # what a small transaction's statements do, so one per statement would triple a job's
        # cost. aiosqlite has no public call for this; `_execute` queues a function on that
        # thread, in order with every other statement of this connection.
        writer = self.writer
        if writer is None:
            raise StoreError("database is not open")
        conn: sqlite3.Connection = writer._conn
        abandoned = threading.Event()  # the caller was cancelled: roll back if not too late

        def whole() -> _T:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.execute("BEGIN IMMEDIATE")  # may wait busy_timeout for another process
            statements = _SQLiteDirectStatements(conn)
            try:
                if abandoned.is_set():
                    raise asyncio.CancelledError
                result = _run_to_end(body(statements))
                if abandoned.is_set():
                    raise asyncio.CancelledError
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            statements.committed = True
            return result

        trip: asyncio.Future[_T] = asyncio.ensure_future(writer._execute(whole))
        try:
            return await asyncio.shield(trip)
        except asyncio.CancelledError:
            abandoned.set()
            # Rolled back, unless COMMIT had begun; `committed` tells the caller which.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await trip
            raise

    def reads(self) -> _Statements:
        if self._reader is None:
            raise StoreError("database is not open")
        return self._reader

    async def schema_version(self) -> int:
        row = await self.reads().fetch_one("PRAGMA user_version")
        return int(row[0]) if row else 0

    async def locked_version(self, sql: _Statements) -> int:
        row = await sql.fetch_one("PRAGMA user_version")  # BEGIN IMMEDIATE holds the others off
        return int(row[0]) if row else 0

    async def set_version(self, sql: _Statements, version: int) -> None:
        await sql.execute(f"PRAGMA user_version = {int(version)}")
        await sql.execute(f"PRAGMA application_id = {APPLICATION_ID}")

    def is_duplicate_source(self, error: Exception) -> bool:
        return isinstance(error, sqlite3.IntegrityError) and "downloads.source_key" in str(error)

    async def tables(self, sql: _Statements) -> set[str]:
        rows = await sql.fetch_all(
            "SELECT name FROM sqlite_master"
            " WHERE type = 'table' AND substr(name, 1, 7) != 'sqlite_'"
        )
        return {str(row[0]) for row in rows}

    async def columns(self, sql: _Statements, table: str) -> tuple[str, ...]:
        rows = await sql.fetch_all("SELECT name FROM pragma_table_info(?) ORDER BY cid", (table,))
        return tuple(str(row[0]) for row in rows)

    async def last_id(self, sql: _Statements, table: str) -> int:
        # AUTOINCREMENT keeps the highest id handed out in sqlite_sequence.
        row = await sql.fetch_one("SELECT seq FROM sqlite_sequence WHERE name = ?", (table,))
        return int(row[0]) if row else 0

    async def set_last_id(self, sql: _Statements, table: str, last_id: int) -> None:
        await sql.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table,))
        await sql.execute("INSERT INTO sqlite_sequence (name, seq) VALUES (?, ?)", (table, last_id))


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The pool's reset between two uses of a connection: nothing. The store changes no session
    state (no SET, LISTEN, cursors or session locks), so asyncpg's default reset query would
    only cost a round trip on every use."""


class _PostgresBackend:
    """A pool of connections: reads take any, each write transaction holds one."""

    dialect: Dialect = "postgresql"

    def __init__(self, location: PostgresLocation) -> None:
        self.location = location
        self.where = location.shown
        self._pool: asyncpg.Pool | None = None
        self._reads: _PostgresStatements | None = None

    async def connect(self) -> int:
        doing = "cannot connect"
        try:
            self._pool = await asyncpg.create_pool(
                self.location.dsn,
                min_size=1,
                max_size=_POSTGRES_POOL_SIZE,
                timeout=self.location.connect_timeout,
                reset=_keep_session,
            )
            self._reads = _PostgresStatements(self._pool)
            doing = "cannot read which database it is"
            return await self._check_identity()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreUnavailable(
                f"database.url {self.where}: {doing}: {self._masked(exc)}"
            ) from None

    def _masked(self, error: BaseException) -> str:
        """The error as one line, the password masked should the driver have quoted it."""
        text = " ".join(str(error).split())
        if not text and isinstance(error, TimeoutError):
            text = f"no answer within {self.location.connect_timeout:g} s"
        text = text or type(error).__name__
        password = urlsplit(self.location.dsn).password
        for secret in {password, unquote(password)} if password else set():
            text = text.replace(secret, "***")
        return text

    async def close(self) -> None:
        pool, self._pool, self._reads = self._pool, None, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 10)
            except TimeoutError:
                pool.terminate()

    async def _all_tables(self, sql: _Statements) -> set[str]:
        rows = await sql.fetch_all(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
        return {str(row["table_name"]) for row in rows}

    async def _check_identity(self) -> int:
        tables = await self._all_tables(self.reads())
        if not tables:
            return 0
        if "mistrelay_schema" in tables:
            marks = await self.reads().fetch_all(
                "SELECT application, version FROM mistrelay_schema"
            )
            if len(marks) == 1 and marks[0]["application"] == _POSTGRES_APPLICATION:
                return _known_version(self.where, int(marks[0]["version"]))
        raise StoreError(f"{self.where}: not a MistRelay database")

    @asynccontextmanager
    async def _pooled_transaction(self, pool: asyncpg.Pool) -> AsyncIterator[_Statements]:
        conn = await pool.acquire()

        async def roll_back() -> None:
            try:
                await conn.execute("ROLLBACK")
            except Exception:  # the connection broke: closing it ends the transaction too
                conn.terminate()

        try:
            async with _transaction(
                _PostgresStatements(conn),
                lambda: conn.execute("BEGIN"),
                lambda: conn.execute("COMMIT"),
                roll_back,
            ) as sql:
                yield sql
        finally:
            await pool.release(conn)

    def transaction(self) -> AbstractAsyncContextManager[_Statements]:
        if self._pool is None:
            raise StoreError("database is not open")
        return self._pooled_transaction(self._pool)

    async def run(self, body: Callable[[_Statements], Coroutine[Any, Any, _T]]) -> _T:
        async with self.transaction() as sql:
            return await body(sql)

    def reads(self) -> _Statements:
        if self._reads is None:
            raise StoreError("database is not open")
        return self._reads

    async def schema_version(self) -> int:
        row = await self.reads().fetch_one("SELECT version FROM mistrelay_schema")
        return int(row["version"]) if row else 0

    async def locked_version(self, sql: _Statements) -> int:
        await sql.execute("SELECT pg_advisory_xact_lock(?)", (_POSTGRES_SCHEMA_LOCK,))
        await sql.execute(
            "CREATE TABLE IF NOT EXISTS mistrelay_schema"
            " (application TEXT NOT NULL, version INTEGER NOT NULL)"
        )
        row = await sql.fetch_one("SELECT version FROM mistrelay_schema")
        return int(row["version"]) if row else 0

    async def set_version(self, sql: _Statements, version: int) -> None:
        await sql.execute("DELETE FROM mistrelay_schema")
        await sql.execute(
            "INSERT INTO mistrelay_schema (application, version) VALUES (?, ?)",
            (_POSTGRES_APPLICATION, version),
        )

    def is_duplicate_source(self, error: Exception) -> bool:
        return (
            isinstance(error, asyncpg.UniqueViolationError)
            and error.constraint_name == "downloads_one_active_per_source"
        )

    async def tables(self, sql: _Statements) -> set[str]:
        return await self._all_tables(sql) - {"mistrelay_schema"}

    async def columns(self, sql: _Statements, table: str) -> tuple[str, ...]:
        rows = await sql.fetch_all(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            (table,),
        )
        return tuple(str(row[0]) for row in rows)

    async def last_id(self, sql: _Statements, table: str) -> int:
        named = await sql.fetch_one("SELECT pg_get_serial_sequence(?, 'id')", (table,))
        if named is None or named[0] is None:
            raise StoreError(f"{self.where}: {table} has no numbered id")
        row = await sql.fetch_one(f"SELECT last_value, is_called FROM {named[0]}")
        return int(row["last_value"]) if row is not None and row["is_called"] else 0

    async def set_last_id(self, sql: _Statements, table: str, last_id: int) -> None:
        await sql.execute(
            "SELECT setval(pg_get_serial_sequence(?, 'id'), ?, ?)",
            (table, max(last_id, 1), last_id > 0),
        )


@dataclass(frozen=True)
class _Total:
    """One row of `store_totals`."""

    entity: str
    target: str
    status: str
    items: int
    bytes: int
    speed: int
    cleaned: int

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.entity, self.target, self.status)

    def describe(self) -> str:
        where = f" to {self.target}" if self.target else ""
        return f"{self.entity}s{where} in {self.status}"

    def sums(self) -> str:
        return f"{self.items} rows, {self.bytes} bytes, {self.speed} B/s" + (
            f", {self.cleaned} cleaned" if self.entity == "upload" else ""
        )


async def _all_totals(sql: _Statements, query: str, params: Sequence[object] = ()) -> list[_Total]:
    return [
        _Total(str(r[0]), str(r[1]), str(r[2]), *(int(r[i]) for i in range(3, 7)))
        for r in await sql.fetch_all(query, params)
    ]


def _download_statistics(totals: Sequence[_Total]) -> DownloadStatistics:
    by_status = {status: 0 for status in DOWNLOAD_STATUSES}
    mine = [t for t in totals if t.entity == "download"]
    for total in mine:
        by_status[total.status] += total.items
    return {
        "total": sum(by_status.values()),
        "by_status": by_status,
        "total_bytes": sum(t.bytes for t in mine),
        "completed_bytes": sum(t.bytes for t in mine if t.status == "completed"),
        "download_speed": sum(t.speed for t in mine),
    }


def _upload_statistics(totals: Sequence[_Total]) -> UploadStatistics:
    by_status = {status: 0 for status in UPLOAD_STATUSES}
    by_target: dict[str, dict[str, int]] = {}
    mine = [t for t in totals if t.entity == "upload"]
    for total in mine:
        by_status[total.status] += total.items
        if total.items:
            by_target.setdefault(total.target, {})[total.status] = total.items
    return {
        "total": sum(by_status.values()),
        "by_status": by_status,
        "by_target": by_target,
        "total_bytes": sum(t.bytes for t in mine),
        "upload_speed": float(sum(t.speed for t in mine)),
        "cleaned": sum(t.cleaned for t in mine),
    }


_DOWNLOAD_COLUMNS = (
    "id, gid, source_type, source_key, source_url, status, file_name, local_path, total_length, "
    "completed_length, download_speed, error_message, error_code, file_unique_id, owner_id, "
    "chat_id, message_id, group_key, progress_message_id, info_hash, files_json, "
    "media_info_json, created_at, started_at, completed_at, updated_at, "
    "torrent_data IS NOT NULL AS has_torrent_data, node"
)
_UPLOAD_COLUMNS = ", ".join(UploadRow._fields)
_SESSION_COLUMNS = ", ".join(WebSession._fields)
_API_TOKEN_COLUMNS = ", ".join(ApiToken._fields)
_SETTINGS_CHANGE_COLUMNS = ", ".join(SettingsChange._fields)
_SESSION_TOUCH = timedelta(minutes=1)  # how often a session's last use is written at most
_SLOT_STATUSES = "('pending', 'waiting', 'downloading')"  # the jobs that take a node's slot
_DOWNLOAD_STAMPS = {"downloading": "started_at", "completed": "completed_at"}
_PROGRESS_CHUNK = 2000  # rows per statement: 4 parameters each, under both backends' limits
_LOOKUP_CHUNK = 500  # ids or keys per IN (…) list
_INSERT_CHUNK = 1000  # new downloads per INSERT: 16 parameters each, under SQLite's limit
_NEW_DOWNLOAD_COLUMNS = (
    "source_type, source_key, source_url, file_name, total_length, file_unique_id, owner_id,"
    " chat_id, message_id, group_key, torrent_data, info_hash, status, gid, created_at, updated_at"
)
_NEW_DOWNLOAD_TYPES = (
    "TEXT", "TEXT", "TEXT", "TEXT", "INTEGER", "TEXT", "INTEGER", "INTEGER", "INTEGER", "TEXT",
    "BLOB", "TEXT", "TEXT", "TEXT", "TEXT", "TEXT",
)  # fmt: skip
_UPLOAD_EXTRA_COLUMNS = frozenset(
    {
        "remote_path",
        "uploaded_size",
        "total_size",
        "upload_speed",
        "failure_reason",
        "error_message",
        "error_code",
        "next_attempt_at",
        "started_at",
    }
)


def _equal_filters(**columns: Any) -> tuple[str, list[Any]]:
    """A WHERE clause matching every column given a value (None = no filter), and its params."""
    given = {name: value for name, value in columns.items() if value is not None}
    clause = " AND ".join(f"{name} = ?" for name in given)
    return (f"WHERE {clause}" if clause else ""), list(given.values())


def _limit(limit: int) -> tuple[str, tuple[int, ...]]:
    """`LIMIT ?` and its parameter; nothing for a negative limit (every row: PostgreSQL knows no
    `LIMIT -1`)."""
    return ("LIMIT ?", (limit,)) if limit >= 0 else ("", ())


def _rows(
    dialect: Dialect, types: Sequence[str], rows: Sequence[Sequence[object]]
) -> tuple[str, list[object]]:
    """Many rows of parameters (of SQLite's column `types`) as a query, and its parameters.

    SQLite: a VALUES list, its first row saying the types. PostgreSQL: each column as an array,
    unnested — binding 4000 parameters cost it 5 ms more per 1000 rows of progress (13 ms
    instead of 8, measured at 10k downloads), a quarter of a poll cycle's budget.
    """
    if dialect == "postgresql":
        arrays = ", ".join(f"CAST(? AS {_POSTGRES_TYPE.get(t, t)}[])" for t in types)
        return f"SELECT * FROM unnest({arrays})", [
            [row[i] for row in rows] for i in range(len(types))
        ]
    typed = "(" + ", ".join(f"CAST(? AS {t})" for t in types) + ")"
    plain = "(" + ", ".join("?" for _ in types) + ")"
    return "VALUES " + ", ".join([typed, *(plain for _ in rows[1:])]), [
        value for row in rows for value in row
    ]


def _polled(dialect: Dialect, chunk: Sequence[ProgressUpdate]) -> tuple[str, list[object]]:
    """A poll cycle's rows (gid, completed, total, speed) as a query, and its parameters."""
    return _rows(
        dialect,
        ("TEXT", "INTEGER", "INTEGER", "INTEGER"),
        [(u.gid, u.completed_length, u.total_length, u.download_speed) for u in chunk],
    )


def _active_by_source(dialect: Dialect) -> str:
    """`downloads`, read through the one-active-job-per-source index (a query that names the
    index's condition, `status IN ('pending', 'waiting', 'downloading', 'paused')`). SQLite's
    planner, without statistics, takes the status index and walks every active row: 13 ms for
    300 sources at 11k active jobs, 0.4 ms through this index. PostgreSQL chooses well."""
    if dialect == "sqlite":
        return "downloads INDEXED BY downloads_one_active_per_source"
    return "downloads"


def _download_from_row(row: _Row) -> DownloadRow:
    # Positional, in _DOWNLOAD_COLUMNS order (the record's field order).
    files_json, media_json = row[20], row[21]
    files = tuple(TorrentFile(**f) for f in json.loads(files_json)) if files_json else ()
    media_info = json.loads(media_json) if media_json else None
    return DownloadRow._make((*row[:20], files, media_info, *row[22:26], bool(row[26]), row[27]))


def _upload_from_row(row: _Row) -> UploadRow:
    return UploadRow._make(row)


RowT = TypeVar("RowT")


@dataclass(frozen=True)
class _Table(Generic[RowT]):
    """One table's name, the columns its record is read from, and the conversion."""

    name: str
    columns: str
    convert: Callable[[_Row], RowT]

    async def convert_all(self, rows: Sequence[_Row]) -> list[RowT]:
        converted: list[RowT] = []
        for first in range(0, len(rows), 200):
            if first:
                await asyncio.sleep(0)  # the poller reads every active row: let others run
            converted.extend(self.convert(r) for r in rows[first : first + 200])
        return converted


_DOWNLOADS = _Table("downloads", _DOWNLOAD_COLUMNS, _download_from_row)
_UPLOADS = _Table("uploads", _UPLOAD_COLUMNS, _upload_from_row)


class Store(Protocol):
    """What the rest of the service asks of the store; :class:`Database` is one."""

    async def open(self) -> Self: ...
    async def close(self) -> None: ...

    # Telegram media
    async def save_tg_media(self, media: TgMediaRecord) -> str: ...
    async def get_tg_media(self, file_unique_id: str) -> TgMediaRecord | None: ...
    async def update_tg_media_file_id(self, file_unique_id: str, file_id: str) -> None: ...
    async def get_tg_storage_message(self, file_unique_id: str, chat_id: int) -> int | None: ...
    async def save_tg_storage_message(
        self, file_unique_id: str, chat_id: int, message_id: int
    ) -> None: ...

    # downloads: written
    async def create_download(
        self, new: NewDownload, media: TgMediaRecord | None = None, *, gid: str | None = None
    ) -> int: ...
    async def create_downloads(
        self,
        jobs: Sequence[tuple[NewDownload, TgMediaRecord | None]],
        *,
        gids: Sequence[str] | None = None,
    ) -> list[int | DuplicateDownload]: ...
    async def mark_download_queued_by_id(
        self, download_id: int, gid: str, status: str = "waiting"
    ) -> None: ...
    async def mark_downloads_queued(self, queued: Sequence[tuple[int, str]]) -> list[int]: ...
    async def follow_gid(self, old_gid: str, new_gid: str) -> int | None: ...
    async def mark_download_started(self, gid: str) -> int | None: ...
    async def mark_download_completed(
        self, gid: str, local_path: str | None, total_length: int
    ) -> int | None: ...
    async def mark_download_failed(
        self, gid: str, error_message: str, error_code: str | None = None
    ) -> int | None: ...
    async def mark_download_paused(self, gid: str) -> int | None: ...
    async def mark_download_resumed(self, gid: str) -> int | None: ...
    async def mark_download_failed_by_id(
        self, download_id: int, error_message: str, error_code: str | None = None
    ) -> None: ...
    async def mark_download_cancelled_by_id(
        self, download_id: int, reason: str = "cancelled"
    ) -> None: ...
    async def apply_download_changes(
        self, changes: Sequence[DownloadChange]
    ) -> list[ChangeOutcome]: ...
    async def reset_download_for_retry(self, download_id: int) -> DownloadRow: ...
    async def update_download_progress(
        self, gid: str, completed_length: int, total_length: int, download_speed: int
    ) -> None: ...
    async def update_progress_batch(self, updates: Iterable[ProgressUpdate]) -> int: ...
    async def update_download_details_by_id(
        self,
        download_id: int,
        *,
        file_name: str | None = None,
        local_path: str | None = None,
        total_length: int | None = None,
        files: Sequence[TorrentFile] | None = None,
        info_hash: str | None = None,
    ) -> None: ...
    async def set_progress_message(self, download_id: int, message_id: int | None) -> None: ...
    async def set_media_info(self, download_id: int, media_info: Mapping[str, object]) -> None: ...
    async def set_archive_option(
        self, download_id: int, action: str, password: str | None
    ) -> None: ...
    async def get_archive_option(self, download_id: int) -> ArchiveOption | None: ...
    async def record_archive_prepared(self, download_id: int, prepared_path: str) -> None: ...
    async def set_download_targets(self, download_id: int, targets: Sequence[str]) -> None: ...
    async def get_download_targets(self, download_id: int) -> list[str] | None: ...
    async def get_targets_for_downloads(
        self, download_ids: Sequence[int]
    ) -> dict[int, list[str]]: ...
    async def delete_download_record(self, download_id: int) -> DownloadRow: ...
    async def delete_all_downloads(self) -> list[DownloadRow]: ...

    # downloads: read
    async def get_torrent_data(self, download_id: int) -> bytes | None: ...
    async def get_download_id_by_gid(self, gid: str) -> int | None: ...
    async def get_download_by_id(self, download_id: int) -> DownloadRow | None: ...
    async def get_download_by_gid(self, gid: str) -> DownloadRow | None: ...
    async def get_gids(self, download_id: int) -> list[str]: ...
    async def fetch_recent_downloads(
        self, limit: int = 50, *, status: str | None = None, owner_id: int | None = None
    ) -> list[DownloadRow]: ...
    async def fetch_downloads_in_states(
        self, statuses: Sequence[str], *, node: str | None = None
    ) -> list[DownloadRow]: ...
    async def fetch_downloads_grouped(
        self, limit: int = 50, *, status: str | None = None, before: int | None = None
    ) -> list[DownloadGroup]: ...
    async def search_downloads(self, limit: int, search: DownloadSearch) -> list[DownloadRow]: ...
    async def get_download_statistics(self, owner_id: int | None = None) -> DownloadStatistics: ...

    # uploads: written
    async def create_upload(
        self,
        download_id: int,
        upload_target: str,
        remote_path: str | None,
        max_retries: int,
        *,
        target_type: str = "rclone",
        ready: bool = False,
    ) -> int: ...
    async def update_upload_status(
        self, upload_id: int, status: str, **columns: object
    ) -> None: ...
    async def release_waiting_uploads(self, download_id: int) -> list[int]: ...
    async def mark_upload_started(self, upload_id: int, total_size: int) -> None: ...
    async def update_upload_progress(
        self, upload_id: int, uploaded_size: int, total_size: int, upload_speed: float
    ) -> None: ...
    async def record_upload_verified(
        self, upload_id: int, verified_size: int, verified_hash: str | None
    ) -> None: ...
    async def mark_upload_completed(
        self, upload_id: int, remote_path: str | None = None, public_link: str | None = None
    ) -> None: ...
    async def mark_upload_failed(
        self,
        upload_id: int,
        failure_reason: str,
        error_message: str,
        error_code: str | None = None,
    ) -> None: ...
    async def schedule_upload_retry(
        self,
        upload_id: int,
        failure_reason: str,
        error_message: str,
        error_code: str | None,
        next_attempt_at: str,
    ) -> int: ...
    async def mark_upload_cancelled(self, upload_id: int, reason: str = "cancelled") -> None: ...
    async def reset_upload_for_retry(self, upload_id: int) -> None: ...
    async def increment_upload_retry(self, upload_id: int) -> int: ...
    async def mark_upload_cleaned(self, upload_id: int) -> None: ...
    async def mark_download_cleaned_by_id(self, download_id: int) -> list[int]: ...
    async def check_and_update_download_status_if_file_exists(
        self, upload_id: int, file_path: str | Path, *, exists: bool
    ) -> bool: ...

    # uploads: read
    async def get_upload_by_id(self, upload_id: int) -> UploadRow | None: ...
    async def get_uploads_by_download(self, download_id: int) -> list[UploadRow]: ...
    async def get_uploads_for_downloads(
        self, download_ids: Sequence[int]
    ) -> dict[int, list[UploadRow]]: ...
    async def fetch_recent_uploads(
        self,
        limit: int = 50,
        status: str | None = None,
        upload_target: str | None = None,
        owner_id: int | None = None,
    ) -> list[UploadRow]: ...
    async def fetch_uploads_in_states(
        self, statuses: Sequence[str], *, node: str | None = None
    ) -> list[UploadRow]: ...
    async def get_pending_uploads(self, upload_target: str | None = None) -> list[UploadRow]: ...
    async def get_upload_statistics(self, owner_id: int | None = None) -> UploadStatistics: ...

    # statistics, history, configuration
    async def get_statistics(self, owner_id: int | None = None) -> Statistics: ...
    async def recount_totals(self, *, repair: bool) -> list[str]: ...
    async def get_status_history(self, entity: str, entity_id: int) -> list[HistoryEntry]: ...

    # imports from another store
    async def imported_origins(self) -> dict[str, int]: ...
    async def import_rows(self, batch: ImportBatch) -> ImportResult: ...
    async def init_config_from_yaml(self, settings: Mapping[str, str]) -> None: ...
    async def get_config(self, key: str) -> str | None: ...
    async def get_all_configs(self) -> dict[str, str]: ...
    async def record_settings_changes(
        self, changed_by: str, changes: Sequence[tuple[str, str, str]]
    ) -> list[SettingsChange]: ...
    async def list_settings_changes(self, limit: int = 100) -> list[SettingsChange]: ...

    # the cluster (PostgreSQL; with SQLite there is one node and no `nodes` row)
    @property
    def shared(self) -> bool: ...
    async def follow_peers(self) -> None: ...
    async def shared_secret(self, name: str, make: Callable[[], str]) -> str: ...
    async def register_node(self, beat: NodeHeartbeat, *, timeout: float) -> NodeRow | None: ...
    async def heartbeat_node(self, beat: NodeHeartbeat) -> bool: ...
    async def stop_node(self, name: str, instance: str) -> None: ...
    async def list_nodes(self) -> list[NodeRow]: ...
    async def count_node_jobs(self, node: str) -> int: ...
    async def claim_downloads(
        self, node: str, limit: int, ids: Sequence[int] | None = None
    ) -> list[int]: ...
    async def requeue_downloads_of_node(self, node: str, reason: str) -> list[int]: ...
    async def fail_uploads_of_node(self, node: str, reason: str) -> list[int]: ...
    async def try_lead(self) -> bool: ...
    async def still_leading(self) -> bool: ...
    async def resign(self) -> None: ...

    # dashboard sessions and the bot's outbox
    async def create_web_session(
        self,
        token_hash: str,
        expires_at: str,
        address: str | None,
        user_agent: str | None,
        user_id: int | None = None,
    ) -> WebSession: ...
    async def use_sign_in_link(self, nonce: str, user_id: int, expires_at: str) -> bool: ...
    async def create_api_token(
        self, token_hash: str, user_id: int | None, name: str
    ) -> ApiToken: ...
    async def use_api_token(self, token_hash: str) -> ApiToken | None: ...
    async def list_api_tokens(self, user_id: int | None) -> list[ApiToken]: ...
    async def revoke_api_token(self, id_prefix: str, user_id: int | None) -> bool: ...
    async def use_web_session(self, token_hash: str) -> WebSession | None: ...
    async def revoke_web_session(self, token_hash: str) -> bool: ...
    async def revoke_all_web_sessions(self) -> int: ...
    async def list_web_sessions(self) -> list[WebSession]: ...
    async def fetch_undelivered_notices(self, limit: int = 100) -> list[BotNotice]: ...
    async def mark_notice_delivered(self, notice_id: int) -> bool: ...


class Database:
    """The MistRelay store, on SQLite (a file path) or PostgreSQL (a :class:`PostgresLocation`).
    Open with :meth:`open`, close with :meth:`close`.

    Writes are one at a time in this process (one lock), so events are published in the order
    their transactions committed; with PostgreSQL, other processes may write too, and every
    status change is a compare-and-set on the status just read (see ``_Tx.transition``).
    """

    def __init__(
        self,
        location: Path | PostgresLocation,
        *,
        hub: EventHub | None = None,
        busy_timeout_ms: int = 15000,
        on_write: Callable[[float], None] | None = None,
    ) -> None:
        self.hub = hub
        self._on_write = on_write
        self._backend: _Backend = (
            _PostgresBackend(location)
            if isinstance(location, PostgresLocation)
            else _SQLiteBackend(Path(location), busy_timeout_ms)
        )
        self._write_lock = asyncio.Lock()
        # Other processes on the same PostgreSQL: their commits reach our hub, and the leader's
        # lock. None with SQLite (one process).
        self._peers = (
            _Peers(location, self._republish) if isinstance(location, PostgresLocation) else None
        )

    # --- lifecycle ------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        """The SQLite file; StoreError with PostgreSQL."""
        if not isinstance(self._backend, _SQLiteBackend):
            raise StoreError(f"{self._backend.where} is a PostgreSQL database, not a file")
        return self._backend.path

    async def open(self) -> Database:
        return await self._open(SCHEMA_VERSION)

    async def _open(self, target: int) -> Database:
        """Connect, then migrate to schema `target` (tests build older schemas with it)."""
        found = await self._connect()
        try:
            await self._migrate(found, target)
        except BaseException:
            await self.close()
            raise
        return self

    async def _connect(self) -> int:
        """Connect without migrating; the schema version found (0: an empty database)."""
        try:
            return await self._backend.connect()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._peers is not None:
            await self._peers.close()
        await self._backend.close()

    async def follow_peers(self) -> None:
        """Publish the commits of other processes on this store on our hub too (PostgreSQL:
        LISTEN/NOTIFY on a connection of its own, reconnected with backoff)."""
        if self._peers is not None:
            self._peers.follow()

    async def __aenter__(self) -> Database:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _migrate(self, found: int, target: int) -> None:
        for number in range(found + 1, target + 1):
            async with self._write() as tx:
                if await self._backend.locked_version(tx.sql) >= number:
                    continue  # another process migrated meanwhile
                await self._step(tx.sql, number)
            logger.info("database {} migrated to schema version {}", self._backend.where, number)

    async def _step(self, sql: _Statements, number: int) -> None:
        """Schema step `number` and the version it leaves, in the caller's transaction."""
        await _MIGRATIONS[number](sql, self._backend.dialect)
        await self._backend.set_version(sql, number)

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[_Tx]:
        """One write transaction; its events are published once it has committed, here and
        (PostgreSQL) to every other process on the store, in one notification per batch."""
        async with self._write_lock:
            tx: _Tx | None = None
            began = time.perf_counter()
            try:
                async with self._backend.transaction() as sql:
                    tx = _Tx(sql, self._backend.dialect)
                    yield tx
                    if self._peers is not None:
                        await self._peers.announce(sql, tx.events)
            finally:
                self._after_commit(tx, began)

    async def _write_all(self, body: Callable[[_Tx], Coroutine[Any, Any, _T]]) -> _T:
        """One write transaction whose body awaits nothing but its statements, published like
        :meth:`_write`'s; on SQLite all of it runs in one trip to the writer's thread."""
        async with self._write_lock:
            began = time.perf_counter()
            opened: list[_Tx] = []

            async def whole(sql: _Statements) -> _T:
                tx = _Tx(sql, self._backend.dialect)
                opened.append(tx)
                result = await body(tx)
                if self._peers is not None:
                    await self._peers.announce(sql, tx.events)
                return result

            try:
                return await self._backend.run(whole)
            finally:
                self._after_commit(opened[0] if opened else None, began)

    def _after_commit(self, tx: _Tx | None, began: float) -> None:
        """A write transaction's end: if it committed, its time told and its events published."""
        if tx is not None and tx.sql.committed:
            if self._on_write is not None:
                self._on_write(time.perf_counter() - began)
            tx.publish(self.hub)

    async def _republish(self, notice: _Notice) -> None:
        """Publish what another process committed: the rows as they are now."""
        tx = _Tx(self._backend.reads(), self._backend.dialect)
        if notice.downloads:
            marks = ", ".join("?" for _ in notice.downloads)
            rows = await tx.fetch_all(
                f"SELECT {_DOWNLOAD_COLUMNS} FROM downloads WHERE id IN ({marks}) ORDER BY id",
                notice.downloads,
            )
            await tx._snapshots([_download_from_row(row) for row in rows])
        if notice.since is not None:
            rows = await tx.fetch_all(
                f"SELECT {_DOWNLOAD_COLUMNS} FROM downloads WHERE updated_at >= ? ORDER BY id",
                (notice.since,),
            )
            await tx._snapshots([_download_from_row(row) for row in rows])
        for download_id in notice.removed:
            tx.emit_removed(download_id)
        for upload_id in notice.uploads:
            await tx.emit_upload(upload_id)
        for upload_id in notice.cleanups:
            await tx.emit_upload(upload_id, cleanup=True)
        tx.publish(self.hub)

    async def _read_all(self, sql: str, params: Sequence[object] = ()) -> Sequence[_Row]:
        return await self._backend.reads().fetch_all(sql, params)

    async def _read_one(self, sql: str, params: Sequence[object] = ()) -> _Row | None:
        return await self._backend.reads().fetch_one(sql, params)

    async def schema_version(self) -> int:
        return await self._backend.schema_version()

    # --- tg_media (seed 001 §2.1) ---------------------------------------------------------------

    async def save_tg_media(self, media: TgMediaRecord) -> str:
        async with self._write() as tx:
            await tx.upsert_media([media])
        return media.file_unique_id

    async def get_tg_media(self, file_unique_id: str) -> TgMediaRecord | None:
        row = await self._read_one(
            "SELECT * FROM tg_media WHERE file_unique_id = ?", (file_unique_id,)
        )
        if row is None:
            return None
        data = {k: row[k] for k in row.keys() if k not in ("created_at", "updated_at")}  # noqa: SIM118
        return TgMediaRecord(**data)

    async def update_tg_media_file_id(self, file_unique_id: str, file_id: str) -> None:
        """Store a fresh file_id (its file reference was refreshed by re-reading the message)."""
        async with self._write() as tx:
            await tx.execute(
                "UPDATE tg_media SET file_id = ?, updated_at = ? WHERE file_unique_id = ?",
                (file_id, utc_now(), file_unique_id),
            )

    async def get_tg_storage_message(self, file_unique_id: str, chat_id: int) -> int | None:
        """The id of the file's copy in the storage channel `chat_id`, if forwarded there."""
        row = await self._read_one(
            "SELECT message_id FROM tg_storage_messages WHERE file_unique_id = ? AND chat_id = ?",
            (file_unique_id, chat_id),
        )
        return int(row["message_id"]) if row is not None else None

    async def save_tg_storage_message(
        self, file_unique_id: str, chat_id: int, message_id: int
    ) -> None:
        """Record the file's copy in a storage channel (replacing one in another channel)."""
        async with self._write() as tx:
            await tx.execute(
                "INSERT INTO tg_storage_messages (file_unique_id, chat_id, message_id, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (file_unique_id) DO UPDATE SET"
                " chat_id = excluded.chat_id, message_id = excluded.message_id,"
                " created_at = excluded.created_at",
                (file_unique_id, chat_id, message_id, utc_now()),
            )

    # --- downloads (seed 001 §2.2) --------------------------------------------------------------

    async def create_download(
        self, new: NewDownload, media: TgMediaRecord | None = None, *, gid: str | None = None
    ) -> int:
        """Record a job before aria2 sees it: `pending` with no gid, or queued under `gid`
        (see :meth:`create_downloads`).

        Telegram media gets its `tg_media` row in the same transaction. A source that is already
        pending, waiting, downloading or paused raises :class:`DuplicateDownload`.
        """
        [created] = await self.create_downloads([(new, media)], gids=None if gid is None else [gid])
        if isinstance(created, DuplicateDownload):
            raise created
        return created

    async def create_downloads(
        self,
        jobs: Sequence[tuple[NewDownload, TgMediaRecord | None]],
        *,
        gids: Sequence[str] | None = None,
    ) -> list[int | DuplicateDownload]:
        """Record many jobs (with their Telegram media rows) in ONE transaction, published as
        one batch of events; for each job, in order, its id, or the DuplicateDownload it is (a
        source already pending, waiting, downloading or paused, or earlier in `jobs`).

        With `gids` (one per job, chosen before aria2 is told, which takes a job under a gid
        given to it), each new job is also queued under its gid in the same transaction, as
        :meth:`mark_downloads_queued` would: one commit from row to queued.

        All or nothing: any other error (an unknown source type, a refused statement) leaves
        no row of any job.
        """
        unknown = [new.source_type for new, _ in jobs if new.source_type not in SOURCE_TYPES]
        if unknown:
            raise StoreError(f"unknown source type {unknown[0]!r}")
        if gids is not None and len(gids) != len(jobs):
            raise ValueError(f"{len(gids)} gids for {len(jobs)} jobs")
        now = utc_now()

        async def insert(tx: _Tx) -> tuple[dict[str, DownloadRow], dict[str, int]]:
            active = await tx.active_sources([new.source_key for new, _ in jobs])
            fresh: dict[str, tuple[NewDownload, TgMediaRecord | None]] = {}
            for new, media in jobs:
                if new.source_key not in active:
                    fresh.setdefault(new.source_key, (new, media))
            # A duplicate leaves its media row as it was: only the new jobs' rows are written.
            await tx.upsert_media([media for _, media in fresh.values() if media is not None])
            chosen: dict[str, str] = {}
            for (new, _), gid in zip(jobs, gids or (), strict=False):
                chosen.setdefault(new.source_key, gid)
            created = await tx.insert_downloads([new for new, _ in fresh.values()], now, chosen)
            missing = [key for key in fresh if key not in created]  # another process's, meanwhile
            active.update(await tx.active_sources(missing) if missing else {})
            refused = [key for key in missing if key not in active]
            if refused:  # not a duplicate: the gid chosen for it is taken
                raise StoreError(f"{len(refused)} new job(s) refused: the gid chosen is taken")
            ids = [row.id for row in created.values()]
            await tx.history_many("download", ids, None, "pending", "created", now)
            if gids is not None:  # recorded queued: as mark_downloads_queued would have
                await tx.executemany(
                    "INSERT INTO download_gids (gid, download_id, reason, created_at)"
                    " VALUES (?, ?, 'added', ?)",
                    [(row.gid, row.id, now) for row in created.values()],
                )
                await tx.history_many("download", ids, "pending", "waiting", "queued in aria2", now)
            tx.emit_new(list(created.values()))
            return created, active

        created, active = await self._write_all(insert)
        answers: list[int | DuplicateDownload] = []
        given: set[int] = set()
        for new, _ in jobs:
            row = created.get(new.source_key)
            if row is not None and row.id not in given:
                given.add(row.id)
                answers.append(row.id)
            else:
                existing = row.id if row is not None else active[new.source_key]
                answers.append(DuplicateDownload(existing, new.source_key))
        return answers

    async def _raise_if_duplicate(self, source_key: str, exc: Exception) -> None:
        """DuplicateDownload if `exc` is the one-active-job-per-source index's refusal."""
        if not self._backend.is_duplicate_source(exc):
            return
        existing = await self._read_one(
            f"SELECT id FROM {_active_by_source(self._backend.dialect)} WHERE source_key = ?"
            " AND status IN ('pending', 'waiting', 'downloading', 'paused')",
            (source_key,),
        )
        raise DuplicateDownload(int(existing["id"]) if existing else 0, source_key) from exc

    async def mark_download_queued_by_id(
        self, download_id: int, gid: str, status: str = "waiting"
    ) -> None:
        """aria2 accepted the job: remember its gid (and every earlier one) and leave `pending`."""

        async def queue(tx: _Tx) -> None:
            current = await tx.claim_gid(download_id, gid, "added")
            # The gid and the status in one UPDATE; the gid alone if the status stays.
            if not await tx.move(
                "download", download_id, current, status, "queued in aria2", {"gid": gid}
            ):
                await tx.update_columns("downloads", download_id, {"gid": gid})
            await tx.emit_download(download_id)

        await self._write_all(queue)

    async def mark_downloads_queued(self, queued: Sequence[tuple[int, str]]) -> list[int]:
        """aria2 accepted these jobs (id, gid), handed to it together: each one's gid
        remembered and `waiting`, in ONE transaction and one batch of events. A job that left
        `pending` meanwhile (cancelled) keeps its gid and its status; the ids queued."""

        async def queue(tx: _Tx) -> list[DownloadRow]:
            moved = await tx.queue(queued)
            # The moved rows as the UPDATE returned them; only the others are read again.
            done = {row.id for row in moved}
            others = await tx.downloads_by_id([i for i, _ in queued if i not in done])
            await tx.emit_rows(sorted([*moved, *others], key=lambda row: row.id))
            return moved

        return [row.id for row in await self._write_all(queue)]

    async def follow_gid(self, old_gid: str, new_gid: str) -> int | None:
        """aria2 replaced `old_gid` by `new_gid` (a magnet's metadata gid is followed by its real
        download)."""
        async with self._write() as tx:
            download_id = await tx.download_id_by_gid(old_gid)
            if download_id is None:
                return None
            await tx.set_gid(download_id, new_gid, f"followed {old_gid}")
            await tx.emit_download(download_id)
        return download_id

    async def mark_download_started(self, gid: str) -> int | None:
        return await self._download_transition_by_gid(gid, "downloading", "aria2 started")

    async def mark_download_completed(
        self, gid: str, local_path: str | None, total_length: int
    ) -> int | None:
        return await self._download_transition_by_gid(
            gid,
            "completed",
            "aria2 completed",
            local_path=local_path,
            total_length=total_length,
            completed_length=total_length,
            download_speed=0,
        )

    async def mark_download_failed(
        self, gid: str, error_message: str, error_code: str | None = None
    ) -> int | None:
        return await self._download_transition_by_gid(
            gid,
            "failed",
            error_message,
            error_message=error_message,
            error_code=error_code,
            download_speed=0,
        )

    async def mark_download_paused(self, gid: str) -> int | None:
        return await self._download_transition_by_gid(gid, "paused", "paused", download_speed=0)

    async def mark_download_resumed(self, gid: str) -> int | None:
        return await self._download_transition_by_gid(gid, "waiting", "resumed")

    async def mark_download_failed_by_id(
        self, download_id: int, error_message: str, error_code: str | None = None
    ) -> None:
        """Fail a job by id (e.g. aria2 refused it before it got a gid)."""
        async with self._write() as tx:
            await tx.transition(
                "download",
                download_id,
                "failed",
                error_message,
                error_message=error_message,
                error_code=error_code,
                download_speed=0,
            )
            await tx.emit_download(download_id)

    async def mark_download_cancelled_by_id(
        self, download_id: int, reason: str = "cancelled"
    ) -> None:
        async with self._write() as tx:
            await tx.transition("download", download_id, "cancelled", reason, download_speed=0)
            await tx.emit_download(download_id)

    async def apply_download_changes(
        self, changes: Sequence[DownloadChange]
    ) -> list[ChangeOutcome]:
        """Apply conditional repairs in ONE transaction, one outcome per change, in order.

        A change whose row no longer has the status and gid it expects (or already records one
        of `skip_if_error_code_in`) is left alone and said so; statuses move through the machine,
        by way of `downloading` where the machine needs it (see `_download_steps`).
        """
        if not changes:
            return []
        async with self._write() as tx:
            return [await tx.apply_download_change(change) for change in changes]

    async def reset_download_for_retry(self, download_id: int) -> DownloadRow:
        """failed/cancelled → pending: progress and error cleared, free for any node to claim;
        the old gids stay known."""
        try:
            async with self._write() as tx:
                await tx.transition(
                    "download",
                    download_id,
                    "pending",
                    "retry",
                    gid=None,
                    node=None,
                    completed_length=0,
                    download_speed=0,
                    error_message=None,
                    error_code=None,
                    started_at=None,
                    completed_at=None,
                )
                await tx.emit_download(download_id)
        except Exception as exc:
            failed = await self.get_download_by_id(download_id)
            await self._raise_if_duplicate(failed.source_key if failed else "", exc)
            raise
        row = await self.get_download_by_id(download_id)
        assert row is not None
        return row

    async def _download_transition_by_gid(
        self, gid: str, target: str, reason: str, **columns: Any
    ) -> int | None:
        async with self._write() as tx:
            download_id = await tx.download_id_by_gid(gid)
            if download_id is None:
                return None
            await tx.transition("download", download_id, target, reason, **columns)
            await tx.emit_download(download_id)
        return download_id

    async def update_download_progress(
        self, gid: str, completed_length: int, total_length: int, download_speed: int
    ) -> None:
        await self.update_progress_batch(
            [ProgressUpdate(gid, completed_length, total_length, download_speed)]
        )

    async def update_progress_batch(self, updates: Iterable[ProgressUpdate]) -> int:
        """Write one poll cycle's progress in one transaction; returns the rows changed."""
        batch = list(updates)
        if not batch:
            return 0
        now = utc_now()
        return await self._write_all(lambda tx: tx.progress(batch, now))

    async def update_download_details_by_id(
        self,
        download_id: int,
        *,
        file_name: str | None = None,
        local_path: str | None = None,
        total_length: int | None = None,
        files: Sequence[TorrentFile] | None = None,
        info_hash: str | None = None,
    ) -> None:
        """Names, paths and torrent file lists learnt from aria2 (no status change)."""
        columns: dict[str, Any] = {}
        if file_name is not None:
            columns["file_name"] = file_name
        if local_path is not None:
            columns["local_path"] = local_path
        if total_length is not None:
            columns["total_length"] = total_length
        if files is not None:
            columns["files_json"] = json.dumps([asdict(f) for f in files])
        if info_hash is not None:
            columns["info_hash"] = info_hash
        if not columns:
            return
        async with self._write() as tx:
            await tx.update_columns("downloads", download_id, columns)
            await tx.emit_download(download_id)

    async def set_progress_message(self, download_id: int, message_id: int | None) -> None:
        async with self._write() as tx:
            await tx.update_columns("downloads", download_id, {"progress_message_id": message_id})
            await tx.emit_download(download_id)

    async def set_media_info(self, download_id: int, media_info: Mapping[str, object]) -> None:
        async with self._write() as tx:
            await tx.update_columns(
                "downloads", download_id, {"media_info_json": json.dumps(media_info)}
            )
            await tx.emit_download(download_id)

    async def set_archive_option(self, download_id: int, action: str, password: str | None) -> None:
        """Ask for the job's archive to be extracted (`password` optional) or its folder zipped."""
        if action not in ARCHIVE_ACTIONS:
            raise StoreError(f"unknown archive action {action!r}")
        async with self._write() as tx:
            await tx.execute(
                "INSERT INTO download_archive_options (download_id, action, password, created_at)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (download_id) DO UPDATE SET"
                " action = excluded.action, password = excluded.password, prepared_path = NULL",
                (download_id, action, password, utc_now()),
            )

    async def get_archive_option(self, download_id: int) -> ArchiveOption | None:
        row = await self._read_one(
            "SELECT download_id, action, password, prepared_path FROM download_archive_options"
            " WHERE download_id = ?",
            (download_id,),
        )
        return ArchiveOption(*row) if row else None

    async def record_archive_prepared(self, download_id: int, prepared_path: str) -> None:
        """The extraction or zip is done: its path is kept, the password is forgotten."""
        async with self._write() as tx:
            await tx.execute(
                "UPDATE download_archive_options SET prepared_path = ?, password = NULL"
                " WHERE download_id = ?",
                (prepared_path, download_id),
            )

    async def set_download_targets(self, download_id: int, targets: Sequence[str]) -> None:
        """The upload targets chosen for the job (names; empty = keep it here only)."""
        async with self._write() as tx:
            await tx.execute(
                "INSERT INTO download_targets (download_id, targets_json, created_at)"
                " VALUES (?, ?, ?) ON CONFLICT (download_id) DO UPDATE SET"
                " targets_json = excluded.targets_json",
                (download_id, json.dumps(list(targets)), utc_now()),
            )

    async def get_download_targets(self, download_id: int) -> list[str] | None:
        """The job's chosen targets, or None when it has no choice (its `match` rules decide)."""
        row = await self._read_one(
            "SELECT targets_json FROM download_targets WHERE download_id = ?", (download_id,)
        )
        return [str(name) for name in json.loads(row["targets_json"])] if row else None

    async def get_targets_for_downloads(self, download_ids: Sequence[int]) -> dict[int, list[str]]:
        """The chosen targets of those of these jobs that have a choice."""
        if not download_ids:
            return {}
        marks = ", ".join("?" for _ in download_ids)
        rows = await self._read_all(
            "SELECT download_id, targets_json FROM download_targets"
            f" WHERE download_id IN ({marks})",
            tuple(download_ids),
        )
        return {
            int(row["download_id"]): [str(name) for name in json.loads(row["targets_json"])]
            for row in rows
        }

    async def get_torrent_data(self, download_id: int) -> bytes | None:
        row = await self._read_one(
            "SELECT torrent_data FROM downloads WHERE id = ?", (download_id,)
        )
        return bytes(row["torrent_data"]) if row and row["torrent_data"] is not None else None

    async def get_download_id_by_gid(self, gid: str) -> int | None:
        row = await self._read_one("SELECT download_id FROM download_gids WHERE gid = ?", (gid,))
        return int(row["download_id"]) if row else None

    async def get_download_by_id(self, download_id: int) -> DownloadRow | None:
        row = await self._read_one(
            f"SELECT {_DOWNLOAD_COLUMNS} FROM downloads WHERE id = ?", (download_id,)
        )
        return _download_from_row(row) if row else None

    async def get_download_by_gid(self, gid: str) -> DownloadRow | None:
        download_id = await self.get_download_id_by_gid(gid)
        return await self.get_download_by_id(download_id) if download_id is not None else None

    async def get_gids(self, download_id: int) -> list[str]:
        rows = await self._read_all(
            "SELECT gid FROM download_gids WHERE download_id = ? ORDER BY id", (download_id,)
        )
        return [r["gid"] for r in rows]

    async def fetch_recent_downloads(
        self,
        limit: int = 50,
        *,
        status: str | None = None,
        owner_id: int | None = None,
    ) -> list[DownloadRow]:
        return await self._fetch_recent(_DOWNLOADS, limit, {"status": status, "owner_id": owner_id})

    async def fetch_downloads_in_states(
        self, statuses: Sequence[str], *, node: str | None = None
    ) -> list[DownloadRow]:
        """The downloads in `statuses`; with `node`, only those that node holds."""
        return await self._fetch_in_states(_DOWNLOADS, statuses, "node = ?", node)

    async def fetch_downloads_grouped(
        self, limit: int = 50, *, status: str | None = None, before: int | None = None
    ) -> list[DownloadGroup]:
        """The `limit` most recent groups (a negative limit: all), newest first.

        A Telegram album or message is one group; every other job is a group of its own. A
        group's place is its newest download (in `status`). With `before`, the groups whose
        newest download is older than that id: the next page after a page whose last group's
        newest download was `before` (keyset pagination: rows that arrive meanwhile, with
        higher ids, neither shift nor repeat the pages after the first).
        """
        filters: list[str] = []
        params: list[object] = []
        if limit >= 0 or before is not None:
            keys = await self._newest_group_keys(limit, status, before)
            if not keys:
                return []
            filters.append(f"group_key IN ({', '.join('?' for _ in keys)})")
            params += keys
        if status:
            filters.append("status = ?")
            params.append(status)
        where = f"WHERE {' AND '.join(filters)}" if filters else ""
        rows = await self._read_all(
            f"SELECT {_DOWNLOAD_COLUMNS} FROM downloads {where} ORDER BY id", params
        )
        groups: dict[str, DownloadGroup] = {}
        media_groups = await self._media_group_ids([r["file_unique_id"] for r in rows])
        for row in rows:
            download = _download_from_row(row)
            group = groups.get(download.group_key)
            if group is None:
                group = groups[download.group_key] = DownloadGroup(
                    group_key=download.group_key,
                    source_type=download.source_type,
                    media_group_id=media_groups.get(download.file_unique_id or ""),
                )
            group.downloads.append(download)
        return sorted(groups.values(), key=lambda g: max(d.id for d in g.downloads), reverse=True)

    async def search_downloads(self, limit: int, search: DownloadSearch) -> list[DownloadRow]:
        """The newest `limit` downloads matching every filter `search` gives, below its `before`
        id (keyset paging: rows that arrive meanwhile have higher ids and never shift a later
        page). `name` matches file names containing it, whatever the letter case."""
        where = ["id < ?"]
        params: list[object] = [search.before if search.before is not None else 2**63 - 1]
        if search.name:
            escaped = search.name.translate({92: "\\\\", 37: "\\%", 95: "\\_"})
            where.append("LOWER(file_name) LIKE LOWER(?) ESCAPE '\\'")
            params.append(f"%{escaped}%")
        filters = (
            ("status", search.status),
            ("source_type", search.source),
            ("owner_id", search.owner_id),
        )
        for column, value in filters:
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if search.target is not None:
            where.append("id IN (SELECT download_id FROM uploads WHERE upload_target = ?)")
            params.append(search.target)
        rows = await self._read_all(
            f"SELECT {_DOWNLOAD_COLUMNS} FROM downloads WHERE {' AND '.join(where)}"
            " ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return await _DOWNLOADS.convert_all(rows)

    async def _newest_group_keys(
        self, limit: int, status: str | None, before: int | None
    ) -> list[str]:
        """The keys of the `limit` groups (a negative limit: all) with the newest downloads (in
        `status`) below the id `before`, newest first.

        Downloads are read from the newest down, a batch at a time along the primary key (or
        downloads_by_status), until that many groups are seen: a few reads, whatever the size of
        the table. Below `before`, a group is new only if none of its downloads is at or above
        `before` (those were on an earlier page): one look-up in downloads_by_group.
        """
        only, status_params = (" AND status = ?", (status,)) if status else ("", ())
        batch = limit if limit > 0 else 500
        keys: dict[str, None] = {}
        below = before if before is not None else 2**63 - 1
        while limit < 0 or len(keys) < limit:
            rows = await self._read_all(
                f"SELECT id, group_key FROM downloads WHERE id < ?{only} ORDER BY id DESC LIMIT ?",
                (below, *status_params, batch),
            )
            found = [str(row["group_key"]) for row in rows if str(row["group_key"]) not in keys]
            if before is not None and found:
                marks = ", ".join("?" for _ in found)
                shown = await self._read_all(
                    f"SELECT DISTINCT group_key FROM downloads WHERE group_key IN ({marks})"
                    f" AND id >= ?{only}",
                    (*found, before, *status_params),
                )
                earlier = {str(row["group_key"]) for row in shown}
                found = [key for key in found if key not in earlier]
            keys.update((key, None) for key in found)
            if len(rows) < batch:
                break
            below = int(rows[-1]["id"])
        return list(keys)[:limit] if limit >= 0 else list(keys)

    async def _media_group_ids(self, unique_ids: Sequence[str | None]) -> dict[str, str | None]:
        wanted = sorted({u for u in unique_ids if u})
        if not wanted:
            return {}
        marks = ", ".join("?" for _ in wanted)
        rows = await self._read_all(
            "SELECT file_unique_id, media_group_id FROM tg_media"
            f" WHERE file_unique_id IN ({marks})",
            wanted,
        )
        return {r["file_unique_id"]: r["media_group_id"] for r in rows}

    async def delete_download_record(self, download_id: int) -> DownloadRow:
        """Delete a job's rows (its uploads cascade) and return the row as it was.

        The caller stops aria2 and running uploads first, and deletes files itself.
        """
        async with self._write() as tx:
            row = await tx.fetch_one(
                f"SELECT {_DOWNLOAD_COLUMNS} FROM downloads WHERE id = ?", (download_id,)
            )
            if row is None:
                raise NotFound("download", download_id)
            await tx.execute("DELETE FROM downloads WHERE id = ?", (download_id,))
            tx.emit_removed(download_id)
        return _download_from_row(row)

    async def delete_all_downloads(self) -> list[DownloadRow]:
        """Delete every job's rows (and the Telegram media records); returns the rows deleted."""
        async with self._write() as tx:
            rows = await tx.fetch_all(f"SELECT {_DOWNLOAD_COLUMNS} FROM downloads ORDER BY id")
            await tx.execute("DELETE FROM downloads")
            await tx.execute("DELETE FROM tg_media")
            tx.emit_removed(None)
        return [_download_from_row(r) for r in rows]

    async def get_download_statistics(self, owner_id: int | None = None) -> DownloadStatistics:
        """Every job's figures, or (`owner_id`) only those of that Telegram user's jobs."""
        return _download_statistics(await self._totals(owner_id))

    # --- uploads (seed 001 §2.3) ----------------------------------------------------------------

    async def create_upload(
        self,
        download_id: int,
        upload_target: str,
        remote_path: str | None,
        max_retries: int,
        *,
        target_type: str = "rclone",
        ready: bool = False,
    ) -> int:
        """One upload per download per target; a second call returns the existing id."""
        now = utc_now()
        status = "pending" if ready else "waiting_download"
        async with self._write() as tx:
            created = await tx.fetch_one(
                "INSERT INTO uploads (download_id, upload_target, target_type, status, remote_path,"
                " max_retries, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (download_id, upload_target) DO NOTHING RETURNING id",
                (
                    download_id,
                    upload_target,
                    target_type,
                    status,
                    remote_path,
                    max_retries,
                    now,
                    now,
                ),
            )
            if created is not None:
                upload_id = int(created["id"])
                await tx.history("upload", upload_id, None, status, "created", now)
                await tx.emit_upload(upload_id)
            else:
                existing = await tx.fetch_one(
                    "SELECT id FROM uploads WHERE download_id = ? AND upload_target = ?",
                    (download_id, upload_target),
                )
                assert existing is not None
                upload_id = int(existing["id"])
        return upload_id

    async def update_upload_status(self, upload_id: int, status: str, **columns: object) -> None:
        reason = columns.pop("reason", None)
        if reason is not None and not isinstance(reason, str):
            raise StoreError("update_upload_status: reason must be text")
        unknown = set(columns) - _UPLOAD_EXTRA_COLUMNS
        if unknown:
            raise StoreError(f"update_upload_status: unknown columns {sorted(unknown)}")
        async with self._write() as tx:
            await tx.transition("upload", upload_id, status, reason, **columns)
            await tx.emit_upload(upload_id)

    async def release_waiting_uploads(self, download_id: int) -> list[int]:
        """The download completed: its `waiting_download` uploads become `pending`."""
        async with self._write() as tx:
            rows = await tx.fetch_all(
                "SELECT id FROM uploads WHERE download_id = ? AND status = 'waiting_download'",
                (download_id,),
            )
            ids = [int(r["id"]) for r in rows]
            for upload_id in ids:
                await tx.transition("upload", upload_id, "pending", "download completed")
                await tx.emit_upload(upload_id)
        return ids

    async def mark_upload_started(self, upload_id: int, total_size: int) -> None:
        async with self._write() as tx:
            await tx.transition(
                "upload",
                upload_id,
                "uploading",
                "started",
                total_size=total_size,
                uploaded_size=0,
                upload_speed=0,
                started_at=utc_now(),
                next_attempt_at=None,
            )
            await tx.emit_upload(upload_id)

    async def update_upload_progress(
        self, upload_id: int, uploaded_size: int, total_size: int, upload_speed: float
    ) -> None:
        async with self._write() as tx:
            changed = await tx.execute(
                "UPDATE uploads SET uploaded_size = ?, total_size = ?, upload_speed = ?,"
                " updated_at = ? WHERE id = ? AND status = 'uploading'",
                (uploaded_size, total_size, upload_speed, utc_now(), upload_id),
            )
            if changed:
                await tx.emit_upload(upload_id)

    async def record_upload_verified(
        self, upload_id: int, verified_size: int, verified_hash: str | None
    ) -> None:
        async with self._write() as tx:
            await tx.update_columns(
                "uploads",
                upload_id,
                {
                    "verified_size": verified_size,
                    "verified_hash": verified_hash,
                    "verified_at": utc_now(),
                },
            )
            await tx.emit_upload(upload_id)

    async def mark_upload_completed(
        self, upload_id: int, remote_path: str | None = None, public_link: str | None = None
    ) -> None:
        columns: dict[str, Any] = {"completed_at": utc_now(), "upload_speed": 0}
        if remote_path is not None:
            columns["remote_path"] = remote_path
        if public_link is not None:
            columns["public_link"] = public_link
        async with self._write() as tx:
            row = await tx.fetch_one("SELECT verified_at FROM uploads WHERE id = ?", (upload_id,))
            if row is not None and row["verified_at"] is None:
                raise StoreError(f"upload {upload_id} cannot complete before it is verified")
            await tx.transition(
                "upload", upload_id, "completed", "uploaded and verified", **columns
            )
            await tx.execute(
                "UPDATE uploads SET uploaded_size = total_size WHERE id = ?", (upload_id,)
            )
            await tx.emit_upload(upload_id)

    async def mark_upload_failed(
        self,
        upload_id: int,
        failure_reason: str,
        error_message: str,
        error_code: str | None = None,
    ) -> None:
        """uploading → failed: final, nothing retries it unless a person does."""
        async with self._write() as tx:
            await tx.transition(
                "upload",
                upload_id,
                "failed",
                failure_reason,
                failure_reason=failure_reason,
                error_message=error_message,
                error_code=error_code,
                upload_speed=0,
                next_attempt_at=None,
            )
            await tx.emit_upload(upload_id)

    async def schedule_upload_retry(
        self,
        upload_id: int,
        failure_reason: str,
        error_message: str,
        error_code: str | None,
        next_attempt_at: str,
    ) -> int:
        """A retriable failure: uploading → pending, due at `next_attempt_at`, with the failure
        recorded and the retry count raised. Returns the new retry count."""
        async with self._write() as tx:
            row = await tx.fetch_one("SELECT status FROM uploads WHERE id = ?", (upload_id,))
            if row is None:
                raise NotFound("upload", upload_id)
            # Only from `uploading`: the machine's other ways into `pending` are not failures.
            if row["status"] != "uploading":
                raise TransitionError("upload", upload_id, str(row["status"]), "pending")
            await tx.transition(
                "upload",
                upload_id,
                "pending",
                failure_reason,
                failure_reason=failure_reason,
                error_message=error_message,
                error_code=error_code,
                upload_speed=0,
                next_attempt_at=next_attempt_at,
            )
            count = await tx.raise_retry_count(upload_id)
            await tx.emit_upload(upload_id)
        return count

    async def mark_upload_cancelled(self, upload_id: int, reason: str = "cancelled") -> None:
        async with self._write() as tx:
            await tx.transition(
                "upload", upload_id, "cancelled", reason, upload_speed=0, next_attempt_at=None
            )
            await tx.emit_upload(upload_id)

    async def reset_upload_for_retry(self, upload_id: int) -> None:
        """A retry by hand: failed/cancelled → pending, or a pending upload waiting for its
        automatic retry is due now. Either way the retry count starts again from 0."""
        columns: dict[str, Any] = {
            "failure_reason": None,
            "error_message": None,
            "error_code": None,
            "next_attempt_at": None,
            "verified_at": None,
            "verified_size": None,
            "verified_hash": None,
            "uploaded_size": 0,
            "retry_count": 0,
        }
        async with self._write() as tx:
            row = await tx.fetch_one(
                "SELECT status, next_attempt_at FROM uploads WHERE id = ?", (upload_id,)
            )
            if row is None:
                raise NotFound("upload", upload_id)
            status = str(row["status"])
            if status == "pending" and row["next_attempt_at"] is not None:
                await tx.update_columns("uploads", upload_id, columns)
            elif status in ("failed", "cancelled"):
                await tx.transition("upload", upload_id, "pending", "manual retry", **columns)
            else:
                raise TransitionError("upload", upload_id, status, "pending")
            await tx.emit_upload(upload_id)

    async def increment_upload_retry(self, upload_id: int) -> int:
        async with self._write() as tx:
            count = await tx.raise_retry_count(upload_id)
            await tx.emit_upload(upload_id)
        return count

    async def mark_upload_cleaned(self, upload_id: int) -> None:
        async with self._write() as tx:
            await tx.execute(
                "UPDATE uploads SET cleaned_at = ?, updated_at = ? WHERE id = ?"
                " AND cleaned_at IS NULL",
                (utc_now(), utc_now(), upload_id),
            )
            await tx.emit_upload(upload_id, cleanup=True)

    async def mark_download_cleaned_by_id(self, download_id: int) -> list[int]:
        """The local file of `download_id` was deleted: every upload of it gets `cleaned_at`."""
        now = utc_now()
        async with self._write() as tx:
            rows = await tx.fetch_all(
                "SELECT id FROM uploads WHERE download_id = ? AND cleaned_at IS NULL",
                (download_id,),
            )
            ids = [int(r["id"]) for r in rows]
            await tx.execute(
                "UPDATE uploads SET cleaned_at = ?, updated_at = ? WHERE download_id = ?"
                " AND cleaned_at IS NULL",
                (now, now, download_id),
            )
            for upload_id in ids:
                await tx.emit_upload(upload_id, cleanup=True)
        return ids

    async def check_and_update_download_status_if_file_exists(
        self, upload_id: int, file_path: str | Path, *, exists: bool
    ) -> bool:
        """`exists`: whether the caller found the local file at `file_path`, returned as is.
        If it is gone, the upload completes when its remote copy was verified, and otherwise
        fails with reason `local_file_missing` (one transaction, walking the upload machine's own
        edges)."""
        if exists:
            return True
        async with self._write() as tx:
            row = await tx.fetch_one(
                "SELECT status, verified_at FROM uploads WHERE id = ?", (upload_id,)
            )
            if row is None:
                raise NotFound("upload", upload_id)
            status = str(row["status"])
            if status in ("completed", "failed", "cancelled"):
                return False
            path = {
                "waiting_download": ["pending", "uploading"],
                "paused": ["pending", "uploading"],
                "pending": ["uploading"],
                "uploading": [],
            }[status]
            for step in path:
                await tx.transition("upload", upload_id, step, "local file gone")
            if row["verified_at"] is not None:
                await tx.transition(
                    "upload",
                    upload_id,
                    "completed",
                    "remote copy verified; local file gone",
                    completed_at=utc_now(),
                    upload_speed=0,
                    next_attempt_at=None,
                )
            else:
                await tx.transition(
                    "upload",
                    upload_id,
                    "failed",
                    "local_file_missing",
                    failure_reason="local_file_missing",
                    error_message=f"local file is gone: {Path(file_path).name}",
                    upload_speed=0,
                    next_attempt_at=None,
                )
            await tx.emit_upload(upload_id)
        return False

    async def get_upload_by_id(self, upload_id: int) -> UploadRow | None:
        row = await self._read_one(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE id = ?", (upload_id,)
        )
        return _upload_from_row(row) if row else None

    async def get_uploads_by_download(self, download_id: int) -> list[UploadRow]:
        rows = await self._read_all(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE download_id = ? ORDER BY id",
            (download_id,),
        )
        return [_upload_from_row(r) for r in rows]

    async def get_uploads_for_downloads(
        self, download_ids: Sequence[int]
    ) -> dict[int, list[UploadRow]]:
        result: dict[int, list[UploadRow]] = {i: [] for i in download_ids}
        if not download_ids:
            return result
        marks = ", ".join("?" for _ in download_ids)
        rows = await self._read_all(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE download_id IN ({marks}) ORDER BY id",
            tuple(download_ids),
        )
        for row in rows:
            upload = _upload_from_row(row)
            result.setdefault(upload.download_id, []).append(upload)
        return result

    async def fetch_recent_uploads(
        self,
        limit: int = 50,
        status: str | None = None,
        upload_target: str | None = None,
        owner_id: int | None = None,
    ) -> list[UploadRow]:
        """The newest uploads matching the filters given; with `owner_id`, only the uploads of
        that Telegram user's jobs."""
        owned = None if owner_id is None else (_OWNED_UPLOADS, owner_id)
        return await self._fetch_recent(
            _UPLOADS, limit, {"status": status, "upload_target": upload_target}, owned
        )

    async def fetch_uploads_in_states(
        self, statuses: Sequence[str], *, node: str | None = None
    ) -> list[UploadRow]:
        """The uploads in `statuses`; with `node`, only those of downloads that node holds."""
        return await self._fetch_in_states(
            _UPLOADS, statuses, "download_id IN (SELECT id FROM downloads WHERE node = ?)", node
        )

    async def _fetch_recent(
        self,
        table: _Table[RowT],
        limit: int,
        filters: Mapping[str, object],
        condition: tuple[str, object] | None = None,
    ) -> list[RowT]:
        """The newest `limit` rows (-1: all) matching every filter given a value, and the
        `condition` (a clause with one parameter, and its value) when given."""
        clause, params = _equal_filters(**filters)
        if condition is not None:
            clause += f" AND {condition[0]}" if clause else f"WHERE {condition[0]}"
            params.append(condition[1])
        limit_clause, limit_params = _limit(limit)
        rows = await self._read_all(
            f"SELECT {table.columns} FROM {table.name} {clause} ORDER BY id DESC {limit_clause}",
            (*params, *limit_params),
        )
        return await table.convert_all(rows)

    async def _fetch_in_states(
        self, table: _Table[RowT], statuses: Sequence[str], node_clause: str, node: str | None
    ) -> list[RowT]:
        marks = ", ".join("?" for _ in statuses)
        where = f"status IN ({marks})" + (f" AND {node_clause}" if node is not None else "")
        params = (*statuses, node) if node is not None else tuple(statuses)
        rows = await self._read_all(
            f"SELECT {table.columns} FROM {table.name} WHERE {where} ORDER BY id", params
        )
        return await table.convert_all(rows)

    async def get_pending_uploads(self, upload_target: str | None = None) -> list[UploadRow]:
        uploads = await self.fetch_uploads_in_states(("pending",))
        return [u for u in uploads if upload_target is None or u.upload_target == upload_target]

    async def get_upload_statistics(self, owner_id: int | None = None) -> UploadStatistics:
        """Every upload's figures, or (`owner_id`) only those of that Telegram user's jobs."""
        return _upload_statistics(await self._totals(owner_id))

    async def get_statistics(self, owner_id: int | None = None) -> Statistics:
        """Both statistics, the payload of a `statistics` event (everyone's), or those of one
        Telegram user's jobs."""
        totals = await self._totals(owner_id)
        return {"downloads": _download_statistics(totals), "uploads": _upload_statistics(totals)}

    async def _totals(self, owner_id: int | None = None) -> list[_Total]:
        """The running totals (schema 7): a few rows, whatever the size of the tables; or one
        owner's, counted from their jobs' rows."""
        if owner_id is None:
            return await _all_totals(self._backend.reads(), _TOTALS_NOW)
        return await _all_totals(self._backend.reads(), _OWNER_TOTALS, (owner_id, owner_id))

    async def recount_totals(self, *, repair: bool) -> list[str]:
        """Compare the running totals with a count of every row; each difference, described.
        With `repair`, the totals are replaced by the count, in the same transaction."""
        async with self._write() as tx:
            kept = {t.key: t for t in await _all_totals(tx.sql, _TOTALS_NOW)}
            counted = {
                t.key: t
                for totalled in _TOTALLED
                for t in await _all_totals(tx.sql, totalled.recount())
            }
            drift = []
            for key in sorted(set(kept) | set(counted)):
                have = kept.get(key, _Total(*key, 0, 0, 0, 0))
                want = counted.get(key, _Total(*key, 0, 0, 0, 0))
                if have != want:
                    drift.append(
                        f"statistics of {have.describe()}: kept {have.sums()},"
                        f" counted {want.sums()}"
                    )
            if drift and repair:
                await tx.execute("DELETE FROM store_totals")
                for totalled in _TOTALLED:
                    await tx.execute(
                        f"INSERT INTO store_totals ({_TOTALS_COLUMNS}) {totalled.recount()}"
                    )
        if drift:
            logger.bind(where=self._backend.where).warning(
                "running totals differed from a recount in {} place(s){}",
                len(drift),
                "; replaced by the recount" if repair else "",
            )
        return drift

    # --- history and configuration --------------------------------------------------------------

    async def get_status_history(self, entity: str, entity_id: int) -> list[HistoryEntry]:
        rows = await self._read_all(
            "SELECT entity, entity_id, from_status, to_status, reason, at FROM status_history"
            " WHERE entity = ? AND entity_id = ? ORDER BY id",
            (entity, entity_id),
        )
        return [HistoryEntry(*r) for r in rows]

    # --- imports from another store -------------------------------------------------------------

    async def imported_origins(self) -> dict[str, int]:
        """Every row an earlier import took: its origin in the other store → our id."""
        rows = await self._read_all("SELECT origin, local_id FROM imported_rows")
        return {str(r["origin"]): int(r["local_id"]) for r in rows}

    async def import_rows(self, batch: ImportBatch) -> ImportResult:
        """Write what an import mapped, all in one transaction: media rows that are not here
        yet, downloads and uploads with the status they were given (a history row each, with
        the import's reason) and the origin of each, so that no row is imported twice."""
        media = downloads = uploads = 0
        async with self._write() as tx:
            for record in batch.media:
                media += await tx.insert_media_if_absent(record)
            for item in batch.downloads:
                if await tx.already_imported(item.origin):
                    continue
                download_id = await tx.insert_imported_download(item)
                downloads += 1
                for upload in item.uploads:
                    uploads += await tx.insert_imported_upload(download_id, upload)
            for download_id, upload in batch.late_uploads:
                uploads += await tx.insert_imported_upload(download_id, upload)
        return ImportResult(media, downloads, uploads)

    async def init_config_from_yaml(self, settings: Mapping[str, str]) -> None:
        """Store the effective configuration (secrets already masked) for the page and the API."""
        now = utc_now()
        async with self._write() as tx:
            await tx.serialize(_CONFIG_LOCK)  # nodes starting together each rewrite it
            await tx.execute("DELETE FROM config_settings")
            await tx.executemany(
                "INSERT INTO config_settings (key, value, updated_at) VALUES (?, ?, ?)",
                [(k, v, now) for k, v in sorted(settings.items())],
            )

    async def get_config(self, key: str) -> str | None:
        row = await self._read_one("SELECT value FROM config_settings WHERE key = ?", (key,))
        return str(row["value"]) if row else None

    async def get_all_configs(self) -> dict[str, str]:
        rows = await self._read_all("SELECT key, value FROM config_settings ORDER BY key")
        return {r["key"]: r["value"] for r in rows}

    async def record_settings_changes(
        self, changed_by: str, changes: Sequence[tuple[str, str, str]]
    ) -> list[SettingsChange]:
        """Record changed settings as (key, old, new), values already masked, in one write."""
        now = utc_now()
        recorded: list[SettingsChange] = []
        async with self._write() as tx:
            for key, old, new in changes:
                row = await tx.fetch_one(
                    "INSERT INTO settings_changes (changed_at, changed_by, key, old_value,"
                    " new_value) VALUES (?, ?, ?, ?, ?) RETURNING id",
                    (now, changed_by, key, old, new),
                )
                assert row is not None
                recorded.append(SettingsChange(int(row["id"]), now, changed_by, key, old, new))
        return recorded

    async def list_settings_changes(self, limit: int = 100) -> list[SettingsChange]:
        """The latest recorded setting changes, newest first."""
        rows = await self._read_all(
            f"SELECT {_SETTINGS_CHANGE_COLUMNS} FROM settings_changes ORDER BY id DESC LIMIT ?",
            (limit,),
        )
        return [SettingsChange(*row) for row in rows]

    # --- the cluster ----------------------------------------------------------------------------

    @property
    def shared(self) -> bool:
        """True when several nodes may share this store (PostgreSQL)."""
        return self._backend.dialect == "postgresql"

    async def shared_secret(self, name: str, make: Callable[[], str]) -> str:
        """The secret every node uses under `name`: the first node to ask stores `make()`."""
        async with self._write() as tx:
            await tx.execute(
                "INSERT INTO shared_secrets (name, value, created_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO NOTHING",
                (name, make(), utc_now()),
            )
            row = await tx.fetch_one("SELECT value FROM shared_secrets WHERE name = ?", (name,))
        assert row is not None
        return str(row["value"])

    async def register_node(self, beat: NodeHeartbeat, *, timeout: float) -> NodeRow | None:
        """Enter this node in `nodes`, taking over its name only from a node that stopped or
        whose heartbeat is older than `timeout` seconds; None when a live node has the name."""
        now = datetime.now(UTC)
        stale = (now - timedelta(seconds=timeout)).isoformat(timespec="milliseconds")
        stamp = now.isoformat(timespec="milliseconds")
        async with self._write() as tx:
            row = await tx.fetch_one(
                "INSERT INTO nodes (name, instance, public_url, slots, disk_free, leader,"
                " started_at, heartbeat_at, stopped_at) VALUES (?, ?, ?, ?, ?, 0, ?, ?, NULL)"
                " ON CONFLICT (name) DO UPDATE SET instance = excluded.instance,"
                " public_url = excluded.public_url, slots = excluded.slots,"
                " disk_free = excluded.disk_free, leader = 0, started_at = excluded.started_at,"
                " heartbeat_at = excluded.heartbeat_at, stopped_at = NULL"
                " WHERE nodes.stopped_at IS NOT NULL OR nodes.heartbeat_at < ?"
                " RETURNING name",
                (
                    beat.name,
                    beat.instance,
                    beat.public_url,
                    beat.slots,
                    beat.disk_free,
                    stamp,
                    stamp,
                    stale,
                ),
            )
        if row is None:
            return None
        return next(node for node in await self.list_nodes() if node.name == beat.name)

    async def heartbeat_node(self, beat: NodeHeartbeat) -> bool:
        """Refresh this node's row; False when the row is no longer this process's."""
        async with self._write() as tx:
            changed = await tx.execute(
                "UPDATE nodes SET public_url = ?, slots = ?, disk_free = ?, leader = ?,"
                " heartbeat_at = ?, stopped_at = NULL WHERE name = ? AND instance = ?",
                (
                    beat.public_url,
                    beat.slots,
                    beat.disk_free,
                    int(beat.leader),
                    utc_now(),
                    beat.name,
                    beat.instance,
                ),
            )
        return changed == 1

    async def stop_node(self, name: str, instance: str) -> None:
        async with self._write() as tx:
            await tx.execute(
                "UPDATE nodes SET stopped_at = ?, leader = 0 WHERE name = ? AND instance = ?",
                (utc_now(), name, instance),
            )

    async def list_nodes(self) -> list[NodeRow]:
        """Every node, by name, with the jobs it holds that take a slot."""
        rows = await self._read_all(
            "SELECT n.name, n.instance, n.public_url, n.slots, COALESCE(r.running, 0),"
            " n.disk_free, n.leader, n.started_at, n.heartbeat_at, n.stopped_at FROM nodes n"
            " LEFT JOIN (SELECT node, COUNT(*) AS running FROM downloads"
            f" WHERE status IN {_SLOT_STATUSES} AND node IS NOT NULL GROUP BY node) r"
            " ON r.node = n.name ORDER BY n.name"
        )
        return [
            NodeRow(r[0], r[1], r[2], int(r[3]), int(r[4]), int(r[5]), bool(r[6]), *r[7:10])
            for r in rows
        ]

    async def count_node_jobs(self, node: str) -> int:
        """The jobs `node` holds that take one of its slots (pending, waiting, downloading)."""
        row = await self._read_one(
            f"SELECT COUNT(*) FROM downloads WHERE node = ? AND status IN {_SLOT_STATUSES}",
            (node,),
        )
        return int(row[0]) if row else 0

    async def claim_downloads(
        self, node: str, limit: int, ids: Sequence[int] | None = None
    ) -> list[int]:
        """Claim up to `limit` pending downloads no node holds (only among `ids` if given), oldest
        first, for `node`; the ids claimed. However many nodes race, a row goes to one: PostgreSQL
        skips the rows another transaction has locked, SQLite has one writer."""
        if limit <= 0 or ids == []:
            return []
        among = f" AND id IN ({', '.join('?' for _ in ids)})" if ids else ""
        skip = " FOR UPDATE SKIP LOCKED" if self._backend.dialect == "postgresql" else ""
        now = utc_now()
        async with self._write() as tx:
            # The pick is a CTE, run once: as a subquery of the UPDATE, PostgreSQL may run it
            # again for each row and pick the rows after the ones just claimed too.
            rows = await tx.fetch_all(
                "WITH picked AS (SELECT id AS picked_id FROM downloads"
                f" WHERE status = 'pending' AND node IS NULL{among} ORDER BY id LIMIT ?{skip})"
                " UPDATE downloads SET node = ?, updated_at = ? FROM picked"
                " WHERE downloads.id = picked_id AND status = 'pending' AND node IS NULL"
                f" RETURNING {_DOWNLOAD_COLUMNS}",
                (*(ids or ()), limit, node, now),
            )
            claimed = [_download_from_row(row) for row in rows]
            why = f"claimed by node {node}"
            for row in claimed:
                await tx.history("download", row.id, "pending", "pending", why, now)
            await tx._snapshots(claimed)
        return sorted(row.id for row in claimed)

    async def requeue_downloads_of_node(self, node: str, reason: str) -> list[int]:
        """Send every unfinished download `node` holds back to the queue (pending, no node, no
        gid, no progress), each with a history row giving `reason`; the ids."""
        async with self._write() as tx:
            await tx.serialize(_CLUSTER_SWEEP_LOCK)
            rows = await tx.fetch_all(
                "SELECT id FROM downloads WHERE node = ?"
                " AND status IN ('pending', 'waiting', 'downloading', 'paused') ORDER BY id",
                (node,),
            )
            ids = [int(row["id"]) for row in rows]
            now = utc_now()
            for download_id in ids:
                columns = {
                    "node": None,
                    "gid": None,
                    "local_path": None,
                    "completed_length": 0,
                    "download_speed": 0,
                }
                if not await tx.transition("download", download_id, "pending", reason, **columns):
                    await tx.update_columns("downloads", download_id, columns)
                    await tx.history("download", download_id, "pending", "pending", reason, now)
                await tx.emit_download(download_id)
        return ids

    async def fail_uploads_of_node(self, node: str, reason: str) -> list[int]:
        """Fail every unfinished upload of a file `node` holds (it is on that node's disk only)."""
        async with self._write() as tx:
            await tx.serialize(_CLUSTER_SWEEP_LOCK)
            rows = await tx.fetch_all(
                "SELECT id FROM uploads WHERE status IN ('pending', 'uploading', 'paused')"
                " AND download_id IN (SELECT id FROM downloads WHERE node = ?"
                " AND status = 'completed') ORDER BY id",
                (node,),
            )
            ids = [int(row["id"]) for row in rows]
            for upload_id in ids:
                await tx.transition(
                    "upload",
                    upload_id,
                    "failed",
                    reason,
                    failure_reason=reason,
                    upload_speed=0,
                    next_attempt_at=None,
                )
                await tx.emit_upload(upload_id)
        return ids

    async def try_lead(self) -> bool:
        """Try to become the cluster's leader (the one node running the bot): a session lock
        on a connection of its own, released by the server when that connection ends. A lone
        SQLite node always leads."""
        return True if self._peers is None else await self._peers.try_lead()

    async def still_leading(self) -> bool:
        """False once the leader's connection is gone (so is its lock)."""
        return True if self._peers is None else await self._peers.still_leading()

    async def resign(self) -> None:
        if self._peers is not None:
            await self._peers.resign()

    # --- dashboard sessions -------------------------------------------------------------------

    async def create_web_session(
        self,
        token_hash: str,
        expires_at: str,
        address: str | None,
        user_agent: str | None,
        user_id: int | None = None,
    ) -> WebSession:
        """A new session; `user_id` for one a sign-in link made (None: the web token's)."""
        now = utc_now()
        async with self._write() as tx:
            await tx.execute(
                f"INSERT INTO web_sessions ({_SESSION_COLUMNS}) VALUES (?, ?, ?, ?, NULL, ?, ?, ?)",
                (token_hash, now, now, expires_at, address, user_agent, user_id),
            )
        return WebSession(token_hash, now, now, expires_at, None, address, user_agent, user_id)

    async def use_sign_in_link(self, nonce: str, user_id: int, expires_at: str) -> bool:
        """Record a one-time sign-in link as used: False when it was used before. Links whose
        expiry has passed are forgotten here (their signature refuses them anyway)."""
        now = utc_now()
        async with self._write() as tx:
            await tx.execute("DELETE FROM web_sign_in_links WHERE expires_at <= ?", (now,))
            return (
                await tx.execute(
                    "INSERT INTO web_sign_in_links (nonce, user_id, used_at, expires_at)"
                    " VALUES (?, ?, ?, ?) ON CONFLICT (nonce) DO NOTHING",
                    (nonce, user_id, now, expires_at),
                )
                == 1
            )

    async def use_web_session(self, token_hash: str) -> WebSession | None:
        """The session if it is neither revoked nor expired; its last use is recorded at most
        once a minute (not a write per request)."""
        row = await self._read_one(
            f"SELECT {_SESSION_COLUMNS} FROM web_sessions WHERE token_hash = ?", (token_hash,)
        )
        if row is None:
            return None
        session = WebSession(*row)
        now = datetime.now(UTC)
        expires = parse_utc(session.expires_at)
        if session.revoked_at is not None or expires is None or expires <= now:
            return None
        stamp = await self._touch("web_sessions", token_hash, session.last_used_at, now)
        return session if stamp is None else session._replace(last_used_at=stamp)

    async def _touch(
        self, table: str, token_hash: str, last_used_at: str | None, now: datetime
    ) -> str | None:
        """Record a session's or token's use (its new `last_used_at`), unless the last one is
        under `_SESSION_TOUCH` old: not a write per request. None when nothing was written."""
        used = parse_utc(last_used_at) if last_used_at else None
        if used is not None and now - used < _SESSION_TOUCH:
            return None
        stamp = now.isoformat(timespec="milliseconds")
        async with self._write() as tx:
            await tx.execute(
                f"UPDATE {table} SET last_used_at = ? WHERE token_hash = ?", (stamp, token_hash)
            )
        return stamp

    async def create_api_token(self, token_hash: str, user_id: int | None, name: str) -> ApiToken:
        now = utc_now()
        async with self._write() as tx:
            await tx.execute(
                f"INSERT INTO api_tokens ({_API_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, NULL, NULL)",
                (token_hash, user_id, name, now),
            )
        return ApiToken(token_hash, user_id, name, now, None, None)

    async def use_api_token(self, token_hash: str) -> ApiToken | None:
        """The token if it is not revoked; its last use is recorded at most once a minute."""
        row = await self._read_one(
            f"SELECT {_API_TOKEN_COLUMNS} FROM api_tokens WHERE token_hash = ?", (token_hash,)
        )
        if row is None or row["revoked_at"] is not None:
            return None
        token = ApiToken(*row)
        stamp = await self._touch("api_tokens", token_hash, token.last_used_at, datetime.now(UTC))
        return token if stamp is None else token._replace(last_used_at=stamp)

    async def list_api_tokens(self, user_id: int | None) -> list[ApiToken]:
        """The live tokens made for `user_id` (None: those made with web.token), newest first."""
        owner = "user_id IS NULL" if user_id is None else "user_id = ?"
        rows = await self._read_all(
            f"SELECT {_API_TOKEN_COLUMNS} FROM api_tokens"
            f" WHERE {owner} AND revoked_at IS NULL ORDER BY created_at DESC",
            () if user_id is None else (user_id,),
        )
        return [ApiToken(*row) for row in rows]

    async def revoke_api_token(self, id_prefix: str, user_id: int | None) -> bool:
        """Revoke the live token of `user_id` whose hash starts with `id_prefix` (hex digits)."""
        owner = "user_id IS NULL" if user_id is None else "user_id = ?"
        async with self._write() as tx:
            changed = await tx.execute(
                f"UPDATE api_tokens SET revoked_at = ? WHERE {owner}"
                " AND revoked_at IS NULL AND substr(token_hash, 1, ?) = ?",
                (utc_now(), *(() if user_id is None else (user_id,)), len(id_prefix), id_prefix),
            )
        return changed >= 1

    async def revoke_web_session(self, token_hash: str) -> bool:
        async with self._write() as tx:
            changed = await tx.execute(
                "UPDATE web_sessions SET revoked_at = ?"
                " WHERE token_hash = ? AND revoked_at IS NULL",
                (utc_now(), token_hash),
            )
        return changed == 1

    async def revoke_all_web_sessions(self) -> int:
        """Sign out everywhere; the number of sessions ended."""
        async with self._write() as tx:
            now = utc_now()
            return await tx.execute(
                "UPDATE web_sessions SET revoked_at = ?"
                " WHERE revoked_at IS NULL AND expires_at > ?",
                (now, now),
            )

    async def list_web_sessions(self) -> list[WebSession]:
        """The sessions still in use (not revoked, not expired), newest first."""
        rows = await self._read_all(
            f"SELECT {_SESSION_COLUMNS} FROM web_sessions"
            " WHERE revoked_at IS NULL AND expires_at > ? ORDER BY created_at DESC",
            (utc_now(),),
        )
        return [WebSession(*row) for row in rows]

    # --- the bot's outbox -----------------------------------------------------------------------

    async def fetch_undelivered_notices(self, limit: int = 100) -> list[BotNotice]:
        rows = await self._read_all(
            "SELECT id, download_id, chat_id, kind, created_at FROM bot_notices"
            " WHERE delivered_at IS NULL ORDER BY id LIMIT ?",
            (limit,),
        )
        return [BotNotice(*row) for row in rows]

    async def mark_notice_delivered(self, notice_id: int) -> bool:
        """True when this call recorded the delivery (False: already delivered, or gone)."""
        async with self._write() as tx:
            changed = await tx.execute(
                "UPDATE bot_notices SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL",
                (utc_now(), notice_id),
            )
        return changed == 1

    # --- maintenance ----------------------------------------------------------------------------

    async def backup(self, target: Path) -> None:
        """A consistent online copy of the SQLite file through SQLite's backup API (safe while
        the service runs); StoreError with PostgreSQL, whose own tools (pg_dump) do that."""
        await asyncio.to_thread(backup_database_file, self.path, target)

    async def table_counts(self) -> tuple[TableCount, ...]:
        """Every table of the store: its rows and, when numbered, its highest ids. (A store at
        an older schema lacks the tables of later ones: they would be empty.)"""
        sql = self._backend.reads()
        present = await self._backend.tables(sql)
        return tuple(
            [await _count(self._backend, sql, table) for table in _STORE_TABLES if table in present]
        )

    async def copy_into(self, target: Database) -> tuple[TableCount, ...]:
        """Copy every row of this store (at the current schema) into `target`, an empty
        database connected without migrating, in ONE transaction on `target`: its schema
        brought to the current version by the store's own steps, every table copied with its
        ids, the numbering moved past the ids handed out here, and each table's rows and ids
        compared with this store's before COMMIT; what was copied. This store is read in one
        transaction too, which holds its writers off meanwhile. StoreNotEmpty when `target`
        holds rows or tables that are not the store's; nothing is written on any error."""
        async with target._write() as copy, self._write() as read:
            found = await target._backend.locked_version(copy.sql)
            for number in range(found + 1, SCHEMA_VERSION + 1):
                await target._step(copy.sql, number)
            await _refuse_unless_empty(target._backend, copy.sql)
            version = await self._backend.locked_version(read.sql)
            tables = await self._backend.tables(read.sql)
            if version != SCHEMA_VERSION or tables != set(_STORE_TABLES) | _DERIVED_TABLES:
                raise StoreError(
                    f"{self._backend.where}: schema version {version} with the tables "
                    f"{', '.join(sorted(tables))}: not the store this MistRelay copies"
                )
            copied: list[TableCount] = []
            for table, key in _STORE_TABLES.items():
                columns = await self._backend.columns(read.sql, table)
                if set(columns) != set(await target._backend.columns(copy.sql, table)):
                    raise StoreError(f"{table}: the two databases have different columns")
                expected = await _count(self._backend, read.sql, table)
                await _copy_rows(read.sql, copy.sql, table, key, columns)
                if expected.last_id is not None:
                    await target._backend.set_last_id(copy.sql, table, expected.last_id)
                found_there = await _count(target._backend, copy.sql, table)
                if found_there != expected:
                    raise StoreError(
                        f"{table}: the copy holds {found_there}, not {expected}; "
                        "nothing was written"
                    )
                copied.append(found_there)
        logger.info("the store {} was copied into {}", self._backend.where, target._backend.where)
        return tuple(copied)


def _location(config: DatabaseConfig) -> Path | PostgresLocation:
    if config.backend == "sqlite":
        return config.sqlite_path
    return PostgresLocation(
        config.postgres_dsn,
        config.redacted_url,
        config.postgres_connect_timeout or _POSTGRES_CONNECT_TIMEOUT,
    )


async def open_store(
    config: DatabaseConfig,
    hub: EventHub | None = None,
    on_write: Callable[[float], None] | None = None,
) -> Store:
    """The store `database.url` (or `database.path`) names, open and migrated to the current
    schema. StoreUnavailable (one line, password masked) when a PostgreSQL server cannot be
    reached; StoreError for a database that is not MistRelay's or is newer. `on_write` is told
    the seconds of each committed write transaction."""
    return await Database(_location(config), hub=hub, on_write=on_write).open()


async def inspect_store(config: DatabaseConfig) -> int:
    """The schema version of the configured database, read without changing anything;
    StoreError if it is missing, unreachable, empty, or not a MistRelay database we know."""
    location = _location(config)
    if isinstance(location, Path):
        return await asyncio.to_thread(inspect_database_file, location)
    backend = _PostgresBackend(location)
    try:
        version = await backend.connect()
    finally:
        await backend.close()
    if version == 0:
        raise StoreError(f"{backend.where}: holds no MistRelay database yet")
    return version


def read_sqlite_tables(
    path: Path, wanted: Collection[str]
) -> tuple[set[str], dict[str, list[dict[str, Any]]]]:
    """The table names of another program's SQLite file and every row of the `wanted` tables
    it has (as column → value), read without writing to it (blocking: call it in a thread).
    StoreError when it is not a readable SQLite database."""
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise StoreError(f"{path}: cannot be opened: {exc}") from None
    try:
        conn.row_factory = sqlite3.Row
        tables = {
            str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        rows = {
            table: [dict(r) for r in conn.execute(f'SELECT * FROM "{table}"')]
            for table in wanted
            if table in tables
        }
        return tables, rows
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not a readable SQLite database: {exc}") from None
    finally:
        conn.close()


def inspect_database_file(path: Path) -> int:
    """The schema version of a MistRelay database file; StoreError if it is not one we know."""
    if not path.is_file():
        raise StoreError(f"{path}: no such file")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: not an SQLite database ({exc})") from None
    if app_id != APPLICATION_ID:
        raise StoreError(f"{path}: not a MistRelay database")
    if not 1 <= version <= SCHEMA_VERSION:
        raise StoreError(
            f"{path}: unknown schema version {version} (this MistRelay knows 1..{SCHEMA_VERSION})"
        )
    if check != "ok":
        raise StoreError(f"{path}: the database is damaged ({check})")
    return int(version)


def backup_database_file(source: Path, target: Path) -> None:
    """A consistent copy of `source` through SQLite's backup API, safe while the service writes."""
    inspect_database_file(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    discard(partial)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30)
    dst = sqlite3.connect(partial)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    inspect_database_file(partial)
    os.replace(partial, target)


def restore_database_file(backup: Path, target: Path) -> Path | None:
    """Replace `target` by `backup` (service stopped). The replaced file is kept aside; its path
    is returned (None when there was no database yet)."""
    inspect_database_file(backup)
    kept: Path | None = None
    if target.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        kept = target.with_name(f"{target.name}.replaced-{stamp}")
        # Fold the WAL into the file first so the copy kept aside is whole on its own.
        conn = sqlite3.connect(target)
        try:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
        os.replace(target, kept)
    for suffix in ("-wal", "-shm"):
        discard(Path(f"{target}{suffix}"))
    partial = target.with_name(target.name + ".partial")
    discard(partial)
    src = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
    dst = sqlite3.connect(partial)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    os.replace(partial, target)
    return kept


# --- a copy of the store into another database -------------------------------------------------

_COPY_BATCH = 500  # rows read, and written, at a time


@dataclass(frozen=True)
class TableCount:
    """One table of the store: its rows and, for a table of numbered rows, the highest id in it
    and the highest id ever handed out (ids of deleted rows are never given again)."""

    table: str
    rows: int
    max_id: int | None = None
    last_id: int | None = None


@dataclass(frozen=True)
class StoreMove:
    """A copy of one store into another database: planned (a dry run) or done."""

    source: str  # where, as shown: a file, or a URL with its password masked
    target: str
    source_version: int  # as found, before any migration
    target_version: int  # as found: 0 = an empty database
    tables: tuple[TableCount, ...]  # what would be, or was, copied


async def _count(backend: _Backend, sql: _Statements, table: str) -> TableCount:
    numbered = "id" in await backend.columns(sql, table)
    row = await sql.fetch_one(f"SELECT COUNT(*), {'MAX(id)' if numbered else 'NULL'} FROM {table}")
    assert row is not None  # an aggregate always answers
    if not numbered:
        return TableCount(table, int(row[0]))
    max_id = int(row[1] or 0)
    return TableCount(table, int(row[0]), max_id, max(max_id, await backend.last_id(sql, table)))


async def _refuse_unless_empty(backend: _Backend, sql: _Statements) -> None:
    """StoreNotEmpty when the database holds tables that are not the store's, or rows."""
    tables = await backend.tables(sql)
    foreign = sorted(tables - set(_STORE_TABLES) - _DERIVED_TABLES)
    if foreign:
        raise StoreNotEmpty(
            f"{backend.where}: holds tables that are not MistRelay's ({', '.join(foreign)}); "
            "give an empty database"
        )
    counts = [await _count(backend, sql, table) for table in _STORE_TABLES if table in tables]
    filled = [f"{count.table}: {count.rows}" for count in counts if count.rows]
    if filled:
        raise StoreNotEmpty(
            f"{backend.where}: not empty (rows in {', '.join(filled)}); give an empty database"
        )


async def _copy_rows(
    source: _Statements, target: _Statements, table: str, key: str, columns: Sequence[str]
) -> None:
    """Every row of `table`, in the order of its `key`, a batch at a time."""
    names = ", ".join(columns)
    insert = f"INSERT INTO {table} ({names}) VALUES ({', '.join('?' * len(columns))})"
    at = columns.index(key)
    rows = await source.fetch_all(f"SELECT {names} FROM {table} ORDER BY {key} LIMIT {_COPY_BATCH}")
    while rows:
        await target.executemany(insert, [tuple(row) for row in rows])
        if len(rows) < _COPY_BATCH:
            return
        rows = await source.fetch_all(
            f"SELECT {names} FROM {table} WHERE {key} > ? ORDER BY {key} LIMIT {_COPY_BATCH}",
            (rows[-1][at],),
        )


async def move_store(source: DatabaseConfig, target: DatabaseConfig, *, apply: bool) -> StoreMove:
    """Copy the store `source` names into the empty database `target` names (see
    :meth:`Database.copy_into`), the source migrated first when it is behind. Without `apply`,
    a dry run: what would be copied, read without writing to either database.

    StoreError (one line, no password) when the source is missing or not a store this MistRelay
    knows, StoreUnavailable when the target cannot be reached, StoreNotEmpty when it is not
    empty. The target is checked before the source is touched."""
    source_version = await inspect_store(source)
    async with contextlib.AsyncExitStack() as stack:
        there = Database(_location(target))
        target_version = await there._connect()
        stack.push_async_callback(there.close)
        await _refuse_unless_empty(there._backend, there._backend.reads())
        here = Database(_location(source))
        stack.push_async_callback(here.close)
        if apply:
            tables = await (await here.open()).copy_into(there)
        else:
            await here._connect()
            tables = await here.table_counts()
        return StoreMove(
            here._backend.where, there._backend.where, source_version, target_version, tables
        )


# --- other processes on one PostgreSQL store -----------------------------------------------------

_EVENTS_CHANNEL = "mistrelay_events"
_LEADER_LOCK = APPLICATION_ID + 1  # advisory lock held by the node running the bot
_CLUSTER_SWEEP_LOCK = APPLICATION_ID + 2  # one sweep of a dead node's jobs at a time
_CONFIG_LOCK = APPLICATION_ID + 3  # one rewrite of the stored configuration at a time
_NOTICE_BYTES = 7900  # PostgreSQL refuses a NOTIFY payload of 8000 bytes or more
_NOTICE_IDS = 1000  # ids per notification: a larger batch is announced in several
_FOLLOW_PROBE = 5.0  # seconds between checks that the listening connection still lives
_CATCH_UP_MARGIN = timedelta(seconds=2)  # reread rows changed this long before a lost link
# The leader's connection: the server notices a vanished leader (no FIN) within ~10 s.
_LEADER_KEEPALIVES = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}


@dataclass(frozen=True)
class _Notice:
    """What one committed batch of another process changed (ids), or, after a lost link, the
    moment from which to reread every row (`since`)."""

    downloads: tuple[int, ...] = ()
    removed: tuple[int | None, ...] = ()
    uploads: tuple[int, ...] = ()
    cleanups: tuple[int, ...] = ()
    since: str | None = None

    @classmethod
    def parse(cls, payload: str) -> tuple[str, _Notice]:
        """(sender, notice) from a NOTIFY payload."""
        data = json.loads(payload)
        return str(data.get("from", "")), cls(
            downloads=tuple(int(i) for i in data.get("d", ())),
            removed=tuple(None if i is None else int(i) for i in data.get("r", ())),
            uploads=tuple(int(i) for i in data.get("u", ())),
            cleanups=tuple(int(i) for i in data.get("c", ())),
        )


def _payloads(sender: str, events: Sequence[tuple[EventKind, int | None, EventData]]) -> list[str]:
    """A batch's changed ids as NOTIFY payloads: one, unless the batch is very large."""
    ids: dict[str, list[int | None]] = {"d": [], "r": [], "u": [], "c": []}
    for kind, item_id, data in events:
        key = "r" if isinstance(data, DownloadRemoved) else kind[0]
        if key in ids and (key == "r" or item_id is not None) and item_id not in ids[key]:
            ids[key].append(item_id)
    flat = [(key, item) for key, items in ids.items() for item in items]
    payloads: list[str] = []  # none for a batch that changed no job (a heartbeat)
    for first in range(0, len(flat), _NOTICE_IDS):
        part: dict[str, list[int | None]] = {}
        for key, item in flat[first : first + _NOTICE_IDS]:
            part.setdefault(key, []).append(item)
        payloads.append(json.dumps({"from": sender, **part}, separators=(",", ":")))
    return payloads


class _Peers:
    """This process among others on one PostgreSQL store: announces its commits, republishes
    theirs, and holds the leader's lock, each on a connection of its own."""

    def __init__(
        self, location: PostgresLocation, republish: Callable[[_Notice], Awaitable[None]]
    ) -> None:
        self.location = location
        self.sender = secrets.token_hex(8)
        self._republish = republish
        self._follower: asyncio.Task[None] | None = None
        self._notices: asyncio.Queue[_Notice] = asyncio.Queue()
        self._leader_conn: asyncpg.Connection | None = None

    async def announce(
        self, sql: _Statements, events: Sequence[tuple[EventKind, int | None, EventData]]
    ) -> None:
        """NOTIFY inside the transaction: delivered to the listeners when (and if) it commits."""
        for payload in _payloads(self.sender, events):
            if len(payload.encode()) < _NOTICE_BYTES:
                await sql.execute("SELECT pg_notify(?, ?)", (_EVENTS_CHANNEL, payload))

    def follow(self) -> None:
        if self._follower is None:
            self._follower = asyncio.create_task(self._follow(), name="store-follow-peers")

    async def _connect(self, **settings: str) -> asyncpg.Connection:
        connection: asyncpg.Connection = await asyncpg.connect(
            self.location.dsn,
            timeout=self.location.connect_timeout,
            server_settings=settings or None,
        )
        return connection

    async def _follow(self) -> None:
        delay = 0.5
        since: str | None = None
        publisher = asyncio.create_task(self._publish_notices(), name="store-peer-events")
        try:
            while True:
                try:
                    conn = await self._connect()
                except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                    logger.warning(
                        "store {}: cannot listen for other nodes; retrying in {:.1f} s",
                        self.location.shown,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 10.0)
                    continue
                if since is not None:
                    logger.info("store {}: listening for other nodes again", self.location.shown)
                    self._notices.put_nowait(_Notice(since=since))
                delay = 0.5
                since = await self._listen(conn)
        finally:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher

    async def _listen(self, conn: asyncpg.Connection) -> str:
        """Listen until the connection is lost; the moment from which to catch up."""
        lost = asyncio.Event()

        def received(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            try:
                sender, notice = _Notice.parse(payload)
            except (ValueError, TypeError, AttributeError):
                logger.warning("store: ignored a malformed notification")
                return
            if sender != self.sender:
                self._notices.put_nowait(notice)

        conn.add_termination_listener(lambda _conn: lost.set())
        alive_at = datetime.now(UTC)
        try:
            await conn.add_listener(_EVENTS_CHANNEL, received)
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), _FOLLOW_PROBE)
                    break
                await conn.execute("SELECT 1", timeout=_FOLLOW_PROBE)
                alive_at = datetime.now(UTC)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass
        finally:
            conn.terminate()
        logger.warning("store {}: lost the link to other nodes; reconnecting", self.location.shown)
        return (alive_at - _CATCH_UP_MARGIN).isoformat(timespec="milliseconds")

    async def _publish_notices(self) -> None:
        while True:
            notice = await self._notices.get()
            try:
                await self._republish(notice)
            except STORE_ERRORS as exc:
                logger.warning("store: another node's change not published here: {}", exc)

    async def try_lead(self) -> bool:
        if self._leader_conn is None or self._leader_conn.is_closed():
            self._leader_conn = await self._connect(**_LEADER_KEEPALIVES)
        held = await self._leader_conn.fetchval("SELECT pg_try_advisory_lock($1)", _LEADER_LOCK)
        if not held:
            await self.resign()
        return bool(held)

    async def still_leading(self) -> bool:
        conn = self._leader_conn
        if conn is None or conn.is_closed():
            return False
        try:
            await conn.execute("SELECT 1", timeout=_FOLLOW_PROBE)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            await self.resign()
            return False
        return True

    async def resign(self) -> None:
        """Close the leader's connection: the server releases its lock with it."""
        conn, self._leader_conn = self._leader_conn, None
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        await self.resign()
        task, self._follower = self._follower, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Tx:
    """Statements inside one write transaction; collects events to publish after COMMIT."""

    def __init__(self, sql: _Statements, dialect: Dialect) -> None:
        self.sql = sql
        self.dialect = dialect
        self.events: list[tuple[EventKind, int | None, EventData]] = []

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return await self.sql.execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self.sql.executemany(sql, rows)

    async def fetch_one(self, sql: str, params: Sequence[object] = ()) -> _Row | None:
        return await self.sql.fetch_one(sql, params)

    async def fetch_all(self, sql: str, params: Sequence[object] = ()) -> Sequence[_Row]:
        return await self.sql.fetch_all(sql, params)

    async def history(
        self,
        entity: str,
        entity_id: int,
        source: str | None,
        target: str,
        reason: str | None,
        at: str,
    ) -> None:
        await self.history_many(entity, [entity_id], source, target, reason, at)

    async def transition(
        self, entity: str, item_id: int, target: str, reason: str | None, **columns: Any
    ) -> bool:
        """Move `item_id` to `target` if the machine allows it; True if the status changed.

        Repeating the current status is a no-op (nothing written); anything else the machine
        forbids raises :class:`TransitionError` (and the caller's transaction rolls back). The
        UPDATE is a compare-and-set on the status read: should another process (PostgreSQL)
        have moved the row in between, nothing is written and TransitionError is raised.
        """
        machine = MACHINES[entity]
        if target not in machine:
            raise TransitionError(entity, item_id, None, target)
        table = "downloads" if entity == "download" else "uploads"
        current_row = await self.fetch_one(f"SELECT status FROM {table} WHERE id = ?", (item_id,))
        if current_row is None:
            raise NotFound(entity, item_id)
        return await self.move(entity, item_id, str(current_row["status"]), target, reason, columns)

    async def move(
        self,
        entity: str,
        item_id: int,
        current: str,
        target: str,
        reason: str | None,
        columns: Mapping[str, Any],
    ) -> bool:
        """`transition` from `current`, the status the caller read in this transaction."""
        table = "downloads" if entity == "download" else "uploads"
        if current == target:
            return False
        sources = allowed_sources(entity, target)
        if current not in sources:
            raise TransitionError(entity, item_id, current, target)
        now = utc_now()
        assignments = {"status": target, "updated_at": now, **columns}
        stamp = _DOWNLOAD_STAMPS.get(target) if entity == "download" else None
        if stamp is not None:
            assignments.setdefault(stamp, now)
        sets = ", ".join(f"{name} = ?" for name in assignments)
        changed = await self.sql.execute(
            f"UPDATE {table} SET {sets} WHERE id = ? AND status = ?",
            (*assignments.values(), item_id, current),
        )
        if changed != 1:
            raise TransitionError(entity, item_id, current, target)
        await self.history(entity, item_id, current, target, reason, now)
        if entity == "download" and target in FINAL_DOWNLOAD_STATUSES:
            # What the bot owes the chat that asked, if any: delivered once, even after a stop.
            await self.sql.execute(
                "INSERT INTO bot_notices (download_id, chat_id, kind, created_at)"
                " SELECT id, chat_id, ?, ? FROM downloads WHERE id = ? AND chat_id IS NOT NULL",
                (target, now, item_id),
            )
        return True

    async def history_many(
        self,
        entity: str,
        entity_ids: Sequence[int],
        source: str | None,
        target: str,
        reason: str | None,
        at: str,
    ) -> None:
        await self.sql.executemany(
            "INSERT INTO status_history (entity, entity_id, from_status, to_status, reason, at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(entity, entity_id, source, target, reason, at) for entity_id in entity_ids],
        )

    async def active_sources(self, source_keys: Sequence[str]) -> dict[str, int]:
        """The id of the pending, waiting, downloading or paused job of each of these sources
        that has one (downloads_one_active_per_source)."""
        found: dict[str, int] = {}
        wanted = sorted(set(source_keys))
        for first in range(0, len(wanted), _LOOKUP_CHUNK):
            chunk = wanted[first : first + _LOOKUP_CHUNK]
            rows = await self.fetch_all(
                f"SELECT id, source_key FROM {_active_by_source(self.dialect)} WHERE source_key IN"
                f" ({', '.join('?' for _ in chunk)}) AND status IN"
                " ('pending', 'waiting', 'downloading', 'paused')",
                chunk,
            )
            found.update((str(row["source_key"]), int(row["id"])) for row in rows)
        return found

    async def insert_downloads(
        self, news: Sequence[NewDownload], now: str, gids: Mapping[str, str] | None = None
    ) -> dict[str, DownloadRow]:
        """`pending` rows for `news` (each of its own source), or `waiting` under their gids
        (`gids`, by source), a chunk per statement; the rows made, by source. A source that has
        an active job meanwhile (another process's) gets none (downloads_one_active_per_source).
        A job of no group is a group of its own."""
        gids = gids or {}
        made: dict[str, DownloadRow] = {}
        for first in range(0, len(news), _INSERT_CHUNK):
            chunk = news[first : first + _INSERT_CHUNK]
            rows, params = _rows(
                self.dialect,
                _NEW_DOWNLOAD_TYPES,
                [
                    (
                        n.source_type, n.source_key, n.source_url, n.file_name, n.total_length,
                        n.file_unique_id, n.owner_id, n.chat_id, n.message_id,
                        n.group_key or f"job:{n.source_key}", n.torrent_data, n.info_hash,
                        "waiting" if n.source_key in gids else "pending",
                        gids.get(n.source_key), now, now,
                    )
                    for n in chunk
                ],
            )  # fmt: skip
            inserted = await self.fetch_all(
                f"INSERT INTO downloads ({_NEW_DOWNLOAD_COLUMNS}) {rows}"
                f" ON CONFLICT DO NOTHING RETURNING {_DOWNLOAD_COLUMNS}",
                params,
            )
            ungrouped = {n.source_key for n in chunk if n.group_key is None}
            alone = [int(r["id"]) for r in inserted if r["source_key"] in ungrouped]
            grouped: Sequence[_Row] = ()
            if alone:
                grouped = await self.fetch_all(
                    "UPDATE downloads SET group_key = 'download:' || id"
                    f" WHERE id IN ({', '.join('?' for _ in alone)}) RETURNING {_DOWNLOAD_COLUMNS}",
                    alone,
                )
            for row in [*inserted, *grouped]:
                made[str(row["source_key"])] = _download_from_row(row)
        return dict(sorted(made.items(), key=lambda item: item[1].id))

    async def queue(self, queued: Sequence[tuple[int, str]]) -> list[DownloadRow]:
        """aria2 took these new jobs (id, gid): every gid remembered on its job, and the jobs
        still `pending` moved to `waiting` as `transition` would (a compare-and-set on
        `pending`, a history row each), a chunk per statement; the rows moved. StoreError if a
        gid belongs to another job."""
        now = utc_now()
        await self.executemany(
            "INSERT INTO download_gids (gid, download_id, reason, created_at)"
            " VALUES (?, ?, 'added', ?) ON CONFLICT (gid) DO NOTHING",
            [(gid, download_id, now) for download_id, gid in queued],
        )
        moved: list[DownloadRow] = []
        for first in range(0, len(queued), _LOOKUP_CHUNK):
            chunk = queued[first : first + _LOOKUP_CHUNK]
            owners = await self.fetch_all(
                "SELECT gid, download_id FROM download_gids"
                f" WHERE gid IN ({', '.join('?' for _ in chunk)})",
                [gid for _, gid in chunk],
            )
            owner = {str(r["gid"]): int(r["download_id"]) for r in owners}
            for download_id, gid in chunk:
                if owner[gid] != download_id:
                    raise StoreError(f"gid {gid} already belongs to download {owner[gid]}")
            pairs, params = _rows(self.dialect, ("INTEGER", "TEXT"), chunk)
            rows = await self.fetch_all(
                f"WITH queued(q_id, q_gid) AS ({pairs}) UPDATE downloads SET gid = q_gid,"
                " status = 'waiting', updated_at = ? FROM queued"
                " WHERE downloads.id = q_id AND downloads.status = 'pending'"
                f" RETURNING {_DOWNLOAD_COLUMNS}",
                (*params, now),
            )
            moved += [_download_from_row(row) for row in rows]
        done = {row.id for row in moved}
        left = [(gid, now, download_id) for download_id, gid in queued if download_id not in done]
        if left:  # moved on meanwhile (cancelled): aria2 has the job all the same
            await self.executemany(
                "UPDATE downloads SET gid = ?, updated_at = ? WHERE id = ?", left
            )
        await self.history_many(
            "download", [row.id for row in moved], "pending", "waiting", "queued in aria2", now
        )
        return sorted(moved, key=lambda row: row.id)

    async def serialize(self, lock: int) -> None:
        """One transaction taking `lock` at a time among the processes on the store, until it
        ends (PostgreSQL; SQLite has one writer anyway)."""
        if self.dialect == "postgresql":
            await self.execute("SELECT pg_advisory_xact_lock(?)", (lock,))

    async def raise_retry_count(self, upload_id: int) -> int:
        """retry_count + 1 on the upload; the new count."""
        rows = await self.fetch_all(
            "UPDATE uploads SET retry_count = retry_count + 1, updated_at = ? WHERE id = ?"
            " RETURNING retry_count",
            (utc_now(), upload_id),
        )
        if not rows:
            raise NotFound("upload", upload_id)
        return int(rows[0]["retry_count"])

    async def update_columns(self, table: str, item_id: int, columns: Mapping[str, Any]) -> None:
        sets = ", ".join(f"{name} = ?" for name in columns)
        changed = await self.sql.execute(
            f"UPDATE {table} SET {sets}, updated_at = ? WHERE id = ?",
            (*columns.values(), utc_now(), item_id),
        )
        if changed != 1:
            raise NotFound(table.rstrip("s"), item_id)

    async def upsert_media(self, records: Sequence[TgMediaRecord]) -> None:
        if not records:
            return
        now = utc_now()
        names = [f.name for f in fields(TgMediaRecord)]
        marks = ", ".join("?" for _ in names)
        updates = ", ".join(f"{k} = excluded.{k}" for k in names if k != "file_unique_id")
        await self.sql.executemany(
            f"INSERT INTO tg_media ({', '.join(names)}, created_at, updated_at)"
            f" VALUES ({marks}, ?, ?) ON CONFLICT (file_unique_id) DO UPDATE SET"
            f" {updates}, updated_at = excluded.updated_at",
            [(*(getattr(media, name) for name in names), now, now) for media in records],
        )

    async def insert_media_if_absent(self, media: TgMediaRecord) -> int:
        """1 if the media row was written, 0 if one with its file_unique_id was here."""
        now = utc_now()
        data = asdict(media)
        names = ", ".join(data)
        marks = ", ".join("?" for _ in data)
        row = await self.fetch_one(
            f"INSERT INTO tg_media ({names}, created_at, updated_at) VALUES ({marks}, ?, ?)"
            " ON CONFLICT (file_unique_id) DO NOTHING RETURNING file_unique_id",
            (*data.values(), now, now),
        )
        return 0 if row is None else 1

    async def already_imported(self, origin: str) -> bool:
        found = await self.fetch_one("SELECT 1 FROM imported_rows WHERE origin = ?", (origin,))
        return found is not None

    async def _remember_import(self, origin: str, entity: str, local_id: int, now: str) -> None:
        await self.execute(
            "INSERT INTO imported_rows (origin, entity, local_id, imported_at) VALUES (?, ?, ?, ?)",
            (origin, entity, local_id, now),
        )

    async def insert_imported_download(self, item: ImportedDownload) -> int:
        if item.status not in DOWNLOAD_STATUSES:
            raise StoreError(f"{item.origin}: unknown download status {item.status!r}")
        new = item.new
        now = utc_now()
        files = json.dumps([asdict(f) for f in item.files]) if item.files else None
        created = await self.fetch_one(
            "INSERT INTO downloads (source_type, source_key, source_url, file_name,"
            " total_length, completed_length, file_unique_id, owner_id, chat_id, message_id,"
            " group_key, info_hash, status, local_path, files_json, error_message, error_code,"
            " created_at, started_at, completed_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                new.source_type,
                new.source_key,
                new.source_url,
                new.file_name,
                new.total_length,
                item.completed_length,
                new.file_unique_id,
                new.owner_id,
                new.chat_id,
                new.message_id,
                new.group_key or f"job:{new.source_key}",
                new.info_hash,
                item.status,
                item.local_path,
                files,
                item.error_message,
                item.error_code,
                item.created_at or now,
                item.started_at,
                item.completed_at,
                now,
            ),
        )
        assert created is not None
        download_id = int(created["id"])
        if new.group_key is None:
            await self.execute(
                "UPDATE downloads SET group_key = ? WHERE id = ?",
                (f"download:{download_id}", download_id),
            )
        await self.history("download", download_id, None, item.status, item.reason, now)
        await self._remember_import(item.origin, "download", download_id, now)
        await self.emit_download(download_id)
        return download_id

    async def insert_imported_upload(self, download_id: int, item: ImportedUpload) -> int:
        """1 if written; 0 if it was imported before."""
        if item.status not in UPLOAD_STATUSES:
            raise StoreError(f"{item.origin}: unknown upload status {item.status!r}")
        if await self.already_imported(item.origin):
            return 0
        now = utc_now()
        created = await self.fetch_one(
            "INSERT INTO uploads (download_id, upload_target, target_type, status, remote_path,"
            " uploaded_size, total_size, retry_count, max_retries, failure_reason,"
            " error_message, error_code, created_at, started_at, completed_at, cleaned_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (
                download_id,
                item.upload_target,
                item.target_type,
                item.status,
                item.remote_path,
                item.uploaded_size,
                item.total_size,
                item.retry_count,
                item.max_retries,
                item.failure_reason,
                item.error_message,
                item.error_code,
                item.created_at or now,
                item.started_at,
                item.completed_at,
                item.cleaned_at,
                now,
            ),
        )
        assert created is not None
        upload_id = int(created["id"])
        await self.history("upload", upload_id, None, item.status, item.reason, now)
        await self._remember_import(item.origin, "upload", upload_id, now)
        await self.emit_upload(upload_id)
        return 1

    async def download_id_by_gid(self, gid: str) -> int | None:
        row = await self.fetch_one("SELECT download_id FROM download_gids WHERE gid = ?", (gid,))
        return int(row["download_id"]) if row else None

    async def claim_gid(self, download_id: int, gid: str, reason: str) -> str:
        """Remember `gid` as the download's (StoreError if it is another's) and answer the
        download's status, in one statement. The row's `gid` column is left to the caller's
        UPDATE. A gid the download has already is left as it was (the no-op update only makes
        the statement return it)."""
        row = await self.fetch_one(
            "INSERT INTO download_gids (gid, download_id, reason, created_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (gid) DO UPDATE SET gid = excluded.gid"
            " WHERE download_gids.download_id = excluded.download_id"
            " RETURNING (SELECT status FROM downloads WHERE id = ?) AS status",
            (gid, download_id, reason, utc_now(), download_id),
        )
        if row is None:
            raise StoreError(
                f"gid {gid} already belongs to download {await self.download_id_by_gid(gid)}"
            )
        if row["status"] is None:
            raise NotFound("download", download_id)
        return str(row["status"])

    async def set_gid(self, download_id: int, gid: str, reason: str) -> None:
        await self.claim_gid(download_id, gid, reason)
        await self.update_columns("downloads", download_id, {"gid": gid})

    async def progress(self, batch: Sequence[ProgressUpdate], now: str) -> int:
        """Apply a poll cycle's progress as one UPDATE … FROM polled per chunk of rows."""
        changed = 0
        for first in range(0, len(batch), _PROGRESS_CHUNK):
            chunk = batch[first : first + _PROGRESS_CHUNK]
            polled, params = _polled(self.dialect, chunk)
            # The CTE's names differ from the table's so RETURNING reads the updated row.
            # aria2 says 0 bytes in all until it has learnt the size: a size known before
            # (a Telegram file's, a torrent's) is kept meanwhile.
            rows = await self.fetch_all(
                f"WITH polled(p_gid, p_completed, p_total, p_speed) AS ({polled})"
                " UPDATE downloads SET completed_length = p_completed,"
                " total_length = CASE WHEN p_total > 0 THEN p_total"
                " ELSE downloads.total_length END,"
                " download_speed = p_speed, updated_at = ?"
                " FROM polled WHERE downloads.gid = p_gid"
                " AND downloads.status IN ('waiting', 'downloading', 'paused')"
                " AND (downloads.completed_length != p_completed"
                " OR (p_total > 0 AND downloads.total_length != p_total)"
                " OR downloads.download_speed != p_speed)"
                f" RETURNING {_DOWNLOAD_COLUMNS}",
                (*params, now),
            )
            changed += len(rows)
            await self._snapshots([_download_from_row(row) for row in rows])
        return changed

    async def _snapshots(self, downloads: Sequence[DownloadRow]) -> None:
        """Queue a `download` event for each row, with its uploads read in one query."""
        if not downloads:
            return
        marks = ", ".join("?" for _ in downloads)
        uploads: dict[int, list[UploadRow]] = {}
        for row in await self.fetch_all(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE download_id IN ({marks}) ORDER BY id",
            [d.id for d in downloads],
        ):
            upload = _upload_from_row(row)
            uploads.setdefault(upload.download_id, []).append(upload)
        for download in downloads:
            snapshot = DownloadSnapshot(download, tuple(uploads.get(download.id, ())))
            self.events.append(("download", download.id, snapshot))

    async def emit_download(self, download_id: int) -> None:
        await self.emit_downloads([download_id])

    def emit_new(self, downloads: Sequence[DownloadRow]) -> None:
        """A `download` event for each new row (it has no uploads yet)."""
        self.events += [("download", d.id, DownloadSnapshot(d, ())) for d in downloads]

    async def emit_downloads(self, download_ids: Sequence[int]) -> None:
        """A `download` event for each of these rows, read a chunk at a time."""
        await self.emit_rows(await self.downloads_by_id(download_ids))

    async def downloads_by_id(self, download_ids: Sequence[int]) -> list[DownloadRow]:
        """These rows (those that exist), read a chunk at a time, each chunk in id order."""
        found: list[DownloadRow] = []
        for first in range(0, len(download_ids), _LOOKUP_CHUNK):
            chunk = download_ids[first : first + _LOOKUP_CHUNK]
            rows = await self.fetch_all(
                f"SELECT {_DOWNLOAD_COLUMNS} FROM downloads"
                f" WHERE id IN ({', '.join('?' for _ in chunk)}) ORDER BY id",
                chunk,
            )
            found += [_download_from_row(row) for row in rows]
        return found

    async def emit_rows(self, downloads: Sequence[DownloadRow]) -> None:
        """A `download` event for each of these rows as they are, a chunk at a time."""
        for first in range(0, len(downloads), _LOOKUP_CHUNK):
            await self._snapshots(downloads[first : first + _LOOKUP_CHUNK])

    def emit_removed(self, download_id: int | None) -> None:
        self.events.append(("download", download_id, DownloadRemoved(download_id)))

    async def emit_upload(self, upload_id: int, *, cleanup: bool = False) -> None:
        row = await self.fetch_one(
            f"SELECT {_UPLOAD_COLUMNS} FROM uploads WHERE id = ?", (upload_id,)
        )
        if row is not None:
            kind: EventKind = "cleanup" if cleanup else "upload"
            self.events.append((kind, upload_id, _upload_from_row(row)))

    async def apply_download_change(self, change: DownloadChange) -> ChangeOutcome:
        download_id = change.download_id

        def left_alone(why: str) -> ChangeOutcome:
            return ChangeOutcome(download_id, False, f"left alone: {why}")

        row = await self.fetch_one(
            "SELECT status, gid, error_code FROM downloads WHERE id = ?", (download_id,)
        )
        if row is None:
            return left_alone("the download no longer exists")
        current, gid, error_code = str(row["status"]), row["gid"], row["error_code"]
        if current != change.expected_status or gid != change.expected_gid:
            return left_alone(f"it changed since the check (now {current})")
        if error_code in change.skip_if_error_code_in:
            return left_alone(f"already recorded ({error_code})")
        steps: tuple[str, ...] = ()
        if change.target is not None:
            found = _download_steps(current, change.target)
            if found is None:
                return left_alone(f"the status machine forbids {current} → {change.target}")
            steps = found
        if change.new_gid is not None:
            owner = await self.download_id_by_gid(change.new_gid)
            if owner not in (None, download_id):
                return left_alone(f"gid {change.new_gid} belongs to download {owner}")

        done: list[str] = []
        if change.new_gid is not None:
            await self.set_gid(download_id, change.new_gid, change.reason)
            done.append(f"gid {gid} → {change.new_gid}")
        for step in steps[:-1]:
            await self.transition("download", download_id, step, change.reason)
        if steps:
            await self.transition(
                "download", download_id, steps[-1], change.reason, **change.columns
            )
            done.append(" → ".join((current, *steps)))
        elif change.columns:
            await self.update_columns("downloads", download_id, change.columns)
            done.append(f"recorded on the row: {', '.join(change.columns)}")
        if change.cancel_unstarted_uploads:
            uploads = await self.fetch_all(
                "SELECT id FROM uploads WHERE download_id = ?"
                " AND status IN ('waiting_download', 'pending', 'paused') ORDER BY id",
                (download_id,),
            )
            for upload in uploads:
                upload_id = int(upload["id"])
                await self.transition(
                    "upload",
                    upload_id,
                    "cancelled",
                    change.reason,
                    upload_speed=0,
                    next_attempt_at=None,
                )
                await self.emit_upload(upload_id)
            if uploads:
                done.append(f"{len(uploads)} upload(s) not started cancelled")
        await self.emit_download(download_id)
        return ChangeOutcome(download_id, True, "; ".join(done) or "nothing to change")

    def publish(self, hub: EventHub | None) -> None:
        if hub is not None:
            hub.publish_many((kind, data, item_id) for kind, item_id, data in self.events)


_DATABASE_IS_A_STORE: type[Store] = Database  # mypy holds the store to the protocol
