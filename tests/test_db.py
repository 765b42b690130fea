"""The store (db.py) on both backends — a real SQLite file and a real PostgreSQL database (the
`store_backend` fixture runs each test once on each): schema, migrations, every seed function,
transactions, gids, batched progress, the status machines' refusals, uploads, safe deletion,
grouping, locks held by another process. Tests named `test_sqlite_file_…` are about the SQLite
file itself (WAL, its identity marks, the backup of the file) and run on SQLite only."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import os
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from loguru import logger

from app import check_command
from configer import Config, DatabaseConfig
from db import (
    _MIGRATIONS,
    ACTIVE_DOWNLOAD_STATUSES,
    APPLICATION_ID,
    DOWNLOAD_TRANSITIONS,
    DRIVER_ERRORS,
    SCHEMA_VERSION,
    Database,
    DuplicateDownload,
    NotFound,
    PostgresLocation,
    StoreError,
    StoreUnavailable,
    TransitionError,
    _numbered,
    _SQLiteBackend,
    inspect_store,
    open_store,
)
from events import Event, EventHub, EventKind, Subscription
from files import DownloadFiles, remove_confined
from records import (
    ChangeOutcome,
    DownloadChange,
    DownloadRemoved,
    DownloadSearch,
    DownloadSnapshot,
    EventData,
    HistoryEntry,
    NewDownload,
    ProgressUpdate,
    TgMediaRecord,
    UploadRow,
)
from tests.support.postgres import PostgresServer
from tests.support.processes import free_port
from tests.support.stores import Peek, StoreBackend

# --- helpers -----------------------------------------------------------------------------------


@pytest.fixture
async def hub() -> AsyncIterator[EventHub]:
    event_hub = EventHub()
    try:
        yield event_hub
    finally:
        await event_hub.close()


@pytest.fixture
def download_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "dl"
    folder.mkdir()
    return folder


@pytest.fixture
async def db(store_backend: StoreBackend, hub: EventHub) -> AsyncIterator[Database]:
    async with store_backend.database(hub) as database:
        yield database


@pytest.fixture
async def sqlite_db(tmp_path: Path, hub: EventHub) -> AsyncIterator[Database]:
    """The store on a SQLite file, for the tests about the file itself."""
    async with Database(tmp_path / "m.db", hub=hub) as database:
        yield database


@contextlib.contextmanager
def raw(path: Path) -> Iterator[sqlite3.Connection]:
    """A plain second connection for looking at the file the way another process would."""
    conn = sqlite3.connect(path, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def fetch(path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with raw(path) as conn:
        return conn.execute(sql, params).fetchall()


def history_rows_of(peek: Peek, download_id: int) -> list[HistoryEntry]:
    rows = peek.fetch(
        "SELECT entity, entity_id, from_status, to_status, reason, at FROM status_history"
        " WHERE entity = 'download' AND entity_id = ? ORDER BY id",
        (download_id,),
    )
    return [HistoryEntry(*row) for row in rows]


def snapshot_of(event: Event) -> DownloadSnapshot:
    assert isinstance(event.data, DownloadSnapshot), event.data
    return event.data


async def drain(subscription: Subscription) -> list[Event]:
    """Every event queued on `subscription` right now (publish is synchronous, so all are in)."""
    events: list[Event] = []
    while len(subscription):
        events.append(await subscription.get())
    return events


def media(unique_id: str, **extra: Any) -> TgMediaRecord:
    return TgMediaRecord(
        file_unique_id=unique_id,
        file_id=f"file-{unique_id}",
        chat_id=100,
        message_id=extra.pop("message_id", 1),
        media_type="video",
        file_name=f"{unique_id}.mp4",
        file_size=1234,
        **extra,
    )


async def new_http(db: Database, key: str, **extra: Any) -> int:
    return await db.create_download(
        NewDownload(source_type="http", source_key=key, source_url=key, **extra)
    )


async def new_downloading(db: Database, key: str, gid: str) -> int:
    download_id = await new_http(db, key)
    await db.mark_download_queued_by_id(download_id, gid)
    assert await db.mark_download_started(gid) == download_id
    return download_id


async def seed_active_downloads(db: Database, count: int, status: str = "downloading") -> None:
    """`count` rows with gids gid-0000… in `status`. Seeding them one transaction each through the
    API would take seconds; one bulk insert keeps the test quick."""
    now = "2026-01-01T00:00:00.000+00:00"
    async with db._write() as tx:
        await tx.executemany(
            "INSERT INTO downloads (gid, source_type, source_key, status, group_key, total_length,"
            " created_at, updated_at) VALUES (?, 'http', ?, ?, ?, 1000000, ?, ?)",
            [
                (f"gid-{i:04d}", f"http://h/{i}", status, f"bulk:{i}", now, now)
                for i in range(count)
            ],
        )
        await tx.execute(
            "INSERT INTO download_gids (gid, download_id, reason, created_at)"
            " SELECT gid, id, 'seeded', created_at FROM downloads WHERE gid LIKE 'gid-%'"
            " ORDER BY id"
        )


def assert_utc(stamp: str | None) -> None:
    assert stamp is not None
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None
    assert parsed.utcoffset() == timedelta(0)
    assert stamp.endswith("+00:00")


# --- schema and lifecycle ----------------------------------------------------------------------


def test_migrations_are_numbered_from_one_to_the_current_version() -> None:
    assert sorted(_MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


def test_placeholders_are_numbered_for_postgresql_outside_literals_only() -> None:
    assert _numbered("UPDATE t SET a = ?, b = 'x' WHERE id IN (?, ?)") == (
        "UPDATE t SET a = $1, b = 'x' WHERE id IN ($2, $3)"
    )
    with pytest.raises(ValueError, match="inside a string literal"):
        _numbered("SELECT id FROM t WHERE name = 'why?' AND id = ?")


async def test_schema_version_and_tables(db: Database, peek: Peek) -> None:
    assert await db.schema_version() == SCHEMA_VERSION == peek.schema_version()
    tables = peek.tables()
    assert {"tg_media", "downloads", "download_gids", "uploads", "status_history"} <= tables
    assert "config_settings" in tables


async def test_foreign_keys_are_enforced(db: Database, store_backend: StoreBackend) -> None:
    with pytest.raises(store_backend.foreign_key_violation):
        await db.create_upload(9999, "cloud", None, 3)


async def test_sqlite_file_pragmas_wal_foreign_keys_busy_timeout(sqlite_db: Database) -> None:
    assert fetch(sqlite_db.path, "PRAGMA journal_mode")[0][0] == "wal"
    backend = sqlite_db._backend
    assert isinstance(backend, _SQLiteBackend) and backend.writer is not None
    for conn in (backend.writer, backend.reads().conn):  # type: ignore[attr-defined]
        foreign_keys = next(iter(await conn.execute_fetchall("PRAGMA foreign_keys")))
        busy_timeout = next(iter(await conn.execute_fetchall("PRAGMA busy_timeout")))
        assert foreign_keys[0] == 1
        assert busy_timeout[0] >= 1000


async def test_sqlite_file_user_version_and_application_id(sqlite_db: Database) -> None:
    assert fetch(sqlite_db.path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
    assert fetch(sqlite_db.path, "PRAGMA application_id")[0][0] == APPLICATION_ID


async def test_reopening_a_migrated_database_is_a_no_op(
    store_backend: StoreBackend, peek: Peek
) -> None:
    async with store_backend.database() as first:
        download_id = await new_http(first, "http://h/a")
    schema_before = peek.schema()
    history_before = peek.history()
    async with store_backend.database() as second:
        assert await second.schema_version() == SCHEMA_VERSION
        row = await second.get_download_by_id(download_id)
        assert row is not None and row.source_key == "http://h/a"
    assert peek.schema() == schema_before
    assert peek.history() == history_before
    assert peek.schema_version() == SCHEMA_VERSION


async def test_newer_schema_version_is_refused(store_backend: StoreBackend, peek: Peek) -> None:
    async with store_backend.database():
        pass
    peek.set_schema_version(SCHEMA_VERSION + 1)
    database = store_backend.database()
    try:
        with pytest.raises(StoreError, match="newer"):
            await database.open()
    finally:
        await database.close()
    assert peek.schema_version() == SCHEMA_VERSION + 1


async def make_old_database(backend: StoreBackend, version: int) -> None:
    """A database at schema `version` (1 to 6) holding what MistRelay 1 left: one upload waiting
    for an automatic retry (`failed` with next_attempt_at), one failed for good, one running,
    and a download's gids learnt in an order that is not the alphabet's."""
    stamp = "2026-01-01T00:00:00.000+00:00"
    old = await backend.database()._open(1)
    try:
        async with old._write() as tx:
            await tx.execute(
                "INSERT INTO downloads (source_type, source_key, status, group_key, created_at,"
                " updated_at) VALUES ('http', 'http://h/a', 'completed', 'g', ?, ?)",
                (stamp, stamp),
            )
            await tx.executemany(
                "INSERT INTO download_gids (gid, download_id, reason, created_at)"
                " VALUES (?, 1, 'added', ?)",
                [(gid, stamp) for gid in ("zz-first", "mm-second", "aa-third")],
            )
            await tx.executemany(
                "INSERT INTO uploads (download_id, upload_target, target_type, status,"
                " retry_count, failure_reason, error_message, next_attempt_at, created_at,"
                " updated_at) VALUES (1, ?, 'rclone', ?, ?, 'network', 'timeout', ?, ?, ?)",
                [
                    ("waits", "failed", 1, "2026-01-01T00:00:08.000+00:00", stamp, stamp),
                    ("final", "failed", 3, None, stamp, stamp),
                    ("runs", "uploading", 0, None, stamp, stamp),
                ],
            )
            await tx.execute(
                "INSERT INTO status_history (entity, entity_id, from_status, to_status, reason, at)"
                " VALUES ('upload', 1, 'uploading', 'failed', 'network', ?)",
                (stamp,),
            )
    finally:
        await old.close()
    if version > 1:
        await (await backend.database()._open(version)).close()
    assert backend.peek.schema_version() == version


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6])
async def test_a_released_schema_is_migrated_forward_with_its_data(
    store_backend: StoreBackend, peek: Peek, version: int
) -> None:
    await make_old_database(store_backend, version)
    untouched = peek.fetch("SELECT * FROM uploads WHERE id IN (2, 3) ORDER BY id")
    async with store_backend.database() as db:
        assert await db.schema_version() == SCHEMA_VERSION == 12
        # Schema 12 (per-user sign-in): old sessions are the web token's; links work once.
        assert all(s.user_id is None for s in await db.list_web_sessions())
        assert await db.use_sign_in_link("n" * 22, 7, "2999-01-01T00:00:00.000+00:00")
        assert not await db.use_sign_in_link("n" * 22, 7, "2999-01-01T00:00:00.000+00:00")
        # Schema 8 (settings changes): none was recorded yet.
        assert await db.list_settings_changes() == []
        # Schema 9 (archive options): no job asked for an archive step yet.
        assert await db.get_archive_option(1) is None
        # Schema 10 (job destinations): no job chose its targets: `match` decides.
        assert await db.get_download_targets(1) is None
        await db.set_download_targets(1, [])
        assert await db.get_download_targets(1) == []
        assert await db.get_targets_for_downloads([1, 2]) == {1: []}
        # Schema 11 (finding downloads): the old rows are found by source and by target.
        found = await db.search_downloads(10, DownloadSearch(source="http"))
        assert 1 in [row.id for row in found]
        # Schema 6: nothing was imported from another store yet.
        assert await db.imported_origins() == {}
        # Schema 4: a job of a single node's store is held by no node.
        download = await db.get_download_by_id(1)
        assert download is not None and download.node is None
        assert await db.list_nodes() == []
        waiting = await db.get_upload_by_id(1)
        assert waiting is not None
        assert (waiting.status, waiting.next_attempt_at, waiting.retry_count) == (
            "pending",
            "2026-01-01T00:00:08.000+00:00",
            1,
        )
        assert (waiting.failure_reason, waiting.error_message) == ("network", "timeout")
        assert_utc(waiting.updated_at)
        history = await db.get_status_history("upload", 1)
        assert [(h.from_status, h.to_status, h.reason) for h in history] == [
            ("uploading", "failed", "network"),
            ("failed", "pending", "retry scheduled (migrated)"),
        ]
        assert_utc(history[-1].at)
        assert await db.get_status_history("upload", 2) == []
        # What the migration moved is an ordinary waiting retry now.
        await db.mark_upload_started(1, 100)
        assert await db.schedule_upload_retry(1, "network", "again", None, "2030-01-01T00:00Z") == 2
        # Schema 3 numbered the gids in the order they were learnt; new ones follow.
        assert await db.get_gids(1) == ["zz-first", "mm-second", "aa-third"]
        async with db._write() as tx:
            await tx.set_gid(1, "bb-fourth", "test")
        assert await db.get_gids(1) == ["zz-first", "mm-second", "aa-third", "bb-fourth"]
        assert await db.get_download_id_by_gid("mm-second") == 1
    after = peek.fetch("SELECT * FROM uploads WHERE id IN (2, 3) ORDER BY id")
    # Schema 10 added the remote's link (none yet) after the columns that were there.
    assert [row[: len(untouched[0])] for row in after] == untouched
    assert [row[len(untouched[0]) :] for row in after] == [(None,)] * len(untouched)
    assert peek.schema_version() == SCHEMA_VERSION


def make_foreign_database(backend: StoreBackend) -> None:
    backend.peek.execute("CREATE TABLE notes (body TEXT)")
    backend.peek.execute("INSERT INTO notes VALUES ('keep me')")
    if backend.name == "sqlite":
        backend.peek.execute("PRAGMA user_version = 1")


async def test_foreign_database_is_refused_and_left_untouched(
    store_backend: StoreBackend, peek: Peek
) -> None:
    make_foreign_database(store_backend)
    schema_before = peek.schema()
    database = store_backend.database()
    try:
        with pytest.raises(StoreError, match="not a MistRelay database"):
            await database.open()
    finally:
        await database.close()
    assert peek.fetch("SELECT body FROM notes") == [("keep me",)]
    assert peek.tables() == {"notes"}
    assert peek.schema() == schema_before


async def test_sqlite_file_foreign_with_high_user_version_is_called_foreign(
    tmp_path: Path,
) -> None:
    path = tmp_path / "other.db"
    with raw(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("PRAGMA user_version = 7")
        conn.commit()
    database = Database(path)
    try:
        with pytest.raises(StoreError, match="not a MistRelay database"):
            await database.open()
    finally:
        await database.close()


async def test_sqlite_file_refused_foreign_file_keeps_its_journal_mode(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    with raw(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("PRAGMA user_version = 1")
        conn.commit()
    header_before = path.read_bytes()[:100]
    database = Database(path)
    try:
        with pytest.raises(StoreError):
            await database.open()
    finally:
        await database.close()
    # bytes 18-19 of the header are the read/write format versions: 1 = rollback journal, 2 = WAL
    assert path.read_bytes()[18:20] == header_before[18:20]


async def test_refused_open_releases_its_connections(
    store_backend: StoreBackend, peek: Peek
) -> None:
    make_foreign_database(store_backend)
    before = set(threading.enumerate())
    database = store_backend.database()
    try:
        with pytest.raises(StoreError):
            await database.open()
        if store_backend.name == "sqlite":
            started = set(threading.enumerate()) - before
            for thread in started:
                await asyncio.to_thread(thread.join, 2)
            assert not [t for t in started if t.is_alive()]
        else:
            others = peek.fetch(
                "SELECT COUNT(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert others == [(0,)]
    finally:
        await database.close()


# --- opening the configured store --------------------------------------------------------------

SECRET = "s3cr3t-Pa55"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def logged_lines() -> tuple[list[str], int]:
    lines: list[str] = []
    return lines, logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")


async def test_open_store_picks_the_backend_and_never_shows_the_password(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path
) -> None:
    database_name = postgres_url.rsplit("/", 1)[1]
    shown = (
        f"postgresql://postgres:***@{postgres_server.host}:{postgres_server.port}/{database_name}"
    )
    with_password = shown.replace("***", SECRET)  # the test server trusts loopback: any works
    lines, sink = logged_lines()
    try:
        store = await open_store(DatabaseConfig(url=with_password), EventHub())
        try:
            assert isinstance(store, Database)
            download_id = await new_http(store, "http://h/a")
            assert (await store.get_download_by_id(download_id)) is not None
            with pytest.raises(StoreError, match="not a file"):
                await store.backup(tmp_path / "copy.db")
        finally:
            await store.close()
        assert await inspect_store(DatabaseConfig(url=with_password)) == SCHEMA_VERSION
        sqlite = await open_store(DatabaseConfig(path=tmp_path / "data" / "m.db"))
        try:
            assert isinstance(sqlite, Database) and sqlite.path == tmp_path / "data" / "m.db"
        finally:
            await sqlite.close()
    finally:
        logger.remove(sink)
    assert any(f"database {shown} migrated to schema version" in line for line in lines), lines
    assert not any(SECRET in line for line in lines)


async def test_an_empty_postgresql_database_is_not_yet_a_store(postgres_url: str) -> None:
    with pytest.raises(StoreError, match="holds no MistRelay database yet"):
        await inspect_store(DatabaseConfig(url=postgres_url))


async def test_unreachable_postgresql_is_one_line_without_the_password() -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    config = DatabaseConfig(url=f"postgresql://relay:{SECRET}@127.0.0.1:{port}/mistrelay")
    for attempt in (open_store(config), inspect_store(config)):
        with pytest.raises(StoreUnavailable) as caught:
            await attempt
        message = str(caught.value)
        assert message.startswith(
            f"database.url postgresql://relay:***@127.0.0.1:{port}/mistrelay: cannot connect: "
        ), message
        assert SECRET not in message and "\n" not in message
        assert caught.value.__cause__ is None and caught.value.__suppress_context__
    assert SECRET not in repr(PostgresLocation(config.postgres_dsn, config.redacted_url))


async def test_check_command_reads_a_postgresql_store(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    defaults = Config()
    config = replace(
        defaults,
        database=DatabaseConfig(path=tmp_path / "data" / "m.db", url=postgres_url),
        aria2=replace(defaults.aria2, download_dir=tmp_path / "downloads"),
    )
    assert await check_command(config, fix=False) == 2
    assert "holds no MistRelay database yet" in capsys.readouterr().out
    await (await open_store(config.database)).close()
    assert await check_command(config, fix=False) == 0
    printed = capsys.readouterr().out
    assert "aria2: not reachable" in printed and "No mismatches" in printed


async def test_the_service_stops_with_one_line_when_postgresql_is_unreachable(
    tmp_path: Path,
) -> None:
    port = free_port("127.0.0.1")  # nothing listens there
    config = tmp_path / "config.yaml"
    config.write_text(
        "database:\n"
        f"  path: {tmp_path / 'data' / 'mistrelay.db'}\n"
        f"  url: postgresql://relay:{SECRET}@127.0.0.1:{port}/mistrelay\n"
        "aria2:\n"
        f"  download_dir: {tmp_path / 'downloads'}\n"
        "web:\n"
        "  host: 127.0.0.1\n"
        f"  port: {free_port('127.0.0.1')}\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISTRELAY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(PROJECT_ROOT / "app.py"),
        "--config",
        str(config),
        cwd=PROJECT_ROOT,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    output = (stdout + stderr).decode(errors="replace")
    assert process.returncode == 2, output
    errors = [line for line in output.splitlines() if "| ERROR" in line]
    assert len(errors) == 1, output
    assert f"database.url postgresql://relay:***@127.0.0.1:{port}/mistrelay: cannot" in errors[0]
    assert "Traceback" not in output and SECRET not in output


# --- the seed functions ------------------------------------------------------------------------

SEED_FUNCTIONS = [
    "save_tg_media",
    "create_download",
    "mark_download_started",
    "mark_download_completed",
    "mark_download_failed",
    "mark_download_paused",
    "mark_download_resumed",
    "update_download_progress",
    "get_download_id_by_gid",
    "get_download_by_id",
    "fetch_recent_downloads",
    "fetch_downloads_grouped",
    "delete_download_record",
    "delete_all_downloads",
    "get_download_statistics",
    "create_upload",
    "update_upload_status",
    "mark_upload_started",
    "mark_upload_completed",
    "mark_upload_failed",
    "mark_upload_cleaned",
    "check_and_update_download_status_if_file_exists",
    "get_upload_by_id",
    "get_uploads_by_download",
    "fetch_recent_uploads",
    "get_upload_statistics",
    "get_pending_uploads",
    "increment_upload_retry",
    "init_config_from_yaml",
    "get_config",
    "get_all_configs",
]


@pytest.mark.parametrize("name", SEED_FUNCTIONS)
def test_seed_function_exists(name: str) -> None:
    function = getattr(Database, name, None)
    assert function is not None, f"Database.{name} is missing"
    assert inspect.iscoroutinefunction(function), f"Database.{name} is not async"


async def test_save_tg_media_inserts_then_updates(db: Database, peek: Peek) -> None:
    assert await db.save_tg_media(media("U1", caption="first")) == "U1"
    assert await db.save_tg_media(media("U1", caption="second")) == "U1"
    assert peek.count("tg_media") == 1
    stored = await db.get_tg_media("U1")
    assert stored is not None and stored.caption == "second" and stored.file_id == "file-U1"
    assert await db.get_tg_media("nope") is None


async def test_a_files_copy_in_a_storage_channel_is_kept_per_channel(
    db: Database, peek: Peek
) -> None:
    await db.save_tg_media(media("U1"))
    assert await db.get_tg_storage_message("U1", -1001) is None
    await db.save_tg_storage_message("U1", -1001, 7)
    assert await db.get_tg_storage_message("U1", -1001) == 7
    assert await db.get_tg_storage_message("U1", -1002) is None  # another channel: no copy there
    await db.save_tg_storage_message("U1", -1002, 9)  # the channel changed: the new copy counts
    assert await db.get_tg_storage_message("U1", -1002) == 9
    assert await db.get_tg_storage_message("U1", -1001) is None
    assert peek.count("tg_storage_messages") == 1


async def test_create_download_records_pending_row_history_and_event(
    db: Database, hub: EventHub
) -> None:
    subscription = hub.subscribe("t")
    download_id = await new_http(db, "http://h/a", file_name="a.bin", total_length=10)
    row = await db.get_download_by_id(download_id)
    assert row is not None
    assert (row.status, row.gid, row.file_name, row.total_length) == ("pending", None, "a.bin", 10)
    assert row.group_key == f"download:{download_id}"
    assert row.status in ACTIVE_DOWNLOAD_STATUSES
    history = await db.get_status_history("download", download_id)
    assert [(h.from_status, h.to_status, h.reason) for h in history] == [
        (None, "pending", "created")
    ]
    events = await drain(subscription)
    assert [(e.kind, e.item_id, snapshot_of(e).row.status) for e in events] == [
        ("download", download_id, "pending")
    ]
    assert snapshot_of(events[0]) == DownloadSnapshot(row, ())
    assert await db.get_download_by_id(download_id + 100) is None


async def test_create_download_with_media_writes_both_rows(db: Database) -> None:
    download_id = await db.create_download(
        NewDownload(source_type="telegram", source_key="tg:U1", file_unique_id="U1"), media("U1")
    )
    row = await db.get_download_by_id(download_id)
    assert row is not None and row.file_unique_id == "U1" and row.source_type == "telegram"
    assert await db.get_tg_media("U1") == media("U1")


async def test_create_download_failure_leaves_neither_row(
    db: Database, store_backend: StoreBackend, peek: Peek
) -> None:
    class SlipsPastTheCheck(str):
        """Compares equal to every known source type, but the database stores its real text."""

        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    invalid = NewDownload(
        source_type=SlipsPastTheCheck("carrier-pigeon"),  # type: ignore[arg-type]
        source_key="tg:U1",
        file_unique_id="U1",
    )
    history_before = peek.history()
    with pytest.raises(store_backend.check_violation, match=r"(?i)check"):
        await db.create_download(invalid, media("U1"))
    assert peek.count("downloads") == 0
    assert peek.count("tg_media") == 0
    assert peek.history() == history_before


async def test_duplicate_create_download_leaves_neither_row(db: Database, peek: Peek) -> None:
    first = await db.create_download(
        NewDownload(source_type="telegram", source_key="tg:same", file_unique_id="U1"),
        media("U1", caption="original"),
    )
    history_before = peek.history()
    with pytest.raises(DuplicateDownload) as caught:
        await db.create_download(
            NewDownload(source_type="telegram", source_key="tg:same", file_unique_id="U2"),
            media("U2"),
        )
    assert caught.value.existing_id == first
    with pytest.raises(DuplicateDownload):
        await db.create_download(
            NewDownload(source_type="telegram", source_key="tg:same", file_unique_id="U1"),
            media("U1", caption="changed"),
        )
    assert peek.count("downloads") == 1
    assert await db.get_tg_media("U2") is None
    stored = await db.get_tg_media("U1")
    assert stored is not None and stored.caption == "original"
    assert peek.history() == history_before


async def test_queued_by_id_keeps_its_checks(
    db: Database, peek: Peek, store_backend: StoreBackend
) -> None:
    """aria2's gid recorded on the job, its status moved, one history row: a gid of another job,
    a status the machine forbids and a missing job are refused with nothing written; queued
    again with the status it has, the job only takes the new gid."""
    first = await new_http(db, "http://h/first")
    second = await new_http(db, "http://h/second")
    await db.mark_download_queued_by_id(first, "g-first")
    history = peek.history()
    with pytest.raises(StoreError, match=f"gid g-first already belongs to download {first}"):
        await db.mark_download_queued_by_id(second, "g-first")
    with pytest.raises(TransitionError):
        await db.mark_download_queued_by_id(second, "g-second", status="completed")
    with pytest.raises(store_backend.foreign_key_violation):
        await db.mark_download_queued_by_id(second + 100, "g-nobody")
    row = await db.get_download_by_id(second)
    assert row is not None and (row.status, row.gid) == ("pending", None)
    assert peek.count("download_gids") == 1
    assert peek.history() == history

    await db.mark_download_queued_by_id(first, "g-again")  # still waiting: the gid alone
    row = await db.get_download_by_id(first)
    assert row is not None and (row.status, row.gid) == ("waiting", "g-again")
    assert peek.history() == history
    assert await db.get_gids(first) == ["g-first", "g-again"]
    assert peek.fetch(
        "SELECT entity_id, from_status, to_status FROM status_history ORDER BY id DESC LIMIT 1"
    ) == [(first, "pending", "waiting")]


@pytest.mark.parametrize("active", ["pending", "waiting", "downloading", "paused"])
async def test_duplicate_refused_while_active(db: Database, active: str, peek: Peek) -> None:
    download_id = await new_http(db, "http://h/a")
    if active != "pending":
        await db.mark_download_queued_by_id(download_id, "g1")
    if active in ("downloading", "paused"):
        await db.mark_download_started("g1")
    if active == "paused":
        await db.mark_download_paused("g1")
    assert (await db.get_download_by_id(download_id)).status == active  # type: ignore[union-attr]
    with pytest.raises(DuplicateDownload) as caught:
        await new_http(db, "http://h/a")
    assert caught.value.existing_id == download_id
    assert caught.value.source_key == "http://h/a"
    assert peek.count("downloads") == 1


@pytest.mark.parametrize("final", ["completed", "failed", "cancelled"])
async def test_new_row_allowed_once_old_one_is_final(db: Database, final: str) -> None:
    download_id = await new_downloading(db, "http://h/a", "g1")
    if final == "completed":
        await db.mark_download_completed("g1", None, 5)
    elif final == "failed":
        await db.mark_download_failed("g1", "boom")
    else:
        await db.mark_download_cancelled_by_id(download_id)
    second = await new_http(db, "http://h/a")
    assert second != download_id
    assert (await db.get_download_by_id(second)).status == "pending"  # type: ignore[union-attr]
    assert (await db.get_download_by_id(download_id)).status == final  # type: ignore[union-attr]


async def test_retry_while_same_source_is_active_raises_duplicate(db: Database, peek: Peek) -> None:
    old = await new_http(db, "http://h/a")
    await db.mark_download_failed_by_id(old, "boom")
    newer = await new_http(db, "http://h/a")
    row_before = peek.row("downloads", old)
    with pytest.raises(DuplicateDownload) as caught:
        await db.reset_download_for_retry(old)
    assert caught.value.existing_id == newer
    assert peek.row("downloads", old) == row_before


async def test_gid_history_every_gid_finds_the_row(db: Database) -> None:
    download_id = await db.create_download(
        NewDownload(source_type="magnet", source_key="magnet:?xt=urn:btih:abc")
    )
    await db.mark_download_queued_by_id(download_id, "meta-gid")
    assert await db.follow_gid("meta-gid", "real-gid") == download_id
    row = await db.get_download_by_id(download_id)
    assert row is not None and row.gid == "real-gid" and row.status == "waiting"
    assert await db.follow_gid("unknown", "whatever") is None

    await db.mark_download_started("real-gid")
    await db.mark_download_failed("real-gid", "tracker gone", "2")
    failed = await db.get_download_by_id(download_id)
    assert failed is not None and failed.error_message == "tracker gone"
    assert failed.error_code == "2" and failed.download_speed == 0

    reset = await db.reset_download_for_retry(download_id)
    assert (reset.status, reset.gid, reset.error_message, reset.completed_length) == (
        "pending",
        None,
        None,
        0,
    )
    await db.mark_download_queued_by_id(download_id, "third-gid")
    for gid in ("meta-gid", "real-gid", "third-gid"):
        assert await db.get_download_id_by_gid(gid) == download_id
        by_gid = await db.get_download_by_gid(gid)
        assert by_gid is not None and by_gid.id == download_id
    assert await db.get_gids(download_id) == ["meta-gid", "real-gid", "third-gid"]
    assert await db.get_download_id_by_gid("never-seen") is None
    current = await db.get_download_by_id(download_id)
    assert current is not None and current.gid == "third-gid" and current.status == "waiting"


async def test_a_gid_cannot_belong_to_two_downloads(db: Database, peek: Peek) -> None:
    first = await new_http(db, "http://h/a")
    second = await new_http(db, "http://h/b")
    await db.mark_download_queued_by_id(first, "shared")
    row_before = peek.row("downloads", second)
    history_before = peek.history()
    with pytest.raises(StoreError):
        await db.mark_download_queued_by_id(second, "shared")
    assert peek.row("downloads", second) == row_before
    assert peek.history() == history_before
    assert await db.get_download_id_by_gid("shared") == first
    third = await new_http(db, "http://h/c")
    await db.mark_download_queued_by_id(third, "g3")
    with pytest.raises(StoreError):
        await db.follow_gid("g3", "shared")
    assert await db.get_gids(third) == ["g3"]
    assert await db.get_download_id_by_gid("shared") == first


# --- progress ----------------------------------------------------------------------------------


class CommitCheckingHub(EventHub):
    """Records, at each publish, whether another connection already sees the published values."""

    def __init__(self, peek: Peek) -> None:
        super().__init__()
        self.peek = peek
        self.visible: list[bool] = []

    def publish_many(self, items: Iterable[tuple[EventKind, EventData, int | None]]) -> None:
        batch = list(items)
        published = {
            item_id: data.row.completed_length
            for _kind, data, item_id in batch
            if isinstance(data, DownloadSnapshot) and item_id is not None
        }
        if published:
            marks = ", ".join("?" for _ in published)
            seen: dict[int, int] = dict(
                self.peek.fetch(
                    f"SELECT id, completed_length FROM downloads WHERE id IN ({marks})",
                    tuple(published),
                )
            )
            self.visible += [seen.get(i) == length for i, length in published.items()]
        super().publish_many(batch)


async def test_update_progress_batch_1000_rows(store_backend: StoreBackend, peek: Peek) -> None:
    hub = CommitCheckingHub(peek)
    try:
        async with store_backend.database(hub) as db:
            await seed_active_downloads(db, 1000)
            # rows in final states and unknown gids are ignored
            async with db._write() as tx:
                await tx.execute(
                    "UPDATE downloads SET status = 'completed'"
                    " WHERE gid IN ('gid-0000', 'gid-0001')"
                )
                await tx.execute("UPDATE downloads SET status = 'failed' WHERE gid = 'gid-0002'")
            final_before = peek.fetch("SELECT * FROM downloads WHERE id <= 3 ORDER BY id")
            with_uploads = await db.get_download_id_by_gid("gid-0007")
            assert with_uploads is not None
            upload_ids = [
                await db.create_upload(with_uploads, name, None, 3) for name in ("a", "b")
            ]
            subscription = hub.subscribe("progress", maxsize=5000)
            updates = [
                ProgressUpdate(f"gid-{i:04d}", 500 + i, 2_000_000, 100 + i) for i in range(1000)
            ]
            updates += [ProgressUpdate(f"nobody-{i}", 1, 2, 3) for i in range(50)]
            changed = await db.update_progress_batch(updates)
            assert changed == 997
            events = await drain(subscription)
            assert len(events) == 997
            assert all(e.kind == "download" for e in events)
            assert len({e.item_id for e in events}) == 997
            assert 1 not in {e.item_id for e in events}
            assert len(hub.visible) == 997 and all(hub.visible)
            assert peek.fetch("SELECT * FROM downloads WHERE id <= 3 ORDER BY id") == final_before
            row = await db.get_download_by_gid("gid-0999")
            assert row is not None
            assert (row.completed_length, row.total_length, row.download_speed) == (
                1499,
                2_000_000,
                1099,
            )
            # each event is the whole committed row, with its uploads
            snapshots = {e.item_id: snapshot_of(e) for e in events}
            assert snapshots[row.id] == DownloadSnapshot(row, ())
            uploads = tuple(await db.get_uploads_by_download(with_uploads))
            assert [u.id for u in uploads] == upload_ids
            assert snapshots[with_uploads] == DownloadSnapshot(
                await db.get_download_by_id(with_uploads),  # type: ignore[arg-type]
                uploads,
            )
            # the same cycle again changes nothing and publishes nothing
            assert await db.update_progress_batch(updates) == 0
            assert await drain(subscription) == []
            # one row moved: only it counts
            updates[500] = ProgressUpdate("gid-0500", 999_999, 2_000_000, 7)
            assert await db.update_progress_batch(updates) == 1
            moved = await db.get_download_id_by_gid("gid-0500")
            assert [e.item_id for e in await drain(subscription)] == [moved]
            assert await db.update_progress_batch([]) == 0
    finally:
        await hub.close()


async def test_update_download_progress_single_row(db: Database) -> None:
    download_id = await new_downloading(db, "http://h/a", "g1")
    await db.update_download_progress("g1", 10, 100, 5)
    row = await db.get_download_by_id(download_id)
    assert row is not None and (row.completed_length, row.total_length, row.download_speed) == (
        10,
        100,
        5,
    )
    await db.update_download_progress("unknown", 1, 1, 1)  # ignored, no error


async def test_a_known_size_is_kept_while_aria2_has_not_learnt_it(db: Database) -> None:
    """aria2 reports 0 bytes in all before it knows the size: the size a Telegram file or a
    torrent came with stays, and aria2's own figure replaces it once it has one."""
    download_id = await db.create_download(NewDownload("http", "http://h/sized", total_length=500))
    await db.mark_download_queued_by_id(download_id, "g-sized", "downloading")
    await db.update_download_progress("g-sized", 0, 0, 0)
    row = await db.get_download_by_id(download_id)
    assert row is not None and row.total_length == 500
    await db.update_download_progress("g-sized", 20, 0, 7)  # progress still counts
    row = await db.get_download_by_id(download_id)
    assert row is not None and (row.completed_length, row.total_length) == (20, 500)
    await db.update_download_progress("g-sized", 40, 480, 7)
    row = await db.get_download_by_id(download_id)
    assert row is not None and (row.completed_length, row.total_length) == (40, 480)


# --- download transitions ----------------------------------------------------------------------


async def test_a_status_another_process_changes_meanwhile_is_not_overwritten(
    db: Database, store_backend: StoreBackend, peek: Peek
) -> None:
    """Another process moves the row while the store's transition waits for it. PostgreSQL: the
    store read `pending` before, its compare-and-set then finds `waiting` and changes nothing;
    SQLite: the store waits for the file before reading. Either way the history stays one chain
    that ends at the row's status."""
    download_id = await new_http(db, "http://h/a")
    begin = "BEGIN IMMEDIATE" if store_backend.name == "sqlite" else "BEGIN"
    for statement, params in (
        (begin, ()),
        ("UPDATE downloads SET status = 'waiting' WHERE id = ?", (download_id,)),
        (
            "INSERT INTO status_history (entity, entity_id, from_status, to_status, reason, at)"
            " VALUES ('download', ?, 'pending', 'waiting', 'other process', ?)",
            (download_id, "2026-01-01T00:00:00.000+00:00"),
        ),
    ):
        await asyncio.to_thread(peek.execute, statement, params)
    cancel = asyncio.create_task(db.mark_download_cancelled_by_id(download_id, "race"))
    await asyncio.sleep(0.5)
    assert not cancel.done()  # waiting for the other transaction
    await asyncio.to_thread(peek.execute, "COMMIT")
    if store_backend.name == "postgresql":
        with pytest.raises(TransitionError):
            await cancel
    else:
        await cancel
    row = await db.get_download_by_id(download_id)
    assert row is not None
    steps = [(h.from_status, h.to_status) for h in history_rows_of(peek, download_id)]
    assert steps[0] == (None, "pending")
    for (_, reached), (left, _) in itertools.pairwise(steps):
        assert reached == left, steps
    assert steps[-1][1] == row.status
    assert row.status == ("waiting" if store_backend.name == "postgresql" else "cancelled")


async def test_mark_download_completed_from_downloading(db: Database, hub: EventHub) -> None:
    download_id = await new_downloading(db, "http://h/a", "g1")
    subscription = hub.subscribe("t")
    assert await db.mark_download_completed("g1", "/data/a.bin", 4096) == download_id
    row = await db.get_download_by_id(download_id)
    assert row is not None
    assert row.status == "completed" and row.local_path == "/data/a.bin"
    assert row.completed_length == row.total_length == 4096 and row.download_speed == 0
    assert_utc(row.completed_at)
    assert_utc(row.started_at)
    assert row.status not in ACTIVE_DOWNLOAD_STATUSES
    events = await drain(subscription)
    assert [(e.kind, e.item_id, snapshot_of(e).row.status) for e in events] == [
        ("download", download_id, "completed")
    ]
    assert await db.mark_download_completed("unknown", None, 1) is None


async def test_pause_and_resume(db: Database) -> None:
    download_id = await new_downloading(db, "http://h/a", "g1")
    await db.update_download_progress("g1", 10, 100, 50)
    assert await db.mark_download_paused("g1") == download_id
    paused = await db.get_download_by_id(download_id)
    assert paused is not None and paused.status == "paused" and paused.download_speed == 0
    assert await db.mark_download_resumed("g1") == download_id
    resumed = await db.get_download_by_id(download_id)
    assert resumed is not None and resumed.status == "waiting"
    assert resumed.completed_length == 10


FORBIDDEN_DOWNLOAD_STEPS = [
    ("waiting", "completed"),
    ("pending", "paused"),
    ("completed", "downloading"),
    ("completed", "failed"),
    ("failed", "downloading"),
    ("cancelled", "waiting"),
]


async def put_download_in(db: Database, status: str) -> tuple[int, str]:
    """A download in `status` with gid 'g1' (reached through allowed transitions)."""
    download_id = await new_http(db, "http://h/a")
    if status == "pending":
        # give it a gid without leaving pending
        async with db._write() as tx:
            await tx.set_gid(download_id, "g1", "test")
        return download_id, "g1"
    await db.mark_download_queued_by_id(download_id, "g1")
    if status in ("downloading", "completed", "failed"):
        await db.mark_download_started("g1")
    if status == "completed":
        await db.mark_download_completed("g1", "/x", 1)
    elif status == "failed":
        await db.mark_download_failed("g1", "boom")
    elif status == "cancelled":
        await db.mark_download_cancelled_by_id(download_id)
    return download_id, "g1"


@pytest.mark.parametrize(("current", "target"), FORBIDDEN_DOWNLOAD_STEPS)
async def test_forbidden_download_transition_writes_nothing(
    db: Database, hub: EventHub, current: str, target: str, peek: Peek
) -> None:
    assert target not in DOWNLOAD_TRANSITIONS[current]
    download_id, gid = await put_download_in(db, current)
    row_before = peek.row("downloads", download_id)
    history_before = peek.history()
    subscription = hub.subscribe("t")
    calls = {
        "completed": lambda: db.mark_download_completed(gid, "/elsewhere", 99),
        "paused": lambda: db.mark_download_paused(gid),
        "downloading": lambda: db.mark_download_started(gid),
        "failed": lambda: db.mark_download_failed(gid, "late error"),
        "waiting": lambda: db.mark_download_resumed(gid),
    }
    with pytest.raises(TransitionError) as caught:
        await calls[target]()
    assert (caught.value.current, caught.value.target) == (current, target)
    assert peek.row("downloads", download_id) == row_before
    assert peek.history() == history_before
    assert await drain(subscription) == []


async def test_repeating_current_status_is_a_no_op(db: Database, peek: Peek) -> None:
    download_id = await new_downloading(db, "http://h/a", "g1")
    row_before = peek.row("downloads", download_id)
    history_before = peek.history()
    assert await db.mark_download_started("g1") == download_id
    assert peek.row("downloads", download_id) == row_before
    assert peek.history() == history_before
    await db.mark_download_paused("g1")
    paused_before = peek.row("downloads", download_id)
    history_before = peek.history()
    await db.mark_download_paused("g1")
    assert peek.row("downloads", download_id) == paused_before
    assert peek.history() == history_before
    await db.mark_download_failed("g1", "x")
    failed_before = peek.row("downloads", download_id)
    history_before = peek.history()
    await db.mark_download_failed("g1", "a different message")
    await db.mark_download_failed_by_id(download_id, "yet another")
    assert peek.row("downloads", download_id) == failed_before
    assert peek.history() == history_before
    assert paused_before != failed_before


async def test_status_history_records_from_to_reason_in_utc(db: Database) -> None:
    download_id = await new_downloading(db, "http://h/a", "g1")
    await db.mark_download_failed("g1", "disk full")
    history = await db.get_status_history("download", download_id)
    assert [(h.from_status, h.to_status, h.reason) for h in history] == [
        (None, "pending", "created"),
        ("pending", "waiting", "queued in aria2"),
        ("waiting", "downloading", "aria2 started"),
        ("downloading", "failed", "disk full"),
    ]
    for entry in history:
        assert entry.entity == "download" and entry.entity_id == download_id
        assert_utc(entry.at)
    stamps = [datetime.fromisoformat(h.at) for h in history]
    assert stamps == sorted(stamps)


async def test_timestamps_everywhere_are_utc_with_offset(
    db: Database, download_dir: Path, peek: Peek
) -> None:
    await db.create_download(
        NewDownload(source_type="telegram", source_key="tg:U1", file_unique_id="U1"), media("U1")
    )
    download_id = await new_downloading(db, "http://h/a", "g1")
    await db.mark_download_completed("g1", str(download_dir / "a.bin"), 10)
    upload_id = await db.create_upload(download_id, "cloud", "/r/a.bin", 3, ready=True)
    await db.mark_upload_started(upload_id, 10)
    await db.record_upload_verified(upload_id, 10, "abc")
    await db.mark_upload_completed(upload_id)
    await db.mark_download_cleaned_by_id(download_id)
    await db.init_config_from_yaml({"web.port": "8080"})
    columns = {
        "downloads": ["created_at", "updated_at", "started_at", "completed_at"],
        "uploads": [
            "created_at",
            "updated_at",
            "started_at",
            "completed_at",
            "cleaned_at",
            "verified_at",
        ],
        "status_history": ["at"],
        "tg_media": ["created_at", "updated_at"],
        "download_gids": ["created_at"],
        "config_settings": ["updated_at"],
    }
    checked = 0
    for table, names in columns.items():
        for values in peek.fetch(f"SELECT {', '.join(names)} FROM {table}"):
            for value in values:
                if value is not None:
                    assert_utc(value)
                    checked += 1
    assert checked >= 20
    row = await db.get_download_by_id(download_id)
    upload = await db.get_upload_by_id(upload_id)
    assert row is not None and upload is not None
    for stamp in (row.created_at, row.updated_at, upload.cleaned_at, upload.verified_at):
        assert_utc(stamp)


# --- uploads -----------------------------------------------------------------------------------


async def completed_download(db: Database, key: str = "http://h/a", gid: str = "g1") -> int:
    download_id = await new_downloading(db, key, gid)
    await db.mark_download_completed(gid, "/data/a.bin", 100)
    return download_id


async def test_create_upload_is_idempotent_per_download_and_target(
    db: Database, peek: Peek
) -> None:
    download_id = await new_http(db, "http://h/a")
    first = await db.create_upload(download_id, "cloud", "/r/a", 3)
    history_before = peek.history()
    assert await db.create_upload(download_id, "cloud", "/other", 9) == first
    assert peek.history() == history_before
    second = await db.create_upload(download_id, "tg", None, 1, target_type="telegram")
    assert second != first
    uploads = await db.get_uploads_by_download(download_id)
    assert [(u.id, u.upload_target, u.status) for u in uploads] == [
        (first, "cloud", "waiting_download"),
        (second, "tg", "waiting_download"),
    ]
    assert uploads[0].remote_path == "/r/a" and uploads[0].max_retries == 3
    assert await db.get_upload_by_id(first + 100) is None


async def test_release_waiting_uploads(db: Database, hub: EventHub) -> None:
    download_id = await completed_download(db)
    waiting = await db.create_upload(download_id, "cloud", None, 3)
    ready = await db.create_upload(download_id, "other", None, 3, ready=True)
    other_download = await new_http(db, "http://h/b")
    untouched = await db.create_upload(other_download, "cloud", None, 3)
    subscription = hub.subscribe("t")
    assert await db.release_waiting_uploads(download_id) == [waiting]
    assert (await db.get_upload_by_id(waiting)).status == "pending"  # type: ignore[union-attr]
    assert (await db.get_upload_by_id(ready)).status == "pending"  # type: ignore[union-attr]
    assert (await db.get_upload_by_id(untouched)).status == "waiting_download"  # type: ignore[union-attr]
    assert [(e.kind, e.item_id) for e in await drain(subscription)] == [("upload", waiting)]
    assert await db.release_waiting_uploads(download_id) == []


async def test_upload_lifecycle_and_completion_needs_verification(db: Database, peek: Peek) -> None:
    download_id = await completed_download(db)
    upload_id = await db.create_upload(download_id, "cloud", "/r/a.bin", 3, ready=True)
    await db.mark_upload_started(upload_id, 100)
    await db.update_upload_progress(upload_id, 40, 100, 12.5)
    progressing = await db.get_upload_by_id(upload_id)
    assert progressing is not None
    assert (progressing.status, progressing.uploaded_size, progressing.upload_speed) == (
        "uploading",
        40,
        12.5,
    )
    row_before = peek.row("uploads", upload_id)
    history_before = peek.history()
    with pytest.raises(StoreError, match="verified"):
        await db.mark_upload_completed(upload_id)
    assert peek.row("uploads", upload_id) == row_before
    assert peek.history() == history_before
    await db.record_upload_verified(upload_id, 100, "deadbeef")
    await db.mark_upload_completed(upload_id, remote_path="/r/final.bin")
    done = await db.get_upload_by_id(upload_id)
    assert done is not None
    assert (done.status, done.remote_path, done.uploaded_size, done.upload_speed) == (
        "completed",
        "/r/final.bin",
        100,
        0,
    )
    assert (done.verified_size, done.verified_hash) == (100, "deadbeef")
    assert_utc(done.completed_at)


async def test_a_retriable_failure_waits_as_pending_and_a_final_one_is_failed(
    db: Database, hub: EventHub, peek: Peek
) -> None:
    download_id = await completed_download(db)
    upload_id = await db.create_upload(download_id, "cloud", None, 3, ready=True)
    due = "2030-01-01T00:00:00.000+00:00"
    for expected in (1, 2, 3):
        await db.mark_upload_started(upload_id, 100)
        await db.update_upload_progress(upload_id, 40, 100, 12.5)
        subscription = hub.subscribe("retry")
        assert await db.schedule_upload_retry(upload_id, "network", "timeout", "5", due) == expected
        [event] = await drain(subscription)
        subscription.close()
        waiting = await db.get_upload_by_id(upload_id)
        assert waiting is not None and event.data == waiting
        assert (waiting.status, waiting.next_attempt_at, waiting.retry_count) == (
            "pending",
            due,
            expected,
        )
        assert (waiting.failure_reason, waiting.error_message, waiting.error_code) == (
            "network",
            "timeout",
            "5",
        )
        assert waiting.upload_speed == 0
        step = (await db.get_status_history("upload", upload_id))[-1]
        assert (step.from_status, step.to_status) == ("uploading", "pending")
        assert step.reason == "network"
        # Only a running upload can be put back to wait: nothing changes otherwise.
        row_before, history_before = peek.row("uploads", upload_id), peek.history()
        with pytest.raises(TransitionError):
            await db.schedule_upload_retry(upload_id, "network", "again", None, due)
        assert peek.row("uploads", upload_id) == row_before and peek.history() == history_before
    # The last try fails for good: `failed`, and a failed row never has a retry time.
    await db.mark_upload_started(upload_id, 100)
    started = await db.get_upload_by_id(upload_id)
    assert started is not None and started.next_attempt_at is None
    await db.mark_upload_failed(upload_id, "network", "timeout")
    failed = await db.get_upload_by_id(upload_id)
    assert failed is not None
    assert (failed.status, failed.next_attempt_at, failed.retry_count) == ("failed", None, 3)
    with pytest.raises(TransitionError):
        await db.schedule_upload_retry(upload_id, "network", "timeout", None, due)
    # A retry by hand starts again from 0.
    await db.reset_upload_for_retry(upload_id)
    manual = await db.get_upload_by_id(upload_id)
    assert manual is not None and manual.status == "pending" and manual.retry_count == 0
    assert manual.failure_reason is None and manual.next_attempt_at is None
    history = await db.get_status_history("upload", upload_id)
    assert history[-1].reason == "manual retry"
    assert await db.increment_upload_retry(upload_id) == 1
    with pytest.raises(NotFound):
        await db.increment_upload_retry(upload_id + 100)
    with pytest.raises(NotFound):
        await db.schedule_upload_retry(upload_id + 100, "network", "timeout", None, due)


async def test_a_retry_by_hand_or_a_cancel_ends_the_wait_for_an_automatic_retry(
    db: Database,
    peek: Peek,
) -> None:
    download_id = await completed_download(db)
    a = await db.create_upload(download_id, "cloud", None, 3, ready=True)
    b = await db.create_upload(download_id, "other", None, 3, ready=True)
    for upload_id in (a, b):
        await db.mark_upload_started(upload_id, 100)
        await db.schedule_upload_retry(upload_id, "network", "timeout", None, "2030-01-01T00:00Z")
    history_before = len(await db.get_status_history("upload", a))
    await db.reset_upload_for_retry(a)
    now = await db.get_upload_by_id(a)
    assert now is not None
    assert (now.status, now.next_attempt_at, now.retry_count, now.error_message) == (
        "pending",
        None,
        0,
        None,
    )
    assert len(await db.get_status_history("upload", a)) == history_before  # no status change
    # A pending upload that waits for nothing, or a running one, has nothing to retry.
    await db.mark_upload_started(b, 100)
    for upload_id in (a, b):
        row_before = peek.row("uploads", upload_id)
        with pytest.raises(TransitionError):
            await db.reset_upload_for_retry(upload_id)
        assert peek.row("uploads", upload_id) == row_before
    await db.schedule_upload_retry(b, "network", "timeout", None, "2030-01-01T00:00Z")
    await db.mark_upload_cancelled(b, "cancelled by user")
    cancelled = await db.get_upload_by_id(b)
    assert cancelled is not None
    assert (cancelled.status, cancelled.next_attempt_at) == ("cancelled", None)


async def test_update_upload_status_and_queries(db: Database) -> None:
    download_id = await completed_download(db)
    a = await db.create_upload(download_id, "cloud", None, 3, ready=True)
    b = await db.create_upload(download_id, "tg", None, 3, ready=True, target_type="telegram")
    await db.update_upload_status(a, "uploading", total_size=50, reason="by test")
    assert (await db.get_upload_by_id(a)).total_size == 50  # type: ignore[union-attr]
    assert (await db.get_status_history("upload", a))[-1].reason == "by test"
    with pytest.raises(StoreError, match="unknown columns"):
        await db.update_upload_status(a, "paused", retry_count=0)
    with pytest.raises(TransitionError):
        await db.update_upload_status(b, "completed")
    assert [u.id for u in await db.get_pending_uploads()] == [b]
    assert [u.id for u in await db.get_pending_uploads("tg")] == [b]
    assert await db.get_pending_uploads("cloud") == []
    assert [u.id for u in await db.fetch_recent_uploads()] == [b, a]
    assert [u.id for u in await db.fetch_recent_uploads(limit=1)] == [b]
    assert [u.id for u in await db.fetch_recent_uploads(status="uploading")] == [a]
    assert [u.id for u in await db.fetch_recent_uploads(upload_target="tg")] == [b]
    statistics = await db.get_upload_statistics()
    assert statistics["total"] == 2
    assert statistics["by_status"]["uploading"] == 1 and statistics["by_status"]["pending"] == 1
    assert statistics["by_target"] == {"cloud": {"uploading": 1}, "tg": {"pending": 1}}


async def test_mark_upload_cleaned_and_download_cleaned(db: Database, hub: EventHub) -> None:
    download_id = await completed_download(db)
    ids = [await db.create_upload(download_id, name, None, 3) for name in ("a", "b", "c")]
    other = await db.create_upload(await completed_download(db, "http://h/b", "g2"), "a", None, 3)
    await db.mark_upload_cleaned(ids[0])
    first_stamp = (await db.get_upload_by_id(ids[0])).cleaned_at  # type: ignore[union-attr]
    assert_utc(first_stamp)
    subscription = hub.subscribe("t")
    assert await db.mark_download_cleaned_by_id(download_id) == ids[1:]
    events = await drain(subscription)
    assert [(e.kind, e.item_id) for e in events] == [("cleanup", ids[1]), ("cleanup", ids[2])]
    assert all(isinstance(e.data, UploadRow) and e.data.cleaned_at is not None for e in events)
    for upload in await db.get_uploads_by_download(download_id):
        assert_utc(upload.cleaned_at)
    assert (await db.get_upload_by_id(ids[0])).cleaned_at == first_stamp  # type: ignore[union-attr]
    assert (await db.get_upload_by_id(other)).cleaned_at is None  # type: ignore[union-attr]
    assert await db.mark_download_cleaned_by_id(download_id) == []
    assert (await db.get_upload_statistics())["cleaned"] == 3


# --- conditional repairs (apply_download_changes) ---------------------------------------------


async def test_apply_download_changes_checks_each_row_then_writes_through_the_machine(
    db: Database, hub: EventHub, peek: Peek
) -> None:
    late = await new_http(db, "http://h/late")
    await db.mark_download_queued_by_id(late, "g-late")  # waiting, while aria2 finished it
    moved = await new_downloading(db, "http://h/moved", "g-moved")
    await db.mark_download_paused("g-moved")
    magnet = await new_downloading(db, "http://h/magnet", "g-meta")
    damaged = await completed_download(db, "http://h/damaged", "g-damaged")
    waiting, pending, running = [
        await db.create_upload(damaged, name, None, 3, ready=name != "waiting")
        for name in ("waiting", "pending", "running")
    ]
    await db.mark_upload_started(running, 100)
    history_before = len(peek.history())
    subscription = hub.subscribe("t")
    disk = DownloadChange(
        damaged,
        "completed",
        "g-damaged",
        "repair: file_missing",
        columns={"error_code": "file_missing", "error_message": "a.bin is not there"},
        cancel_unstarted_uploads=True,
        skip_if_error_code_in=frozenset({"file_missing"}),
    )
    outcomes = await db.apply_download_changes(
        [
            DownloadChange(
                late,
                "waiting",
                "g-late",
                "repair: finished",
                target="completed",
                columns={"local_path": "/data/late.bin", "total_length": 7, "download_speed": 0},
            ),
            DownloadChange(moved, "downloading", "g-moved", "repair", target="completed"),
            DownloadChange(moved, "paused", "someone-else", "repair", target="downloading"),
            DownloadChange(magnet + 100, "downloading", None, "repair", target="failed"),
            DownloadChange(magnet, "downloading", "g-meta", "followed g-meta", new_gid="g-real"),
            DownloadChange(damaged, "completed", "g-damaged", "repair", target="failed"),
            disk,
        ]
    )
    assert outcomes == [
        ChangeOutcome(late, True, "waiting → downloading → completed"),
        ChangeOutcome(moved, False, "left alone: it changed since the check (now paused)"),
        ChangeOutcome(moved, False, "left alone: it changed since the check (now paused)"),
        ChangeOutcome(magnet + 100, False, "left alone: the download no longer exists"),
        ChangeOutcome(magnet, True, "gid g-meta → g-real"),
        ChangeOutcome(damaged, False, "left alone: the status machine forbids completed → failed"),
        ChangeOutcome(
            damaged,
            True,
            "recorded on the row: error_code, error_message; 2 upload(s) not started cancelled",
        ),
    ]
    finished = await db.get_download_by_id(late)
    assert finished is not None
    assert (finished.status, finished.local_path, finished.total_length) == (
        "completed",
        "/data/late.bin",
        7,
    )
    assert_utc(finished.started_at)
    assert_utc(finished.completed_at)
    assert [(h.from_status, h.to_status, h.reason) for h in history_rows_of(peek, late)][-2:] == [
        ("waiting", "downloading", "repair: finished"),
        ("downloading", "completed", "repair: finished"),
    ]
    assert (await db.get_download_by_id(moved)).status == "paused"  # type: ignore[union-attr]
    assert await db.get_download_id_by_gid("g-real") == magnet
    assert await db.get_download_id_by_gid("g-meta") == magnet
    marked = await db.get_download_by_id(damaged)
    assert marked is not None and marked.status == "completed"
    assert (marked.error_code, marked.error_message) == ("file_missing", "a.bin is not there")
    statuses = {u.id: u.status for u in await db.get_uploads_by_download(damaged)}
    assert statuses == {waiting: "cancelled", pending: "cancelled", running: "uploading"}
    # 2 steps for `late`, 2 upload cancellations; nothing for the rows left alone
    assert len(peek.history()) == history_before + 4
    events = await drain(subscription)
    assert [(e.kind, e.item_id) for e in events] == [
        ("download", late),
        ("download", magnet),
        ("upload", waiting),
        ("upload", pending),
        ("download", damaged),
    ]
    assert snapshot_of(events[-1]).row == marked
    assert [u.status for u in snapshot_of(events[-1]).uploads] == [
        "cancelled",
        "cancelled",
        "uploading",
    ]
    # already recorded: the same disk repair again is left alone
    assert await db.apply_download_changes([disk]) == [
        ChangeOutcome(damaged, False, "left alone: already recorded (file_missing)")
    ]
    assert await db.apply_download_changes([]) == []


async def test_apply_download_changes_is_one_transaction(
    db: Database, hub: EventHub, store_backend: StoreBackend, peek: Peek
) -> None:
    first = await new_downloading(db, "http://h/a", "g1")
    second = await new_downloading(db, "http://h/b", "g2")
    before = [peek.row("downloads", first), peek.row("downloads", second)]
    history_before = peek.history()
    subscription = hub.subscribe("t")
    with pytest.raises(store_backend.undefined_column):
        await db.apply_download_changes(
            [
                DownloadChange(first, "downloading", "g1", "repair", target="paused"),
                DownloadChange(
                    second, "downloading", "g2", "repair", columns={"no_such_column": 1}
                ),
            ]
        )
    assert [peek.row("downloads", first), peek.row("downloads", second)] == before
    assert peek.history() == history_before
    assert await drain(subscription) == []


# --- check_and_update_download_status_if_file_exists -------------------------------------------


async def uploading(db: Database) -> int:
    download_id = await completed_download(db)
    upload_id = await db.create_upload(download_id, "cloud", None, 3, ready=True)
    await db.mark_upload_started(upload_id, 100)
    return upload_id


async def test_file_present_changes_nothing(db: Database, tmp_path: Path, peek: Peek) -> None:
    upload_id = await uploading(db)
    present = tmp_path / "present.bin"
    present.write_bytes(b"x")
    row_before = peek.row("uploads", upload_id)
    history_before = peek.history()
    found = await db.check_and_update_download_status_if_file_exists(
        upload_id, present, exists=True
    )
    assert found is True
    assert peek.row("uploads", upload_id) == row_before
    assert peek.history() == history_before


async def test_file_gone_and_verified_completes(db: Database, tmp_path: Path) -> None:
    upload_id = await uploading(db)
    await db.record_upload_verified(upload_id, 100, None)
    gone = tmp_path / "gone.bin"
    assert (
        await db.check_and_update_download_status_if_file_exists(upload_id, gone, exists=False)
        is False
    )
    upload = await db.get_upload_by_id(upload_id)
    assert upload is not None and upload.status == "completed"


async def test_file_gone_and_not_verified_fails(db: Database, tmp_path: Path) -> None:
    upload_id = await uploading(db)
    gone = str(tmp_path / "gone.bin")
    assert (
        await db.check_and_update_download_status_if_file_exists(upload_id, gone, exists=False)
        is False
    )
    upload = await db.get_upload_by_id(upload_id)
    assert upload is not None and upload.status == "failed"
    assert upload.failure_reason == "local_file_missing"
    with pytest.raises(NotFound):
        await db.check_and_update_download_status_if_file_exists(
            upload_id + 100, gone, exists=False
        )


async def test_file_gone_pending_upload_fails(db: Database, tmp_path: Path) -> None:
    download_id = await completed_download(db)
    upload_id = await db.create_upload(download_id, "cloud", None, 3, ready=True)
    gone = tmp_path / "gone.bin"
    assert (
        await db.check_and_update_download_status_if_file_exists(upload_id, gone, exists=False)
        is False
    )
    upload = await db.get_upload_by_id(upload_id)
    assert upload is not None and upload.status == "failed"
    assert upload.failure_reason == "local_file_missing"


@pytest.mark.parametrize("status", ["waiting_download", "paused"])
async def test_file_gone_waiting_or_paused_upload_fails(
    db: Database, tmp_path: Path, status: str
) -> None:
    download_id = await completed_download(db)
    upload_id = await db.create_upload(download_id, "cloud", None, 3, ready=status == "paused")
    if status == "paused":
        await db.mark_upload_started(upload_id, 100)
        await db.update_upload_status(upload_id, "paused")
    assert (await db.get_upload_by_id(upload_id)).status == status  # type: ignore[union-attr]
    gone = tmp_path / "gone.bin"
    assert (
        await db.check_and_update_download_status_if_file_exists(upload_id, gone, exists=False)
        is False
    )
    upload = await db.get_upload_by_id(upload_id)
    assert upload is not None and upload.status == "failed"
    assert upload.failure_reason == "local_file_missing"


# --- deletion ----------------------------------------------------------------------------------


async def test_delete_download_record_cascades(db: Database, hub: EventHub) -> None:
    download_id = await completed_download(db)
    await db.create_upload(download_id, "cloud", None, 3)
    keep = await completed_download(db, "http://h/b", "g2")
    kept_upload = await db.create_upload(keep, "cloud", None, 3)
    subscription = hub.subscribe("t")
    deleted = await db.delete_download_record(download_id)
    assert deleted.id == download_id
    assert await db.get_download_by_id(download_id) is None
    assert await db.get_uploads_by_download(download_id) == []
    assert await db.get_download_id_by_gid("g1") is None
    assert [u.id for u in await db.get_uploads_by_download(keep)] == [kept_upload]
    assert [(e.kind, e.item_id, e.data) for e in await drain(subscription)] == [
        ("download", download_id, DownloadRemoved(download_id))
    ]
    with pytest.raises(NotFound):
        await db.delete_download_record(download_id)


async def download_at(db: Database, local_path: str, key: str) -> int:
    download_id = await new_downloading(db, key, f"gid-{key}")
    await db.mark_download_completed(f"gid-{key}", local_path, 1)
    return download_id


async def test_deleting_records_leaves_files_to_the_caller(
    db: Database, download_dir: Path
) -> None:
    """The store deletes rows only; the caller removes files (confined) from what it returns."""
    inside = download_dir / "a.bin"
    inside.write_bytes(b"data")
    (download_dir / "a.bin.aria2").write_bytes(b"control")
    relative = download_dir / "b.bin"
    relative.write_bytes(b"data")
    download_id = await download_at(db, str(inside), "a")
    other = await download_at(db, "b.bin", "b")
    deleted = await db.delete_download_record(download_id)
    assert deleted.local_path == str(inside) and inside.exists()
    assert await DownloadFiles(download_dir).remove(str(deleted.local_path), job=deleted.id)
    assert not inside.exists() and not (download_dir / "a.bin.aria2").exists()
    assert await asyncio.to_thread(download_dir.is_dir)
    assert [(r.id, r.local_path) for r in await db.delete_all_downloads()] == [(other, "b.bin")]
    assert relative.exists()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "absolute-dotdot", "symlink", "symlinkdir"])
async def test_deleted_record_file_never_removed_outside_download_dir(
    db: Database, download_dir: Path, tmp_path: Path, how: str
) -> None:
    outside_dir = tmp_path / "outside"
    outside_dir.mkdir()
    secret = outside_dir / "secret.bin"
    secret.write_bytes(b"precious")
    local_path = {
        "absolute": str(secret),
        "dotdot": "../outside/secret.bin",
        "absolute-dotdot": str(download_dir / ".." / "outside" / "secret.bin"),
        "symlink": str(download_dir / "link.bin"),
        "symlinkdir": str(download_dir / "linkdir" / "secret.bin"),
    }[how]
    if how == "symlink":
        (download_dir / "link.bin").symlink_to(secret)
    if how == "symlinkdir":
        (download_dir / "linkdir").symlink_to(outside_dir, target_is_directory=True)
    download_id = await download_at(db, local_path, how)
    deleted = await db.delete_download_record(download_id)
    assert await db.get_download_by_id(download_id) is None
    assert deleted.local_path == local_path
    assert await DownloadFiles(download_dir).remove(local_path, job=download_id) is False
    assert secret.read_bytes() == b"precious"
    assert outside_dir.is_dir()


async def test_delete_all_downloads_returns_every_row(
    db: Database, hub: EventHub, download_dir: Path, tmp_path: Path, peek: Peek
) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"precious")
    inside = download_dir / "in.bin"
    inside.write_bytes(b"x")
    first = await download_at(db, str(secret), "a")
    second = await download_at(db, str(inside), "b")
    third = await db.create_download(
        NewDownload(source_type="telegram", source_key="tg:U1", file_unique_id="U1"), media("U1")
    )
    subscription = hub.subscribe("t")
    deleted = await db.delete_all_downloads()
    assert [row.id for row in deleted] == [first, second, third]
    assert peek.count("downloads") == 0 and peek.count("tg_media") == 0
    assert [(e.kind, e.item_id, e.data) for e in await drain(subscription)] == [
        ("download", None, DownloadRemoved(None))
    ]
    files = DownloadFiles(download_dir)
    removed = [await files.remove(str(row.local_path), job=row.id) for row in deleted[:2]]
    assert removed == [False, True]
    assert secret.exists() and not inside.exists()
    assert await asyncio.to_thread(download_dir.is_dir)
    assert await db.delete_all_downloads() == []


def test_remove_confined_removes_emptied_parents_not_root(tmp_path: Path) -> None:
    root = tmp_path / "dl"
    deep = root / "torrent" / "season" / "ep1.mkv"
    deep.parent.mkdir(parents=True)
    deep.write_bytes(b"x")
    sibling = root / "other" / "keep.bin"
    sibling.parent.mkdir()
    sibling.write_bytes(b"x")
    assert remove_confined(root, deep) is True
    assert not (root / "torrent").exists()
    assert root.is_dir() and sibling.exists()
    # a torrent folder given as a whole is removed with its content
    folder = root / "album"
    (folder / "cd1").mkdir(parents=True)
    (folder / "cd1" / "t1.flac").write_bytes(b"x")
    assert remove_confined(root, "album") is True
    assert not folder.exists() and root.is_dir()
    # a parent that still holds something stays
    shared = root / "shared"
    shared.mkdir()
    (shared / "a").write_bytes(b"x")
    (shared / "b").write_bytes(b"x")
    assert remove_confined(root, shared / "a") is True
    assert (shared / "b").exists()
    # the root itself and anything outside are refused
    assert remove_confined(root, root) is False
    assert remove_confined(root, ".") is False
    assert remove_confined(root, tmp_path) is False
    assert remove_confined(root, "missing.bin") is False
    assert root.is_dir() and sibling.exists()


# --- grouping and statistics -------------------------------------------------------------------


async def test_fetch_downloads_grouped_album_and_single_jobs(db: Database) -> None:
    first = await new_http(db, "http://h/first")
    album_ids = []
    for index, unique in enumerate(("A1", "A2")):
        album_ids.append(
            await db.create_download(
                NewDownload(
                    source_type="telegram",
                    source_key=f"tg:{unique}",
                    file_unique_id=unique,
                    group_key="album:100:555",
                ),
                media(unique, media_group_id="555", message_id=10 + index),
            )
        )
    middle = await new_http(db, "http://h/middle")
    album_ids.append(
        await db.create_download(
            NewDownload(
                source_type="telegram",
                source_key="tg:A3",
                file_unique_id="A3",
                group_key="album:100:555",
            ),
            media("A3", media_group_id="555", message_id=12),
        )
    )
    groups = await db.fetch_downloads_grouped(limit=10)
    assert [[d.id for d in g.downloads] for g in groups] == [album_ids, [middle], [first]]
    album = groups[0]
    assert album.group_key == "album:100:555" and album.media_group_id == "555"
    assert album.source_type == "telegram"
    assert groups[1].media_group_id is None and groups[1].source_type == "http"
    limited = await db.fetch_downloads_grouped(limit=2)
    assert [[d.id for d in g.downloads] for g in limited] == [album_ids, [middle]]
    assert len(await db.fetch_downloads_grouped(limit=1)) == 1
    # the 3 newest rows hold only 2 groups: the third is found further down
    three = await db.fetch_downloads_grouped(limit=3)
    assert [[d.id for d in g.downloads] for g in three] == [album_ids, [middle], [first]]
    assert await db.fetch_downloads_grouped(limit=-1) == groups
    assert await db.fetch_downloads_grouped(limit=0) == []
    await db.mark_download_failed_by_id(first, "x")
    failed_only = await db.fetch_downloads_grouped(limit=10, status="failed")
    assert [[d.id for d in g.downloads] for g in failed_only] == [[first]]


async def test_fetch_recent_downloads(db: Database) -> None:
    a = await new_http(db, "http://h/a", owner_id=1)
    b = await new_http(db, "http://h/b", owner_id=2)
    c = await new_http(db, "http://h/c", owner_id=1)
    await db.mark_download_failed_by_id(b, "x")
    assert [r.id for r in await db.fetch_recent_downloads()] == [c, b, a]
    assert [r.id for r in await db.fetch_recent_downloads(2)] == [c, b]
    assert [r.id for r in await db.fetch_recent_downloads(status="failed")] == [b]
    assert [r.id for r in await db.fetch_recent_downloads(owner_id=1)] == [c, a]


async def test_download_statistics_count_by_status(db: Database) -> None:
    await new_http(db, "http://h/pending")
    await completed_download(db, "http://h/done", "g-done")
    failed = await new_http(db, "http://h/failed")
    await db.mark_download_failed_by_id(failed, "x")
    cancelled = await new_http(db, "http://h/cancelled")
    await db.mark_download_cancelled_by_id(cancelled)
    await new_downloading(db, "http://h/running", "g-run")
    await db.update_download_progress("g-run", 5, 500, 42)
    statistics = await db.get_download_statistics()
    assert statistics["total"] == 5
    assert statistics["by_status"] == {
        "pending": 1,
        "waiting": 0,
        "downloading": 1,
        "paused": 0,
        "completed": 1,
        "failed": 1,
        "cancelled": 1,
    }
    assert statistics["completed_bytes"] == 100
    assert statistics["download_speed"] == 42
    both = await db.get_statistics()
    assert both["downloads"] == statistics and both["uploads"]["total"] == 0


async def test_one_owners_statistics_and_uploads_count_only_their_jobs(db: Database) -> None:
    mine = await new_http(db, "http://h/mine", owner_id=7, total_length=100)
    theirs = await new_http(db, "http://h/theirs", owner_id=8, total_length=900)
    nobodys = await new_http(db, "http://h/nobody", total_length=50)
    await db.mark_download_failed_by_id(mine, "x")
    own_upload = await db.create_upload(mine, "cloud", None, 3, ready=True)
    await db.update_upload_status(own_upload, "uploading", total_size=100)
    other_upload = await db.create_upload(theirs, "cloud", None, 3, ready=True)
    await db.create_upload(nobodys, "tg", None, 3, ready=True)
    own = await db.get_statistics(owner_id=7)
    assert own["downloads"]["total"] == 1 and own["downloads"]["by_status"]["failed"] == 1
    assert own["downloads"]["total_bytes"] == 100
    assert own["uploads"]["total"] == 1 and own["uploads"]["by_target"] == {
        "cloud": {"uploading": 1}
    }
    assert own == {
        "downloads": await db.get_download_statistics(7),
        "uploads": await db.get_upload_statistics(7),
    }
    # A user with no job has zeros; everyone's totals stay the running totals.
    assert (await db.get_statistics(owner_id=9))["downloads"]["total"] == 0
    assert (await db.get_statistics())["downloads"]["total"] == 3
    assert (await db.get_upload_statistics())["total"] == 3
    assert [u.id for u in await db.fetch_recent_uploads(owner_id=7)] == [own_upload]
    assert [u.id for u in await db.fetch_recent_uploads(owner_id=8)] == [other_upload]
    assert await db.fetch_recent_uploads(owner_id=8, status="uploading") == []
    assert await db.fetch_recent_uploads(owner_id=9) == []


async def test_config_settings(db: Database) -> None:
    assert await db.get_all_configs() == {}
    await db.init_config_from_yaml({"web.port": "8080", "web.token": "***"})
    assert await db.get_config("web.port") == "8080"
    assert await db.get_config("missing") is None
    assert await db.get_all_configs() == {"web.port": "8080", "web.token": "***"}
    await db.init_config_from_yaml({"aria2.port": "6800"})
    assert await db.get_all_configs() == {"aria2.port": "6800"}


# --- backup and concurrency --------------------------------------------------------------------


async def test_sqlite_file_backup_while_another_coroutine_writes(
    sqlite_db: Database, tmp_path: Path
) -> None:
    db = sqlite_db
    for index in range(20):
        await new_http(db, f"http://h/before-{index}")
    stop = asyncio.Event()
    written: list[int] = []

    async def keep_writing() -> None:
        index = 0
        while not stop.is_set() and index < 5000:
            written.append(await new_http(db, f"http://h/during-{index}"))
            index += 1

    writer = asyncio.create_task(keep_writing())
    try:
        await asyncio.sleep(0.05)
        target = tmp_path / "backups" / "copy.db"
        await db.backup(target)
        await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait_for(writer, 10)
    assert len(written) > 0
    assert not target.with_name(target.name + ".partial").exists()
    assert fetch(target, "PRAGMA integrity_check") == [("ok",)]
    assert fetch(target, "PRAGMA application_id")[0][0] == APPLICATION_ID
    async with Database(target) as copy:
        assert await copy.schema_version() == SCHEMA_VERSION
        copied = await copy.fetch_recent_downloads(limit=-1)
    live = {r.id: r for r in await db.fetch_recent_downloads(limit=-1)}
    assert len(copied) >= 20
    assert len(copied) <= len(live)
    copied_ids = sorted(r.id for r in copied)
    # a consistent snapshot: a prefix of the ids, each row as it is in the live file
    assert copied_ids == sorted(live)[: len(copied_ids)]
    for row in copied:
        assert row == live[row.id]


def hold_write_lock(
    backend: StoreBackend, locked: threading.Event, seconds: float, committed: threading.Event
) -> None:
    """Another process's write transaction, holding for `seconds` the lock that the store's
    writes need (SQLite: the file's write lock; PostgreSQL: a lock on the downloads table), with
    a config row of its own committed at the end."""
    other = (
        "INSERT INTO config_settings (key, value, updated_at) VALUES"
        " ('other.process', 'yes', '2026-01-01T00:00:00+00:00')"
    )
    if isinstance(backend.location, PostgresLocation):
        dsn = backend.location.dsn

        async def hold() -> None:
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE downloads IN EXCLUSIVE MODE")
                    await conn.execute(other)
                    locked.set()
                    await asyncio.sleep(seconds)
            finally:
                await conn.close()

        asyncio.run(hold())
    else:
        conn = sqlite3.connect(backend.location, isolation_level=None, timeout=10)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(other)
            locked.set()
            time.sleep(seconds)
            conn.execute("COMMIT")
        finally:
            conn.close()
    committed.set()


async def test_write_waits_for_another_process_lock_then_succeeds(
    db: Database, store_backend: StoreBackend
) -> None:
    locked = threading.Event()
    committed = threading.Event()
    holder = asyncio.create_task(
        asyncio.to_thread(hold_write_lock, store_backend, locked, 2, committed)
    )
    try:
        assert await asyncio.to_thread(locked.wait, 10)
        # readers are not blocked by the writer (WAL mode; PostgreSQL's snapshots)
        assert await db.get_all_configs() == {}
        assert not committed.is_set()
        started = time.monotonic()
        download_id = await new_http(db, "http://h/after-lock")
        elapsed = time.monotonic() - started
        # it waited for the other transaction (held 2 s) to commit
        assert await asyncio.to_thread(committed.wait, 5)
        assert 1.0 < elapsed < 12
    finally:
        await asyncio.wait_for(holder, 15)
    assert await db.get_config("other.process") == "yes"
    assert (await db.get_download_by_id(download_id)).status == "pending"  # type: ignore[union-attr]


async def test_cancelled_write_waiting_for_lock_leaves_store_usable(
    db: Database, store_backend: StoreBackend
) -> None:
    locked = threading.Event()
    holder = asyncio.create_task(
        asyncio.to_thread(hold_write_lock, store_backend, locked, 1.5, threading.Event())
    )
    try:
        assert await asyncio.to_thread(locked.wait, 10)
        waiting_write = asyncio.create_task(new_http(db, "http://h/cancelled"))
        await asyncio.sleep(0.3)
        waiting_write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting_write
    finally:
        await asyncio.wait_for(holder, 15)
    download_id = await asyncio.wait_for(new_http(db, "http://h/next"), 15)
    assert (await db.get_download_by_id(download_id)).status == "pending"  # type: ignore[union-attr]
    assert [r.source_key for r in await db.fetch_recent_downloads()] == ["http://h/next"]


async def test_the_store_works_again_once_postgresql_is_back(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with Database(PostgresLocation(postgres_url, postgres_url)) as db:
        before = await new_http(db, "http://h/before")
        await asyncio.to_thread(postgres_server.stop)
        with pytest.raises((*DRIVER_ERRORS, OSError)):
            await new_http(db, "http://h/while-down")
        await asyncio.to_thread(postgres_server.start)
        # The pool dropped the connections the server closed and opens new ones.
        after = await new_http(db, "http://h/after")
        assert [r.id for r in await db.fetch_recent_downloads()] == [after, before]
