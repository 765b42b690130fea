"""Uploading a finished download through MistRelay against a plain ``rclone copyto``.

The cloud is ``rclone serve webdav`` on 127.0.0.1 (tests/support/rclone_cloud.py). MistRelay's
time runs from the download's completion (a completed row handed to
``UploadManager.on_download_completed``) to the upload's verified ``completed`` status: queueing,
the rclone transfer with its progress written to SQLite, and the read-back of the remote copy.
The peer is the same transfer as one ``rclone copyto`` command, without any verification. Runs
alternate A/B and the medians are compared; the remote file is deleted after every run so each
one sends every byte. Then the cancel latency: from the cancel request to the moment the rclone
process of a running upload is gone.

Run from the project root:  .venv/bin/python -m bench.bench_upload [--size MB] [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loguru import logger

from configer import UploadConfig, UploadTarget
from db import Database
from files import DownloadFiles
from records import DownloadRow, NewDownload, UploadRow
from tests.support.rclone_cloud import RcloneCloud, start_webdav
from uploads.manager import UploadManager

MIB = 1024 * 1024
TARGET_RATIO = 1.10
TARGET_CANCEL_SECONDS = 2.0


def write_file(path: Path, size: int) -> None:
    """`size` bytes that differ in every MiB (a counter stamped on one random block)."""
    block = os.urandom(MIB)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        written, counter = 0, 0
        while written < size:
            chunk = (counter.to_bytes(8, "big") + block[8:])[: min(MIB, size - written)]
            out.write(chunk)
            written += len(chunk)
            counter += 1


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def wait_gone(pid: int, timeout: float = 30.0) -> None:
    """Poll /proc every millisecond until `pid` is gone (bounded)."""
    for _ in range(int(timeout * 1000)):
        if not pid_alive(pid):
            return
        await asyncio.sleep(0.001)
    raise SystemExit(f"rclone pid {pid} still runs {timeout:.0f} s after the cancel")


class Bench:
    def __init__(self, work: Path, size: int) -> None:
        self.work = work
        self.size = size
        self.download_dir = work / "downloads"
        self.data_dir = work / "data"
        self.rclone_config = work / "rclone.conf"
        self.cloud: RcloneCloud | None = None
        self.db: Database | None = None
        self.manager: UploadManager | None = None
        self.source = work / "source.bin"
        self._count = 0

    async def start(self) -> None:
        self.rclone_config.write_text("")
        self.cloud = await start_webdav(self.work / "cloud", self.rclone_config, "benchdav")
        await asyncio.to_thread(write_file, self.source, self.size)
        self.download_dir.mkdir(parents=True)
        self.db = await Database(self.data_dir / "bench.db").open()
        config = UploadConfig(
            targets=(UploadTarget("dav", "rclone", "benchdav", "/relay"),),
            rclone_config=str(self.rclone_config),
            max_concurrent=1,
            max_retries=0,
        )
        self.manager = UploadManager(
            self.db, config, files=DownloadFiles(self.download_dir), data_dir=self.data_dir
        )
        await self.manager.start()

    async def stop(self) -> None:
        if self.manager is not None:
            await self.manager.stop()
        if self.db is not None:
            await self.db.close()
        if self.cloud is not None:
            await self.cloud.stop()

    async def completed_download(self) -> DownloadRow:
        """A completed download whose file is a hard link to the source (no copy, same bytes)."""
        assert self.db is not None
        self._count += 1
        name = f"file{self._count}.bin"
        download_id = await self.db.create_download(
            NewDownload("http", f"bench:{name}", f"http://127.0.0.1/{name}", file_name=name)
        )
        path = self.download_dir / str(download_id) / name
        path.parent.mkdir(parents=True)
        os.link(self.source, path)
        gid = f"{download_id:016x}"
        await self.db.mark_download_queued_by_id(download_id, gid, status="downloading")
        await self.db.mark_download_completed(gid, str(path), self.size)
        row = await self.db.get_download_by_id(download_id)
        assert row is not None
        return row

    async def wait_upload(self, download_id: int, statuses: set[str]) -> UploadRow:
        assert self.db is not None
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            uploads = await self.db.get_uploads_by_download(download_id)
            if uploads and uploads[0].status in statuses:
                return uploads[0]
            await asyncio.sleep(0.01)
        raise SystemExit(f"upload of download {download_id} never reached {statuses}")

    def clear_cloud(self) -> None:
        assert self.cloud is not None
        for child in self.cloud.root.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    async def mistrelay_run(self) -> float:
        assert self.manager is not None
        row = await self.completed_download()
        started = time.perf_counter()
        await self.manager.on_download_completed(row)
        upload = await self.wait_upload(row.id, {"completed", "failed", "cancelled"})
        elapsed = time.perf_counter() - started
        if upload.status != "completed" or upload.verified_size != self.size:
            raise SystemExit(f"MistRelay upload did not complete: {upload}")
        await asyncio.to_thread(self.clear_cloud)
        return elapsed

    async def rclone_run(self) -> float:
        started = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            "rclone",
            "--config",
            str(self.rclone_config),
            "copyto",
            str(self.source),
            "benchdav:/plain/source.bin",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await process.communicate()
        elapsed = time.perf_counter() - started
        if process.returncode != 0:
            raise SystemExit(f"rclone copyto failed: {stderr.decode(errors='replace')}")
        await asyncio.to_thread(self.clear_cloud)
        return elapsed

    async def cancel_latency(self) -> float:
        """From the cancel request to the running rclone's pid being gone."""
        assert self.manager is not None and self.db is not None
        row = await self.completed_download()
        await self.manager.on_download_completed(row)
        upload = await self.wait_upload(row.id, {"uploading"})
        pid_file = self.data_dir / "rclone-pids" / f"upload-{upload.id}.pid"
        deadline = time.monotonic() + 30
        pid = None
        while pid is None and time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text())
            except (OSError, ValueError):
                await asyncio.sleep(0.002)
        if pid is None or not pid_alive(pid):
            raise SystemExit("the upload's rclone never ran (size too small to cancel?)")
        await asyncio.sleep(0.1)  # bytes are moving
        started = time.perf_counter()
        await self.manager.cancel(upload.id)
        await wait_gone(pid)
        elapsed = time.perf_counter() - started
        cancelled = await self.db.get_upload_by_id(upload.id)
        if cancelled is None or cancelled.status != "cancelled":
            raise SystemExit(f"cancel did not mark the upload cancelled: {cancelled}")
        await asyncio.to_thread(self.clear_cloud)
        return elapsed


async def main(size_mb: int, runs: int) -> int:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    size = size_mb * 1000 * 1000
    work = Path(tempfile.mkdtemp(prefix="mistrelay-bench-upload-"))
    bench = Bench(work, size)
    try:
        await bench.start()
        await bench.rclone_run()  # warm-up: page cache, server start-up
        relay_times: list[float] = []
        plain_times: list[float] = []
        for index in range(runs):
            order = (
                (bench.mistrelay_run, bench.rclone_run)
                if index % 2 == 0
                else (bench.rclone_run, bench.mistrelay_run)
            )
            for run in order:
                elapsed = await run()
                (relay_times if run == bench.mistrelay_run else plain_times).append(elapsed)
        cancels = [await bench.cancel_latency() for _ in range(3)]
    finally:
        await bench.stop()
        shutil.rmtree(work, ignore_errors=True)

    relay = statistics.median(relay_times)
    plain = statistics.median(plain_times)
    ratio = relay / plain
    cancel = max(cancels)
    mb = size / 1e6
    print(f"file: {mb:.0f} MB to rclone serve webdav on 127.0.0.1, {runs} alternating runs each")
    print(
        f"MistRelay (completion -> verified completed): median {relay:.2f} s "
        f"({mb / relay:.0f} MB/s)  runs {', '.join(f'{t:.2f}' for t in relay_times)}"
    )
    print(
        f"rclone copyto (no verification):           median {plain:.2f} s "
        f"({mb / plain:.0f} MB/s)  runs {', '.join(f'{t:.2f}' for t in plain_times)}"
    )
    verdict = "ok" if ratio <= TARGET_RATIO else "over target"
    print(f"ratio MistRelay / rclone: {ratio:.3f}x (target <= {TARGET_RATIO:.2f}x: {verdict})")
    cancel_verdict = "ok" if cancel < TARGET_CANCEL_SECONDS else "over target"
    print(
        f"cancel latency (request -> rclone pid gone): max {cancel * 1000:.0f} ms of "
        f"{', '.join(f'{c * 1000:.0f}' for c in cancels)} ms "
        f"(target < {TARGET_CANCEL_SECONDS:.0f} s: {cancel_verdict})"
    )
    return 0 if ratio <= TARGET_RATIO and cancel < TARGET_CANCEL_SECONDS else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1000, help="file size in MB (default 1000)")
    parser.add_argument("--runs", type=int, default=5, help="runs of each side (default 5)")
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.size, arguments.runs)))
