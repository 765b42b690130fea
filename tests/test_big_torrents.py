"""Torrents of many files: read off the event loop, capped by `aria2.max_torrent_files`, and
listed page by page (a download's JSON in lists, details and pushes carries `files_total` and the
first few files; `GET /api/downloads/{id}/files` pages through the rest).

The torrents are real: bencoded with the piece hashes of their content. The 100,000-file one is
4 MB, under the 10 MiB size cap, and took the service's event loop for seconds when it was read
and stored on it.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aria2_client.sources import SourceError, parse_torrent
from configer import ConfigError, default_config, load_config
from tests.support.service import RunningService, ServiceFactory
from tests.support.service_process import HealthProbe
from tests.support.torrents import (
    BencodeValue,
    SeederFactory,
    TorrentInfo,
    Tracker,
    bencode,
    make_torrent,
)
from tests.test_bot import RelayFactory, relay_factory  # noqa: F401 (the relay fixture)
from tests.test_browser import CHROMIUM, chromium, sign_in
from tests.test_engine_api import FINAL, fetch, row_count
from tests.test_engine_sources import upload_torrent

FILES_IN_ROW = 20  # the first files a download's JSON carries
MANY = 100_000
WAIT = 90.0


@functools.cache
def many_files_torrent(count: int, name: str = "many") -> bytes:
    """A torrent of `count` one-byte files, a thousand to a folder: `name/dNNN/fNNNNNN.bin`."""
    piece_length = 16384
    content = bytes(i % 251 for i in range(count))
    pieces = b"".join(
        hashlib.sha1(content[start : start + piece_length]).digest()
        for start in range(0, count, piece_length)
    )
    files: list[BencodeValue] = [
        {"length": 1, "path": [f"d{i // 1000:03d}", f"f{i:06d}.bin"]} for i in range(count)
    ]
    info: dict[bytes | str, BencodeValue] = {
        "name": name,
        "piece length": piece_length,
        "pieces": pieces,
        "files": files,
    }
    return bencode({"info": info})


def expected_path(index: int, name: str = "many") -> str:
    """The path of file `index` (aria2's 1-based numbering) of `many_files_torrent`."""
    return f"{name}/d{(index - 1) // 1000:03d}/f{index - 1:06d}.bin"


async def raw_get(svc: RunningService, path: str) -> bytes:
    async with svc.http.get(svc.base_url + path, headers=svc.auth) as response:
        assert response.status == 200, (path, response.status)
        return await response.read()


async def files_page(svc: RunningService, download_id: int, query: str) -> tuple[int, Any]:
    return await svc.api("GET", f"/api/downloads/{download_id}/files?{query}")


# --- the parser ---------------------------------------------------------------------------------


def test_a_torrent_of_more_files_than_the_cap_is_refused_naming_the_key_and_the_count() -> None:
    data = many_files_torrent(1001)
    with pytest.raises(SourceError) as caught:
        parse_torrent(data, max_files=1000)
    message = str(caught.value)
    assert "aria2.max_torrent_files" in message and "1001" in message and "1000" in message
    assert len(parse_torrent(data, max_files=1001).files) == 1001
    assert len(parse_torrent(data).files) == 1001  # no cap given: none


def test_the_parser_reads_every_file_of_a_big_torrent() -> None:
    meta = parse_torrent(many_files_torrent(MANY))
    assert len(meta.files) == MANY
    assert [f.index for f in meta.files[:3]] == [1, 2, 3]
    assert meta.files[-1].index == MANY
    assert meta.files[-1].path == expected_path(MANY)
    assert meta.total_length == MANY


@pytest.mark.attack(
    "a .torrent with two info dictionaries (its hash read from one, its files from the other)",
    promise="refused as malformed, naming the repeated key",
)
def test_a_torrent_with_two_info_dictionaries_is_refused() -> None:
    """The info hash must be the hash of the info whose files are listed: a second `info` key
    (the hash read from one, the files from the other) is refused."""
    good = bencode(
        {"info": {"name": "a.bin", "length": 1, "piece length": 16384, "pieces": b"\0" * 20}}
    )
    other = bencode({"name": "b.bin", "length": 1, "piece length": 16384, "pieces": b"\1" * 20})
    twice = good[:-1] + b"4:info" + other + b"e"
    with pytest.raises(SourceError, match="repeated key"):
        parse_torrent(twice)


def test_the_cap_is_a_checked_config_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("aria2:\n  max_torrent_files: 250\n")
    assert load_config(path, env={}).aria2.max_torrent_files == 250
    path.write_text("aria2:\n  max_torrent_files: 0\n")
    with pytest.raises(ConfigError, match=r"aria2\.max_torrent_files.*between 1 and 1000000"):
        load_config(path, env={})
    assert default_config(tmp_path).aria2.max_torrent_files == 10_000


# --- the service --------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.attack(
    "a .torrent of 100,000 small files (4 MB, under the size cap)",
    promise="/api/health keeps answering while it is read and stored; lists, details and pushes "
    "carry a file count and the first 20 files; the rest come page by page",
)
async def test_a_torrent_of_100000_files_keeps_the_service_answering_and_is_listed_in_pages(
    service_factory: ServiceFactory,
) -> None:
    svc = await service_factory({"aria2": {"max_torrent_files": MANY}})
    data = many_files_torrent(MANY)
    assert len(data) < 10 * 1024 * 1024  # under the size cap: only the file count is big
    pushes: list[dict[str, Any]] = []
    ws = await svc.http.ws_connect(
        svc.base_url.replace("http://", "ws://") + "/api/ws", headers=svc.auth
    )

    async def listen() -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            decoded = json.loads(message.data)
            if decoded.get("type") == "download_update":
                pushes.append({"size": len(message.data), "data": decoded["data"]})

    listener = asyncio.create_task(listen())
    probe = HealthProbe(svc.service.parts.web.port)
    probe.start()
    try:
        status, answer = await upload_torrent(svc, data)
        assert status == 201, answer
        rows_before_listing = await row_count(svc)
        listed = await raw_get(svc, "/api/downloads?limit=5")
        grouped = await raw_get(svc, "/api/downloads?grouped=true&limit=5")
    finally:
        await probe.stop()
        await ws.close()
        await asyncio.wait_for(listener, 10)
    assert probe.failures == [], probe.failures[:5]
    assert len(probe.latencies) >= 3  # it probed while the torrent was read and stored

    assert rows_before_listing == 1
    # The list answer was 12.6 MB: every file of every row. Now the first few of each.
    for body in (listed, grouped):
        assert len(body) < 32 * 1024, len(body)
    [row] = answer["downloads"]
    assert row["files_total"] == MANY
    assert [f["index"] for f in row["files"]] == list(range(1, FILES_IN_ROW + 1))
    [shown] = json.loads(listed)["downloads"]
    assert shown["files_total"] == MANY and len(shown["files"]) == FILES_IN_ROW
    detail = await raw_get(svc, f"/api/downloads/{row['id']}")
    assert len(detail) < 32 * 1024
    mine = [p for p in pushes if p["data"].get("id") == row["id"]]
    assert any(p["data"]["files_total"] == MANY for p in mine), mine  # 0 before it was stored
    for push in mine:
        assert push["size"] < 32 * 1024
        assert len(push["data"]["files"]) == min(push["data"]["files_total"], FILES_IN_ROW)

    for offset, limit, count in ((0, 1000, 1000), (50_000, 250, 250), (MANY - 10, 1000, 10)):
        status, page = await files_page(svc, row["id"], f"offset={offset}&limit={limit}")
        assert status == 200, page
        assert (page["total"], page["offset"], page["limit"]) == (MANY, offset, limit)
        assert len(page["files"]) == count
        for position, entry in enumerate(page["files"]):
            index = offset + position + 1
            assert entry == {
                "index": index,
                "path": expected_path(index),
                "length": 1,
                "selected": True,
                "stream_url": None,  # not completed
            }
    status, page = await files_page(svc, row["id"], f"offset={MANY}")
    assert status == 200 and page["files"] == [] and page["total"] == MANY
    status, page = await files_page(svc, row["id"], "")
    assert status == 200 and (page["offset"], page["limit"], len(page["files"])) == (0, 100, 100)


async def test_the_files_endpoint_checks_its_bounds_and_its_token(
    service_factory: ServiceFactory,
) -> None:
    svc = await service_factory()
    status, answer = await upload_torrent(svc, many_files_torrent(30, "small"))
    assert status == 201, answer
    download_id = answer["downloads"][0]["id"]
    for query, named in (
        ("limit=1001", "limit"),
        ("limit=0", "limit"),
        ("offset=-1", "offset"),
        ("offset=ten", "offset"),
        ("limit=" + "9" * 5000, "limit"),
    ):
        status, body = await files_page(svc, download_id, query)
        assert status == 400, (query, body)
        assert named in body["detail"], (query, body)
    status, body = await svc.api("GET", "/api/downloads/999999/files")
    assert status == 404, body
    status, body = await svc.api("GET", f"/api/downloads/{download_id}/files", auth=False)
    assert status == 401, body
    status, page = await files_page(svc, download_id, "offset=25&limit=10")
    assert status == 200
    assert [f["path"] for f in page["files"]] == [expected_path(i, "small") for i in range(26, 31)]
    # A link or a magnet has no file list: an empty page, not an error.
    status, added = await svc.api(
        "POST", "/api/downloads", json={"url": "magnet:?xt=urn:btih:" + "c" * 40}
    )
    assert status == 201, added
    status, page = await files_page(svc, added["downloads"][0]["id"], "")
    assert status == 200 and page["files"] == [] and page["total"] == 0


@pytest.mark.attack(
    "a .torrent of more files than aria2.max_torrent_files, through the API",
    promise="400 naming the key and the file count; nothing is added",
)
async def test_a_torrent_above_the_cap_is_a_400_naming_the_key_and_adds_nothing(
    service_factory: ServiceFactory,
) -> None:
    svc = await service_factory({"aria2": {"max_torrent_files": 1000}})
    status, body = await upload_torrent(svc, many_files_torrent(1001))
    assert status == 400, body
    assert body["error"] == "bad_source"
    assert "aria2.max_torrent_files" in body["detail"] and "1001" in body["detail"], body
    assert await row_count(svc) == 0
    status, body = await upload_torrent(svc, many_files_torrent(1000))
    assert status == 201, body
    assert body["downloads"][0]["files_total"] == 1000


@pytest.mark.attack(
    "a .torrent of more files than aria2.max_torrent_files, sent in the chat",
    promise="a reply naming the key and the file count; nothing is added",
)
async def test_a_torrent_above_the_cap_sent_in_the_chat_is_refused_naming_the_key(
    relay_factory: RelayFactory,  # noqa: F811 (the fixture imported above)
) -> None:
    relay = await relay_factory({"aria2": {"max_torrent_files": 100}})
    torrent = relay.fake.add_file(many_files_torrent(101), file_name="many.torrent")
    [reply] = await relay.chat().say(file=torrent)
    assert "aria2.max_torrent_files" in reply.text and "101" in reply.text, reply.text
    assert await relay.downloads() == []


# --- a completed torrent of more files than a row carries ----------------------------------------


def numbered_files(count: int) -> dict[str, bytes]:
    return {f"part{i:02d}/file{i:02d}.bin": bytes([i]) * (1000 + i) for i in range(count)}


async def completed_torrent(
    svc: RunningService,
    tmp_path: Path,
    tracker: Tracker,
    seeder_factory: SeederFactory,
    count: int,
) -> tuple[TorrentInfo, dict[str, Any]]:
    info = make_torrent(numbered_files(count), tmp_path / "seed", tracker.announce_url, "parts")
    await seeder_factory(info)
    await tracker.wait_for_peers(info.info_hash, 1, within_s=20)
    status, answer = await upload_torrent(svc, info.torrent_bytes)
    assert status == 201, answer
    done = await svc.wait_download(answer["downloads"][0]["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    return info, done


@pytest.mark.slow
async def test_every_page_of_a_completed_torrent_links_each_file(
    service_factory: ServiceFactory,
    tmp_path: Path,
    tracker: Tracker,
    seeder_factory: SeederFactory,
) -> None:
    svc = await service_factory()
    info, done = await completed_torrent(svc, tmp_path, tracker, seeder_factory, 45)
    assert done["files_total"] == 45 and len(done["files"]) == FILES_IN_ROW
    status, page = await files_page(svc, done["id"], "offset=20&limit=100")
    assert status == 200 and page["total"] == 45
    entries = done["files"] + page["files"]
    assert [f["index"] for f in entries] == list(range(1, 46))
    assert {f["path"] for f in entries} == set(info.files)
    for entry in entries[FILES_IN_ROW - 1 :]:  # the last of the row's, and every paged one
        assert entry["stream_url"], entry
        status, _, body = await fetch(svc, entry["stream_url"])
        assert status == 200, entry
        assert body == info.files[entry["path"]]


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_the_page_shows_a_torrents_first_files_and_fetches_the_rest(
    service_factory: ServiceFactory,
    tmp_path: Path,
    tracker: Tracker,
    seeder_factory: SeederFactory,
) -> None:
    svc = await service_factory()
    info, done = await completed_torrent(svc, tmp_path, tracker, seeder_factory, 45)
    row = f"document.querySelector('article.item[data-download-id=\"{done['id']}\"]')"
    files = f"{row}.querySelectorAll('.details ul.files > li')"
    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        await page.send("Runtime.enable")
        await sign_in(page, svc.base_url, svc.token)
        await page.wait_for(f"!!{row}", 10, "the torrent's row")
        await page.evaluate(f"{row}.querySelector('button[data-action=\"details\"]').click()")
        await page.wait_for(f"{files}.length === {FILES_IN_ROW}", 10, "the row's first files")
        heading = f"{row}.querySelector('.details h4').textContent"
        assert await page.evaluate(heading) == f"Files ({FILES_IN_ROW} of 45)"
        more = f"{row}.querySelector('.details button.more-files')"
        assert await page.evaluate(f"{more}.textContent") == "Show 25 more"
        await page.evaluate(f"{more}.click()")
        await page.wait_for(f"{files}.length === 45", 10, "every file after one more page")
        assert await page.evaluate(heading) == "Files"
        assert await page.evaluate(f"{more}") is None
        shown = await page.evaluate(
            f"Array.from({files}, (li) => [li.firstChild.textContent,"
            " li.querySelectorAll('button, a').length])"
        )
        assert [text.split(" (")[0] for text, _ in shown] == sorted(info.files)
        assert all(links >= 1 for _, links in shown), shown  # every file has its link
