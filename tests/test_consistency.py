"""The consistency check against a real service, a real aria2c and the real disk.

Every kind of mismatch is planted by hand (a file deleted, truncated, left with aria2's control
file; a row whose gid aria2 never knew; a row behind aria2; an aria2 job without a row), then
found, dry-run, repaired in one transaction, and found no more.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest
from loguru import logger

from app import check_command
from aria2_client.client import Aria2Client
from aria2_client.consistency import (
    FILE_MISSING,
    GID_UNKNOWN,
    ORPHAN_JOB,
    PARTIAL,
    SIZE_DIFFERS,
    STATUS_DIFFERS,
    ConsistencyChecker,
    find_mismatches,
    repair,
)
from aria2_client.process import EmbeddedAria2
from aria2_client.transport import Aria2Transport
from configer import Config, DatabaseConfig, ensure_secrets
from db import Database
from records import DownloadRow, NewDownload
from tests.support.http_files import FileServer
from tests.support.service import RunningService, ServiceFactory
from tests.support.torrents import SeederFactory, Tracker, make_torrent


def dump(path: Path) -> list[str]:
    """Every table's content, as SQL: equal dumps mean nothing changed."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


async def db_dump(path: Path) -> list[str]:
    return await asyncio.to_thread(dump, path)


async def add_links(running: RunningService, urls: list[str]) -> list[int]:
    status, body = await running.api("POST", "/api/downloads", json={"urls": urls})
    assert status == 201, body
    return [int(d["id"]) for d in body["downloads"]]


async def row_of(db: Database, download_id: int) -> DownloadRow:
    row = await db.get_download_by_id(download_id)
    assert row is not None
    return row


async def wait_aria2_complete(client: Aria2Client, gid: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while (await client.tell_status(gid)).status != "complete":
        if time.monotonic() > deadline:
            raise AssertionError(f"aria2 job {gid} did not complete")
        await asyncio.sleep(0.05)


def plant_disk_faults(rows: dict[str, DownloadRow]) -> None:
    """a: deleted; b: truncated; c: aria2's control file left next to it; pack: one file short."""
    os.unlink(rows["a.bin"].local_path or "")
    os.truncate(rows["b.bin"].local_path or "", 1000)
    Path(f"{rows['c.bin'].local_path}.aria2").write_bytes(b"\x00" * 64)
    os.truncate(Path(rows["pack"].local_path or "") / "two.bin", 10)


def plant_seeding_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"s" * 100)
    path.with_name(path.name + ".aria2").write_bytes(b"\x00" * 64)


def aria2_for(config: Config) -> EmbeddedAria2:
    """The service's aria2c alone (same data folder, conf file and secret), without the service:
    nothing then re-adds lost jobs or follows aria2's changes."""
    options = {**config.aria2.options, "enable-dht": "false", "enable-dht6": "false"}
    return EmbeddedAria2(
        download_dir=config.aria2.download_dir,
        data_dir=config.data_dir,
        secret=ensure_secrets(config).aria2_secret,
        extra_options=options,
    )


@pytest.fixture
async def stopped_service(
    service_factory: ServiceFactory,
    file_server: FileServer,
    tracker: Tracker,
    seeder_factory: SeederFactory,
    tmp_path: Path,
) -> AsyncIterator[tuple[Config, dict[str, int]]]:
    """A service that completed four links and a two-file torrent, then stopped."""
    for index, name in enumerate(
        ("a.bin", "b.bin", "c.bin", "d.bin", "late.bin", "orphan.bin", "seeding.bin")
    ):
        file_server.add_file(name, size=150_000 + index * 1000, seed=index)
    torrent = make_torrent(
        {"sub/one.bin": b"1" * 70_000, "two.bin": b"2" * 50_000},
        tmp_path / "seed",
        tracker.announce_url,
        "pack",
    )
    await seeder_factory(torrent)
    await tracker.wait_for_peers(torrent.info_hash)

    running = await service_factory()
    names = ["a.bin", "b.bin", "c.bin", "d.bin"]
    ids = dict(
        zip(names, await add_links(running, [file_server.url(n) for n in names]), strict=True)
    )
    form = aiohttp.FormData()
    form.add_field("file", torrent.torrent_bytes, filename="pack.torrent")
    status, body = await running.api("POST", "/api/downloads/torrent", data=form)
    assert status == 201, body
    ids["pack"] = int(body["downloads"][0]["id"])
    for download_id in ids.values():
        await running.wait_download(download_id, {"completed"}, timeout=30)
    config = running.config
    await running.stop()
    yield config, ids


@pytest.mark.slow
async def test_check_finds_dry_runs_and_repairs_every_mismatch(
    stopped_service: tuple[Config, dict[str, int]],
    file_server: FileServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config, ids = stopped_service
    download_dir = config.aria2.download_dir
    db = Database(config.database.path)
    await db.open()
    aria2 = aria2_for(config)
    transport: Aria2Transport | None = None
    try:
        rows = {name: await row_of(db, i) for name, i in ids.items()}
        assert all(r.local_path for r in rows.values())
        assert [f.path for f in rows["pack"].files] == ["pack/sub/one.bin", "pack/two.bin"]
        await asyncio.to_thread(plant_disk_faults, rows)

        # -- a row whose gid aria2 never knew (the service is stopped: nothing re-adds it)
        lost_id = await db.create_download(
            NewDownload("http", "test:lost", "http://127.0.0.1:9/lost.bin", "lost.bin")
        )
        await db.mark_download_queued_by_id(lost_id, "00000000deadbeef")
        await db.mark_download_started("00000000deadbeef")

        # -- aria2 alone: a job that finished behind its row's back, and a job with no row
        await aria2.start()
        transport = Aria2Transport(aria2.rpc_url, aria2.secret)
        await transport.start()
        assert await transport.wait_connected(10)
        client = Aria2Client(transport)
        late_id = await db.create_download(
            NewDownload("http", "test:late", file_server.url("late.bin"), "late.bin")
        )
        late_gid = await client.add_uri(
            [file_server.url("late.bin")], {"dir": str(download_dir / str(late_id))}
        )
        await db.mark_download_queued_by_id(late_id, late_gid)  # waiting, while aria2 completes it
        await wait_aria2_complete(client, late_gid)
        # A finished download aria2 still works on (as when it seeds a torrent): its job is not
        # an orphan, and aria2's control file next to it is not a sign of a partial file.
        seeding_gid = await client.add_uri(
            [file_server.url("seeding.bin")],
            {"pause": "true", "dir": str(download_dir / "seeding")},
        )
        seeding_file = download_dir / "seeding" / "seeding.bin"
        await asyncio.to_thread(plant_seeding_file, seeding_file)
        seeding_id = await db.create_download(
            NewDownload("http", "test:seeding", file_server.url("seeding.bin"), "seeding.bin")
        )
        await db.mark_download_queued_by_id(seeding_id, seeding_gid)
        await db.mark_download_started(seeding_gid)
        await db.mark_download_completed(seeding_gid, str(seeding_file), 100)
        orphan_gid = await client.add_uri(
            [file_server.url("orphan.bin")],
            {"pause": "true", "dir": str(download_dir / "orphan")},
        )

        # -- find
        mismatches = await find_mismatches(db, client, download_dir)
        found = {(m.download_id, m.file_name, m.kind) for m in mismatches}
        assert found == {
            (ids["a.bin"], "a.bin", FILE_MISSING),
            (ids["b.bin"], "b.bin", SIZE_DIFFERS),
            (ids["c.bin"], "c.bin", PARTIAL),
            (ids["pack"], "pack", SIZE_DIFFERS),
            (lost_id, "lost.bin", GID_UNKNOWN),
            (late_id, "late.bin", STATUS_DIFFERS),
            (None, "orphan.bin", ORPHAN_JOB),
        }, [m.line() for m in mismatches]
        by_kind = {(m.download_id, m.kind): m for m in mismatches}
        assert "pack/two.bin has 10 bytes on disk" in by_kind[(ids["pack"], SIZE_DIFFERS)].detail
        assert by_kind[(None, ORPHAN_JOB)].gid == orphan_gid
        assert "aria2 says complete" in by_kind[(late_id, STATUS_DIFFERS)].detail

        # -- dry run: every mismatch printed, nothing changed
        before = await db_dump(config.database.path)
        capsys.readouterr()
        assert await check_command(config, fix=False) == 1
        printed = capsys.readouterr().out
        assert printed.startswith("aria2: compared")
        for mismatch in mismatches:
            assert mismatch.line() in printed
        assert f"download {ids['a.bin']} (a.bin): file_missing: " in printed
        assert "Dry run: nothing was changed" in printed
        assert await db_dump(config.database.path) == before
        assert (await client.statuses([orphan_gid]))[orphan_gid] is not None

        # -- repair: all row changes in ONE transaction
        statements: list[str] = []
        writer = db._backend.writer  # type: ignore[attr-defined]
        assert writer is not None
        await writer.set_trace_callback(statements.append)
        try:
            lines = await repair(db, client, mismatches)
        finally:
            await writer.set_trace_callback(None)
        assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT", "ROLLBACK")] == [
            "BEGIN IMMEDIATE",
            "COMMIT",
        ]
        assert len(lines) == len(mismatches)
        assert not any("left alone" in line for line in lines), lines

        lost = await row_of(db, lost_id)
        assert (lost.status, lost.error_message) == ("failed", "lost by aria2")
        history = await db.get_status_history("download", lost_id)
        assert (history[-1].from_status, history[-1].to_status) == ("downloading", "failed")
        late = await row_of(db, late_id)
        assert late.status == "completed"
        assert late.local_path == str(download_dir / str(late_id) / "late.bin")
        assert [h.to_status for h in await db.get_status_history("download", late_id)][-2:] == [
            "downloading",
            "completed",
        ]
        missing = await row_of(db, ids["a.bin"])
        assert (missing.status, missing.error_code) == ("completed", FILE_MISSING)
        assert (await client.statuses([orphan_gid]))[orphan_gid] is None

        # -- nothing left to find, by the function and by the command
        assert await find_mismatches(db, client, download_dir) == []
        assert await check_command(config, fix=False) == 0
        assert "No mismatches" in capsys.readouterr().out

        # -- the service is gone (aria2 too): --fix compares with the disk only
        await asyncio.to_thread(os.unlink, f"{seeding_file}.aria2")
        await transport.close()
        transport = None
        await aria2.stop()
        await asyncio.to_thread(os.unlink, rows["d.bin"].local_path or "")
        assert await check_command(config, fix=True) == 1
        printed = capsys.readouterr().out
        assert "aria2: not reachable" in printed
        assert f"download {ids['d.bin']} (d.bin): file_missing: " in printed
        assert "Changed:" in printed and "fixed" in printed
        assert await check_command(config, fix=False) == 0
        assert (await row_of(db, ids["d.bin"])).error_code == FILE_MISSING
    finally:
        if transport is not None:
            await transport.close()
        await aria2.stop()
        await db.close()


async def test_check_command_without_a_database_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = replace(Config(), database=DatabaseConfig(path=tmp_path / "none" / "x.db"))
    assert await check_command(config, fix=False) == 2
    assert "no such file" in capsys.readouterr().out


async def test_periodic_checker_logs_but_never_repairs(tmp_path: Path) -> None:
    downloads = tmp_path / "downloads"
    (downloads / "1").mkdir(parents=True)
    kept = downloads / "1" / "kept.bin"
    kept.write_bytes(b"k" * 100)
    db = Database(tmp_path / "data" / "mistrelay.db")
    await db.open()
    messages: list[str] = []
    sink = logger.add(
        lambda m: messages.append(f"{m.record['message']} job={m.record['extra'].get('job')}"),
        level="WARNING",
    )
    checker: ConsistencyChecker | None = None
    off: ConsistencyChecker | None = None
    try:
        ids = []
        for name in ("kept.bin", "gone.bin"):
            download_id = await db.create_download(NewDownload("http", f"t:{name}", None, name))
            gid = f"{download_id:016x}"
            await db.mark_download_queued_by_id(download_id, gid)
            await db.mark_download_started(gid)
            await db.mark_download_completed(gid, str(downloads / "1" / name), 100)
            ids.append(download_id)
        before = await db_dump(db.path)

        off = ConsistencyChecker(db, None, downloads, lambda: 0, off_recheck=0.02)
        off.start()
        checker = ConsistencyChecker(db, None, downloads, lambda: 0.05, confirm_after=0.05)
        checker.start()
        deadline = time.monotonic() + 10
        while checker.checks < 2:
            assert time.monotonic() < deadline, "the checker never ran"
            await asyncio.sleep(0.02)
        await checker.stop()
        await off.stop()

        assert [(m.download_id, m.kind) for m in checker.last] == [(ids[1], FILE_MISSING)]
        assert off.checks == 0  # interval 0 = off
        assert any(
            f"download {ids[1]} (gone.bin): file_missing" in m and f"job={ids[1]}" in m
            for m in messages
        ), messages
        assert any("no aria2 connection" in m for m in messages)
        assert await db_dump(db.path) == before
    finally:
        logger.remove(sink)
        for running in (checker, off):
            if running is not None:
                await running.stop()
        await db.close()
