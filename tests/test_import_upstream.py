"""`python app.py import-upstream PATH [--files DIR] --dry-run|--apply`: the jobs of the relay bot
MistRelay grew from, read from a database made here with that bot's tables (as the core spec
describes them), mapped into a real store (SQLite, and PostgreSQL for the writing path), with
files matched on a real disk. Run in process (the command's coroutine) and once as a real
process.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from app import InstanceLock, import_upstream_command
from configer import Config, load_config
from db import open_store
from records import DownloadRow, UploadRow
from tests.support.service import service_config
from tests.test_migrate_store import Outcome, postgres_config, run_app

SECRET_SETTING = "tok-9Vq-upstream-secret"

# That bot's tables, as its spec describes them (columns it names, and the usual others).
UPSTREAM_SCHEMA = """
CREATE TABLE tg_media (
    file_unique_id TEXT PRIMARY KEY, file_id TEXT, chat_id INTEGER, message_id INTEGER,
    media_type TEXT, file_name TEXT, mime_type TEXT, file_size INTEGER, sender_id INTEGER,
    media_group_id TEXT, created_at TEXT DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE downloads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_unique_id TEXT REFERENCES tg_media(file_unique_id) ON DELETE CASCADE,
    gid TEXT, source_url TEXT, status TEXT, completed_length INTEGER, total_length INTEGER,
    download_speed INTEGER, local_path TEXT, error_message TEXT,
    created_at TEXT DEFAULT CURRENT_TIMESTAMP, started_at TEXT, completed_at TEXT, updated_at TEXT
);
CREATE TABLE uploads (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    download_id INTEGER REFERENCES downloads(id) ON DELETE CASCADE,
    upload_target TEXT, remote_path TEXT, status TEXT, uploaded_size INTEGER, total_size INTEGER,
    upload_speed REAL, max_retries INTEGER, retry_count INTEGER, failure_reason TEXT,
    error_message TEXT, error_code TEXT, created_at TEXT DEFAULT CURRENT_TIMESTAMP,
    started_at TEXT, completed_at TEXT, cleaned_at TEXT, updated_at TEXT
);
CREATE TABLE config_settings (key TEXT PRIMARY KEY, value TEXT);
"""


class Upstream:
    """The other bot's database file, filled by the test."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as conn:
            conn.executescript(UPSTREAM_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    def media(self, unique_id: str, **columns: object) -> None:
        row = {"file_unique_id": unique_id, "file_id": f"FID-{unique_id}", "chat_id": 4242}
        row.update({"message_id": 7, "media_type": "video", **columns})
        self._insert("tg_media", row)

    def download(self, status: str, **columns: object) -> int:
        return self._insert("downloads", {"status": status, **columns})

    def upload(self, download_id: int, target: str, status: str, **columns: object) -> int:
        row = {"download_id": download_id, "upload_target": target, "status": status}
        return self._insert("uploads", {**row, **columns})

    def setting(self, key: str, value: str) -> None:
        self._insert("config_settings", {"key": key, "value": value})

    def _insert(self, table: str, row: dict[str, object]) -> int:
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._connect() as conn:
            cursor = conn.execute(
                f"INSERT INTO {table} ({names}) VALUES ({marks})", tuple(row.values())
            )
            return int(cursor.lastrowid or 0)

    def snapshot(self) -> bytes:
        return self.path.read_bytes()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """A stopped SQLite installation with two targets: `onedrive` (rclone) and `tg` (Telegram)."""
    targets = [
        {"name": "onedrive", "type": "rclone", "remote": "onedrive", "path": "/in"},
        {"name": "tg", "type": "telegram", "chat_id": -1001},
    ]
    return load_config(service_config(tmp_path / "svc", {"upload": {"targets": targets}}))


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[Upstream]:
    yield Upstream(tmp_path / "downloads.db")


def write_file(path: Path, size: int, fill: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((fill * size)[:size])
    return path


async def run(
    config: Config,
    upstream: Upstream,
    capsys: pytest.CaptureFixture[str],
    *,
    files: Path | None = None,
    apply: bool = False,
) -> Outcome:
    code = await import_upstream_command(config, upstream.path, files, apply=apply)
    captured = capsys.readouterr()
    return Outcome(code, captured.out + captured.err)


async def imported_rows(config: Config) -> tuple[list[DownloadRow], dict[int, list[UploadRow]]]:
    db = await open_store(config.database)
    try:
        downloads = sorted(await db.fetch_recent_downloads(1000), key=lambda r: r.id)
        uploads = await db.get_uploads_for_downloads([r.id for r in downloads])
        return downloads, uploads
    finally:
        await db.close()


def fill_a_library(upstream: Upstream, config: Config) -> Path:
    """A library of every kind of row the other bot keeps; the matching files under the
    download folder (the folder `--files` is given). Returns that folder."""
    library = config.aria2.download_dir / "library"
    write_file(library / "movie.mkv", 3000)
    write_file(library / "renamed-on-disk.iso", 4321)
    write_file(library / "show" / "e1.mp4", 100)
    write_file(library / "show" / "e2.mp4", 200)

    movie = upstream.download(
        "completed",
        source_url="https://files.example/movie.mkv",
        local_path="/srv/old/downloads/movie.mkv",
        total_length=3000,
        completed_length=3000,
        created_at="2025-03-01 10:00:00",
        completed_at="2025-03-01 10:05:00",
    )
    upstream.upload(movie, "onedrive", "completed", remote_path="/in/movie.mkv", total_size=3000)
    upstream.upload(movie, "gdrive", "uploading", total_size=3000)
    upstream.upload(movie, "tg", "failed", failure_reason="too big", error_code="413")
    iso = upstream.download(
        "completed",
        source_url="ftp://mirror.example/pub/distro.iso",
        local_path="/srv/old/downloads/distro.iso",
        total_length=4321,
    )
    upstream.upload(iso, "onedrive", "pending")
    upstream.media("AgAD-show", file_name="show", file_size=300, media_group_id="555")
    upstream.download(
        "completed", file_unique_id="AgAD-show", local_path="/srv/old/show", total_length=300
    )
    upstream.media("AgAD-clip", file_name="clip.mp4", file_size=77)
    clip = upstream.download(
        "completed", file_unique_id="AgAD-clip", local_path="/srv/old/clip.mp4", total_length=77
    )
    upstream.upload(clip, "onedrive", "cleaned", remote_path="/in/clip.mp4")
    upstream.download("failed", source_url="http://files.example/a.zip", error_message="404")
    running = upstream.download(
        "downloading", source_url="magnet:?xt=urn:btih:" + "ab" * 20 + "&dn=linux", gid="g1"
    )
    upstream.upload(running, "onedrive", "waiting_download")
    upstream.download("completed", source_url="https://files.example/lost.bin", total_length=9)
    upstream.download("queued", source_url="https://files.example/odd")
    upstream.download("pending", source_url="gopher://old.example/x")
    upstream.download("pending")
    upstream.setting("onedrive_token", SECRET_SETTING)
    return library


async def test_a_dry_run_reports_everything_and_writes_nothing(
    config: Config, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    library = fill_a_library(upstream, config)
    before = upstream.snapshot()
    dry = await run(config, upstream, capsys, files=library)
    assert dry.code == 0, dry.output
    assert "Would import: 7 download(s), 6 upload(s), 2 Telegram media row(s)" in dry.output
    assert "download 8: unknown status 'queued'" in dry.output
    assert "download 9: link refused: unsupported scheme 'gopher'" in dry.output
    assert "download 10: neither a Telegram file nor a link" in dry.output
    assert "completed downloads, file found by size: 1" in dry.output
    assert "completed downloads, uploaded and cleaned there: 1" in dry.output
    assert "Settings not imported (the configuration is config.yaml): onedrive_token" in dry.output
    assert SECRET_SETTING not in dry.output
    assert "Dry run: nothing was written" in dry.output
    assert not config.database.sqlite_path.exists()  # no store was made
    assert upstream.snapshot() == before  # the other bot's file is only read


async def test_apply_maps_each_row_and_matches_the_files(
    config: Config, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    library = fill_a_library(upstream, config)
    applied = await run(config, upstream, capsys, files=library, apply=True)
    assert applied.code == 0, applied.output
    assert "Imported in one transaction: 7 download(s), 6 upload(s), 2" in applied.output

    downloads, uploads = await imported_rows(config)
    by_name = {row.file_name: row for row in downloads}
    assert len(by_name) == 7

    movie = by_name["movie.mkv"]
    assert (movie.status, movie.source_type) == ("completed", "http")
    assert movie.local_path == str((library / "movie.mkv").resolve())
    assert movie.created_at.startswith("2025-03-01T10:00:00")  # SQLite's time, read as UTC
    assert movie.error_code is None
    movie_uploads = {u.upload_target: u for u in uploads[movie.id]}
    assert movie_uploads["onedrive"].status == "completed"
    assert movie_uploads["onedrive"].remote_path == "/in/movie.mkv"
    assert movie_uploads["gdrive"].status == "failed"  # no such target here
    assert "no target 'gdrive' is configured here" in (movie_uploads["gdrive"].failure_reason or "")
    assert movie_uploads["tg"].status == "failed"
    assert movie_uploads["tg"].failure_reason == "too big"
    assert movie_uploads["tg"].target_type == "telegram"

    iso = by_name["distro.iso"]  # its name differs on disk: matched by its size
    assert iso.local_path == str((library / "renamed-on-disk.iso").resolve())
    assert [u.status for u in uploads[iso.id]] == ["pending"]  # the file is here: uploads again

    show = by_name["show"]  # a folder: matched with its files
    assert (show.source_type, show.group_key) == ("telegram", "album:555")
    assert show.local_path == str((library / "show").resolve())
    assert [(f.path, f.length) for f in show.files] == [("show/e1.mp4", 100), ("show/e2.mp4", 200)]

    clip = by_name["clip.mp4"]  # uploaded and cleaned there: no file, and nothing missing
    assert clip.local_path is None and clip.error_code is None
    [cleaned] = uploads[clip.id]
    assert cleaned.status == "completed" and cleaned.cleaned_at is not None

    lost = by_name["lost.bin"]
    assert (lost.status, lost.local_path, lost.error_code) == ("completed", None, "file_missing")

    failed = by_name["a.zip"]
    assert (failed.status, failed.error_message) == ("failed", "404")

    magnet = by_name["linux"]  # was downloading there: downloads again here
    assert (magnet.status, magnet.gid, magnet.source_type) == ("pending", None, "magnet")
    assert magnet.source_key == "btih:" + "ab" * 20
    assert [u.status for u in uploads[magnet.id]] == ["waiting_download"]

    db = await open_store(config.database)
    try:
        history = await db.get_status_history("download", magnet.id)
        assert [(h.to_status, h.reason) for h in history] == [
            ("pending", "imported (was downloading: downloads again)")
        ]
        media = await db.get_tg_media("AgAD-clip")
        assert media is not None and (media.file_id, media.chat_id) == ("FID-AgAD-clip", 4242)
    finally:
        await db.close()


async def test_a_second_apply_imports_only_what_is_new(
    config: Config, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    first_id = upstream.download(
        "completed", source_url="https://files.example/one.bin", total_length=5
    )
    assert (await run(config, upstream, capsys, apply=True)).code == 0
    again = await run(config, upstream, capsys, apply=True)
    assert again.code == 0, again.output
    assert "Imported in one transaction: 0 download(s), 0 upload(s), 0" in again.output
    assert "Already imported before (left alone): 1 row(s)." in again.output

    upstream.upload(first_id, "onedrive", "completed", remote_path="/in/one.bin")
    upstream.download("failed", source_url="https://files.example/two.bin")
    third = await run(config, upstream, capsys, apply=True)
    assert "Imported in one transaction: 1 download(s), 1 upload(s), 0" in third.output
    downloads, uploads = await imported_rows(config)
    assert sorted(r.file_name or "" for r in downloads) == ["one.bin", "two.bin"]
    one = next(r for r in downloads if r.file_name == "one.bin")
    assert [u.remote_path for u in uploads[one.id]] == ["/in/one.bin"]


async def test_same_size_files_are_told_apart_by_content_or_left_unmatched(
    config: Config, upstream: Upstream, capsys: pytest.CaptureFixture[str]
) -> None:
    library = config.aria2.download_dir / "library"
    write_file(library / "copy-a.bin", 64, b"s")
    write_file(library / "copy-b.bin", 64, b"s")  # the same bytes: either is the file
    write_file(library / "odd-a.bin", 32, b"a")
    write_file(library / "odd-b.bin", 32, b"b")  # two different files of one size
    write_file(library / "half.bin", 50)
    write_file(library / "half.bin.aria2", 10)  # aria2 never finished it
    for name, size in (("same.bin", 64), ("which.bin", 32), ("half.bin", 50)):
        upstream.download("completed", source_url=f"https://f.example/{name}", total_length=size)
    applied = await run(config, upstream, capsys, files=library, apply=True)
    assert applied.code == 0, applied.output
    downloads, _ = await imported_rows(config)
    found = {row.file_name: row for row in downloads}
    assert found["same.bin"].local_path == str((library / "copy-a.bin").resolve())
    assert found["which.bin"].local_path is None
    assert found["which.bin"].error_message == (
        "imported: file not matched: 2 different files of that size"
    )
    assert found["half.bin"].local_path is None


async def test_bad_inputs_are_refused_in_one_line_and_nothing_is_written(
    config: Config, upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.download("failed", source_url="https://files.example/x")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    refused = await run(config, upstream, capsys, files=outside, apply=True)
    assert refused.code == 2 and len(refused.lines) == 1, refused.output
    assert "--files" in refused.output and "must be the download folder" in refused.output

    not_a_database = write_file(tmp_path / "notes.db", 100, b"hello ")
    bad = await import_upstream_command(config, not_a_database, None, apply=True)
    output = capsys.readouterr().out
    assert bad == 2 and "not a readable SQLite database" in output

    other = sqlite3.connect(tmp_path / "other.db")
    other.execute("CREATE TABLE things (id INTEGER)")
    other.close()
    wrong = await import_upstream_command(config, tmp_path / "other.db", None, apply=False)
    assert wrong == 2 and "has no downloads table (tables: things)" in capsys.readouterr().out

    lock = InstanceLock(config.data_dir)  # what a running service holds
    assert lock.acquire()
    try:
        running = await run(config, upstream, capsys, apply=True)
    finally:
        lock.release()
    assert running.code == 2 and "running" in running.output
    assert not config.database.sqlite_path.exists()


async def test_apply_into_postgresql(
    config: Config, upstream: Upstream, postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    library = fill_a_library(upstream, config)
    on_postgres = replace(config, database=postgres_config(config, postgres_url))
    applied = await run(on_postgres, upstream, capsys, files=library, apply=True)
    assert applied.code == 0, applied.output
    assert "Imported in one transaction: 7 download(s), 6 upload(s), 2" in applied.output
    again = await run(on_postgres, upstream, capsys, files=library, apply=True)
    assert "Imported in one transaction: 0 download(s), 0 upload(s), 0" in again.output
    downloads, uploads = await imported_rows(on_postgres)
    assert len(downloads) == 7 and sum(len(u) for u in uploads.values()) == 6


async def test_import_upstream_as_a_real_process(
    config: Config, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.download("completed", source_url="https://files.example/one.bin", total_length=5)
    config_path = tmp_path / "svc" / "config.yaml"
    usage = await run_app(config_path, "import-upstream", str(upstream.path))
    assert usage.code == 2 and "--dry-run" in usage.output  # one of the two modes is required
    dry = await run_app(config_path, "import-upstream", str(upstream.path), "--dry-run")
    assert dry.code == 0 and "Would import: 1 download(s)" in dry.output, dry.output
    applied = await run_app(config_path, "import-upstream", str(upstream.path), "--apply")
    assert applied.code == 0 and "Imported in one transaction: 1" in applied.output
    downloads, _ = await imported_rows(config)
    [row] = downloads
    assert (row.status, row.error_code) == ("completed", "file_missing")
