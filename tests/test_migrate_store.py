"""`python app.py migrate-store --to URL [--apply]`: a SQLite installation copied into an empty
PostgreSQL database (a real file, the session's throwaway PostgreSQL server, the command in
process and as a real process), and `backup`/`restore`, which on PostgreSQL print the commands of
PostgreSQL's own tools instead (run here for real).
"""

from __future__ import annotations

import asyncio
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from app import InstanceLock, migrate_store_command
from configer import Config, DatabaseConfig, load_config, masked_settings, parse_database_url
from db import (
    _DERIVED_TABLES,
    _STORE_TABLES,
    SCHEMA_VERSION,
    Database,
    PostgresLocation,
    StoreNotEmpty,
    open_store,
)
from records import ImportBatch, ImportedDownload, NewDownload, TgMediaRecord, TorrentFile
from tests.support.postgres import PostgresServer, find_server_programs
from tests.support.processes import free_port
from tests.support.service import service_config
from tests.support.service_process import APP_SCRIPT, PROJECT_ROOT, clean_environment
from tests.support.stores import Peek, PostgresPeek, SQLitePeek, StoreBackend

PASSWORD = "pw-Zq8s3cret"  # the test server trusts every login: the password is only carried
DUE = "2030-01-01T00:00:00.000+00:00"

# --- helpers -----------------------------------------------------------------------------------


def with_password(url: str) -> str:
    """`url` (postgresql://postgres@host:port/db) with PASSWORD in it."""
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A SQLite installation: config.yaml under tmp_path/svc, the database in svc/data."""
    return load_config(service_config(tmp_path / "svc"))


@pytest.fixture
def target_url(postgres_url: str) -> str:
    return with_password(postgres_url)


@pytest.fixture
def target_peek(postgres_url: str) -> Iterator[PostgresPeek]:
    peek = PostgresPeek(postgres_url)
    try:
        yield peek
    finally:
        peek.close()


@pytest.fixture
def source_peek(config: Config) -> Iterator[SQLitePeek]:
    peek = SQLitePeek(config.database.sqlite_path)
    try:
        yield peek
    finally:
        peek.close()


def postgres_config(config: Config, url: str) -> DatabaseConfig:
    return replace(config.database, url=parse_database_url(url))


@dataclass(frozen=True)
class Filled:
    """What fill_store made: the highest ids handed out (a deleted download's included)."""

    last_download_id: int
    download_ids: tuple[int, ...]


async def fill_store(db: Database, config: Config) -> Filled:
    """Every kind of row, written through the store: downloads of each source (a Telegram one
    with its media, a torrent with its files and data, two gids for one job), uploads in
    several states (one waiting for its automatic retry), history, the configuration and a
    change of it, and a deleted download whose id must never be handed out again."""
    media = TgMediaRecord(
        file_unique_id="AgADq1",
        file_id="BAACAgIAAxk-q1",
        chat_id=-1001234567890,
        message_id=42,
        media_type="video",
        sender_id=7_000_000_001,
        sender_name="Ann Ö",
        file_name="clip.mp4",
        mime_type="video/mp4",
        file_size=5_000_000_000,
        duration=61,
        width=1920,
        height=1080,
        caption="a clip ✓",
        media_group_id="album-1",
        message_date="2026-01-02T03:04:05+00:00",
        dc_id=4,
    )
    telegram = await db.create_download(
        NewDownload(
            "telegram",
            "tg:AgADq1",
            file_name="clip.mp4",
            total_length=5_000_000_000,
            file_unique_id="AgADq1",
            owner_id=7_000_000_001,
            chat_id=-1001234567890,
            message_id=42,
            group_key="album-1",
        ),
        media,
    )
    await db.save_tg_storage_message("AgADq1", -1009876543210, 7)
    await db.mark_download_queued_by_id(telegram, "gid-tg-1", "downloading")
    await db.mark_download_completed("gid-tg-1", "/data/downloads/1/clip.mp4", 5_000_000_000)
    await db.set_media_info(telegram, {"duration": 61.5, "streams": [{"codec": "h264"}]})
    await db.set_progress_message(telegram, 9001)

    torrent = await db.create_download(
        NewDownload(
            "torrent",
            "torrent:abc",
            file_name="set",
            torrent_data=bytes(range(256)) * 40,
            info_hash="ab" * 20,
        )
    )
    await db.mark_download_queued_by_id(torrent, "gid-meta", "waiting")
    await db.follow_gid("gid-meta", "gid-files")
    await db.mark_download_started("gid-files")
    await db.update_download_details_by_id(
        torrent,
        files=[TorrentFile(1, "set/a.bin", 100), TorrentFile(2, "set/b.bin", 50, False)],
        total_length=150,
    )
    await db.update_download_progress("gid-files", 60, 150, 1234)

    http = await db.create_download(NewDownload("http", "http://h/a.bin", "http://h/a.bin"))
    await db.mark_download_queued_by_id(http, "gid-http", "downloading")
    await db.mark_download_completed("gid-http", "/data/downloads/3/a.bin", 100)
    done = await db.create_upload(http, "cloud", "/remote/a.bin", 3, ready=True)
    await db.mark_upload_started(done, 100)
    await db.update_upload_progress(done, 100, 100, 12.5)
    await db.record_upload_verified(done, 100, "deadbeef")
    await db.mark_upload_completed(done, public_link="https://cloud.example/s/a")
    await db.set_download_targets(http, ["cloud", "backup"])  # chosen when it was added
    await db.use_sign_in_link("n" * 22, 515_151, "2999-01-01T00:00:00.000+00:00")
    await db.create_api_token("f" * 64, 515_151, "phone")
    retrying = await db.create_upload(http, "backup", None, 3, ready=True)
    await db.mark_upload_started(retrying, 100)
    await db.schedule_upload_retry(retrying, "network", "timeout", "5", DUE)
    failed = await db.create_upload(http, "tg", None, 1, target_type="telegram", ready=True)
    await db.mark_upload_started(failed, 100)
    await db.mark_upload_failed(failed, "too_large", "file too large", "413")
    await db.create_upload(torrent, "cloud", "/remote/set", 3)  # waiting for its download
    await db.set_archive_option(torrent, "zip", None)  # zipped before uploading

    magnet = await db.create_download(NewDownload("magnet", "magnet:?xt=urn:btih:cd"))
    await db.mark_download_queued_by_id(magnet, "gid-magnet")
    await db.mark_download_paused("gid-magnet")
    ftp = await db.create_download(NewDownload("ftp", "ftp://h/f.iso", "ftp://h/f.iso"))
    await db.mark_download_failed_by_id(ftp, "connection refused", "6")
    old = ImportedDownload(
        "download:9|2025-01-01 00:00:00",
        NewDownload("http", "http://h/old.bin", "http://h/old.bin", file_name="old.bin"),
        "failed",
        "imported",
        error_message="404",
    )
    await db.import_rows(ImportBatch(downloads=(old,)))  # one taken from another store
    imported = (await db.imported_origins())[old.origin]
    gone = await db.create_download(NewDownload("http", "http://h/gone", "http://h/gone"))
    await db.mark_download_cancelled_by_id(gone)
    await db.delete_download_record(gone)
    await db.init_config_from_yaml(masked_settings(config))
    await db.record_settings_changes("telegram:7", [("limits.download", "0", "2097152")])
    return Filled(gone, (telegram, torrent, http, magnet, ftp, imported))


async def filled_source(config: Config) -> Filled:
    async with Database(config.database.sqlite_path) as db:
        return await fill_store(db, config)


def store_columns(source: SQLitePeek) -> dict[str, list[str]]:
    """The columns of each table of the store, in the SQLite file's order."""
    return {
        table: [
            str(row[0])
            for row in source.fetch("SELECT name FROM pragma_table_info(?) ORDER BY cid", (table,))
        ]
        for table in _STORE_TABLES
    }


def every_row(peek: Peek, columns: dict[str, list[str]]) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the store, its columns in the order `columns` gives (the
    same for both backends), sorted by the table's key."""
    rows: dict[str, list[tuple[Any, ...]]] = {}
    for table, key in _STORE_TABLES.items():
        found = peek.fetch(f"SELECT {', '.join(columns[table])} FROM {table}")
        at = columns[table].index(key)
        rows[table] = sorted(found, key=lambda row: row[at])
    return rows


@dataclass(frozen=True)
class Outcome:
    code: int
    output: str  # stdout and stderr

    @property
    def lines(self) -> list[str]:
        return self.output.strip().splitlines()


async def migrate(
    config: Config, to: str, capsys: pytest.CaptureFixture[str], *, apply: bool = False
) -> Outcome:
    code = await migrate_store_command(config, to, apply=apply)
    captured = capsys.readouterr()
    return Outcome(code, captured.out + captured.err)


async def run_app(config_path: Path, *args: str) -> Outcome:
    """`python app.py --config CONFIG ARGS…` as a real process, to its end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(APP_SCRIPT),
        "--config",
        str(config_path),
        *args,
        cwd=PROJECT_ROOT,
        env=clean_environment(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), 120)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Outcome(process.returncode, out.decode() + err.decode())


def counted(lines: list[str], table: str) -> int:
    """The number of rows the output says `table` has (lines like `  downloads  5 rows, …`)."""
    [line] = [line for line in lines if line.split()[:1] == [table]]
    return int(line.split()[1])


# --- the copy ----------------------------------------------------------------------------------


async def test_the_copy_knows_every_table_in_an_order_its_foreign_keys_allow(
    store_backend: StoreBackend, peek: Peek
) -> None:
    async with store_backend.database():
        pass
    assert (
        peek.tables() - {"mistrelay_schema", "sqlite_sequence"}
        == set(_STORE_TABLES) | _DERIVED_TABLES
    )
    if store_backend.name == "sqlite":
        references = [
            (table, str(row[0]))
            for table in _STORE_TABLES
            for row in peek.fetch('SELECT "table" FROM pragma_foreign_key_list(?)', (table,))
        ]
    else:
        references = [
            (str(row[0]), str(row[1]))
            for row in peek.fetch(
                "SELECT c.table_name, u.table_name FROM information_schema.table_constraints c"
                " JOIN information_schema.constraint_column_usage u"
                " ON u.constraint_name = c.constraint_name"
                " WHERE c.constraint_type = 'FOREIGN KEY' AND c.table_schema = current_schema()"
            )
        ]
    order = list(_STORE_TABLES)
    assert sorted(references) == [
        ("bot_notices", "downloads"),
        ("download_archive_options", "downloads"),
        ("download_gids", "downloads"),
        ("download_targets", "downloads"),
        ("downloads", "tg_media"),
        ("tg_storage_messages", "tg_media"),
        ("uploads", "downloads"),
    ]
    for table, referenced in references:
        assert order.index(referenced) < order.index(table), (table, referenced)


async def test_copy_into_keeps_every_row_and_the_numbering_on_either_backend(
    config: Config, store_backend: StoreBackend, source_peek: SQLitePeek
) -> None:
    filled = await filled_source(config)
    columns = store_columns(source_peek)
    source_rows = every_row(source_peek, columns)
    async with Database(config.database.sqlite_path) as source:
        target = store_backend.database()
        assert await target._connect() == 0
        try:
            copied = await source.copy_into(target)
            assert copied == await source.table_counts() == await target.table_counts()
            downloads = {count.table: count for count in copied}["downloads"]
            assert (downloads.rows, downloads.max_id, downloads.last_id) == (
                6,
                max(filled.download_ids),
                filled.last_download_id,
            )
            assert every_row(store_backend.peek, columns) == source_rows
            assert store_backend.peek.schema_version() == SCHEMA_VERSION
            # A new job is numbered after every id the source handed out, the deleted one's too.
            new = await target.create_download(NewDownload("http", "http://h/new"))
            assert new == filled.last_download_id + 1
        finally:
            await target.close()


async def test_a_target_filled_after_the_check_is_refused_inside_the_copy(
    config: Config, target_url: str, target_peek: PostgresPeek
) -> None:
    await filled_source(config)
    target = postgres_config(config, target_url)
    await (await open_store(target)).close()  # the schema, no rows
    async with Database(config.database.sqlite_path) as source:
        there = Database(PostgresLocation(target.postgres_dsn, target.redacted_url))
        assert await there._connect() == SCHEMA_VERSION
        try:
            target_peek.execute(
                "INSERT INTO config_settings (key, value, updated_at) VALUES ('k', 'v', 'now')"
            )
            with pytest.raises(StoreNotEmpty, match=r"rows in config_settings: 1"):
                await source.copy_into(there)
        finally:
            await there.close()
    for table in _STORE_TABLES:
        assert target_peek.count(table) == (1 if table == "config_settings" else 0), table


# --- the command -------------------------------------------------------------------------------


@pytest.mark.parametrize("prepared", ["an empty database", "an empty MistRelay schema"])
async def test_a_dry_run_writes_nothing_then_apply_copies_every_row(
    config: Config,
    target_url: str,
    source_peek: SQLitePeek,
    target_peek: PostgresPeek,
    capsys: pytest.CaptureFixture[str],
    prepared: str,
) -> None:
    filled = await filled_source(config)
    target = postgres_config(config, target_url)
    if prepared == "an empty MistRelay schema":
        await (await open_store(target)).close()
    tables_before = target_peek.tables()
    assert (tables_before == set()) is (prepared == "an empty database")
    columns = store_columns(source_peek)
    source_rows = every_row(source_peek, columns)
    # A single node's SQLite store has no cluster (no nodes, no secrets shared among nodes);
    # this one has no dashboard sign-ins and no chat owed a notice either.
    empty = {"nodes", "shared_secrets", "web_sessions", "bot_notices"}
    assert all(rows for table, rows in source_rows.items() if table not in empty), (
        "every table has rows to copy"
    )

    dry = await migrate(config, target_url, capsys)
    assert dry.code == 0, dry.output
    assert dry.lines[-1] == "Dry run: nothing was written. Run again with --apply."
    assert dry.lines[0] == f"Source: {config.database.path} (schema version {SCHEMA_VERSION})"
    assert dry.lines[1].startswith(f"Target: {target.redacted_url} (")
    for table, rows in source_rows.items():
        assert counted(dry.lines, table) == len(rows), table
    assert PASSWORD not in dry.output
    assert target_peek.tables() == tables_before
    assert all(target_peek.count(table) == 0 for table in _STORE_TABLES.keys() & tables_before)
    assert every_row(source_peek, columns) == source_rows

    applied = await migrate(config, target_url, capsys, apply=True)
    assert applied.code == 0, applied.output
    assert PASSWORD not in applied.output
    for table, rows in source_rows.items():
        assert counted(applied.lines, table) == len(rows), table
    assert f"  database.url: {target.redacted_url}" in applied.lines
    assert ":***@" in target.redacted_url
    assert every_row(target_peek, columns) == source_rows == every_row(source_peek, columns)

    store = await open_store(target)
    try:
        telegram, torrent, http = filled.download_ids[:3]
        row = await store.get_download_by_id(torrent)
        assert row is not None and row.has_torrent_data and row.status == "downloading"
        assert row.files == (
            TorrentFile(1, "set/a.bin", 100),
            TorrentFile(2, "set/b.bin", 50, False),
        )
        assert await store.get_torrent_data(torrent) == bytes(range(256)) * 40
        assert await store.get_gids(torrent) == ["gid-meta", "gid-files"]
        assert await store.get_download_id_by_gid("gid-meta") == torrent
        media = await store.get_tg_media("AgADq1")
        assert media is not None and media.chat_id == -1001234567890 and media.caption == "a clip ✓"
        uploads = {u.upload_target: u for u in await store.get_uploads_by_download(http)}
        assert uploads["backup"].status == "pending" and uploads["backup"].next_attempt_at == DUE
        assert [u.id for u in await store.get_pending_uploads()] == [uploads["backup"].id]
        assert uploads["cloud"].upload_speed == 0 and uploads["cloud"].verified_hash == "deadbeef"
        assert await store.get_all_configs() == masked_settings(config)
        # New rows are numbered after everything the source ever numbered.
        last = {
            table: int(target_peek.fetch(f"SELECT MAX(id) FROM {table}")[0][0])
            for table in ("download_gids", "uploads", "status_history")
        }
        new = await store.create_download(NewDownload("http", "http://h/new"))
        assert new == filled.last_download_id + 1 > max(filled.download_ids) + 1
        await store.mark_download_queued_by_id(new, "gid-new")
        upload = await store.create_upload(new, "cloud", None, 3)
        assert upload == last["uploads"] + 1
        assert int(
            target_peek.fetch("SELECT id FROM download_gids WHERE gid = 'gid-new'")[0][0]
        ) == (last["download_gids"] + 1)
        history = target_peek.fetch(
            "SELECT MIN(id) FROM status_history WHERE entity_id = ?", (new,)
        )
        assert int(history[0][0]) == last["status_history"] + 1
        assert await store.get_download_by_id(telegram) is not None
    finally:
        await store.close()


def make_foreign(peek: PostgresPeek) -> None:
    peek.execute("CREATE TABLE notes (body TEXT)")


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("a store with rows", "not empty (rows in downloads: 1, status_history: 1)"),
        ("a foreign table", "not a MistRelay database"),
        ("an empty store beside a foreign table", "tables that are not MistRelay's (notes)"),
    ],
)
async def test_a_target_that_is_not_empty_is_refused_and_nothing_is_written(
    config: Config,
    target_url: str,
    target_peek: PostgresPeek,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    said: str,
) -> None:
    await filled_source(config)
    target = postgres_config(config, target_url)
    if kind != "a foreign table":
        store = await open_store(target)
        try:
            if kind == "a store with rows":
                await store.create_download(NewDownload("http", "http://elsewhere/x"))
        finally:
            await store.close()
    if kind != "a store with rows":
        make_foreign(target_peek)
    before = {table: target_peek.fetch(f"SELECT * FROM {table}") for table in target_peek.tables()}
    schema_before = target_peek.schema()
    for apply in (False, True):
        refused = await migrate(config, target_url, capsys, apply=apply)
        assert refused.code == 2, refused.output
        assert len(refused.lines) == 1, refused.output
        assert said in refused.output and target.redacted_url in refused.output
        assert PASSWORD not in refused.output
        after = {t: target_peek.fetch(f"SELECT * FROM {t}") for t in target_peek.tables()}
        assert after == before and target_peek.schema() == schema_before


@pytest.mark.parametrize(
    "to",
    [
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:99999/db",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:5432/",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1/db?sslmode=sometimes",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1/db#{PASSWORD}",
        f"mysql://postgres:{PASSWORD}@127.0.0.1/db",
        "sqlite:///elsewhere.db",
        "",
    ],
)
async def test_a_bad_to_url_is_one_line_naming_to_without_the_password(
    config: Config, capsys: pytest.CaptureFixture[str], to: str
) -> None:
    refused = await migrate(config, to, capsys, apply=True)
    assert refused.code == 2
    assert len(refused.lines) == 1, refused.output
    assert refused.lines[0].startswith("migrate-store: --to: "), refused.output
    assert PASSWORD not in refused.output
    assert not config.database.sqlite_path.exists()


async def test_an_unreachable_target_is_one_line_without_the_password(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    await filled_source(config)
    port = free_port()
    refused = await migrate(config, f"postgresql://u:{PASSWORD}@127.0.0.1:{port}/db", capsys)
    assert refused.code == 2
    assert len(refused.lines) == 1 and "cannot connect" in refused.output, refused.output
    assert PASSWORD not in refused.output and f"u:***@127.0.0.1:{port}/db" in refused.output


async def test_refused_when_the_store_is_already_on_postgresql_or_the_service_runs(
    config: Config,
    target_url: str,
    target_peek: PostgresPeek,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await filled_source(config)
    on_postgres = replace(config, database=postgres_config(config, target_url))
    refused = await migrate(on_postgres, target_url, capsys, apply=True)
    assert refused.code == 2 and len(refused.lines) == 1, refused.output
    assert "already on PostgreSQL" in refused.output and PASSWORD not in refused.output

    lock = InstanceLock(config.data_dir)  # what a running service holds
    assert lock.acquire()
    try:
        running = await migrate(config, target_url, capsys, apply=True)
    finally:
        lock.release()
    assert running.code == 2 and len(running.lines) == 1, running.output
    assert "running" in running.output
    assert target_peek.tables() == set()


async def test_a_source_behind_is_reported_by_the_dry_run_and_migrated_by_apply(
    config: Config,
    target_url: str,
    source_peek: SQLitePeek,
    target_peek: PostgresPeek,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old = await Database(config.database.sqlite_path)._open(2)
    stamp = "2026-01-01T00:00:00.000+00:00"
    try:
        # Written as schema 2 had it (today's store methods read columns it did not have).
        async with old._write() as tx:
            await tx.execute(
                "INSERT INTO downloads (source_type, source_key, source_url, status, group_key,"
                " created_at, updated_at) VALUES ('http', 'http://h/a', 'http://h/a', 'pending',"
                " 'g', ?, ?)",
                (stamp, stamp),
            )
            await tx.execute(
                "INSERT INTO uploads (download_id, upload_target, target_type, created_at,"
                " updated_at) VALUES (1, 'cloud', 'rclone', ?, ?)",
                (stamp, stamp),
            )
    finally:
        await old.close()

    dry = await migrate(config, target_url, capsys)
    assert dry.code == 0, dry.output
    assert f"(schema version 2; --apply migrates it to {SCHEMA_VERSION} first)" in dry.lines[0]
    assert counted(dry.lines, "downloads") == 1 and counted(dry.lines, "uploads") == 1
    assert source_peek.schema_version() == 2 and target_peek.tables() == set()

    applied = await migrate(config, target_url, capsys, apply=True)
    assert applied.code == 0, applied.output
    assert f"(schema version 2; migrated to {SCHEMA_VERSION} first)" in applied.lines[0]
    assert source_peek.schema_version() == SCHEMA_VERSION
    columns = store_columns(source_peek)
    assert every_row(target_peek, columns) == every_row(source_peek, columns)
    assert target_peek.count("downloads") == 1


async def test_migrate_store_as_a_real_process(
    tmp_path: Path, target_url: str, target_peek: PostgresPeek
) -> None:
    config_path = service_config(tmp_path / "svc")
    filled = await filled_source(load_config(config_path))

    dry = await run_app(config_path, "migrate-store", "--to", target_url)
    assert dry.code == 0, dry.output
    assert dry.lines[-1] == "Dry run: nothing was written. Run again with --apply."
    assert counted(dry.lines, "downloads") == len(filled.download_ids)
    assert PASSWORD not in dry.output
    assert target_peek.tables() == set()

    applied = await run_app(config_path, "migrate-store", "--to", target_url, "--apply")
    assert applied.code == 0, applied.output
    assert PASSWORD not in applied.output
    redacted = target_url.replace(PASSWORD, "***")
    assert f"  database.url: {redacted}" in applied.lines
    assert target_peek.count("downloads") == len(filled.download_ids)

    again = await run_app(config_path, "migrate-store", "--to", target_url, "--apply")
    assert again.code == 2 and len(again.lines) == 1 and "not empty" in again.output
    assert PASSWORD not in again.output
    assert target_peek.count("downloads") == len(filled.download_ids)


# --- backup and restore on PostgreSQL ---------------------------------------------------------


async def test_backup_and_restore_on_postgresql_print_the_commands_of_its_own_tools(
    tmp_path: Path, postgres_url: str, postgres_server: PostgresServer
) -> None:
    config_path = service_config(
        tmp_path / "svc", {"database": {"url": with_password(postgres_url)}}
    )
    database = load_config(config_path).database
    store = await open_store(database)
    try:
        kept = await store.create_download(NewDownload("http", "http://h/kept"))
    finally:
        await store.close()
    dump = tmp_path / "backups" / "store dump"  # a space: the command quotes it

    backup = await run_app(config_path, "backup", str(dump))
    assert backup.code == 2, backup.output
    assert PASSWORD not in backup.output
    assert len(backup.lines) == 2 and "PGPASSWORD" in backup.lines[0], backup.output
    command = shlex.split(backup.lines[1])
    assert command == ["pg_dump", "--format=custom", f"--file={dump}", postgres_url]

    restore = await run_app(config_path, "restore", str(dump))
    assert restore.code == 2, restore.output
    assert PASSWORD not in restore.output
    assert len(restore.lines) == 2 and "PGPASSWORD" in restore.lines[0], restore.output
    restore_command = shlex.split(restore.lines[1])
    assert restore_command == [
        "pg_restore",
        "--clean",
        "--if-exists",
        "--no-owner",
        f"--dbname={postgres_url}",
        str(dump),
    ]

    # The commands printed do the job: a dump, a later job, the dump restored.
    programs, _ = find_server_programs()
    dump.parent.mkdir()
    await run_program(programs / command[0], command[1:])
    store = await open_store(database)
    try:
        await store.create_download(NewDownload("http", "http://h/later"))
    finally:
        await store.close()
    await run_program(programs / restore_command[0], restore_command[1:])
    store = await open_store(database)
    try:
        assert [row.id for row in await store.fetch_recent_downloads(-1)] == [kept]
    finally:
        await store.close()


async def run_program(program: Path, args: list[str]) -> None:
    process = await asyncio.create_subprocess_exec(
        str(program),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode(errors="replace")
