"""The cache of open files behind /stream: a cached file is served again without being looked up,
and every change (the file replaced, rewritten or deleted on disk, the row changed, the job
deleted) shows in the very next request. The service is real (aria2c fetched the files); the
cache's own rules are held on real files and a real hub. Also: the link signature, computed from
pads hashed once, is plain HMAC-SHA256."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from events import EventHub
from files import DownloadFiles
from records import DownloadRemoved, DownloadRow
from tests.support.http_files import FileServer
from tests.support.records import download_row
from tests.support.service import ServiceFactory
from tests.test_web_page import Site, serve_site
from webstreamer.byteserve import OWN_FILE_FROM, _open_again
from webstreamer.filecache import FileCache, OpenFile
from webstreamer.routes.stream import FILE_CACHE
from webstreamer.signing import LinkSigner

SIZE = 300_000


@pytest.fixture
async def site(service_factory: ServiceFactory) -> AsyncIterator[Site]:
    running = await service_factory()
    async with serve_site(running) as served:
        yield served


def _cache(site: Site) -> FileCache:
    return site.running.service.parts.web.app[FILE_CACHE]


async def _completed(
    site: Site, file_server: FileServer, name: str, seed: int
) -> tuple[int, str, Path, bytes]:
    """(id, stream path, file on disk, bytes) of a download aria2 completed."""
    data = file_server.add_file(name, size=SIZE, seed=seed)
    download = await site.add_and_complete(file_server.url(name))
    row = await site.running.service.parts.store.get_download_by_id(download["id"])
    assert row is not None and row.local_path
    path = "/" + download["stream_url"].split("://", 1)[1].split("/", 1)[1]
    return download["id"], path, Path(row.local_path), data


async def _range(site: Site, path: str, first: int, last: int) -> tuple[int, bytes, str]:
    status, body, response = await site.request(
        "GET", path, auth=False, headers={"Range": f"bytes={first}-{last}"}
    )
    return status, body, response.headers.get("ETag", "")


async def test_a_cached_file_is_reused_and_follows_the_disk(
    site: Site, file_server: FileServer
) -> None:
    download_id, path, on_disk, data = await _completed(site, file_server, "clip.mkv", 1)
    cache = _cache(site)

    status, body, etag = await _range(site, path, 1000, 66535)
    assert (status, body) == (206, data[1000:66536])
    entry = cache.get((download_id, None))
    assert entry is not None
    status, body, again = await _range(site, path, 0, 9)
    assert (status, body, again) == (206, data[:10], etag)
    assert cache.get((download_id, None)) is entry  # the same open file, not a new look-up

    # Replaced (a new file renamed over it, same size): the next request sends the new bytes.
    new = bytes(reversed(data))
    staged = on_disk.with_name("staged")
    staged.write_bytes(new)
    os.replace(staged, on_disk)
    status, body, replaced_etag = await _range(site, path, 0, 65535)
    assert (status, body) == (206, new[:65536])
    assert replaced_etag != etag
    assert entry.file.closed  # the replaced file's descriptor is gone

    # Rewritten in place to another size: no longer the whole file the row records.
    with on_disk.open("r+b") as file:
        file.truncate(SIZE - 1)
    status, _, _ = await _range(site, path, 0, 9)
    assert status == 409

    # Deleted outside the service: nothing is served from a descriptor kept open.
    on_disk.write_bytes(data)
    assert (await _range(site, path, 0, 9))[:2] == (206, data[:10])
    kept = cache.get((download_id, None))
    assert kept is not None
    on_disk.unlink()
    status, _, _ = await _range(site, path, 0, 9)
    assert status == 409
    assert kept.file.closed


async def test_a_deleted_job_link_is_refused_at_once(site: Site, file_server: FileServer) -> None:
    kept_id, kept_path, on_disk, _ = await _completed(site, file_server, "kept.bin", 2)
    gone_id, gone_path, gone_disk, _ = await _completed(site, file_server, "gone.bin", 3)
    cache = _cache(site)
    for path in (kept_path, gone_path):
        assert (await _range(site, path, 0, 9))[0] == 206
    kept_entry, gone_entry = cache.get((kept_id, None)), cache.get((gone_id, None))
    assert kept_entry is not None and gone_entry is not None

    # The row goes, the file stays on disk: the link must not go on serving it.
    status, _, _ = await site.request("DELETE", f"/api/downloads/{kept_id}")
    assert status == 200
    status, body, _ = await site.request("GET", kept_path, auth=False)
    assert status == 404, body
    assert on_disk.exists() and kept_entry.file.closed
    # Both go.
    status, _, _ = await site.request("DELETE", f"/api/downloads/{gone_id}?delete_file=true")
    assert status == 200
    assert (await site.request("GET", gone_path, auth=False))[0] == 404
    assert not gone_disk.exists() and gone_entry.file.closed
    assert len(cache) == 0


async def test_a_changed_row_is_served_as_changed(site: Site, file_server: FileServer) -> None:
    download_id, path, on_disk, data = await _completed(site, file_server, "first.mkv", 4)
    cache = _cache(site)
    assert (await _range(site, path, 0, 9))[:2] == (206, data[:10])
    entry = cache.get((download_id, None))
    assert entry is not None

    other = on_disk.with_name("second.mkv")
    other_data = os.urandom(SIZE // 2)
    other.write_bytes(other_data)
    await site.running.service.parts.store.update_download_details_by_id(
        download_id, file_name="second.mkv", local_path=str(other), total_length=len(other_data)
    )
    status, body, response = await site.request("GET", path, auth=False)
    assert (status, body) == (200, other_data)
    assert "second.mkv" in response.headers["Content-Disposition"]
    assert entry.file.closed


async def test_long_transfers_and_short_ranges_of_one_file_at_once(
    site: Site, file_server: FileServer
) -> None:
    """Long transfers go out from a file opened for each, short ranges from the shared one."""
    data = file_server.add_file("long.mkv", size=OWN_FILE_FROM + 12_345, seed=5)
    download = await site.add_and_complete(file_server.url("long.mkv"))
    path = "/" + download["stream_url"].split("://", 1)[1].split("/", 1)[1]

    async def whole() -> bytes:
        status, body, _ = await site.request("GET", path, auth=False)
        assert status == 200
        return bytes(body)

    async def tail() -> bytes:
        status, body, _ = await _range(site, path, 7, len(data) - 1)
        assert status == 206
        return bytes(body)

    async def short(first: int) -> bytes:
        status, body, _ = await _range(site, path, first, first + 65_535)
        assert status == 206
        return bytes(body)

    firsts = [0, 1_000_000, OWN_FILE_FROM - 10, len(data) - 65_536]
    results = await asyncio.gather(whole(), tail(), whole(), *(short(f) for f in firsts))
    assert results[:3] == [data, data[7:], data]
    assert results[3:] == [data[f : f + 65_536] for f in firsts]
    assert _cache(site).get((download["id"], None)) is not None


def test_a_file_is_opened_again_only_while_it_is_the_same(tmp_path: Path) -> None:
    path = tmp_path / "file.bin"
    path.write_bytes(b"x" * 10)
    with path.open("rb") as shared:
        again = _open_again(path, shared)
        assert again is not None
        again.close()
        staged = tmp_path / "staged"
        staged.write_bytes(b"y" * 10)
        os.replace(staged, path)  # another file under the same name
        assert _open_again(path, shared) is None
        path.unlink()
        assert _open_again(path, shared) is None


# --- the cache's own rules, on real files and a real hub ------------------------------------------


def _row(download_id: int, path: Path, size: int) -> DownloadRow:
    return download_row(
        id=download_id,
        status="completed",
        file_name=path.name,
        local_path=str(path),
        total_length=size,
        completed_length=size,
    )


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[tuple[FileCache, EventHub, Path]]:
    root = tmp_path / "downloads"
    (root / "1").mkdir(parents=True)
    (root / "1" / "a.bin").write_bytes(b"a" * 100)
    hub = EventHub()
    files_cache = FileCache(DownloadFiles(root))
    files_cache.watch(hub)
    yield files_cache, hub, root / "1" / "a.bin"
    files_cache.close()
    await hub.close()


async def _open(cache: FileCache, row: DownloadRow) -> OpenFile:
    with cache.loading(row.id) as load:
        entry = await cache.open(load, row, None)
    assert entry is not None
    return entry


async def test_a_file_in_use_closes_only_when_its_last_response_ends(
    cache: tuple[FileCache, EventHub, Path],
) -> None:
    files_cache, hub, path = cache
    entry = await _open(files_cache, _row(1, path, 100))
    files_cache.acquire(entry)
    hub.publish("download", DownloadRemoved(1), 1)  # the job is deleted mid-response
    assert files_cache.get((1, None)) is None
    assert not entry.file.closed  # the response under way still reads from it
    files_cache.release(entry)
    assert entry.file.closed


async def test_a_look_up_raced_by_a_change_is_not_kept(
    cache: tuple[FileCache, EventHub, Path],
) -> None:
    files_cache, hub, path = cache
    row = _row(1, path, 100)
    with files_cache.loading(1) as load:
        hub.publish("download", DownloadRemoved(1), 1)  # committed after the row was read
        entry = await files_cache.open(load, row, None)
    assert entry is not None and entry.dropped
    assert len(files_cache) == 0
    files_cache.acquire(entry)
    files_cache.release(entry)
    assert entry.file.closed


async def test_only_whole_regular_files_are_opened(
    cache: tuple[FileCache, EventHub, Path],
) -> None:
    files_cache, hub, path = cache
    fifo = path.with_name("pipe")
    os.mkfifo(fifo)
    for row in (
        _row(1, path, 99),  # preallocated, not yet whole
        _row(1, fifo, 0),  # a FIFO must not hold the thread that opens it
        _row(1, path.parent, 100),  # a folder
        _row(1, path.parent.parent.parent / "outside.bin", 100),  # outside the download folder
    ):
        with files_cache.loading(1) as load:
            assert await asyncio.wait_for(files_cache.open(load, row, None), 5) is None
    assert len(files_cache) == 0
    entry = await _open(files_cache, _row(1, path, 100))
    hub.publish("download", DownloadRemoved(None), None)  # every download removed
    assert len(files_cache) == 0 and entry.file.closed


@pytest.mark.parametrize("key_length", [1, 32, 64, 65, 200])
def test_link_signatures_are_plain_hmac_sha256(key_length: int) -> None:
    """The pads hashed once give the very MAC of RFC 2104, for keys shorter and longer than a
    block: links signed before stay valid."""
    key = os.urandom(key_length)
    signer = LinkSigner(key)
    for download_id, index, expires in ((1, 0, 0), (7, 3, 1_900_000_000), (10**15, 0, 5)):
        message = f"stream:{download_id}:{index}:{expires}".encode()
        mac = hmac.new(key, message, hashlib.sha256).digest()
        expected = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
        query = signer.query(download_id, index, expires=expires)
        assert query.split("&")[0] == f"sig={expected}"
        exp = str(expires) if expires else None
        assert signer.verify(download_id, index, expected, exp, now=1) is None
        assert signer.verify(download_id, index + 1, expected, exp, now=1) == "forged signature"
