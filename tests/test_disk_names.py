"""One name policy for what is written on disk: a torrent's names and paths are cleaned
(`safe_file_name`, element by element) before aria2 writes them, and the row records the paths on
disk, so that streams and uploads find the files. Real torrents, a loopback tracker and seeder."""

from __future__ import annotations

import asyncio
import unicodedata
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.http_files import FileServer, deterministic_bytes
from tests.support.service import RunningService, ServiceFactory
from tests.support.torrents import SeederFactory, TorrentInfo, Tracker, make_torrent
from tests.test_engine_api import FINAL, fetch, settled

WAIT = 90.0
BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


@pytest.fixture
async def svc(service_factory: ServiceFactory) -> RunningService:
    return await settled(await service_factory())


def unsafe(name: str) -> list[str]:
    return [ascii(ch) for ch in name if ch in BIDI or unicodedata.category(ch) == "Cc"]


async def seeded(
    tmp_path: Path,
    tracker: Tracker,
    seeder_factory: SeederFactory,
    files: dict[str, bytes] | bytes,
    name: str,
) -> TorrentInfo:
    info = make_torrent(files, tmp_path / "seed", tracker.announce_url, name)
    await seeder_factory(info)
    await tracker.wait_for_peers(info.info_hash, 1, within_s=20)
    return info


async def add_and_finish(svc: RunningService, info: TorrentInfo) -> tuple[dict[str, Any], str]:
    """Upload the torrent; the finished row and the `index-out` aria2 was given."""
    form = aiohttp.FormData()
    form.add_field("file", info.torrent_bytes, filename="t.torrent")
    status, answer = await svc.api("POST", "/api/downloads/torrent", data=form)
    assert status == 201, answer
    row = answer["downloads"][0]
    options = await svc.service.parts.engine.aria2.get_option(row["gid"])
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    return done, options.get("index-out", "")


async def names_on_disk(job_dir: Path) -> list[str]:
    """Every path in the job's folder but aria2's control file (NAME.aria2, its bookkeeping until
    the torrent stops; never uploaded)."""
    return await asyncio.to_thread(
        lambda: sorted(
            str(p.relative_to(job_dir)) for p in job_dir.rglob("*") if p.suffix != ".aria2"
        )
    )


async def streams(svc: RunningService, url: str) -> bytes:
    status, _, body = await fetch(svc, url)
    assert status == 200, (url, status)
    return body


@pytest.mark.slow
@pytest.mark.attack(
    "a torrent named with a bidi control (invoice\u202egpj.exe)",
    promise="the file on disk and the uploaded name are the cleaned name",
)
async def test_a_torrent_named_with_a_bidi_control_is_written_under_its_clean_name(
    svc: RunningService, tracker: Tracker, seeder_factory: SeederFactory, tmp_path: Path
) -> None:
    data = deterministic_bytes(300_000, seed=21)
    info = await seeded(tmp_path, tracker, seeder_factory, data, "invoice\u202egpj.exe")
    done, index_out = await add_and_finish(svc, info)
    job_dir = svc.config.aria2.download_dir / str(done["id"])
    assert await names_on_disk(job_dir) == ["invoicegpj.exe"]
    assert index_out.strip() == "1=invoicegpj.exe"
    assert done["file_name"] == "invoicegpj.exe"
    assert Path(done["local_path"]) == job_dir / "invoicegpj.exe"  # what uploads send
    assert await asyncio.to_thread(Path(done["local_path"]).read_bytes) == data
    assert [f["path"] for f in done["files"]] == ["invoicegpj.exe"]
    assert await streams(svc, done["files"][0]["stream_url"]) == data


@pytest.mark.slow
async def test_unsafe_paths_inside_a_torrent_are_cleaned_made_unique_and_stream(
    svc: RunningService, tracker: Tracker, seeder_factory: SeederFactory, tmp_path: Path
) -> None:
    files = {
        "a\u202eb.txt": deterministic_bytes(40_000, seed=22),
        "ab.txt": deterministic_bytes(50_000, seed=23),  # what the first one cleans to
        "sub/c\u2066d.bin": deterministic_bytes(60_000, seed=24),
        "plain.bin": deterministic_bytes(70_000, seed=25),
    }
    info = await seeded(tmp_path, tracker, seeder_factory, files, "pack")
    done, index_out = await add_and_finish(svc, info)
    job_dir = svc.config.aria2.download_dir / str(done["id"])
    recorded = sorted(f["path"] for f in done["files"])
    assert recorded == ["pack/ab.1.txt", "pack/ab.txt", "pack/plain.bin", "pack/sub/cd.bin"]
    # aria2 was told the renamed files only; the files that needed nothing keep their path.
    assert "plain.bin" not in index_out and "cd.bin" in index_out, index_out
    on_disk = await names_on_disk(job_dir)
    assert [name for name in on_disk if unsafe(name)] == [], on_disk
    assert set(recorded) <= set(on_disk), on_disk
    assert Path(done["local_path"]) == job_dir / "pack"
    contents = set()
    for entry in done["files"]:
        body = await asyncio.to_thread((job_dir / entry["path"]).read_bytes)
        assert await streams(svc, entry["stream_url"]) == body
        contents.add(body)
    assert contents == set(files.values())  # every file whole, none written over another


@pytest.mark.slow
async def test_a_torrent_folder_named_with_a_bidi_control_is_the_clean_folder(
    svc: RunningService, tracker: Tracker, seeder_factory: SeederFactory, tmp_path: Path
) -> None:
    files = {"one.bin": deterministic_bytes(30_000, seed=26), "two.bin": b"two"}
    info = await seeded(tmp_path, tracker, seeder_factory, files, "folder\u202egpj.exe")
    done, _ = await add_and_finish(svc, info)
    job_dir = svc.config.aria2.download_dir / str(done["id"])
    assert sorted(f["path"] for f in done["files"]) == [
        "foldergpj.exe/one.bin",
        "foldergpj.exe/two.bin",
    ]
    assert Path(done["local_path"]) == job_dir / "foldergpj.exe"  # the folder uploads send
    on_disk = await names_on_disk(job_dir)
    assert {"foldergpj.exe/one.bin", "foldergpj.exe/two.bin"} <= set(on_disk), on_disk
    assert [name for name in on_disk if unsafe(name)] == [], on_disk


@pytest.mark.attack(
    "a server names its file with a bidi control (Content-Disposition)",
    promise="the file on disk, and so the uploaded name, is the cleaned name",
)
async def test_a_servers_unsafe_file_name_is_cleaned_on_disk(
    svc: RunningService, file_server: FileServer
) -> None:
    data = deterministic_bytes(40_000, seed=9)
    file_server.add_file("get", data=data)
    url = file_server.url("get", disposition="invoice\u202egpj.exe")
    status, answer = await svc.api("POST", "/api/downloads", json={"url": url})
    assert status == 201, answer
    done = await svc.wait_download(answer["downloads"][0]["id"], FINAL)
    assert done["status"] == "completed", done
    local = Path(done["local_path"])
    assert local.name == done["file_name"] == "invoicegpj.exe"
    assert unsafe(local.name) == []
    assert await names_on_disk(local.parent) == ["invoicegpj.exe"]
    assert await asyncio.to_thread(local.read_bytes) == data
    assert await streams(svc, done["stream_url"]) == data


@pytest.mark.slow
@pytest.mark.attack(
    "a magnet whose torrent names its folder and files with bidi controls",
    promise="once the metadata is in, the files are written under their cleaned names",
)
async def test_a_magnets_unsafe_names_are_cleaned_on_disk(
    svc: RunningService, tracker: Tracker, seeder_factory: SeederFactory, tmp_path: Path
) -> None:
    files = {"evil\u202etxt.exe": deterministic_bytes(20_000, seed=31), "fine.bin": b"fine"}
    info = await seeded(tmp_path, tracker, seeder_factory, files, "mag\u202enet")
    status, answer = await svc.api("POST", "/api/downloads", json={"url": info.magnet})
    assert status == 201, answer
    done = await svc.wait_download(answer["downloads"][0]["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    job_dir = svc.config.aria2.download_dir / str(done["id"])
    assert sorted(f["path"] for f in done["files"]) == ["magnet/eviltxt.exe", "magnet/fine.bin"]
    assert Path(done["local_path"]) == job_dir / "magnet"
    on_disk = await names_on_disk(job_dir)
    assert {"magnet/eviltxt.exe", "magnet/fine.bin"} <= set(on_disk), on_disk
    assert [name for name in on_disk if unsafe(name)] == [], on_disk
    for entry in done["files"]:
        body = await asyncio.to_thread((job_dir / entry["path"]).read_bytes)
        assert body == files[entry["path"].split("/")[-1].replace("eviltxt", "evil\u202etxt")]
        assert await streams(svc, entry["stream_url"]) == body
