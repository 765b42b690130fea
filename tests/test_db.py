"""The store (db.py) against real SQLite files: schema, every seed function, transactions, gids,
batched progress, the status machines' refusals, uploads, safe deletion, grouping, backup, locks."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from db import (
    _MIGRATIONS,
    ACTIVE_DOWNLOAD_STATUSES,
    APPLICATION_ID,
    DOWNLOAD_TRANSITIONS,
    SCHEMA_VERSION,
    Database,
    DuplicateDownload,
    NotFound,
    StoreError,
    TransitionError,
    inspect_database_file,
)
from events import Event, EventHub, EventKind, Subscription
from files import DownloadFiles, remove_confined
from records import (
    ChangeOutcome,
    DownloadChange,
    DownloadRemoved,
    DownloadSnapshot,
    EventData,
    HistoryEntry,
    NewDownload,
    ProgressUpdate,
    TgMediaRecord,
    UploadRow,
)

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
async def db(tmp_path: Path, hub: EventHub) -> AsyncIterator[Database]:
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


def download_row(db: Database, download_id: int) -> tuple[Any, ...]:
    rows = fetch(db.path, "SELECT * FROM downloads WHERE id = ?", (download_id,))
    assert len(rows) == 1
    return rows[0]


def upload_row(db: Database, upload_id: int) -> tuple[Any, ...]:
    rows = fetch(db.path, "SELECT * FROM uploads WHERE id = ?", (upload_id,))
    assert len(rows) == 1
    return rows[0]


def history_rows(db: Database) -> list[tuple[Any, ...]]:
    return fetch(db.path, "SELECT * FROM status_history ORDER BY id")


def history_rows_of(db: Database, download_id: int) -> list[HistoryEntry]:
    rows = fetch(
        db.path,
        "SELECT entity, entity_id, from_status, to_status, reason, at FROM status_history"
        " WHERE entity = 'download' AND entity_id = ? ORDER BY id",
        (download_id,),
    )
    return [HistoryEntry(*row) for row in rows]


def table_count(db: Database, table: str) -> int:
    return int(fetch(db.path, f"SELECT COUNT(*) FROM {table}")[0][0])


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
        )


def assert_utc(stamp: str | None) -> None:
    assert stamp is not None
    parsed = datetime.fromisoformat(stamp)
    assert parsed.tzinfo is not None
    assert parsed.utcoffset() == timedelta(0)
    assert stamp.endswith("+00:00")


# --- schema and lifecycle ----------------------------------------------------------------------


async def test_pragmas_wal_foreign_keys_busy_timeout(db: Database) -> None:
    assert fetch(db.path, "PRAGMA journal_mode")[0][0] == "wal"
    assert db._writer is not None and db._reader is not None
    for conn in (db._writer, db._reader):
        foreign_keys = next(iter(await conn.execute_fetchall("PRAGMA foreign_keys")))
        busy_timeout = next(iter(await conn.execute_fetchall("PRAGMA busy_timeout")))
        assert foreign_keys[0] == 1
        assert busy_timeout[0] >= 1000
    # foreign keys really are enforced on the writer
    with pytest.raises(sqlite3.IntegrityError):
        await db.create_upload(9999, "cloud", None, 3)


async def test_schema_version_and_application_id(db: Database) -> None:
    assert await db.schema_version() == SCHEMA_VERSION
    assert fetch(db.path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION
    assert fetch(db.path, "PRAGMA application_id")[0][0] == APPLICATION_ID
    tables = {r[0] for r in fetch(db.path, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"tg_media", "downloads", "download_gids", "uploads", "status_history"} <= tables
    assert "config_settings" in tables


async def test_reopening_a_migrated_file_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    async with Database(path) as first:
        download_id = await new_http(first, "http://h/a")
    schema_before = fetch(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
    history_before = fetch(path, "SELECT * FROM status_history")
    async with Database(path) as second:
        assert await second.schema_version() == SCHEMA_VERSION
        row = await second.get_download_by_id(download_id)
        assert row is not None and row.source_key == "http://h/a"
    assert fetch(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == schema_before
    assert fetch(path, "SELECT * FROM status_history") == history_before
    assert fetch(path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION


async def test_newer_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    async with Database(path):
        pass
    with raw(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    database = Database(path)
    try:
        with pytest.raises(StoreError, match="newer"):
            await database.open()
    finally:
        await database.close()
    assert fetch(path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION + 1


def make_v1_database(path: Path) -> None:
    """A schema 1 file as that MistRelay left it: one upload waiting for an automatic retry
    (`failed` with next_attempt_at), one failed for good, one running."""
    stamp = "2026-01-01T00:00:00.000+00:00"
    with raw(path) as conn:
        conn.executescript(_MIGRATIONS[1])
        conn.execute("PRAGMA user_version = 1")
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(
            "INSERT INTO downloads (id, source_type, source_key, status, group_key, created_at,"
            " updated_at) VALUES (1, 'http', 'http://h/a', 'completed', 'g', ?, ?)",
            (stamp, stamp),
        )
        conn.executemany(
            "INSERT INTO uploads (id, download_id, upload_target, target_type, status,"
            " retry_count, failure_reason, error_message, next_attempt_at, created_at, updated_at)"
            " VALUES (?, 1, ?, 'rclone', ?, ?, 'network', 'timeout', ?, ?, ?)",
            [
                (1, "waits", "failed", 1, "2026-01-01T00:00:08.000+00:00", stamp, stamp),
                (2, "final", "failed", 3, None, stamp, stamp),
                (3, "runs", "uploading", 0, None, stamp, stamp),
            ],
        )
        conn.execute(
            "INSERT INTO status_history (entity, entity_id, from_status, to_status, reason, at)"
            " VALUES ('upload', 1, 'uploading', 'failed', 'network', ?)",
            (stamp,),
        )
        conn.commit()
    assert inspect_database_file(path) == 1


async def test_schema_2_turns_a_scheduled_retry_of_schema_1_into_a_waiting_pending_row(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v1.db"
    make_v1_database(path)
    untouched = fetch(path, "SELECT * FROM uploads WHERE id IN (2, 3) ORDER BY id")
    async with Database(path) as db:
        assert await db.schema_version() == SCHEMA_VERSION == 2
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
    assert fetch(path, "SELECT * FROM uploads WHERE id IN (2, 3) ORDER BY id") == untouched
    assert fetch(path, "PRAGMA user_version")[0][0] == SCHEMA_VERSION


def make_foreign_db(path: Path, user_version: int) -> None:
    with raw(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('keep me')")
        conn.execute(f"PRAGMA user_version = {user_version}")
        conn.commit()


async def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    make_foreign_db(path, 1)
    database = Database(path)
    try:
        with pytest.raises(StoreError, match="not a MistRelay database"):
            await database.open()
    finally:
        await database.close()
    assert fetch(path, "SELECT body FROM notes") == [("keep me",)]
    names = {r[0] for r in fetch(path, "SELECT name FROM sqlite_master")}
    assert "downloads" not in names


async def test_foreign_sqlite_file_with_high_user_version_is_called_foreign(
    tmp_path: Path,
) -> None:
    path = tmp_path / "other.db"
    make_foreign_db(path, 7)
    database = Database(path)
    try:
        with pytest.raises(StoreError, match="not a MistRelay database"):
            await database.open()
    finally:
        await database.close()


async def test_refused_foreign_file_is_left_unmodified(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    make_foreign_db(path, 1)
    header_before = path.read_bytes()[:100]
    database = Database(path)
    try:
        with pytest.raises(StoreError):
            await database.open()
    finally:
        await database.close()
    # bytes 18-19 of the header are the read/write format versions: 1 = rollback journal, 2 = WAL
    assert path.read_bytes()[18:20] == header_before[18:20]


async def test_refused_open_releases_its_connection(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    make_foreign_db(path, 1)
    before = set(threading.enumerate())
    database = Database(path)
    try:
        with pytest.raises(StoreError):
            await database.open()
        started = set(threading.enumerate()) - before
        for thread in started:
            await asyncio.to_thread(thread.join, 2)
        assert not [t for t in started if t.is_alive()]
    finally:
        await database.close()


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


async def test_save_tg_media_inserts_then_updates(db: Database) -> None:
    assert await db.save_tg_media(media("U1", caption="first")) == "U1"
    assert await db.save_tg_media(media("U1", caption="second")) == "U1"
    assert table_count(db, "tg_media") == 1
    stored = await db.get_tg_media("U1")
    assert stored is not None and stored.caption == "second" and stored.file_id == "file-U1"
    assert await db.get_tg_media("nope") is None


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


async def test_create_download_failure_leaves_neither_row(db: Database) -> None:
    class SlipsPastTheCheck(str):
        """Compares equal to every known source type, but SQLite stores its real text."""

        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    invalid = NewDownload(
        source_type=SlipsPastTheCheck("carrier-pigeon"),  # type: ignore[arg-type]
        source_key="tg:U1",
        file_unique_id="U1",
    )
    history_before = history_rows(db)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        await db.create_download(invalid, media("U1"))
    assert table_count(db, "downloads") == 0
    assert table_count(db, "tg_media") == 0
    assert history_rows(db) == history_before


async def test_duplicate_create_download_leaves_neither_row(db: Database) -> None:
    first = await db.create_download(
        NewDownload(source_type="telegram", source_key="tg:same", file_unique_id="U1"),
        media("U1", caption="original"),
    )
    history_before = history_rows(db)
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
    assert table_count(db, "downloads") == 1
    assert await db.get_tg_media("U2") is None
    stored = await db.get_tg_media("U1")
    assert stored is not None and stored.caption == "original"
    assert history_rows(db) == history_before


@pytest.mark.parametrize("active", ["pending", "waiting", "downloading", "paused"])
async def test_duplicate_refused_while_active(db: Database, active: str) -> None:
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
    assert table_count(db, "downloads") == 1


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


async def test_retry_while_same_source_is_active_raises_duplicate(db: Database) -> None:
    old = await new_http(db, "http://h/a")
    await db.mark_download_failed_by_id(old, "boom")
    newer = await new_http(db, "http://h/a")
    row_before = download_row(db, old)
    with pytest.raises(DuplicateDownload) as caught:
        await db.reset_download_for_retry(old)
    assert caught.value.existing_id == newer
    assert download_row(db, old) == row_before


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


async def test_a_gid_cannot_belong_to_two_downloads(db: Database) -> None:
    first = await new_http(db, "http://h/a")
    second = await new_http(db, "http://h/b")
    await db.mark_download_queued_by_id(first, "shared")
    row_before = download_row(db, second)
    history_before = history_rows(db)
    with pytest.raises(StoreError):
        await db.mark_download_queued_by_id(second, "shared")
    assert download_row(db, second) == row_before
    assert history_rows(db) == history_before
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

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.visible: list[bool] = []
        self._conn: sqlite3.Connection | None = None

    def publish_many(self, items: Iterable[tuple[EventKind, EventData, int | None]]) -> None:
        batch = list(items)
        for _kind, data, item_id in batch:
            if isinstance(data, DownloadSnapshot) and item_id is not None:
                if self._conn is None:
                    self._conn = sqlite3.connect(self.path)
                row = self._conn.execute(
                    "SELECT completed_length FROM downloads WHERE id = ?", (item_id,)
                ).fetchone()
                self.visible.append(row is not None and row[0] == data.row.completed_length)
        super().publish_many(batch)

    def close_reader(self) -> None:
        if self._conn is not None:
            self._conn.close()


async def test_update_progress_batch_1000_rows(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    hub = CommitCheckingHub(path)
    try:
        async with Database(path, hub=hub) as db:
            await seed_active_downloads(db, 1000)
            # rows in final states and unknown gids are ignored
            async with db._write() as tx:
                await tx.execute(
                    "UPDATE downloads SET status = 'completed'"
                    " WHERE gid IN ('gid-0000', 'gid-0001')"
                )
                await tx.execute("UPDATE downloads SET status = 'failed' WHERE gid = 'gid-0002'")
            final_before = fetch(path, "SELECT * FROM downloads WHERE id <= 3 ORDER BY id")
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
            assert fetch(path, "SELECT * FROM downloads WHERE id <= 3 ORDER BY id") == final_before
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
        hub.close_reader()
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


# --- download transitions ----------------------------------------------------------------------


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
    db: Database, hub: EventHub, current: str, target: str
) -> None:
    assert target not in DOWNLOAD_TRANSITIONS[current]
    download_id, gid = await put_download_in(db, current)
    row_before = download_row(db, download_id)
    history_before = history_rows(db)
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
    assert download_row(db, download_id) == row_before
    assert history_rows(db) == history_before
    assert await drain(subscription) == []


async def test_repeating_current_status_is_a_no_op(db: Database) -> None:
    download_id = await new_downloading(db, "http://h/a", "g1")
    row_before = download_row(db, download_id)
    history_before = history_rows(db)
    assert await db.mark_download_started("g1") == download_id
    assert download_row(db, download_id) == row_before
    assert history_rows(db) == history_before
    await db.mark_download_paused("g1")
    paused_before = download_row(db, download_id)
    history_before = history_rows(db)
    await db.mark_download_paused("g1")
    assert download_row(db, download_id) == paused_before
    assert history_rows(db) == history_before
    await db.mark_download_failed("g1", "x")
    failed_before = download_row(db, download_id)
    history_before = history_rows(db)
    await db.mark_download_failed("g1", "a different message")
    await db.mark_download_failed_by_id(download_id, "yet another")
    assert download_row(db, download_id) == failed_before
    assert history_rows(db) == history_before
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


async def test_timestamps_everywhere_are_utc_with_offset(db: Database, download_dir: Path) -> None:
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
        for values in fetch(db.path, f"SELECT {', '.join(names)} FROM {table}"):
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


async def test_create_upload_is_idempotent_per_download_and_target(db: Database) -> None:
    download_id = await new_http(db, "http://h/a")
    first = await db.create_upload(download_id, "cloud", "/r/a", 3)
    history_before = history_rows(db)
    assert await db.create_upload(download_id, "cloud", "/other", 9) == first
    assert history_rows(db) == history_before
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


async def test_upload_lifecycle_and_completion_needs_verification(db: Database) -> None:
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
    row_before = upload_row(db, upload_id)
    history_before = history_rows(db)
    with pytest.raises(StoreError, match="verified"):
        await db.mark_upload_completed(upload_id)
    assert upload_row(db, upload_id) == row_before
    assert history_rows(db) == history_before
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
    db: Database, hub: EventHub
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
        row_before, history_before = upload_row(db, upload_id), history_rows(db)
        with pytest.raises(TransitionError):
            await db.schedule_upload_retry(upload_id, "network", "again", None, due)
        assert upload_row(db, upload_id) == row_before and history_rows(db) == history_before
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
        row_before = upload_row(db, upload_id)
        with pytest.raises(TransitionError):
            await db.reset_upload_for_retry(upload_id)
        assert upload_row(db, upload_id) == row_before
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
    db: Database, hub: EventHub
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
    history_before = len(history_rows(db))
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
    assert [(h.from_status, h.to_status, h.reason) for h in history_rows_of(db, late)][-2:] == [
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
    assert len(history_rows(db)) == history_before + 4
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


async def test_apply_download_changes_is_one_transaction(db: Database, hub: EventHub) -> None:
    first = await new_downloading(db, "http://h/a", "g1")
    second = await new_downloading(db, "http://h/b", "g2")
    before = [download_row(db, first), download_row(db, second)]
    history_before = history_rows(db)
    subscription = hub.subscribe("t")
    with pytest.raises(sqlite3.OperationalError):
        await db.apply_download_changes(
            [
                DownloadChange(first, "downloading", "g1", "repair", target="paused"),
                DownloadChange(
                    second, "downloading", "g2", "repair", columns={"no_such_column": 1}
                ),
            ]
        )
    assert [download_row(db, first), download_row(db, second)] == before
    assert history_rows(db) == history_before
    assert await drain(subscription) == []


# --- check_and_update_download_status_if_file_exists -------------------------------------------


async def uploading(db: Database) -> int:
    download_id = await completed_download(db)
    upload_id = await db.create_upload(download_id, "cloud", None, 3, ready=True)
    await db.mark_upload_started(upload_id, 100)
    return upload_id


async def test_file_present_changes_nothing(db: Database, tmp_path: Path) -> None:
    upload_id = await uploading(db)
    present = tmp_path / "present.bin"
    present.write_bytes(b"x")
    row_before = upload_row(db, upload_id)
    history_before = history_rows(db)
    found = await db.check_and_update_download_status_if_file_exists(
        upload_id, present, exists=True
    )
    assert found is True
    assert upload_row(db, upload_id) == row_before
    assert history_rows(db) == history_before


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
    db: Database, hub: EventHub, download_dir: Path, tmp_path: Path
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
    assert table_count(db, "downloads") == 0 and table_count(db, "tg_media") == 0
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


async def test_config_settings(db: Database) -> None:
    assert await db.get_all_configs() == {}
    await db.init_config_from_yaml({"web.port": "8080", "web.token": "***"})
    assert await db.get_config("web.port") == "8080"
    assert await db.get_config("missing") is None
    assert await db.get_all_configs() == {"web.port": "8080", "web.token": "***"}
    await db.init_config_from_yaml({"aria2.port": "6800"})
    assert await db.get_all_configs() == {"aria2.port": "6800"}


# --- backup and concurrency --------------------------------------------------------------------


async def test_backup_while_another_coroutine_writes(db: Database, tmp_path: Path) -> None:
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


async def test_write_waits_for_another_process_lock_then_succeeds(db: Database) -> None:
    locked = threading.Event()
    committed = threading.Event()

    def hold_write_lock() -> None:
        conn = sqlite3.connect(db.path, isolation_level=None, timeout=10)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO config_settings (key, value, updated_at) VALUES"
                " ('other.process', 'yes', '2026-01-01T00:00:00+00:00')"
            )
            locked.set()
            time.sleep(2)
            conn.execute("COMMIT")
            committed.set()
        finally:
            conn.close()

    holder = asyncio.create_task(asyncio.to_thread(hold_write_lock))
    try:
        assert await asyncio.to_thread(locked.wait, 10)
        # readers are not blocked by the writer in WAL mode
        assert await db.get_all_configs() == {}
        assert not committed.is_set()
        started = time.monotonic()
        download_id = await new_http(db, "http://h/after-lock")
        elapsed = time.monotonic() - started
        assert committed.is_set()
        assert elapsed < 12
    finally:
        await asyncio.wait_for(holder, 15)
    assert await db.get_config("other.process") == "yes"
    assert (await db.get_download_by_id(download_id)).status == "pending"  # type: ignore[union-attr]


async def test_cancelled_write_waiting_for_lock_leaves_store_usable(db: Database) -> None:
    locked = threading.Event()

    def hold_write_lock() -> None:
        conn = sqlite3.connect(db.path, isolation_level=None, timeout=10)
        try:
            conn.execute("BEGIN IMMEDIATE")
            locked.set()
            time.sleep(1.5)
            conn.execute("COMMIT")
        finally:
            conn.close()

    holder = asyncio.create_task(asyncio.to_thread(hold_write_lock))
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
