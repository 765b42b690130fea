"""Restarts and crashes: the service, its embedded aria2c or an external aria2 dying mid-job."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from aria2_client.process import EmbeddedAria2
from aria2_client.sources import parse_link
from db import Database
from records import NewDownload
from tests.support.http_files import MIB, FileServer
from tests.support.processes import ProcessReaper, free_port, make_test_aria2
from tests.support.service import RunningService, ServiceFactory
from tests.test_engine_api import (
    FINAL,
    add_link,
    file_size,
    read_file,
    row_count,
    settled,
    wait_until,
)

pytestmark = pytest.mark.slow

WAIT = 90.0


async def health(svc: RunningService) -> str:
    status, body = await svc.api("GET", "/api/health", auth=False)
    assert status == 200, body
    return str(body["aria2"])


async def wait_bytes(svc: RunningService, download_id: int, at_least: int) -> dict[str, Any]:
    """Wait until the row reports at least `at_least` bytes downloaded (and is still running)."""
    last: dict[str, Any] = {}

    async def enough() -> bool:
        nonlocal last
        status, last = await svc.api("GET", f"/api/downloads/{download_id}")
        assert status == 200, last
        assert last["status"] not in FINAL, last
        return int(last["completed_length"]) >= at_least

    await wait_until(enough, timeout=WAIT, what=f"{at_least} bytes of download {download_id}")
    return last


def assert_clean_history(done: dict[str, Any]) -> None:
    steps = [h["to"] for h in done["history"]]
    assert "failed" not in steps and "cancelled" not in steps, steps
    assert steps.count("completed") == 1, steps


async def test_service_restart_mid_download_resumes_from_the_session(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    size = 3 * MIB
    data = file_server.add_file("resume.bin", size=size, seed=21)
    url = file_server.url("resume.bin", route="slow", rate=768 * 1024)
    first = await settled(await service_factory(name="svc"))
    row = await add_link(first, url)
    await wait_bytes(first, row["id"], 256 * 1024)
    await first.stop()
    partial = first.config.aria2.download_dir / str(row["id"]) / "resume.bin"
    assert partial.exists()
    requests_before = len(file_server.requests)

    second = await service_factory(config_path=first.config_path)
    done = await second.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert await read_file(done["local_path"]) == data
    assert done["gid"] == row["gid"]  # aria2's session brought the same job back
    assert await row_count(second) == 1
    assert_clean_history(done)
    later = file_server.requests[requests_before:]
    assert later, "aria2 made no request after the restart"
    # Resumed where it stopped (aria2 may first probe the size with a plain GET).
    starts = [
        int(r.range_header.removeprefix("bytes=").split("-")[0])
        for r in later
        if r.range_header and r.range_header.startswith("bytes=")
    ]
    assert any(start > 0 for start in starts), later


@pytest.mark.parametrize("chosen_gid", [None, "00c0ffee00c0ffee"], ids=["pending", "queued"])
async def test_a_row_aria2_never_got_is_handed_to_it_at_start(
    service_factory: ServiceFactory, file_server: FileServer, chosen_gid: str | None
) -> None:
    data = file_server.add_file("orphan.bin", size=700_000, seed=22)
    url = file_server.url("orphan.bin")
    first = await settled(await service_factory(name="svc"))
    await first.stop()

    # The service died between committing the row and giving the job to aria2: a pending row
    # with no gid, or one queued under the gid chosen for it, which aria2 never had.
    db = Database(first.config.database.path)
    await db.open()
    try:
        link = parse_link(url)
        new = NewDownload(
            source_type="http",
            source_key=link.source_key,
            source_url=link.url,
            file_name=link.display_name,
        )
        download_id = await db.create_download(new, gid=chosen_gid)
        row = await db.get_download_by_id(download_id)
        assert row is not None and row.gid == chosen_gid
        assert row.status == ("pending" if chosen_gid is None else "waiting")
    finally:
        await db.close()

    second = await service_factory(config_path=first.config_path)
    done = await second.wait_download(download_id, FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert done["gid"] and done["gid"] != chosen_gid  # aria2's own gid once it took the job
    assert await read_file(done["local_path"]) == data
    assert await row_count(second) == 1


async def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


async def test_external_aria2_killed_and_restarted_on_the_same_session(
    service_factory: ServiceFactory,
    file_server: FileServer,
    tmp_path: Path,
    process_reaper: ProcessReaper,
) -> None:
    external: EmbeddedAria2 = make_test_aria2(
        tmp_path / "external", port=free_port(), extra_options={"seed-time": "0"}
    )
    await external.start()
    process_reaper.track(external.pid)
    try:
        size = 2 * MIB
        data = file_server.add_file("external.bin", size=size, seed=23)
        svc = await settled(
            await service_factory(
                {"aria2": {"rpc_url": external.rpc_url, "rpc_secret": external.secret}}
            )
        )
        assert svc.service.parts.engine.embedded is None
        assert await health(svc) == "connected"
        row = await add_link(svc, file_server.url("external.bin", route="slow", rate=512 * 1024))
        await wait_bytes(svc, row["id"], 200 * 1024)
        await (
            svc.service.parts.engine.downloads.aria2.save_session()
        )  # what save-session-interval does

        old_pid = external.pid
        assert old_pid is not None
        await _kill(old_pid)
        await external.wait_exit()

        async def down() -> bool:
            return await health(svc) == "down"

        await wait_until(down, timeout=15, what="health to say aria2 is down")
        status, during = await svc.api("GET", f"/api/downloads/{row['id']}")
        assert status == 200
        assert during["status"] not in FINAL, during

        await external.start()  # same port, same session file
        process_reaper.track(external.pid)
        assert external.pid != old_pid

        async def connected() -> bool:
            return await health(svc) == "connected"

        await wait_until(connected, timeout=30, what="health to say aria2 is connected")
        done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
        assert done["status"] == "completed", done
        assert await read_file(done["local_path"]) == data
        assert done["completed_length"] == done["total_length"] == size
        assert done["error_message"] is None
        assert await row_count(svc) == 1
        assert_clean_history(done)
    finally:
        await external.stop(timeout=5)


async def test_embedded_aria2_sigkill_is_restarted_and_the_download_completes(
    service_factory: ServiceFactory,
    file_server: FileServer,
    process_reaper: ProcessReaper,
) -> None:
    size = 3 * MIB
    data = file_server.add_file("crash.bin", size=size, seed=24)
    svc = await settled(await service_factory())
    embedded = svc.service.parts.engine.embedded
    db = svc.service.parts.store
    assert embedded is not None and db is not None
    process_reaper.track(embedded.pid)
    row = await add_link(svc, file_server.url("crash.bin", route="slow", rate=768 * 1024))

    # Watch the row closely: whenever it says completed, the bytes must already be whole.
    premature: list[str] = []
    seen_completed = asyncio.Event()

    async def watch() -> None:
        while True:
            current = await db.get_download_by_id(row["id"])
            if current is not None and current.status == "completed":
                actual = await file_size(current.local_path)
                if actual != size:
                    premature.append(f"completed with {actual} of {size} bytes on disk")
                seen_completed.set()
                return
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    try:
        await wait_bytes(svc, row["id"], 256 * 1024)
        old_pid = embedded.pid
        assert old_pid is not None
        killed_at = time.monotonic()
        await _kill(old_pid)

        async def restarted() -> bool:
            return embedded.pid is not None and embedded.pid != old_pid

        await wait_until(restarted, timeout=10, what="the supervisor to restart aria2c")
        process_reaper.track(embedded.pid)

        async def counted() -> bool:
            return embedded.restarts == 1

        await wait_until(counted, timeout=10, what="the restart to be counted")
        assert time.monotonic() - killed_at < 10

        done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
        assert done["status"] == "completed", done
        await asyncio.wait_for(seen_completed.wait(), 10)
        assert premature == []
        assert await read_file(done["local_path"]) == data
        assert done["completed_length"] == done["total_length"] == size
        assert await row_count(svc) == 1
        assert_clean_history(done)
        metrics = svc.service.parts.web.ctx.metrics.registry
        assert metrics.get_sample_value("mistrelay_aria2_restarts_total") == 1
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
