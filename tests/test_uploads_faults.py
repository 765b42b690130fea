"""Uploads when things go wrong: clouds that vanish, wrong credentials, files that vanish, a
remote copy damaged after the transfer, cancel, restarts of the service, crash leftovers.

Clouds are real ``rclone serve`` processes on 127.0.0.1 that tests stop and start by PID. The
service's rclone reads its flags from ``RCLONE_*`` variables of the environment it starts with:
``RCLONE_BWLIMIT`` slows uploads down so a test can act while one runs, and one retry at each
level makes a dead cloud fail in well under a second instead of rclone's ~10 s of retries.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from configer import UploadConfig, UploadTarget
from db import Database
from records import UploadRow
from tests.support.http_files import FileServer
from tests.support.processes import ProcessReaper, free_port, pid_alive
from tests.support.rclone_cloud import RcloneCloud
from tests.support.service import ServiceFactory, service_config
from tests.test_uploads import (
    MIB,
    all_in,
    by_target,
    completed_download,
    fetch,
    history,
    local_file,
    rclone_target,
    standalone_manager,
    upload_overrides,
    wait_row,
    wait_uploads,
)

FAIL_FAST = {"RCLONE_RETRIES": "1", "RCLONE_LOW_LEVEL_RETRIES": "1", "RCLONE_CONTIMEOUT": "3s"}


@contextmanager
def rclone_environment(monkeypatch: pytest.MonkeyPatch, **values: str) -> Iterator[None]:
    """RCLONE_* variables for rclone started inside the block (the service captures them)."""
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    try:
        yield
    finally:
        for name in values:
            monkeypatch.delenv(name, raising=False)


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def pid_of_upload(data_dir: Path, upload_id: int) -> int | None:
    try:
        return int((data_dir / "rclone-pids" / f"upload-{upload_id}.pid").read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- a manager on its own


async def test_local_file_gone_before_the_upload_fails_at_once(
    tmp_path: Path, rclone_config: Path, webdav_cloud: RcloneCloud
) -> None:
    config = UploadConfig(
        targets=(UploadTarget("dav", "rclone", "testdav", "/up"),),
        rclone_config=str(rclone_config),
        retry_backoff=0.1,
    )
    async with standalone_manager(tmp_path, config) as (db, manager):
        await manager.start()
        row = await completed_download(db, tmp_path / "downloads", "gone.bin", {"": b"x" * 5000})
        assert row.local_path is not None
        await asyncio.to_thread(Path(row.local_path).unlink)
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)
        failed = await wait_row(db, upload.id, {"failed", "completed"})

    assert failed.status == "failed"
    assert failed.failure_reason == "local_file_missing"
    assert "gone.bin" in (failed.error_message or "")
    assert failed.retry_count == 0 and failed.next_attempt_at is None
    assert not (webdav_cloud.root / "up" / "gone.bin").exists()


@pytest.mark.slow
async def test_verify_reads_the_remote_back_and_catches_damage(
    tmp_path: Path, rclone_config: Path, webdav_cloud: RcloneCloud
) -> None:
    """A folder upload: the first file is damaged on the cloud while rclone still sends the
    second; rclone itself succeeds, the read-back finds the size mismatch."""
    config = UploadConfig(
        targets=(UploadTarget("dav", "rclone", "testdav", "/up"),),
        rclone_config=str(rclone_config),
        max_retries=0,
    )
    first, second = os.urandom(200 * 1024), os.urandom(3 * MIB)
    slow_and_ordered = ("--bwlimit", "1M", "--transfers", "1", "--order-by", "name,ascending")
    async with standalone_manager(tmp_path, config, rclone_args=slow_and_ordered) as (
        db,
        manager,
    ):
        row = await completed_download(
            db, tmp_path / "downloads", "pack", {"a.bin": first, "z/b.bin": second}
        )
        await manager.start()
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)
        remote_first = webdav_cloud.root / "up" / "pack" / "a.bin"

        async def first_file_sent() -> bool:
            current = await db.get_upload_by_id(upload.id)
            return (
                current is not None
                and current.status == "uploading"
                and current.uploaded_size > len(first) + 300 * 1024
                and remote_first.is_file()
                and remote_first.stat().st_size == len(first)
            )

        await wait_for(first_file_sent, 30, "a.bin on the cloud while b.bin is sent")
        remote_first.write_bytes(first[:1000])  # the cloud loses most of a.bin
        failed = await wait_row(db, upload.id, {"failed", "completed"})

    assert failed.status == "failed", failed
    assert failed.failure_reason == "verify_size_mismatch"
    assert "a.bin" in (failed.error_message or "")
    assert failed.verified_at is None
    local = Path(row.local_path or "")
    assert (local / "a.bin").read_bytes() == first  # nothing local is touched
    assert (local / "z" / "b.bin").read_bytes() == second


# --------------------------------------------------------------------------- clouds that fail


def waiting_for_retry(rows: list[UploadRow]) -> bool:
    """One upload, back to `pending` after a failure, with the time of its next try."""
    return len(rows) == 1 and rows[0].status == "pending" and rows[0].next_attempt_at is not None


async def test_while_a_retry_waits_the_upload_is_pending_with_its_time_and_count(
    tmp_path: Path,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The cloud is down: the failure can heal, so the row waits as `pending` with
    next_attempt_at and its count raised (never `failed`, which is final); nothing starts it
    before its time, and a retry by hand starts it at once."""
    await webdav_cloud.stop()
    config = UploadConfig(
        targets=(UploadTarget("dav", "rclone", "testdav", "/up"),),
        rclone_config=str(rclone_config),
        retry_backoff=20,
        max_retries=3,
    )
    data = os.urandom(5000)
    with rclone_environment(monkeypatch, **FAIL_FAST):
        manager_of = standalone_manager(tmp_path, config)
    async with manager_of as (db, manager):
        await manager.start()
        row = await completed_download(db, tmp_path / "downloads", "wait.bin", {"": data})
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)

        async def waits() -> bool:
            return waiting_for_retry(await db.get_uploads_by_download(row.id))

        await wait_for(waits, 30, "the upload waiting for its retry")
        waiting = await db.get_upload_by_id(upload.id)
        assert waiting is not None and waiting.next_attempt_at is not None
        assert waiting.retry_count == 1 and waiting.failure_reason == "network", waiting
        assert waiting.error_message and waiting.upload_speed == 0
        wait = datetime.fromisoformat(waiting.next_attempt_at) - datetime.now(UTC)
        assert 10 < wait.total_seconds() <= 20
        steps = [
            (h.from_status, h.to_status) for h in await db.get_status_history("upload", upload.id)
        ]
        assert steps == [(None, "pending"), ("pending", "uploading"), ("uploading", "pending")]

        # Not due: the dispatcher leaves it and names the time until it is.
        assert 10 < await manager.dispatch_once() <= 20
        await asyncio.sleep(0.5)
        assert manager.running() == []
        assert await db.get_upload_by_id(upload.id) == waiting

        await webdav_cloud.start()
        retried = await manager.retry(upload.id)
        assert (retried.status, retried.retry_count, retried.next_attempt_at) == (
            "pending",
            0,
            None,
        )
        done = await wait_row(db, upload.id, {"completed", "failed"})

    assert done.status == "completed", done
    assert (webdav_cloud.root / "up" / "wait.bin").read_bytes() == data


@pytest.mark.slow
async def test_cloud_gone_mid_upload_then_back_the_retry_succeeds(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    overrides = upload_overrides(
        rclone_config, [rclone_target("dav", "testdav")], retry_backoff=2.0, max_retries=3
    )
    with rclone_environment(monkeypatch, RCLONE_BWLIMIT="1M", **FAIL_FAST):
        svc = await service_factory(overrides)
    download, data = await fetch(svc, file_server, "big.bin", 4 * MIB)
    (upload,) = await wait_uploads(
        svc,
        download["id"],
        lambda rows: len(rows) == 1 and rows[0].uploaded_size > 0,
        what="the upload under way",
    )
    await webdav_cloud.stop()
    (waiting,) = await wait_uploads(svc, download["id"], waiting_for_retry, what="a failure")
    assert waiting.failure_reason == "network", waiting
    assert waiting.retry_count == 1
    assert local_file(svc, download).is_file()
    await webdav_cloud.start()

    (done,) = await wait_uploads(svc, download["id"], all_in("completed"), timeout=90)
    assert (webdav_cloud.root / "up" / "big.bin").read_bytes() == data
    assert done.retry_count >= 1 and done.verified_size == len(data)
    steps = await history(svc, upload.id)
    assert ("uploading", "pending") in steps
    assert "failed" not in {status for step in steps for status in step}  # failed is final


async def test_cloud_that_stays_down_fails_after_max_retries_and_keeps_the_file(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await webdav_cloud.stop()
    overrides = upload_overrides(
        rclone_config,
        [rclone_target("dav", "testdav")],
        retry_backoff=0.1,
        max_retries=2,
        auto_delete=True,
    )
    with rclone_environment(monkeypatch, **FAIL_FAST):
        svc = await service_factory(overrides)
    download, data = await fetch(svc, file_server, "stuck.bin", 300_000)

    (failed,) = await wait_uploads(
        svc,
        download["id"],
        lambda rows: len(rows) == 1 and rows[0].status == "failed" and not rows[0].next_attempt_at,
        what="the final failure",
    )
    assert failed.failure_reason == "network"
    assert failed.retry_count == 2
    assert failed.error_message and failed.error_code
    assert [step for step in await history(svc, failed.id) if step[1] == "uploading"] == [
        ("pending", "uploading")
    ] * 3
    assert local_file(svc, download).read_bytes() == data  # kept, auto_delete or not
    assert failed.cleaned_at is None

    # A retry by hand resets the count; with the cloud back it completes (then auto-deletes).
    await webdav_cloud.start()
    status, body = await svc.api("POST", f"/api/uploads/{failed.id}/retry")
    assert status == 200 and body["retry_count"] == 0, body
    (done,) = await wait_uploads(
        svc, download["id"], lambda rows: rows[0].cleaned_at is not None, what="cleanup"
    )
    assert done.status == "completed"
    assert (webdav_cloud.root / "up" / "stuck.bin").read_bytes() == data
    assert not local_file(svc, download).exists()


async def test_wrong_credentials_fail_at_once_and_keep_the_file(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    sftp_bad_password_remote: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    overrides = upload_overrides(rclone_config, [rclone_target("ssh", sftp_bad_password_remote)])
    with rclone_environment(monkeypatch, **FAIL_FAST):
        svc = await service_factory(overrides)
    download, data = await fetch(svc, file_server, "secret.bin", 20_000)

    (failed,) = await wait_uploads(svc, download["id"], all_in("failed"))
    assert failed.failure_reason == "auth_failed"
    assert failed.retry_count == 0 and failed.next_attempt_at is None
    assert "not-the-password" not in (failed.error_message or "")
    assert local_file(svc, download).read_bytes() == data


@pytest.mark.slow
async def test_auto_delete_waits_for_every_target(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    sftp_cloud: RcloneCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    await sftp_cloud.stop()
    overrides = upload_overrides(
        rclone_config,
        [rclone_target("dav", "testdav"), rclone_target("ssh", "testsftp")],
        auto_delete=True,
        retry_backoff=2.0,
        max_retries=5,
    )
    with rclone_environment(monkeypatch, **FAIL_FAST):
        svc = await service_factory(overrides)
    download, data = await fetch(svc, file_server, "both.bin", 500_000)
    path = local_file(svc, download)

    rows = by_target(
        await wait_uploads(
            svc,
            download["id"],
            lambda rs: (
                len(rs) == 2
                and by_target(rs)["dav"].status == "completed"
                and by_target(rs)["ssh"].status == "pending"
                and by_target(rs)["ssh"].next_attempt_at is not None
            ),
            what="one target done, the other waiting for its retry",
        )
    )
    assert rows["ssh"].failure_reason == "network" and rows["ssh"].retry_count >= 1
    assert path.read_bytes() == data  # one target is not all of them
    assert rows["dav"].cleaned_at is None and rows["ssh"].cleaned_at is None

    await sftp_cloud.start()
    rows = by_target(
        await wait_uploads(
            svc,
            download["id"],
            lambda rs: len(rs) == 2 and all(r.cleaned_at is not None for r in rs),
            timeout=90,
            what="both completed and cleaned",
        )
    )
    assert rows["dav"].status == rows["ssh"].status == "completed"
    assert (sftp_cloud.root / "up" / "both.bin").read_bytes() == data
    assert not path.exists()


# --------------------------------------------------------------------------- cancel


@pytest.mark.slow
async def test_cancel_stops_rclone_and_keeps_the_file(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with rclone_environment(monkeypatch, RCLONE_BWLIMIT="512k"):
        svc = await service_factory(
            upload_overrides(rclone_config, [rclone_target("dav", "testdav")], auto_delete=True)
        )
    download, data = await fetch(svc, file_server, "cancel.bin", 4 * MIB)
    (upload,) = await wait_uploads(
        svc,
        download["id"],
        lambda rows: len(rows) == 1 and rows[0].uploaded_size > 0,
        what="the upload under way",
    )
    pid = pid_of_upload(svc.config.data_dir, upload.id)
    assert pid is not None and pid_alive(pid)

    status, body = await svc.api("POST", f"/api/uploads/{upload.id}/cancel")
    assert status == 200, body
    assert body["status"] == "cancelled"

    async def rclone_gone() -> bool:
        return not pid_alive(pid)

    await wait_for(rclone_gone, 5, f"rclone pid {pid} to go")
    assert pid_of_upload(svc.config.data_dir, upload.id) is None
    assert local_file(svc, download).read_bytes() == data
    await asyncio.sleep(0.5)  # nothing restarts it behind the user's back
    (still,) = await svc.service.parts.store.get_uploads_by_download(download["id"])
    assert still.status == "cancelled" and still.cleaned_at is None

    status, body = await svc.api("POST", f"/api/uploads/{upload.id}/cancel")
    assert status == 409 and body["detail"]["status"] == "cancelled"
    status, body = await svc.api("POST", f"/api/uploads/{upload.id}/retry")
    assert status == 200 and body["status"] in ("pending", "uploading")
    assert ("cancelled", "pending") in await history(svc, upload.id)


@pytest.mark.slow
async def test_deleting_the_download_stops_its_upload(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with rclone_environment(monkeypatch, RCLONE_BWLIMIT="512k"):
        svc = await service_factory(
            upload_overrides(rclone_config, [rclone_target("dav", "testdav")])
        )
    download, _ = await fetch(svc, file_server, "deleted.bin", 3 * MIB)
    (upload,) = await wait_uploads(
        svc, download["id"], lambda rows: len(rows) == 1 and rows[0].uploaded_size > 0
    )
    pid = pid_of_upload(svc.config.data_dir, upload.id)
    assert pid is not None

    status, body = await svc.api("DELETE", f"/api/downloads/{download['id']}?delete_file=true")
    assert status == 200, body
    assert not pid_alive(pid)
    assert svc.service.parts.uploads.running() == []
    assert await svc.service.parts.store.get_upload_by_id(upload.id) is None


# --------------------------------------------------------------------------- restarts


@pytest.mark.slow
async def test_service_restart_mid_upload_finishes_it_without_duplicates(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    overrides = upload_overrides(rclone_config, [rclone_target("dav", "testdav")])
    with rclone_environment(monkeypatch, RCLONE_BWLIMIT="1M"):
        first = await service_factory(overrides)
    download, data = await fetch(first, file_server, "resume.bin", 4 * MIB)
    (upload,) = await wait_uploads(
        first, download["id"], lambda rows: len(rows) == 1 and rows[0].uploaded_size > 0
    )
    pid = pid_of_upload(first.config.data_dir, upload.id)
    await first.stop()
    assert pid is not None and not pid_alive(pid)
    async with Database(first.config.database.path) as db:
        left = await db.get_upload_by_id(upload.id)
    assert left is not None and left.status == "uploading"

    second = await service_factory(config_path=first.config_path)
    rows = await wait_uploads(second, download["id"], all_in("completed"))
    assert [r.id for r in rows] == [upload.id]
    assert (webdav_cloud.root / "up" / "resume.bin").read_bytes() == data
    assert await history(second, upload.id) == [
        (None, "pending"),
        ("pending", "uploading"),
        ("uploading", "completed"),
    ]


async def test_restart_creates_missing_uploads_for_completed_downloads(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    tmp_path: Path,
) -> None:
    first = await service_factory(upload_overrides(rclone_config, []))
    download, data = await fetch(first, file_server, "later.bin", 70_000)
    assert await first.service.parts.store.get_uploads_by_download(download["id"]) == []
    await first.stop()

    path = service_config(
        first.root, upload_overrides(rclone_config, [rclone_target("dav", "testdav", "/late")])
    )
    second = await service_factory(config_path=path)
    (row,) = await wait_uploads(second, download["id"], all_in("completed"))
    assert row.upload_target == "dav"
    assert (webdav_cloud.root / "late" / "later.bin").read_bytes() == data
    await second.stop()

    third = await service_factory(config_path=path)  # nothing new: no second row
    await asyncio.sleep(0.5)
    assert len(await third.service.parts.store.get_uploads_by_download(download["id"])) == 1


async def test_rclone_left_by_a_crash_is_stopped_at_start(
    service_factory: ServiceFactory,
    rclone_config: Path,
    tmp_path: Path,
    process_reaper: ProcessReaper,
) -> None:
    leftover = await asyncio.create_subprocess_exec(
        "rclone",
        "--config",
        str(tmp_path / "none.conf"),
        "rcd",
        "--rc-no-auth",
        "--rc-addr",
        f"127.0.0.1:{free_port()}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    process_reaper.track(leftover.pid)
    pid_dir = tmp_path / "svc" / "data" / "rclone-pids"
    pid_dir.mkdir(parents=True)
    (pid_dir / "upload-999.pid").write_text(f"{leftover.pid}\n")
    unrelated = pid_dir / "upload-998.pid"
    unrelated.write_text(f"{os.getpid()}\n")  # a pid reused by something else: left alone

    try:
        await service_factory(upload_overrides(rclone_config, []), name="svc")
        assert await asyncio.wait_for(leftover.wait(), timeout=10) is not None
        assert not list(pid_dir.glob("*.pid"))
    finally:
        if leftover.returncode is None:
            os.kill(leftover.pid, signal.SIGKILL)
            await leftover.wait()
