"""Faults injected into MistRelay running as its own process (`python app.py --config X`).

Each test crashes or starves a real part — the embedded aria2c, an external aria2c, MistRelay
itself, the download disk, the web server under load — and then measures what the promise
"nothing is lost" means: every job ends in a true final state, byte-exact, with no duplicate,
stuck or premature row, and no process left behind. Every test records its figures for
RELIABILITY.md through the `reliability` fixture.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from aria2_client.process import EmbeddedAria2
from tests.support.http_files import MIB, FileServer
from tests.support.processes import ProcessReaper, free_port, make_test_aria2, pid_alive
from tests.support.rclone_cloud import RcloneCloud
from tests.support.reliability import Recorder
from tests.support.service_process import (
    FINAL_DOWNLOAD_STATUSES,
    HealthProbe,
    ServiceProcess,
    ServiceProcessFactory,
    bytes_lost,
    integrity_check,
    wait_until,
)

# --------------------------------------------------------------------------- helpers


async def progressed(svc: ServiceProcess, download_id: int, fraction: float) -> bool:
    """True once the download has at least `fraction` of its bytes (by the API)."""
    with contextlib.suppress(Exception):
        row = await svc.download(download_id)
        total = int(row["total_length"] or 0)
        return total > 0 and int(row["completed_length"]) >= fraction * total
    return False


async def aria2_state(svc: ServiceProcess) -> str | None:
    with contextlib.suppress(Exception):
        status, body = await svc.api("GET", "/api/health", auth=False, timeout=3)
        if status == 200:
            return str(body["aria2"])
    return None


@dataclass
class CompletionSampler:
    """Samples every download's status (API) and its file's size on disk, over and over.

    A violation is a row that says `completed` while its file is not whole (the row must never
    run ahead of the disk), or a row that leaves `completed` again.
    """

    svc: ServiceProcess
    files: dict[int, tuple[Path, int]]  # download id -> (file path, expected size)
    interval: float = 0.05
    samples: int = 0
    violations: list[str] = field(default_factory=list)
    seen: dict[int, list[str]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            for download_id, (path, size) in self.files.items():
                try:
                    status, row = await self.svc.api(
                        "GET", f"/api/downloads/{download_id}", timeout=5
                    )
                except Exception:
                    continue  # the service may be down on purpose
                if status != 200:
                    continue
                # Read the disk only after the row: a row that says completed must already be
                # true of the disk.
                on_disk = path.stat().st_size if path.exists() else -1
                self.samples += 1
                history = self.seen.setdefault(download_id, [])
                if not history or history[-1] != row["status"]:
                    history.append(row["status"])
                if row["status"] == "completed" and on_disk != size:
                    self.violations.append(
                        f"download {download_id} completed with {on_disk} of {size} bytes on disk"
                    )
                if "completed" in history[:-1]:
                    self.violations.append(f"download {download_id} left completed: {history}")
            await asyncio.sleep(self.interval)


@dataclass
class CleanupWatcher:
    """Watches auto-delete: a local file that was once whole may disappear only after every
    upload of its download is completed and verified."""

    svc: ServiceProcess
    files: dict[int, tuple[Path, int]]
    interval: float = 0.05
    violations: list[str] = field(default_factory=list)
    whole: set[int] = field(default_factory=set)
    deleted: set[int] = field(default_factory=set)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _check_once(self) -> None:
        for download_id, (path, size) in self.files.items():
            # The disk first, the database after: a deletion seen on disk must already be
            # preceded by its verification in the database.
            exists = path.exists()
            if exists and path.stat().st_size == size:
                self.whole.add(download_id)
            if exists or download_id not in self.whole or download_id in self.deleted:
                continue
            uploads = self.svc.query(
                "SELECT id, status, verified_at FROM uploads WHERE download_id = ?",
                (download_id,),
            )
            self.deleted.add(download_id)
            unverified = [u["id"] for u in uploads if u["verified_at"] is None]
            if not uploads or unverified or any(u["status"] != "completed" for u in uploads):
                self.violations.append(
                    f"download {download_id}: local file deleted while uploads "
                    f"{[(u['id'], u['status'], u['verified_at']) for u in uploads]}"
                )

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._check_once)
            await asyncio.sleep(self.interval)


def upload_overrides(rclone_config: Path, **upload: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "targets": [{"name": "dav", "type": "rclone", "remote": "testdav", "path": "/up"}],
        "rclone_config": str(rclone_config),
        "auto_delete": True,
        "retry_backoff": 0.5,
        "max_retries": 3,
    }
    settings.update(upload)
    return {"upload": settings}


def duplicate_rows(svc: ServiceProcess) -> int:
    """Rows beyond the first per download source, and per (download, target) upload."""
    downloads = svc.query(
        "SELECT COALESCE(SUM(n - 1), 0) FROM "
        "(SELECT COUNT(*) AS n FROM downloads GROUP BY source_key)"
    )
    uploads = svc.query(
        "SELECT COALESCE(SUM(n - 1), 0) FROM "
        "(SELECT COUNT(*) AS n FROM uploads GROUP BY download_id, upload_target)"
    )
    return int(downloads[0][0]) + int(uploads[0][0])


def plant_leftovers(
    svc: ServiceProcess, local: Path, rclone_config: Path
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    """A slow rclone upload that outlived its service (output to nowhere, own session) and a
    non-rclone process, each named in a pid file of the crashed run."""
    pid_dir = svc.data_dir / "rclone-pids"
    pid_dir.mkdir(parents=True, exist_ok=True)
    remote = "testdav:/stray/left-over.bin"
    stray = subprocess.Popen(
        [
            "rclone",
            "--config",
            str(rclone_config),
            "--bwlimit",
            "64k",
            "copyto",
            str(local),
            remote,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    (pid_dir / "upload-9001.pid").write_text(f"{stray.pid}\n")
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    (pid_dir / "upload-9002.pid").write_text(f"{bystander.pid}\n")
    return stray, bystander


def pid_file_pids(svc: ServiceProcess) -> list[int]:
    pids: list[int] = []
    for pid_file in (svc.data_dir / "rclone-pids").glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pids.append(int(pid_file.read_text().strip()))
    return pids


# --------------------------------------------------------------------------- fault 1: aria2c


# Slow enough that aria2c is killed half way through each file, yet fast enough for a test;
# the control files are saved every second, so a resume fetches about a second's worth again.
RESUME_SIZE = 24 * MIB
RESUME_RATE = 1 * MIB
RESUME_LIMIT = 0.10  # at most this share of a file fetched a second time


def fetched_again(file_server: FileServer, name: str, size: int) -> int:
    """Bytes of `name` the file server sent beyond the file's size (0: fetched exactly once)."""
    return max(0, file_server.bytes_sent.get(f"/slow/{name}", 0) - size)


def resumed_with_range(file_server: FileServer, name: str) -> bool:
    """Whether a request for `name` asked for a range that does not start at byte 0."""
    return any(
        r.path == f"/slow/{name}" and r.range_header and not r.range_header.startswith("bytes=0-")
        for r in file_server.requests
    )


@pytest.mark.slow
@pytest.mark.fault(
    "embedded aria2c SIGKILLed mid-download",
    promise="aria2c is restarted within 10 s; every download resumes where it was (at most 10 % "
    "of it fetched again) and completes byte-exact; a row is never completed before its file "
    "is whole",
)
async def test_embedded_aria2c_killed_mid_download(
    service_process: ServiceProcessFactory,
    file_server: FileServer,
    reliability: Recorder,
) -> None:
    svc = service_process()
    await svc.start()
    sources = {
        f"crash-{i}.bin": file_server.add_file(f"crash-{i}.bin", size=RESUME_SIZE, seed=10 + i)
        for i in range(3)
    }
    ids = await svc.add(*(file_server.url(n, route="slow", rate=RESUME_RATE) for n in sources))
    files = {
        download_id: (svc.download_dir / str(download_id) / name, data)
        for download_id, (name, data) in zip(ids, sources.items(), strict=True)
    }
    sampler = CompletionSampler(svc, {i: (p, len(d)) for i, (p, d) in files.items()})
    sampler.start()
    try:
        await wait_until(lambda: progressed(svc, ids[0], 0.5), 60, what="half of download 1")
        old = svc.child_pids("aria2c")
        assert len(old) == 1, svc.children()
        os.kill(old[0], signal.SIGKILL)
        killed_at = time.monotonic()
        new = await wait_until(
            lambda: [p for p in svc.child_pids("aria2c") if p not in old],
            10,
            what="a new aria2c after the kill",
        )
        restarted_after = time.monotonic() - killed_at
        await wait_until(
            lambda: _is(aria2_state(svc), "connected"), 10, what="aria2 connected again"
        )
        rows = await svc.wait_all_final(ids, timeout=120)
        await asyncio.sleep(1.0)  # keep sampling: a finished row must stay finished
    finally:
        await sampler.stop()

    final = {i: await svc.download(i) for i in ids}
    wrong = list(sampler.violations)
    for download_id, row in final.items():
        path, data = files[download_id]
        if (
            row["status"] != "completed"
            or row["completed_length"] != len(data)
            or row["total_length"] != len(data)
            or row["local_path"] != str(path)
        ):
            wrong.append(f"download {download_id}: {row['status']} {row['local_path']}")
    lost = sum(bytes_lost(path, data) for path, data in files.values())
    finished = sum(1 for r in rows.values() if r["status"] in FINAL_DOWNLOAD_STATUSES)
    again = {name: fetched_again(file_server, name, RESUME_SIZE) for name in sources}
    resumed = {name: resumed_with_range(file_server, name) for name in sources}
    reliability.record(
        "embedded aria2c SIGKILLed mid-download",
        "aria2c is restarted within 10 s; every download resumes where it was (at most 10 % of "
        "it fetched again) and completes byte-exact; a row is never completed before its file "
        "is whole",
        jobs_started=len(ids),
        jobs_finished=finished,
        rows_wrong=len(wrong),
        bytes_lost=lost,
        extra={
            "aria2c restarted after": f"{restarted_after:.1f} s",
            "status samples": sampler.samples,
            "resumed with Range": all(resumed.values()),
            "fetched again": f"{max(again.values()) * 100 / RESUME_SIZE:.1f} % at most",
        },
    )
    assert new and restarted_after < 10
    assert not wrong, wrong
    assert lost == 0
    assert sampler.samples > 20
    assert all(resumed.values()), resumed
    assert max(again.values()) <= RESUME_LIMIT * RESUME_SIZE, again


@pytest.mark.slow
@pytest.mark.fault(
    "MistRelay SIGKILLed half way through a download",
    promise="after the restart the download resumes where it was (at most 10 % of it fetched "
    "again) and completes byte-exact under the same row",
)
async def test_service_killed_mid_download_resumes(
    service_process: ServiceProcessFactory,
    file_server: FileServer,
    reliability: Recorder,
) -> None:
    svc = service_process()
    await svc.start()
    data = file_server.add_file("resume.bin", size=RESUME_SIZE, seed=77)
    [download_id] = await svc.add(file_server.url("resume.bin", route="slow", rate=RESUME_RATE))
    await wait_until(lambda: progressed(svc, download_id, 0.5), 60, what="half of the download")
    svc.kill(signal.SIGKILL)
    assert await svc.wait_exit(10) == -signal.SIGKILL
    left = await svc.wait_children_gone("aria2c", timeout=10)
    await svc.start()
    row = await svc.wait_download(download_id, FINAL_DOWNLOAD_STATUSES, timeout=120)

    path = svc.download_dir / str(download_id) / "resume.bin"
    lost = bytes_lost(path, data)
    again = fetched_again(file_server, "resume.bin", RESUME_SIZE)
    resumed = resumed_with_range(file_server, "resume.bin")
    rows = svc.query("SELECT id FROM downloads")
    wrong = [] if row["status"] == "completed" and row["local_path"] == str(path) else [row]
    reliability.record(
        "MistRelay SIGKILLed half way through a download",
        "after the restart the download resumes where it was (at most 10 % of it fetched "
        "again) and completes byte-exact under the same row",
        jobs_started=1,
        jobs_finished=int(row["status"] in FINAL_DOWNLOAD_STATUSES),
        rows_wrong=len(wrong) + len(rows) - 1,
        bytes_lost=lost,
        extra={
            "resumed with Range": resumed,
            "fetched again": f"{again * 100 / RESUME_SIZE:.1f} %",
        },
    )
    assert left == [], f"aria2c outlived the service: {left}"
    assert not wrong, wrong
    assert len(rows) == 1
    assert lost == 0
    assert resumed, [(r.path, r.range_header) for r in file_server.requests]
    assert again <= RESUME_LIMIT * RESUME_SIZE, again


async def _is(value: Any, expected: str) -> bool:
    return (await value) == expected


@pytest.mark.slow
@pytest.mark.fault(
    "external aria2 SIGKILLed, then started again",
    promise="/api/health says aria2 is down while it is gone; jobs wait (none fails) and "
    "continue when it is back",
)
async def test_external_aria2_goes_away_and_comes_back(
    service_process: ServiceProcessFactory,
    file_server: FileServer,
    tmp_path: Path,
    process_reaper: ProcessReaper,
    reliability: Recorder,
) -> None:
    external: EmbeddedAria2 = make_test_aria2(
        tmp_path / "external-aria2", port=free_port(), secret=secrets.token_hex(24)
    )
    await external.start()
    process_reaper.track(external.pid)
    try:
        svc = service_process(
            {"aria2": {"rpc_url": external.rpc_url, "rpc_secret": external.secret}}
        )
        await svc.start()
        await wait_until(
            lambda: _is(aria2_state(svc), "connected"), 10, what="connected to the external aria2"
        )
        assert svc.child_pids("aria2c") == [], "external mode must not spawn its own aria2c"
        sources = {
            f"ext-{i}.bin": file_server.add_file(f"ext-{i}.bin", size=16 * MIB, seed=20 + i)
            for i in range(2)
        }
        ids = await svc.add(*(file_server.url(n, route="slow", rate=4 * MIB) for n in sources))
        await wait_until(lambda: progressed(svc, ids[0], 0.2), 30, what="20 % of download 1")

        assert external.pid is not None
        os.kill(external.pid, signal.SIGKILL)
        await external.wait_exit()
        await wait_until(lambda: _is(aria2_state(svc), "down"), 10, what="health: aria2 down")
        # A job added while aria2 is away is accepted and waits.
        late = file_server.add_file("ext-late.bin", size=2 * MIB, seed=29)
        ids += await svc.add(file_server.url("ext-late.bin"))
        sources["ext-late.bin"] = late
        await asyncio.sleep(2.0)
        waiting = {i: (await svc.download(i))["status"] for i in ids}
        health_while_down = await aria2_state(svc)

        await external.start()
        process_reaper.track(external.pid)
        await wait_until(
            lambda: _is(aria2_state(svc), "connected"), 15, what="health: aria2 connected"
        )
        rows = await svc.wait_all_final(ids, timeout=90)
    finally:
        await external.stop(timeout=5)

    files = {
        download_id: (svc.download_dir / str(download_id) / name, data)
        for download_id, (name, data) in zip(ids, sources.items(), strict=True)
    }
    wrong = [f"{i}: {s} while aria2 was down" for i, s in waiting.items() if s in ("failed",)]
    wrong += [f"{i}: {r['status']}" for i, r in rows.items() if r["status"] != "completed"]
    lost = sum(bytes_lost(path, data) for path, data in files.values())
    reliability.record(
        "external aria2 SIGKILLed, then started again",
        "/api/health says aria2 is down while it is gone; jobs wait (none fails) and continue "
        "when it is back",
        jobs_started=len(ids),
        jobs_finished=sum(1 for r in rows.values() if r["status"] in FINAL_DOWNLOAD_STATUSES),
        rows_wrong=len(wrong),
        bytes_lost=lost,
        extra={"statuses while down": ", ".join(f"{i}={s}" for i, s in waiting.items())},
    )
    assert health_while_down == "down"
    assert all(s in ("pending", "waiting", "downloading") for s in waiting.values()), waiting
    assert not wrong, wrong
    assert lost == 0


# --------------------------------------------------------------------------- fault 2: MistRelay


@pytest.mark.slow
@pytest.mark.fault(
    "MistRelay SIGKILLed mid-download, then restarted",
    promise="aria2c exits by itself; after the restart every job completes, uploads and is "
    "cleaned up once verified; no duplicate row",
)
async def test_service_killed_mid_download(
    service_process: ServiceProcessFactory,
    file_server: FileServer,
    webdav_cloud: RcloneCloud,
    rclone_config: Path,
    reliability: Recorder,
) -> None:
    svc = service_process(upload_overrides(rclone_config))
    await svc.start()
    sources = {
        f"svc-{i}.bin": file_server.add_file(f"svc-{i}.bin", size=16 * MIB, seed=30 + i)
        for i in range(3)
    }
    ids = await svc.add(*(file_server.url(n, route="slow", rate=4 * MIB) for n in sources))
    files = {
        download_id: (svc.download_dir / str(download_id) / name, data)
        for download_id, (name, data) in zip(ids, sources.items(), strict=True)
    }
    watcher = CleanupWatcher(svc, {i: (p, len(d)) for i, (p, d) in files.items()})
    watcher.start()
    try:
        for download_id in ids:
            await wait_until(
                functools.partial(progressed, svc, download_id, 0.1),
                30,
                what=f"download {download_id} under way",
            )
        aria2_before = svc.child_pids("aria2c")
        assert len(aria2_before) == 1
        svc.kill(signal.SIGKILL)
        assert await svc.wait_exit(10) == -signal.SIGKILL
        killed_at = time.monotonic()
        left = await svc.wait_children_gone("aria2c", timeout=10)
        aria2_gone_after = time.monotonic() - killed_at
        integrity_after_kill = integrity_check(svc.db_path)
        statuses_after_kill = {
            r["id"]: r["status"] for r in svc.query("SELECT id, status FROM downloads")
        }

        await svc.start()
        rows = await svc.wait_all_final(ids, timeout=90)
        uploads = await wait_until(
            lambda: _uploads_settled(svc, ids), 90, what="every upload completed and cleaned"
        )
        await asyncio.sleep(0.5)
    finally:
        await watcher.stop()

    wrong = list(watcher.violations)
    lost = 0
    for download_id, (path, data) in files.items():
        row = rows[download_id]
        if row["status"] != "completed":
            wrong.append(f"download {download_id}: {row['status']}")
        remote = webdav_cloud.root / "up" / path.name
        lost += bytes_lost(remote, data)
        if path.exists():
            wrong.append(f"download {download_id}: local file kept after verified uploads")
    for upload in uploads:
        if upload["status"] != "completed" or upload["verified_at"] is None:
            wrong.append(f"upload {upload['id']}: {upload['status']}")
    duplicates = duplicate_rows(svc)
    reliability.record(
        "MistRelay SIGKILLed mid-download, then restarted",
        "aria2c exits by itself; after the restart every job completes, uploads and is cleaned "
        "up once verified; no duplicate row",
        jobs_started=len(ids),
        jobs_finished=sum(1 for r in rows.values() if r["status"] in FINAL_DOWNLOAD_STATUSES),
        rows_wrong=len(wrong) + duplicates,
        bytes_lost=lost,
        extra={
            "aria2c gone after": f"{aria2_gone_after:.1f} s",
            "statuses at the kill": ", ".join(f"{k}={v}" for k, v in statuses_after_kill.items()),
        },
    )
    assert left == [], f"aria2c outlived the service: {left}"
    assert integrity_after_kill == "ok"
    assert len(uploads) == len(ids)
    assert duplicates == 0
    assert not wrong, wrong
    assert lost == 0


def _uploads_settled(svc: ServiceProcess, ids: Iterable[int]) -> list[Any] | None:
    """The uploads of `ids` once every one is final and cleaned (auto_delete), else None."""
    wanted = list(ids)
    rows = svc.query(
        f"SELECT * FROM uploads WHERE download_id IN ({','.join('?' * len(wanted))})", wanted
    )
    if len({r["download_id"] for r in rows}) < len(wanted):
        return None
    if any(r["status"] not in ("completed", "failed", "cancelled") for r in rows):
        return None
    if any(r["status"] == "completed" and r["cleaned_at"] is None for r in rows):
        return None
    return [dict(r) for r in rows]


@pytest.mark.slow
@pytest.mark.fault(
    "MistRelay SIGKILLed mid-upload, then restarted",
    promise="the stray rclone is stopped at the next start; the upload ends completed and "
    "verified; the local file is deleted only after that",
)
async def test_service_killed_mid_upload(
    service_process: ServiceProcessFactory,
    file_server: FileServer,
    webdav_cloud: RcloneCloud,
    rclone_config: Path,
    reliability: Recorder,
) -> None:
    # rclone reads every flag from RCLONE_<FLAG>: the service's rclone children inherit it.
    svc = service_process(upload_overrides(rclone_config), env={"RCLONE_BWLIMIT": "1M"})
    await svc.start()
    data = file_server.add_file("upload-crash.bin", size=12 * MIB, seed=40)
    [download_id] = await svc.add(file_server.url("upload-crash.bin"))
    path = svc.download_dir / str(download_id) / "upload-crash.bin"
    watcher = CleanupWatcher(svc, {download_id: (path, len(data))})
    watcher.start()
    try:
        await svc.wait_download(download_id, {"completed"}, timeout=30)
        await wait_until(
            lambda: svc.query(
                "SELECT id FROM uploads WHERE download_id = ? AND status = 'uploading' "
                "AND uploaded_size >= ?",
                (download_id, 2 * MIB),
            ),
            30,
            what="the upload under way",
        )
        rclone_before = pid_file_pids(svc)
        assert rclone_before, "a running upload has a pid file"
        svc.kill(signal.SIGKILL)
        await svc.wait_exit(10)
        killed_at = time.monotonic()
        aria2_left = await svc.wait_children_gone("aria2c", timeout=10)
        rclone_alive_after_kill = [p for p in rclone_before if pid_alive(p)]
        upload_at_kill = dict(svc.query("SELECT * FROM uploads")[0])
        file_kept_at_kill = path.exists()
        # The crashed run's rclone usually dies by itself (its stderr pipe is gone, its next
        # stats line kills it with SIGPIPE). To hold the start-up cleanup to its promise, plant
        # what survives a crash in practice: an rclone whose output goes nowhere, named in a
        # pid file; and a pid file naming a process that is not rclone, which must be spared.
        stray, bystander = await asyncio.to_thread(plant_leftovers, svc, path, rclone_config)

        await asyncio.sleep(0.5)
        assert stray.poll() is None and bystander.poll() is None, "the planted processes run"

        svc.env.pop("RCLONE_BWLIMIT")  # the second run may upload at full speed
        await svc.start()
        await wait_until(
            lambda: not [p for p in rclone_before if pid_alive(p)] and stray.poll() is not None,
            10,
            what="the first run's rclone stopped",
        )
        stray_stopped_after = time.monotonic() - killed_at
        bystander_spared = bystander.poll() is None
        uploads = await wait_until(
            lambda: _uploads_settled(svc, [download_id]), 90, what="the upload settled"
        )
        await asyncio.sleep(0.5)
    finally:
        await watcher.stop()
        for process in (stray, bystander) if "stray" in locals() else ():
            if process.poll() is None:
                process.kill()
            await asyncio.to_thread(process.wait)

    wrong = list(watcher.violations)
    if len(uploads) != 1:
        wrong.append(f"{len(uploads)} upload rows for one target")
    wrong += [
        f"upload {u['id']}: {u['status']} verified_at={u['verified_at']}"
        for u in uploads
        if u["status"] != "completed" or u["verified_at"] is None
    ]
    if path.exists():
        wrong.append("local file kept after a verified upload")
    lost = bytes_lost(webdav_cloud.root / "up" / path.name, data)
    duplicates = duplicate_rows(svc)
    reliability.record(
        "MistRelay SIGKILLed mid-upload, then restarted",
        "the stray rclone is stopped at the next start; the upload ends completed and verified; "
        "the local file is deleted only after that",
        jobs_started=1,
        jobs_finished=sum(1 for u in uploads if u["status"] in ("completed", "failed")),
        rows_wrong=len(wrong) + duplicates,
        bytes_lost=lost,
        extra={
            "upload at the kill": f"{upload_at_kill['status']} "
            f"{upload_at_kill['uploaded_size']}/{upload_at_kill['total_size']}",
            "own rclone alive after the kill": len(rclone_alive_after_kill),
            "stray rclone gone after the kill": f"{stray_stopped_after:.1f} s",
        },
    )
    assert aria2_left == []
    assert bystander_spared, "a pid file made the start-up kill a process that is not rclone"
    assert upload_at_kill["status"] == "uploading"
    assert file_kept_at_kill, "the local file went before its upload was verified"
    assert duplicates == 0
    assert not wrong, wrong
    assert lost == 0


# --------------------------------------------------------------------------- fault 4: disk full


def _private_mounts_work() -> str | None:
    """None when this process may mount a tmpfs in a private mount namespace, else why not."""
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs "$d"'],
        capture_output=True,
        timeout=10,
    )
    if probe.returncode != 0:
        return f"unshare -m cannot mount a tmpfs here: {probe.stderr.decode(errors='replace')}"
    return None


def tmpfs_wrapper(mount_point: Path, size: str) -> Any:
    """Run the command in a private mount namespace with a `size` tmpfs on `mount_point`."""

    def wrap(command: list[str]) -> list[str]:
        script = 'mount -t tmpfs -o size="$1" tmpfs "$2" && shift 2 && exec "$@"'
        return ["unshare", "-m", "sh", "-c", script, "sh", size, str(mount_point), *command]

    return wrap


@dataclass
class DiskFullRun:
    failed: dict[str, Any]
    health_status: int
    health: Any
    integrity: str
    delete_status: int
    deleted: Any
    after: dict[str, Any]
    served: bytes
    small: bytes


async def run_disk_full(
    service_process: ServiceProcessFactory, file_server: FileServer, tmp_path: Path
) -> DiskFullRun:
    """A service whose download folder is a 20 MB tmpfs: a 30 MB download, then a 5 MB one."""
    why_not = _private_mounts_work()
    if why_not:
        pytest.skip(why_not)
    download_dir = tmp_path / "svc" / "data" / "downloads"
    download_dir.mkdir(parents=True)
    svc = service_process(wrapper=tmpfs_wrapper(download_dir, "20m"))
    await svc.start()
    file_server.add_file("too-big.bin", size=30 * MIB, seed=50)
    [big_id] = await svc.add(file_server.url("too-big.bin"))
    failed = await svc.wait_download(big_id, {"failed", "completed"}, timeout=60)
    health_status, health = await svc.api("GET", "/api/health", auth=False, timeout=1)
    integrity = integrity_check(svc.db_path)
    delete_status, deleted = await svc.api("DELETE", f"/api/downloads/{big_id}?delete_file=true")
    small = file_server.add_file("fits.bin", size=5 * MIB, seed=51)
    [small_id] = await svc.add(file_server.url("fits.bin"))
    after = await svc.wait_download(small_id, {"completed", "failed"}, timeout=60)
    served = b""
    if after.get("stream_url"):
        stream_status, body = await svc.api("GET", _path_of(after["stream_url"]), auth=False)
        served = body if stream_status == 200 and isinstance(body, bytes) else b""
    return DiskFullRun(
        failed, health_status, health, integrity, delete_status, deleted, after, served, small
    )


@pytest.mark.slow
@pytest.mark.fault(
    "download disk full (20 MB tmpfs, 30 MB download)",
    promise="the download fails (aria2 error 9, not enough space); the service keeps answering; "
    "the database stays intact; after deleting it the next download succeeds",
)
async def test_download_disk_full(
    service_process: ServiceProcessFactory,
    file_server: FileServer,
    tmp_path: Path,
    reliability: Recorder,
) -> None:
    run = await run_disk_full(service_process, file_server, tmp_path)
    wrong = []
    if run.failed["status"] != "failed":
        wrong.append(f"the 30 MB download is {run.failed['status']}")
    if run.after["status"] != "completed":
        wrong.append(f"the 5 MB download after the cleaning is {run.after['status']}")
    if run.integrity != "ok":
        wrong.append(f"integrity_check: {run.integrity}")
    reliability.record(
        "download disk full (20 MB tmpfs, 30 MB download)",
        "the download fails (aria2 error 9, not enough space); the service keeps answering; the "
        "database stays intact; after deleting it the next download succeeds",
        jobs_started=2,
        jobs_finished=sum(
            1 for r in (run.failed, run.after) if r["status"] in FINAL_DOWNLOAD_STATUSES
        ),
        rows_wrong=len(wrong),
        bytes_lost=bytes_missing(run.served, run.small),
        extra={"reason shown": run.failed.get("error_message"), "code": run.failed["error_code"]},
    )
    assert run.failed["status"] == "failed", run.failed
    assert str(run.failed["error_code"]) == "9", run.failed  # aria2: not enough disk space
    assert run.health_status == 200 and run.health["status"] == "ok"
    assert run.integrity == "ok"
    assert run.delete_status == 200, run.deleted
    assert run.after["status"] == "completed", run.after
    assert run.served == run.small


@pytest.mark.slow
async def test_disk_full_reason_names_the_disk_space(
    service_process: ServiceProcessFactory, file_server: FileServer, tmp_path: Path
) -> None:
    run = await run_disk_full(service_process, file_server, tmp_path)
    assert run.failed["status"] == "failed"
    assert "space" in (run.failed.get("error_message") or "").lower(), run.failed


def bytes_missing(actual: bytes, expected: bytes) -> int:
    if actual == expected:
        return 0
    return len(expected) - sum(1 for a, b in zip(actual, expected, strict=False) if a == b)


def _path_of(url: str) -> str:
    """The path and query of an absolute URL (the service's links carry its base URL)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


# --------------------------------------------------------------------------- fault 6: overload


def open_silent_websocket(port: int, token: str) -> tuple[socket.socket | None, int]:
    """A WebSocket handshake on /api/ws from a client that will never read a frame.

    Returns (socket, HTTP status); the socket is None unless the upgrade succeeded (101).
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /api/ws HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 8192:
        chunk = sock.recv(1)  # byte by byte: not one byte of a frame is read past the headers
        if not chunk:
            break
        head += chunk
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else 0
    if status != 101:
        sock.close()
        return None, status
    return sock, status


@pytest.mark.slow
@pytest.mark.fault(
    "overload: 1,000 API requests in 10 s, 200 links at once, a WebSocket that never reads",
    promise="/api/health answers within 1 s throughout; no 5xx; every job ends in a final state",
)
async def test_overload(
    service_process: ServiceProcessFactory,
    file_server: FileServer,
    reliability: Recorder,
) -> None:
    svc = service_process({"aria2": {"max_concurrent_downloads": 10}})
    await svc.start()
    for i in range(400):
        file_server.add_file(f"tiny/{i}.txt", data=f"tiny file {i}\n".encode() * (1 + i % 50))
    probe = HealthProbe(svc.port)
    probe.start()
    silent_ws, ws_status = await asyncio.to_thread(open_silent_websocket, svc.port, svc.token)
    statuses: list[int] = []
    added: list[int] = []
    gate = asyncio.Semaphore(40)
    started = time.monotonic()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, started + i * 0.01 - time.monotonic()))
        async with gate:
            kind = i % 10
            if kind < 4:
                status, body = await svc.api("GET", "/api/downloads?limit=100")
            elif kind < 7:
                status, body = await svc.api("GET", "/api/downloads/statistics")
            elif kind < 9:
                n = (i // 10) * 2 + (kind - 7)
                status, body = await svc.api(
                    "POST", "/api/downloads", json={"url": file_server.url(f"tiny/{n}.txt")}
                )
                if status == 201:
                    added.extend(int(d["id"]) for d in body["downloads"])
            else:
                status, body = await svc.api("GET", "/api/downloads?grouped=true&limit=50")
            statuses.append(status)

    async def chat_message_of_200_links() -> None:
        urls = [file_server.url(f"tiny/{n}.txt") for n in range(200, 400)]
        status, body = await svc.api("POST", "/api/downloads", json={"urls": urls})
        statuses.append(status)
        if status == 201:
            added.extend(int(d["id"]) for d in body["downloads"])

    try:
        await asyncio.gather(*(one(i) for i in range(1000)), chat_message_of_200_links())
        burst_seconds = time.monotonic() - started
        rows = await svc.wait_all_final(sorted(set(added)), timeout=120)
    finally:
        await probe.stop()
        if silent_ws is not None:
            silent_ws.close()

    server_errors = [s for s in statuses if s >= 500]
    slow_health = [round(t, 3) for t in probe.latencies if t >= 1.0]
    not_completed = [i for i, r in rows.items() if r["status"] != "completed"]
    reliability.record(
        "overload: 1,000 API requests in 10 s, 200 links at once, a WebSocket that never reads",
        "/api/health answers within 1 s throughout; no 5xx; every job ends in a final state",
        jobs_started=len(added),
        jobs_finished=sum(1 for r in rows.values() if r["status"] in FINAL_DOWNLOAD_STATUSES),
        rows_wrong=len(not_completed),
        bytes_lost=0,
        extra={
            "requests": len(statuses),
            "burst": f"{burst_seconds:.1f} s",
            "health probes": len(probe.latencies),
            "slowest health": f"{max(probe.latencies, default=0):.3f} s",
            "never-reading WebSocket": "connected" if silent_ws is not None else ws_status,
        },
    )
    assert len(statuses) == 1001
    assert server_errors == [], server_errors
    assert all(s in (200, 201) for s in statuses), sorted(set(statuses))
    assert len(added) == 400 and len(set(added)) == 400
    assert not probe.failures, probe.failures[:5]
    assert len(probe.latencies) > 20
    assert slow_health == [], slow_health
    assert not_completed == [], not_completed
    assert silent_ws is not None, f"GET /api/ws answered {ws_status}"
