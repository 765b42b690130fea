"""The test peers work: file server routes, tracker, torrents, a real seed-to-leech run."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import time
from pathlib import Path

import aiohttp
import pytest
import torf

from tests.support.http_files import MIB, FileServer, deterministic_bytes, start_file_server
from tests.support.torrents import (
    ARIA2_LOOPBACK_FLAGS,
    SeederFactory,
    Tracker,
    corrupt_torrent_cases,
    corrupt_torrent_samples,
    make_torrent,
    stop_pid,
)

LEECH_TIMEOUT_S = 25.0


async def _get(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers or {}) as response,
    ):
        return response.status, dict(response.headers), await response.read()


# ---- deterministic content -------------------------------------------------------------------


def test_deterministic_bytes_repeat_for_a_seed_and_differ_per_offset() -> None:
    data = deterministic_bytes(3 * MIB + 5, seed=7)
    assert len(data) == 3 * MIB + 5
    assert data == deterministic_bytes(3 * MIB + 5, seed=7)
    assert data != deterministic_bytes(3 * MIB + 5, seed=8)
    # Same offset inside consecutive MiBs must differ, at every 4 KiB stamp and between stamps.
    for offset in (0, 4096, 65536, MIB - 4096):
        assert data[offset : offset + 4096] != data[MIB + offset : MIB + offset + 4096]


def test_deterministic_bytes_are_fast_for_large_files() -> None:
    started = time.monotonic()
    data = deterministic_bytes(64 * MIB)
    assert len(data) == 64 * MIB
    assert time.monotonic() - started < 5.0


# ---- file server -----------------------------------------------------------------------------


async def test_files_route_serves_exact_bytes_and_ranges(file_server: FileServer) -> None:
    data = file_server.add_file("dir/sample.bin", size=MIB + 1, seed=3)

    status, _, body = await _get(file_server.url("dir/sample.bin"))
    assert status == 200
    assert body == data

    status, headers, body = await _get(
        file_server.url("dir/sample.bin"), {"Range": "bytes=1000-1999"}
    )
    assert status == 206
    assert headers["Content-Range"] == f"bytes 1000-1999/{MIB + 1}"
    assert body == data[1000:2000]

    status, _, body = await _get(file_server.url("dir/sample.bin"), {"Range": "bytes=-1"})
    assert (status, body) == (206, data[-1:])

    status, _, _ = await _get(file_server.url("dir/sample.bin"), {"Range": f"bytes={MIB + 1}-"})
    assert status == 416

    assert file_server.hits["/files/dir/sample.bin"] == 4
    assert file_server.requests[1].range_header == "bytes=1000-1999"


async def test_files_route_refuses_missing_and_escaping_names(file_server: FileServer) -> None:
    status, _, _ = await _get(file_server.url("missing.bin"))
    assert status == 404
    status, _, _ = await _get(f"{file_server.base_url}/files/..%2F..%2Fetc%2Fpasswd")
    assert status == 404
    with pytest.raises(ValueError):
        file_server.add_file("../outside.bin", data=b"x")


async def test_files_route_sets_content_disposition(file_server: FileServer) -> None:
    file_server.add_file("a.bin", data=b"abc")
    status, headers, body = await _get(file_server.url("a.bin", disposition="report 1.pdf"))
    assert (status, body) == (200, b"abc")
    assert headers["Content-Disposition"] == "attachment; filename*=UTF-8''report%201.pdf"


async def test_slow_route_is_rate_limited_and_supports_range(file_server: FileServer) -> None:
    data = file_server.add_file("slow.bin", size=256 * 1024)
    started = time.monotonic()
    status, _, body = await _get(file_server.url("slow.bin", route="slow", rate=512 * 1024))
    elapsed = time.monotonic() - started
    assert (status, body) == (200, data)
    # 256 KiB at 512 KiB/s is 0.5 s of server-side pacing; the lower bound comes from its sleeps.
    assert 0.3 <= elapsed < 10.0

    status, headers, body = await _get(
        file_server.url("slow.bin", route="slow", rate=10 * MIB), {"Range": "bytes=200000-"}
    )
    assert status == 206
    assert headers["Content-Range"] == f"bytes 200000-{len(data) - 1}/{len(data)}"
    assert body == data[200000:]


async def test_slow_route_delays_headers(file_server: FileServer) -> None:
    file_server.add_file("d.bin", data=b"0123456789")
    timeout = aiohttp.ClientTimeout(total=0.2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with pytest.raises(TimeoutError):
            async with session.get(file_server.url("d.bin", route="slow", delay=2)) as response:
                await response.read()


@pytest.mark.parametrize("code", [404, 500, 403])
async def test_status_route_answers_html_error_page(file_server: FileServer, code: int) -> None:
    status, headers, body = await _get(file_server.status_url(code))
    assert status == code
    assert headers["Content-Type"].startswith("text/html")
    assert body.startswith(b"<!DOCTYPE html>")
    assert str(code).encode() in body


async def test_redirect_route_chains_to_the_file(file_server: FileServer) -> None:
    data = file_server.add_file("r.bin", size=5000)
    status, _, body = await _get(file_server.url("r.bin", route="redirect", hops=3))
    assert (status, body) == (200, data)
    assert file_server.hits["/redirect/r.bin"] == 3
    assert file_server.hits["/files/r.bin"] == 1


async def test_flaky_route_fails_first_requests_with_503(file_server: FileServer) -> None:
    data = file_server.add_file("f.bin", size=1000)
    url = file_server.url("f.bin", route="flaky", fail=2)
    statuses = [(await _get(url))[0] for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert (await _get(url))[2] == data


async def test_hold_route_stalls_mid_body_until_released(file_server: FileServer) -> None:
    data = file_server.add_file("h.bin", size=300_000)
    async with (
        aiohttp.ClientSession() as session,
        session.get(file_server.url("h.bin", route="hold", bytes=100_000)) as response,
    ):
        assert response.status == 200
        assert response.content_length == len(data)
        await file_server.wait_held("h.bin")
        first = await response.content.readexactly(100_000)
        assert first == data[:100_000]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(response.content.read(1), 0.3)
        file_server.hold_event("h.bin").set()
        rest = await asyncio.wait_for(response.content.read(), 10)
    assert first + rest == data


async def test_hold_route_can_cut_the_connection(file_server: FileServer) -> None:
    data = file_server.add_file("c.bin", size=300_000)
    async with (
        aiohttp.ClientSession() as session,
        session.get(file_server.url("c.bin", route="hold", bytes=50_000, then="close")) as resp,
    ):
        await file_server.wait_held("c.bin")
        file_server.release("c.bin")
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(resp.read(), 10)
    # Once released, a resumed request passes straight through.
    status, _, body = await _get(file_server.url("c.bin", route="hold"), {"Range": "bytes=50000-"})
    assert (status, body) == (206, data[50_000:])


async def test_start_file_server_works_outside_fixtures(tmp_path: Path) -> None:
    server = await start_file_server(tmp_path / "bench-root")
    try:
        data = server.add_file("x.bin", size=10)
        assert (await _get(server.url("x.bin")))[2] == data
        assert server.base_url.startswith("http://127.0.0.1:")
    finally:
        await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await _get(server.url("x.bin"))


async def test_stop_releases_held_requests(tmp_path: Path) -> None:
    server = await start_file_server(tmp_path / "root")
    server.add_file("held.bin", size=200_000)
    async with aiohttp.ClientSession() as session:
        response = await session.get(server.url("held.bin", route="hold", bytes=1000))
        await server.wait_held("held.bin")
        started = time.monotonic()
        await server.stop()
        assert time.monotonic() - started < 5.0
        response.close()


# ---- torrents and tracker --------------------------------------------------------------------


def test_make_torrent_single_and_multi_file(tmp_path: Path) -> None:
    announce = "http://127.0.0.1:1/announce"
    single = make_torrent(b"a" * 1000, tmp_path / "seed", announce, "one.bin")
    assert single.files == {"one.bin": b"a" * 1000}
    assert (single.content_dir / "one.bin").read_bytes() == b"a" * 1000
    assert single.torrent_path.read_bytes() == single.torrent_bytes
    assert single.magnet.startswith(f"magnet:?xt=urn:btih:{single.info_hash}")
    assert "tr=http%3A%2F%2F127.0.0.1%3A1%2Fannounce" in single.magnet
    assert not single.is_multi_file

    multi = make_torrent({"x.bin": b"x", "sub/y.bin": b"yy"}, tmp_path / "seed", announce, "pack")
    assert multi.files == {"pack/x.bin": b"x", "pack/sub/y.bin": b"yy"}
    assert multi.is_multi_file and multi.total_size == 3
    parsed = torf.Torrent.read(str(multi.torrent_path))
    assert parsed.infohash == multi.info_hash
    assert sorted(str(f) for f in parsed.files) == ["pack/sub/y.bin", "pack/x.bin"]
    assert len({single.info_hash, multi.info_hash}) == 2


def test_corrupt_torrent_samples_are_malformed_or_hostile() -> None:
    hostile = {"huge_name", "path_traversal_name", "path_traversal_file"}
    cases = corrupt_torrent_cases()
    assert len(corrupt_torrent_samples()) == len(cases) >= 10
    for label, payload in cases.items():
        if label in hostile:
            continue
        with pytest.raises((torf.BdecodeError, torf.MetainfoError)):
            torf.Torrent.read_stream(io.BytesIO(payload))
    assert len(cases["huge_name"]) > 65_536
    assert b"../" in cases["path_traversal_name"]
    assert b"2:..2:.." in cases["path_traversal_file"]


async def test_tracker_returns_compact_loopback_peers(tracker: Tracker) -> None:
    info_hash = bytes(range(20))

    async def announce(peer_id: bytes, port: int, event: str = "started") -> bytes:
        query = (
            f"info_hash={_pct(info_hash)}&peer_id={_pct(peer_id)}&port={port}"
            f"&uploaded=0&downloaded=0&left=0&compact=1&event={event}"
        )
        return (await _get(f"{tracker.announce_url}?{query}"))[2]

    first = await announce(b"A" * 20, 6881)
    assert b"5:peers0:" in first
    assert b"8:intervali5e" in first
    second = await announce(b"\xff" * 20, 6882)
    assert b"5:peers6:" + socket.inet_aton("127.0.0.1") + (6881).to_bytes(2, "big") in second
    assert tracker.peer_count(info_hash) == 2
    await announce(b"A" * 20, 6881, event="stopped")
    assert tracker.peer_count(info_hash.hex()) == 1
    status, _, body = await _get(f"{tracker.announce_url}?info_hash=short&peer_id=x&port=1")
    assert status == 200 and b"failure reason" in body


def _pct(raw: bytes) -> str:
    return "".join(f"%{b:02X}" for b in raw)


# ---- real seed-to-leech runs -----------------------------------------------------------------


async def _leech(source: str, dest: Path) -> tuple[int, str]:
    """A plain aria2c (no RPC) downloading SOURCE into DEST; stopped by PID on timeout."""
    await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = dest.parent / f"{dest.name}.log"
    with log_path.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            "aria2c",
            *ARIA2_LOOPBACK_FLAGS,
            f"--dir={dest}",
            "--seed-time=0",
            "--bt-stop-timeout=20",
            "--file-allocation=none",
            f"--listen-port={port}",
            f"--stop-with-process={os.getpid()}",
            source,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        await asyncio.wait_for(process.wait(), LEECH_TIMEOUT_S)
    except TimeoutError:
        pass
    finally:
        code = await stop_pid(process)
    return (code if code is not None else -1), log_path.read_text(errors="replace")[-3000:]


@pytest.mark.slow
async def test_leech_from_seeder_by_torrent_file_and_by_magnet(
    tmp_path: Path, tracker: Tracker, seeder_factory: SeederFactory
) -> None:
    seed_dir = tmp_path / "seed"
    multi = make_torrent(
        {"a.bin": deterministic_bytes(300_000, seed=1), "nested/b.txt": b"hello torrent\n"},
        seed_dir,
        tracker.announce_url,
        "album",
    )
    single = make_torrent(
        deterministic_bytes(5 * 1000 * 1000, seed=2), seed_dir, tracker.announce_url, "video.bin"
    )
    seeders = [await seeder_factory(multi), await seeder_factory(single)]
    assert all(s.running and s.pid for s in seeders)
    await tracker.wait_for_peers(multi.info_hash)
    await tracker.wait_for_peers(single.info_hash)

    runs = [
        (multi, str(multi.torrent_path), tmp_path / "leech-multi"),
        (single, str(single.torrent_path), tmp_path / "leech-single"),
        (single, single.magnet, tmp_path / "leech-magnet"),
    ]
    results = await asyncio.gather(*(_leech(source, dest) for _, source, dest in runs))

    for (torrent, _, dest), (code, output) in zip(runs, results, strict=True):
        assert code == 0, output
        for relative, data in torrent.files.items():
            assert (dest / relative).read_bytes() == data, relative
    for seeder in seeders:
        assert seeder.running, seeder.output()
        await seeder.stop()
        assert not seeder.running
