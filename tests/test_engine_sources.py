"""Torrents and magnets through the engine: a real service, a loopback tracker, a seeding aria2c."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.http_files import MIB, deterministic_bytes
from tests.support.service import RunningService, ServiceFactory
from tests.support.torrents import (
    SeederFactory,
    TorrentInfo,
    Tracker,
    corrupt_torrent_cases,
    make_torrent,
)
from tests.test_engine_api import FINAL, add_link, fetch, read_file, row_count, settled

WAIT = 90.0


# parse_torrent accepts these corrupt samples today (see tests/test_sources.py).
@pytest.fixture
async def svc(service_factory: ServiceFactory) -> RunningService:
    return await settled(await service_factory())


def three_files() -> dict[str, bytes]:
    return {
        "video.bin": deterministic_bytes(1 * MIB + 5, seed=11),
        "extras/notes.txt": deterministic_bytes(300_001, seed=12),
        "extras/deeper/tiny.dat": deterministic_bytes(17, seed=13),
    }


async def seeded_torrent(
    tmp_path: Path, tracker: Tracker, seeder_factory: SeederFactory, name: str = "pack"
) -> TorrentInfo:
    info = make_torrent(three_files(), tmp_path / "seed", tracker.announce_url, name)
    await seeder_factory(info)
    await tracker.wait_for_peers(info.info_hash, 1, within_s=20)
    return info


async def upload_torrent(svc: RunningService, data: bytes) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("file", data, filename="upload.torrent", content_type="application/x-bittorrent")
    return await svc.api("POST", "/api/downloads/torrent", data=form)


async def check_files_stream(svc: RunningService, done: dict[str, Any], info: TorrentInfo) -> None:
    listed = {f["path"]: f for f in done["files"]}
    assert set(listed) == set(info.files), listed
    assert sorted(f["index"] for f in done["files"]) == [1, 2, 3]
    job_dir = svc.config.aria2.download_dir / str(done["id"])
    for path, data in info.files.items():
        entry = listed[path]
        assert entry["length"] == len(data)
        assert await read_file(job_dir / path) == data
        assert entry["stream_url"], entry
        assert f"/{entry['index']}/" in entry["stream_url"]
        status, _, body = await fetch(svc, entry["stream_url"])
        assert status == 200, (path, status)
        assert body == data, path
    assert Path(done["local_path"]) == job_dir / info.name
    assert done["total_length"] == info.total_size


@pytest.mark.slow
async def test_a_multi_file_torrent_upload_completes_and_each_file_streams(
    svc: RunningService, tracker: Tracker, seeder_factory: SeederFactory, tmp_path: Path
) -> None:
    info = await seeded_torrent(tmp_path, tracker, seeder_factory)
    status, answer = await upload_torrent(svc, info.torrent_bytes)
    assert status == 201, answer
    row = answer["downloads"][0]
    assert row["source_type"] == "torrent"
    assert row["info_hash"] == info.info_hash
    assert row["gid"]
    # The files are known from the .torrent before aria2 has fetched a byte.
    assert sorted(f["path"] for f in row["files"]) == sorted(info.files)
    assert all(f["stream_url"] is None for f in row["files"])

    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    await check_files_stream(svc, done, info)
    # A torrent's files are streamed one by one; the folder itself has no stream link.
    assert done["stream_url"] is None

    status, again = await upload_torrent(svc, info.torrent_bytes)
    assert status == 201, again  # a finished torrent may be fetched again
    assert again["downloads"][0]["id"] != row["id"]


@pytest.mark.slow
async def test_adding_an_active_torrent_again_is_a_409(
    svc: RunningService, tmp_path: Path, tracker: Tracker
) -> None:
    # No seeder: the torrent stays active (waiting for peers).
    info = make_torrent(three_files(), tmp_path / "seed", tracker.announce_url, "lonely")
    status, first = await upload_torrent(svc, info.torrent_bytes)
    assert status == 201, first
    status, second = await upload_torrent(svc, info.torrent_bytes)
    assert status == 409, second
    assert second["detail"]["existing_id"] == first["downloads"][0]["id"]
    status, answer = await svc.api("POST", "/api/downloads", json={"url": info.magnet})
    assert status == 409, answer  # the magnet of the same torrent is the same job
    assert await row_count(svc) == 1


@pytest.mark.slow
async def test_a_magnet_follows_its_metadata_gid_and_completes(
    svc: RunningService, tracker: Tracker, seeder_factory: SeederFactory, tmp_path: Path
) -> None:
    info = await seeded_torrent(tmp_path, tracker, seeder_factory, name="magnetic")
    row = await add_link(svc, info.magnet)
    assert row["source_type"] == "magnet"
    assert row["info_hash"] == info.info_hash
    metadata_gid = row["gid"]
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert done["gid"] != metadata_gid

    db = svc.service.parts.store
    assert db is not None
    gids = await db.get_gids(row["id"])
    assert len(gids) >= 2, gids
    assert gids[0] == metadata_gid and gids[-1] == done["gid"]
    for gid in gids:
        assert await db.get_download_id_by_gid(gid) == row["id"]
    await check_files_stream(svc, done, info)
    # The metadata step left no row of its own.
    assert await row_count(svc) == 1


@pytest.mark.parametrize(
    "label",
    list(corrupt_torrent_cases()),
)
async def test_a_corrupt_torrent_is_a_400_and_creates_no_row(
    svc: RunningService, label: str
) -> None:
    status, answer = await upload_torrent(svc, corrupt_torrent_cases()[label])
    assert status == 400, (status, answer)
    assert answer["error"] == "bad_source"
    assert isinstance(answer["detail"], str) and answer["detail"]
    assert len(answer["detail"]) < 300
    assert await row_count(svc) == 0


async def test_a_torrent_upload_needs_multipart_with_a_file_field(svc: RunningService) -> None:
    status, answer = await svc.api("POST", "/api/downloads/torrent", json={"file": "x"})
    assert status == 400, answer
    form = aiohttp.FormData()
    form.add_field("other", b"d4:infoe", filename="x.torrent")
    status, answer = await svc.api("POST", "/api/downloads/torrent", data=form)
    assert status == 400, answer
    assert "file" in str(answer["detail"])
    assert await row_count(svc) == 0
