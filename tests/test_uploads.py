"""Uploads end to end: a real service (aria2c, SQLite, web server) uploading with real rclone to
clouds served on 127.0.0.1 (rclone serve webdav / sftp), and through the offline Telegram fake.

Downloads come from the local file server; every assertion reads the cloud's folder, the
database rows or the HTTP API.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pyrogram import Client as PyrogramClient
from pyrogram import raw
from pyrogram.errors import FloodWait

from app import configure_logging
from configer import UploadConfig, UploadTarget
from db import Database
from files import DownloadFiles
from records import DownloadRow, NewDownload, UploadRow
from tests.support.fake_telegram import FakeTelegram
from tests.support.http_files import FileServer
from tests.support.rclone_cloud import RcloneCloud
from tests.support.service import RunningService, ServiceFactory
from tests.support.torrents import make_torrent
from uploads import telegram as telegram_upload
from uploads.manager import (
    ProgressWriter,
    UploadManager,
    default_rclone_args,
    remote_path_for,
)
from uploads.telegram import FileWindow, byte_parts, plan_files

MIB = 1024 * 1024


# --------------------------------------------------------------------------- helpers


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Listed before capfd, this tears down after it: logging goes back to pytest's stream
    instead of the closed capture."""
    yield
    configure_logging("DEBUG")


def rclone_target(name: str, remote: str, path: str = "/up", **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "rclone", "remote": remote, "path": path, **extra}


def upload_overrides(
    rclone_config: Path, targets: Sequence[dict[str, Any]], **upload: Any
) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "targets": list(targets),
        "rclone_config": str(rclone_config),
        "retry_backoff": 0.5,
        "max_retries": 2,
    }
    settings.update(upload)
    return {"upload": settings}


async def fetch(
    svc: RunningService, file_server: FileServer, name: str, size: int, seed: int = 0
) -> tuple[dict[str, Any], bytes]:
    """Download `name` (`size` bytes) from the file server through the API; wait for it."""
    data = file_server.add_file(name, size=size, seed=seed)
    status, body = await svc.api("POST", "/api/downloads", json={"url": file_server.url(name)})
    assert status == 201, body
    download = await svc.wait_download(body["downloads"][0]["id"], {"completed"}, timeout=60)
    return download, data


async def wait_uploads(
    svc: RunningService,
    download_id: int,
    condition: Callable[[list[UploadRow]], bool],
    *,
    timeout: float = 60,
    what: str = "the uploads",
) -> list[UploadRow]:
    """Poll the download's upload rows until `condition` holds (bounded)."""
    deadline = time.monotonic() + timeout
    rows: list[UploadRow] = []
    while time.monotonic() < deadline:
        rows = await svc.service.parts.store.get_uploads_by_download(download_id)
        if condition(rows):
            return rows
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; last rows: {rows}")


def all_in(*statuses: str, count: int = 1) -> Callable[[list[UploadRow]], bool]:
    return lambda rows: len(rows) == count and all(r.status in statuses for r in rows)


def by_target(rows: Sequence[UploadRow]) -> dict[str, UploadRow]:
    return {row.upload_target: row for row in rows}


def local_file(svc: RunningService, download: dict[str, Any]) -> Path:
    path = Path(download["local_path"])
    assert path.is_relative_to(svc.config.aria2.download_dir.resolve()) or path.is_relative_to(
        svc.config.aria2.download_dir
    )
    return path


async def history(svc: RunningService, upload_id: int) -> list[tuple[str | None, str]]:
    entries = await svc.service.parts.store.get_status_history("upload", upload_id)
    return [(e.from_status, e.to_status) for e in entries]


async def wait_row(
    db: Database, upload_id: int, statuses: set[str], timeout: float = 60
) -> UploadRow:
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = await db.get_upload_by_id(upload_id)
        if row is not None and row.status in statuses:
            return row
        await asyncio.sleep(0.05)
    raise AssertionError(f"upload {upload_id} never reached {statuses}; last: {row}")


async def completed_download(
    db: Database, download_dir: Path, name: str, files: dict[str, bytes]
) -> DownloadRow:
    """A completed download row, as aria2 would leave it: one file, or a folder of files."""
    download_id = await db.create_download(
        NewDownload("http", f"test:{name}", f"http://127.0.0.1/{name}", file_name=name)
    )
    job = download_dir / str(download_id)
    if list(files) == [""]:
        path = job / name
        path.parent.mkdir(parents=True)
        path.write_bytes(files[""])
    else:
        path = job / name
        for relative, data in files.items():
            (path / relative).parent.mkdir(parents=True, exist_ok=True)
            (path / relative).write_bytes(data)
    gid = f"{download_id:016x}"
    await db.mark_download_queued_by_id(download_id, gid, status="downloading")
    await db.mark_download_completed(gid, str(path), sum(len(d) for d in files.values()))
    row = await db.get_download_by_id(download_id)
    assert row is not None
    return row


@asynccontextmanager
async def standalone_manager(
    tmp_path: Path, config: UploadConfig, **options: Any
) -> AsyncIterator[tuple[Database, UploadManager]]:
    download_dir = tmp_path / "downloads"
    download_dir.mkdir(parents=True, exist_ok=True)
    db = await Database(tmp_path / "data" / "store.db").open()
    manager = UploadManager(
        db, config, files=DownloadFiles(download_dir), data_dir=tmp_path / "data", **options
    )
    try:
        yield db, manager
    finally:
        await manager.stop()
        await db.close()


# --------------------------------------------------------------------------- one and two targets


async def test_one_target_uploads_verifies_and_keeps_the_file(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(rclone_config, [rclone_target("dav", "testdav", "/incoming")])
    )
    download, data = await fetch(svc, file_server, "report.bin", 3 * MIB + 17)

    (row,) = await wait_uploads(svc, download["id"], all_in("completed"))
    uploaded = webdav_cloud.root / "incoming" / "report.bin"
    assert uploaded.read_bytes() == data
    assert row.upload_target == "dav" and row.target_type == "rclone"
    assert row.remote_path == "testdav:/incoming/report.bin"
    assert row.verified_size == len(data) and row.verified_at is not None
    assert row.verified_hash is None  # WebDAV (vendor other) has no hash: verified by size
    assert row.uploaded_size == row.total_size == len(data)
    assert row.cleaned_at is None and row.failure_reason is None
    assert local_file(svc, download).read_bytes() == data  # auto_delete is off
    assert await history(svc, row.id) == [
        (None, "pending"),
        ("pending", "uploading"),
        ("uploading", "completed"),
    ]


async def test_two_targets_each_verified_then_the_file_is_cleaned(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    sftp_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(
            rclone_config,
            [rclone_target("dav", "testdav", "/a"), rclone_target("ssh", "testsftp", "/b")],
            auto_delete=True,
        )
    )
    download, data = await fetch(svc, file_server, "movie.bin", 2 * MIB + 5, seed=3)
    path = local_file(svc, download)

    rows = await wait_uploads(
        svc,
        download["id"],
        lambda rs: len(rs) == 2 and all(r.cleaned_at is not None for r in rs),
        what="both uploads cleaned",
    )
    dav, ssh = by_target(rows)["dav"], by_target(rows)["ssh"]
    assert (webdav_cloud.root / "a" / "movie.bin").read_bytes() == data
    assert (sftp_cloud.root / "b" / "movie.bin").read_bytes() == data
    assert dav.status == ssh.status == "completed"
    assert ssh.verified_hash == "md5:" + hashlib.md5(data).hexdigest()
    assert not path.exists()
    assert not path.parent.exists()  # the job's folder went with it
    assert svc.config.aria2.download_dir.is_dir()  # never the download directory itself


async def test_match_selects_which_targets_take_a_download(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(
            rclone_config,
            [
                rclone_target("everything", "testdav", "/all"),
                rclone_target("videos", "testdav", "/videos", match={"extensions": ["mkv"]}),
            ],
        )
    )
    other, _ = await fetch(svc, file_server, "notes.txt", 4000)
    video, video_data = await fetch(svc, file_server, "clip.mkv", 300_000, seed=1)

    (only,) = await wait_uploads(svc, other["id"], all_in("completed"))
    assert only.upload_target == "everything"
    rows = await wait_uploads(svc, video["id"], all_in("completed", count=2))
    assert sorted(r.upload_target for r in rows) == ["everything", "videos"]
    assert (webdav_cloud.root / "videos" / "clip.mkv").read_bytes() == video_data
    assert not (webdav_cloud.root / "videos" / "notes.txt").exists()

    status, body = await svc.api("GET", "/api/uploads?target=videos")
    assert status == 200
    assert [u["download_id"] for u in body["uploads"]] == [video["id"]]


async def test_targets_chosen_with_the_job_replace_the_match_rules(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    tmp_path: Path,
) -> None:
    svc = await service_factory(
        upload_overrides(
            rclone_config,
            [
                rclone_target("everything", "testdav", "/all"),
                rclone_target("videos", "testdav", "/videos", match={"extensions": ["mkv"]}),
            ],
        )
    )
    # An unknown name is refused, named, and nothing is queued.
    file_server.add_file("kept.txt", size=5000, seed=4)
    status, body = await svc.api(
        "POST", "/api/downloads", json={"url": file_server.url("kept.txt"), "targets": ["nas"]}
    )
    assert status == 400 and 'unknown target "nas"' in str(body), body
    for bad in ("videos", [1], ["videos", "videos"]):
        status, body = await svc.api(
            "POST", "/api/downloads", json={"url": file_server.url("kept.txt"), "targets": bad}
        )
        assert status == 400 and '"targets"' in str(body), body
    status, body = await svc.api("GET", "/api/downloads")
    assert status == 200 and body["downloads"] == []

    # [] keeps the file here only; a chosen target takes what its match would refuse.
    status, body = await svc.api(
        "POST", "/api/downloads", json={"url": file_server.url("kept.txt"), "targets": []}
    )
    assert status == 201, body
    kept = await svc.wait_download(body["downloads"][0]["id"], {"completed"}, timeout=60)
    data = file_server.add_file("notes.txt", size=4000, seed=5)
    status, body = await svc.api(
        "POST", "/api/downloads", json={"url": file_server.url("notes.txt"), "targets": ["videos"]}
    )
    assert status == 201, body
    chosen = await svc.wait_download(body["downloads"][0]["id"], {"completed"}, timeout=60)

    (only,) = await wait_uploads(svc, chosen["id"], all_in("completed"))
    assert only.upload_target == "videos"
    assert only.public_link is None  # WebDAV makes no links: the notice gives the path
    assert (webdav_cloud.root / "videos" / "notes.txt").read_bytes() == data
    assert not (webdav_cloud.root / "all" / "notes.txt").exists()
    store = svc.service.parts.store
    assert await store.get_download_targets(kept["id"]) == []
    assert await store.get_uploads_by_download(kept["id"]) == []
    assert local_file(svc, kept).is_file()
    assert not (webdav_cloud.root / "all" / "kept.txt").exists()

    # A .torrent takes them as a multipart field: a JSON list.
    torrent = await asyncio.to_thread(
        make_torrent, b"t" * 1000, tmp_path / "seed", "http://127.0.0.1:9/announce", "t.bin"
    )
    for field, expected in (("nas", 400), ('["nas"]', 400), ('["everything"]', 201)):
        form = aiohttp.FormData()
        form.add_field("file", torrent.torrent_bytes, filename="t.torrent")
        form.add_field("targets", field)
        status, body = await svc.api("POST", "/api/downloads/torrent", data=form)
        assert status == expected, body
    assert await store.get_download_targets(body["downloads"][0]["id"]) == ["everything"]


async def test_missing_remote_is_named_at_start_and_fails_at_once(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    restore_logging: None,
    capfd: pytest.CaptureFixture[str],
) -> None:
    svc = await service_factory(
        upload_overrides(
            rclone_config,
            [rclone_target("dav", "testdav"), rclone_target("cloudy", "nosuchremote")],
        )
    )
    assert svc.service.parts.uploads.missing_remotes == {"cloudy": "nosuchremote"}
    logged = capfd.readouterr().err
    assert any(
        "ERROR" in line and "'cloudy'" in line and "'nosuchremote'" in line
        for line in logged.splitlines()
    ), logged[-3000:]

    download, data = await fetch(svc, file_server, "keep.bin", 100_000)
    rows = await wait_uploads(svc, download["id"], all_in("completed", "failed", count=2))
    cloudy = by_target(rows)["cloudy"]
    assert cloudy.status == "failed"
    assert cloudy.failure_reason == "remote_not_found"
    assert "nosuchremote" in (cloudy.error_message or "")
    assert cloudy.error_code
    assert cloudy.retry_count == 0 and cloudy.next_attempt_at is None
    assert by_target(rows)["dav"].status == "completed"
    assert local_file(svc, download).read_bytes() == data


async def test_max_concurrent_caps_parallel_uploads(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(rclone_config, [rclone_target("dav", "testdav")], max_concurrent=1)
    )
    downloads = [
        (await fetch(svc, file_server, f"part{i}.bin", 1 * MIB + i, seed=i))[0] for i in range(3)
    ]
    spans: list[tuple[str, str]] = []
    for download in downloads:
        (row,) = await wait_uploads(svc, download["id"], all_in("completed"))
        entries = await svc.service.parts.store.get_status_history("upload", row.id)
        started = next(e.at for e in entries if e.to_status == "uploading")
        finished = next(e.at for e in entries if e.to_status == "completed")
        spans.append((started, finished))
    spans.sort()
    for (_, previous_end), (next_start, _) in itertools.pairwise(spans):
        assert next_start >= previous_end, spans


async def test_reloaded_targets_catch_up_on_completed_downloads(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(rclone_config, [rclone_target("first", "testdav", "/one")])
    )
    download, data = await fetch(svc, file_server, "reload.bin", 120_000)
    await wait_uploads(svc, download["id"], all_in("completed"))

    current = svc.service.parts.uploads.config
    added = UploadTarget("second", "rclone", "testdav", "/two")
    svc.service.parts.uploads.apply_config(replace(current, targets=(*current.targets, added)))
    rows = await wait_uploads(svc, download["id"], all_in("completed", count=2))
    assert sorted(r.upload_target for r in rows) == ["first", "second"]
    assert (webdav_cloud.root / "two" / "reload.bin").read_bytes() == data


def test_rclone_gives_up_early_unless_the_environment_says_otherwise() -> None:
    assert default_rclone_args({}) == ["--retries", "1", "--low-level-retries", "3"]
    assert default_rclone_args({"RCLONE_LOW_LEVEL_RETRIES": "10"}) == ["--retries", "1"]


@pytest.mark.slow
async def test_progress_is_written_while_uploading(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # rclone reads its flags from RCLONE_* variables; the service's rclone takes the environment
    # it starts with. 1 MiB/s makes a 5 MiB upload last about 5 s.
    monkeypatch.setenv("RCLONE_BWLIMIT", "1M")
    svc = await service_factory(upload_overrides(rclone_config, [rclone_target("dav", "testdav")]))
    monkeypatch.delenv("RCLONE_BWLIMIT")
    download, _ = await fetch(svc, file_server, "slow.bin", 5 * MIB)

    seen: list[UploadRow] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = await svc.service.parts.store.get_uploads_by_download(download["id"])
        if rows and rows[0].status == "uploading":
            seen.append(rows[0])
        if rows and rows[0].status == "completed":
            break
        await asyncio.sleep(0.25)
    else:
        raise AssertionError(f"upload never completed: {seen[-1:] or rows}")
    moving = [r for r in seen if 0 < r.uploaded_size < r.total_size]
    assert len({r.uploaded_size for r in moving}) >= 2, seen
    assert all(r.total_size == 5 * MIB for r in moving)
    assert any(r.upload_speed > 0 for r in moving)
    # Consecutive distinct row versions while uploading are never more than ~2 s apart.
    stamps = sorted({r.updated_at for r in seen})
    times = [datetime.fromisoformat(stamp) for stamp in stamps]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    assert gaps and max(gaps) <= 3.0, stamps


# --------------------------------------------------------------------------- the API


async def test_uploads_api_lists_filters_and_counts(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(
            rclone_config, [rclone_target("dav", "testdav"), rclone_target("gone", "nosuch")]
        )
    )
    download, data = await fetch(svc, file_server, "api.bin", 50_000)
    await wait_uploads(svc, download["id"], all_in("completed", "failed", count=2))

    status, body = await svc.api("GET", "/api/uploads")
    assert status == 200
    assert {u["upload_target"]: u["status"] for u in body["uploads"]} == {
        "dav": "completed",
        "gone": "failed",
    }
    status, body = await svc.api("GET", "/api/uploads?status=failed")
    assert [u["upload_target"] for u in body["uploads"]] == ["gone"]
    assert body["uploads"][0]["failure_reason"] == "remote_not_found"
    status, body = await svc.api("GET", "/api/uploads?status=completed&target=dav&limit=1")
    assert status == 200 and len(body["uploads"]) == 1
    assert body["uploads"][0]["verified_size"] == len(data)

    status, stats = await svc.api("GET", "/api/uploads/statistics")
    assert status == 200
    assert stats["by_status"]["completed"] == 1 and stats["by_status"]["failed"] == 1
    assert stats["by_target"] == {"dav": {"completed": 1}, "gone": {"failed": 1}}

    status, body = await svc.api("GET", "/api/uploads?status=bogus")
    assert status == 400 and body["error"] == "bad_request"
    status, body = await svc.api("GET", "/api/uploads?limit=0")
    assert status == 400


async def test_uploads_api_retry_cancel_and_refusals(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(
            rclone_config, [rclone_target("dav", "testdav"), rclone_target("gone", "nosuch")]
        )
    )
    download, _ = await fetch(svc, file_server, "acts.bin", 40_000)
    rows = by_target(
        await wait_uploads(svc, download["id"], all_in("completed", "failed", count=2))
    )
    done, failed = rows["dav"], rows["gone"]

    # The machine forbids retrying or cancelling a completed upload: 409, nothing changes.
    for action in ("retry", "cancel"):
        status, body = await svc.api("POST", f"/api/uploads/{done.id}/{action}")
        assert status == 409, body
        assert body["error"] == "forbidden_transition"
        assert body["detail"]["status"] == "completed"
    status, body = await svc.api("POST", f"/api/uploads/{failed.id}/cancel")
    assert status == 409 and body["detail"]["status"] == "failed"

    # A retry by hand is allowed from failed and resets the count; the remote is still missing.
    status, body = await svc.api("POST", f"/api/uploads/{failed.id}/retry")
    assert status == 200, body
    assert body["status"] in ("pending", "uploading", "failed")
    again = by_target(
        await wait_uploads(svc, download["id"], all_in("completed", "failed", count=2))
    )
    assert again["gone"].failure_reason == "remote_not_found"
    assert again["dav"].status == "completed"
    assert ("failed", "pending") in await history(svc, failed.id)

    status, body = await svc.api("POST", "/api/uploads/999999/retry")
    assert status == 404 and body["error"] == "not_found"
    status, body = await svc.api("POST", "/api/uploads/abc/cancel")
    assert status == 404
    status, body = await svc.api("POST", f"/api/uploads/{done.id}/explode")
    assert status in (404, 405)


async def test_uploads_api_needs_the_token(
    service_factory: ServiceFactory, rclone_config: Path
) -> None:
    svc = await service_factory(upload_overrides(rclone_config, []))
    for method, path in (
        ("GET", "/api/uploads"),
        ("GET", "/api/uploads/statistics"),
        ("POST", "/api/uploads/1/retry"),
        ("POST", "/api/uploads/1/cancel"),
    ):
        status, body = await svc.api(method, path, auth=False)
        assert status == 401, (method, path, body)
        assert body["error"] == "unauthorized"
        status, body = await svc.api(
            method, path, auth=False, headers={"Authorization": "Bearer wrong-token"}
        )
        assert status == 401
    status, body = await svc.api("GET", "/api/uploads")
    assert status == 200 and body == {"uploads": []}


# --------------------------------------------------------------------------- pieces


def test_remote_path_of_a_target() -> None:
    assert remote_path_for(UploadTarget("a", "rclone", "od", "/Downloads"), "x.bin") == (
        "od:/Downloads/x.bin"
    )
    assert remote_path_for(UploadTarget("a", "rclone", "od", "/"), "x.bin") == "od:/x.bin"
    assert remote_path_for(UploadTarget("a", "rclone", "od", "sub/dir/"), "f") == "od:sub/dir/f"
    assert remote_path_for(UploadTarget("t", "telegram", chat_id=-100), "f") == "telegram:-100/f"


def plan_parts(source: Path, name: str, part_size: int) -> list[telegram_upload.TelegramPart]:
    return [part for f in plan_files(source, name) for part in byte_parts(f, part_size)]


def test_plan_parts_splits_files_and_walks_folders(tmp_path: Path) -> None:
    big = tmp_path / "big.iso"
    big.write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    parts = plan_parts(big, "big.iso", 4096)
    assert [(p.offset, p.length, p.name) for p in parts] == [
        (0, 4096, "big.iso.001"),
        (4096, 4096, "big.iso.002"),
        (8192, 2048, "big.iso.003"),
    ]
    assert parts[1].caption == "big.iso — part 2/3\njoin: cat big.iso.[0-9][0-9][0-9] > big.iso"
    assert not any(p.whole_file for p in parts)

    folder = tmp_path / "Album"
    (folder / "cd2").mkdir(parents=True)
    (folder / "a.flac").write_bytes(b"a" * 100)
    (folder / "cd2" / "b.flac").write_bytes(b"b" * 5000)
    (folder / "empty.txt").write_bytes(b"")
    (folder / "link").symlink_to(big)
    planned = plan_parts(folder, "Album", 4096)
    join = "join: cat b.flac.[0-9][0-9][0-9] > b.flac"
    assert [(p.name, p.length, p.caption) for p in planned] == [
        ("a.flac", 100, "Album/a.flac"),
        ("b.flac.001", 4096, f"Album/cd2/b.flac — part 1/2\n{join}"),
        ("b.flac.002", 904, f"Album/cd2/b.flac — part 2/2\n{join}"),
    ]
    assert planned[0].whole_file


def test_raw_parts_join_line_quotes_the_name_and_really_joins(tmp_path: Path) -> None:
    source = tmp_path / "my file's.bin"
    data = os.urandom(3000)
    source.write_bytes(data)
    parts = plan_parts(source, source.name, 1000)
    join = parts[0].caption.splitlines()[-1]
    assert join == """join: cat 'my file'"'"'s.bin'.[0-9][0-9][0-9] > 'my file'"'"'s.bin'"""
    received = tmp_path / "received"
    received.mkdir()
    for part in parts:
        (received / part.name).write_bytes(data[part.offset : part.offset + part.length])
    subprocess.run(["sh", "-c", join.removeprefix("join: ")], cwd=received, check=True)
    assert (received / source.name).read_bytes() == data


def test_file_window_reads_only_its_part(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    data = bytes(range(256)) * 10
    path.write_bytes(data)
    window = FileWindow(path, 1000, 700, "f.bin.002")
    try:
        window.seek(0, 2)
        assert window.tell() == 700
        window.seek(0)
        assert window.read(100) == data[1000:1100]
        assert window.read() == data[1100:1700]
        assert window.read(10) == b""
        window.seek(650)
        assert window.read(1000) == data[1650:1700]
        assert window.name == "f.bin.002"
    finally:
        window.close()
    assert window.closed


async def test_progress_writer_writes_at_least_every_heartbeat(tmp_path: Path) -> None:
    async with Database(tmp_path / "db.sqlite") as db:
        download_id = await db.create_download(NewDownload("http", "k", "http://x/a"))
        upload_id = await db.create_upload(download_id, "t", "r:/a", 3, ready=True)
        await db.mark_upload_started(upload_id, 1000)
        writer = ProgressWriter(db, upload_id, 1000, interval=0.05, heartbeat=0.2)
        writer.report(250)
        writer.start()
        try:
            await asyncio.sleep(0.15)
            row = await db.get_upload_by_id(upload_id)
            assert row is not None and row.uploaded_size == 250 and row.total_size == 1000
            first_writes = writer.writes
            await asyncio.sleep(0.6)  # nothing new reported: heartbeats only
            assert writer.writes >= first_writes + 2
            writer.report(900, 1000, 123.0)
            await asyncio.sleep(0.15)
        finally:
            await writer.stop()
        row = await db.get_upload_by_id(upload_id)
        assert row is not None and row.uploaded_size == 900 and row.upload_speed == 123.0


# --------------------------------------------------------------------------- Telegram


async def known_user(fake: FakeTelegram, client: PyrogramClient) -> int:
    """A user the bot has heard from (so its client knows the peer), as a target chat."""
    user = fake.make_user()
    await fake.feed(client, [fake.message_update(user, "hi")])
    return int(user.id)


def telegram_config(chat_id: int, **options: Any) -> UploadConfig:
    return UploadConfig(targets=(UploadTarget("tg", "telegram", chat_id=chat_id),), **options)


async def test_telegram_target_sends_parts_and_checks_each_size(
    tmp_path: Path, fake_telegram: FakeTelegram, tg_client: PyrogramClient
) -> None:
    chat_id = await known_user(fake_telegram, tg_client)
    data = os.urandom(600_000)
    async with standalone_manager(
        tmp_path,
        telegram_config(chat_id),
        telegram_client=lambda: tg_client,
        telegram_part_size=256 * 1024,
    ) as (db, manager):
        await manager.start()
        row = await completed_download(db, tmp_path / "downloads", "archive.zip", {"": data})
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)
        done = await wait_row(db, upload.id, {"completed", "failed"})

    assert done.status == "completed", done
    documents = fake_telegram.sent_documents()
    assert [d.file_name for d in documents] == [
        "archive.zip.001",
        "archive.zip.002",
        "archive.zip.003",
    ]
    assert [d.size for d in documents] == [262_144, 262_144, 600_000 - 2 * 262_144]
    assert b"".join(d.data for d in documents) == data
    join = "join: cat archive.zip.[0-9][0-9][0-9] > archive.zip"
    assert [d.caption for d in documents] == [
        f"archive.zip — part {i}/3\n{join}" for i in (1, 2, 3)
    ]
    assert {d.chat_id for d in documents} == {chat_id}
    assert {d.kind for d in documents} == {"document"}
    assert done.target_type == "telegram"
    assert done.remote_path == (
        f"telegram:{chat_id}/{documents[0].message_id}..{documents[-1].message_id}"
    )
    assert done.verified_size == len(data) and done.verified_at is not None
    assert await asyncio.to_thread(Path(row.local_path or "").read_bytes) == data


def make_video(path: Path) -> Path:
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=3:size=320x240:rate=10",
            "-pix_fmt",
            "yuv420p",
            str(path),
        ],
        check=True,
        timeout=60,
    )
    return path


async def test_telegram_video_goes_as_a_streamable_video_with_thumbnail(
    tmp_path: Path, fake_telegram: FakeTelegram, tg_client: PyrogramClient
) -> None:
    chat_id = await known_user(fake_telegram, tg_client)
    async with standalone_manager(
        tmp_path, telegram_config(chat_id), telegram_client=lambda: tg_client
    ) as (db, manager):
        await manager.start()
        row = await completed_download(db, tmp_path / "downloads", "clip.mp4", {"": b""})
        video = make_video(tmp_path / "clip.mp4")
        await asyncio.to_thread(os.replace, video, row.local_path or "")
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)
        done = await wait_row(db, upload.id, {"completed", "failed"})

    assert done.status == "completed", done
    (sent,) = fake_telegram.sent_documents()
    assert sent.kind == "video" and sent.file_name == "clip.mp4"
    assert sent.duration == 3 and (sent.width, sent.height) == (320, 240)
    assert sent.size == done.verified_size
    (request,) = fake_telegram.requests_of("messages.SendMedia")
    assert isinstance(request, raw.functions.messages.SendMedia)
    media = request.media
    assert isinstance(media, raw.types.InputMediaUploadedDocument)
    assert media.thumb is not None  # the ffmpeg frame went along
    (video_attribute,) = [
        a for a in media.attributes if isinstance(a, raw.types.DocumentAttributeVideo)
    ]
    assert video_attribute.supports_streaming
    assert not (tmp_path / "data" / "telegram-uploads" / str(upload.id)).exists()  # thumb gone


def make_uneven_video(path: Path) -> Path:
    """8 s with sound: 4 s of noisy picture (big), then 4 s of flat grey (tiny); a keyframe a
    second. Cut evenly by time, the first parts are far bigger than the last."""
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            *("-f", "lavfi", "-i", "testsrc=duration=4:size=320x240:rate=10,noise=alls=60:allf=t"),
            *("-f", "lavfi", "-i", "color=c=gray:duration=4:size=320x240:rate=10"),
            *("-f", "lavfi", "-i", "sine=frequency=440:duration=8"),
            *("-filter_complex", "[0][1]concat=n=2:v=1:a=0,format=yuv420p[v]"),
            *("-map", "[v]", "-map", "2:a", "-g", "10", "-c:v", "libx264", "-preset", "ultrafast"),
            *("-c:a", "aac", "-shortest", str(path)),
        ],
        check=True,
        timeout=60,
    )
    return path


def ffprobe_json(path: Path) -> dict[str, Any]:
    command = ["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams"]
    answer = subprocess.run(
        [*command, str(path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    parsed: dict[str, Any] = json.loads(answer.stdout)
    return parsed


@pytest.mark.slow
async def test_telegram_big_video_goes_as_playable_parts_cut_by_time(
    tmp_path: Path, fake_telegram: FakeTelegram, tg_client: PyrogramClient
) -> None:
    chat_id = await known_user(fake_telegram, tg_client)
    video = await asyncio.to_thread(make_uneven_video, tmp_path / "film.mp4")
    whole = await asyncio.to_thread(ffprobe_json, video)
    limit = 450_000  # a third of the file; one noisy second is ~340 kB
    async with standalone_manager(
        tmp_path,
        telegram_config(chat_id),
        telegram_client=lambda: tg_client,
        telegram_part_size=limit,
    ) as (db, manager):
        await manager.start()
        row = await completed_download(db, tmp_path / "downloads", "film.mp4", {"": b""})
        await asyncio.to_thread(os.replace, video, row.local_path or "")
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)
        done = await wait_row(db, upload.id, {"completed", "failed"})

    assert done.status == "completed", done
    sent = fake_telegram.sent_documents()
    count = len(sent)
    assert count >= 4  # the even first cut left parts over the limit, cut again
    numbers = range(1, count + 1)
    assert [d.file_name for d in sent] == [f"film.part{i:02d}.mp4" for i in numbers]
    assert [d.caption for d in sent] == [f"film.mp4 — part {i}/{count}" for i in numbers]
    assert {d.kind for d in sent} == {"video"}
    assert all(d.size < limit for d in sent)
    assert done.verified_size == sum(d.size for d in sent)
    durations = []
    for index, document in enumerate(sent):
        received = tmp_path / f"received{index}.mp4"
        await asyncio.to_thread(received.write_bytes, document.data)
        facts = await asyncio.to_thread(ffprobe_json, received)
        kinds = sorted(stream["codec_type"] for stream in facts["streams"])
        assert kinds == ["audio", "video"], facts  # picture and sound in every part
        durations.append(float(facts["format"]["duration"]))
        assert document.duration == round(durations[-1])
    assert sum(durations) == pytest.approx(float(whole["format"]["duration"]), abs=0.5)
    assert not (tmp_path / "data" / "telegram-uploads" / str(upload.id)).exists()  # parts gone


async def test_telegram_video_that_cannot_be_cut_goes_as_raw_parts(
    tmp_path: Path, fake_telegram: FakeTelegram, tg_client: PyrogramClient
) -> None:
    """One keyframe for the whole clip: no cut is possible, so the bytes go as .001, .002…"""
    chat_id = await known_user(fake_telegram, tg_client)
    video = await asyncio.to_thread(make_video, tmp_path / "one-gop.mp4")
    data = await asyncio.to_thread(video.read_bytes)
    async with standalone_manager(
        tmp_path,
        telegram_config(chat_id),
        telegram_client=lambda: tg_client,
        telegram_part_size=len(data) // 2 + 1,
    ) as (db, manager):
        await manager.start()
        row = await completed_download(db, tmp_path / "downloads", "one-gop.mp4", {"": b""})
        await asyncio.to_thread(os.replace, video, row.local_path or "")
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)
        done = await wait_row(db, upload.id, {"completed", "failed"})

    assert done.status == "completed", done
    sent = fake_telegram.sent_documents()
    assert [d.file_name for d in sent] == ["one-gop.mp4.001", "one-gop.mp4.002"]
    assert {d.kind for d in sent} == {"document"}
    assert b"".join(d.data for d in sent) == data
    assert sent[0].caption.endswith("join: cat one-gop.mp4.[0-9][0-9][0-9] > one-gop.mp4")


async def test_telegram_flood_wait_is_retried_after_the_backoff(
    tmp_path: Path, fake_telegram: FakeTelegram, tg_client: PyrogramClient
) -> None:
    chat_id = await known_user(fake_telegram, tg_client)
    fake_telegram.inject("messages.SendMedia", FloodWait(value=120))
    data = os.urandom(50_000)
    async with standalone_manager(
        tmp_path,
        telegram_config(chat_id, retry_backoff=0.2, max_retries=2),
        telegram_client=lambda: tg_client,
    ) as (db, manager):
        await manager.start()
        row = await completed_download(db, tmp_path / "downloads", "again.bin", {"": data})
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)
        done = await wait_row(db, upload.id, {"completed"})
        steps = [
            (e.from_status, e.to_status, e.reason)
            for e in await db.get_status_history("upload", upload.id)
        ]

    assert ("uploading", "pending", "telegram_flood_wait") in steps
    assert done.retry_count == 1
    (sent,) = fake_telegram.sent_documents()
    assert sent.data == data


async def test_telegram_target_without_the_bot_fails_clearly(tmp_path: Path) -> None:
    async with standalone_manager(tmp_path, telegram_config(12345, max_retries=0)) as (
        db,
        manager,
    ):
        await manager.start()
        row = await completed_download(db, tmp_path / "downloads", "x.bin", {"": b"x" * 10})
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)
        failed = await wait_row(db, upload.id, {"failed", "completed"})
    assert failed.status == "failed"
    assert failed.failure_reason == "telegram_unavailable"
    assert "bot" in (failed.error_message or "")


@pytest.mark.slow
async def test_telegram_target_through_the_running_bot(
    service_factory: ServiceFactory,
    file_server: FileServer,
    fake_telegram: FakeTelegram,
) -> None:
    user = fake_telegram.make_user()
    svc = await service_factory(
        {
            "telegram": {
                "api_id": 1,
                "api_hash": "x" * 32,
                "bot_token": "1:x",
                "admins": [int(user.id)],
                "max_upload_size": "1MiB",
            },
            "upload": {
                "targets": [{"name": "back", "type": "telegram", "chat_id": int(user.id)}],
                "auto_delete": True,
            },
        },
        telegram_client_factory=fake_telegram.make_client,
    )
    telegram = svc.service.parts.telegram
    assert telegram is not None and telegram.client is not None
    await fake_telegram.feed(telegram.client, [fake_telegram.message_update(user, "/start")])
    download, data = await fetch(svc, file_server, "twice.bin", 2 * MIB + 100)

    (row,) = await wait_uploads(
        svc, download["id"], lambda rows: len(rows) == 1 and rows[0].cleaned_at is not None
    )
    assert row.status == "completed" and row.upload_target == "back"
    documents = [d for d in fake_telegram.sent_documents() if d.file_name]
    assert [d.file_name for d in documents] == [f"twice.bin.00{i}" for i in (1, 2, 3)]
    assert b"".join(d.data for d in documents) == data
    assert not local_file(svc, download).exists()
