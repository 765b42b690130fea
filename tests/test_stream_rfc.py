"""RFC 9110 byte serving through the real service: every Range form on completed downloads of
k·MiB−1, k·MiB and k·MiB+1 bytes; names that try to climb out of their folder; oversize bodies."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from tests.support.http_files import MIB, FileServer
from tests.support.service import ServiceFactory
from tests.test_web_page import Site, serve_site
from webstreamer.context import STATIC_DIR

K = 2
SIZES = (K * MIB - 1, K * MIB, K * MIB + 1)
SECRET = b"TOP-SECRET-" + os.urandom(8).hex().encode()


@dataclass
class Served:
    size: int
    data: bytes
    path: str  # /stream/{id}/{name}?sig=...
    query: str
    download: dict[str, Any]


@pytest.fixture
async def site(service_factory: ServiceFactory) -> AsyncIterator[Site]:
    running = await service_factory(overrides={"web": {"max_body_size": 64 * 1024}})
    async with serve_site(running) as served:
        yield served


@pytest.fixture
async def served(site: Site, file_server: FileServer) -> list[Served]:
    result = []
    for number, size in enumerate(SIZES):
        name = f"part {number} é.mkv"
        data = file_server.add_file(name, size=size, seed=number)
        download = await site.add_and_complete(file_server.url(name))
        stream_url = download["stream_url"]
        path = "/" + stream_url.split("://", 1)[1].split("/", 1)[1]
        result.append(Served(size, data, path, path.split("?", 1)[1], download))
    return result


def range_cases(size: int) -> list[tuple[str, int, int]]:
    """(Range value, first, last) for satisfiable single ranges, per RFC 9110 §14.1.2."""
    cases = [
        ("bytes=0-0", 0, 0),
        ("bytes=0-99", 0, 99),
        (f"bytes=0-{size - 1}", 0, size - 1),
        (f"bytes=0-{size + 1000}", 0, size - 1),
        (f"bytes={MIB - 1}-{MIB}", MIB - 1, MIB),
        (f"bytes={MIB}-{MIB}", MIB, MIB),
        (f"bytes={size - 1}-{size - 1}", size - 1, size - 1),
        ("bytes=0-", 0, size - 1),
        (f"bytes={MIB}-", MIB, size - 1),
        (f"bytes={size - 1}-", size - 1, size - 1),
        ("bytes=-1", size - 1, size - 1),
        (f"bytes=-{MIB}", size - MIB, size - 1),
        (f"bytes=-{size}", 0, size - 1),
        (f"bytes=-{size + 5}", 0, size - 1),
    ]
    chooser = random.Random(size)
    for _ in range(8):
        first = chooser.randrange(size)
        last = chooser.randrange(first, size)
        cases.append((f"bytes={first}-{last}", first, last))
    return cases


async def test_every_single_range_form(site: Site, served: list[Served]) -> None:
    for item in served:
        size = item.size
        for value, first, last in range_cases(size):
            async with site.http.get(site.base_url + item.path, headers={"Range": value}) as r:
                body = await r.read()
                assert r.status == 206, (size, value)
                assert r.headers["Content-Range"] == f"bytes {first}-{last}/{size}", value
                assert int(r.headers["Content-Length"]) == last - first + 1 == len(body)
                assert body == item.data[first : last + 1], (size, value)
                assert r.headers["Accept-Ranges"] == "bytes"


async def test_whole_file_head_and_unsatisfiable(site: Site, served: list[Served]) -> None:
    for item in served:
        size = item.size
        url = site.base_url + item.path
        async with site.http.get(url) as r:
            body = await r.read()
            assert r.status == 200
            assert int(r.headers["Content-Length"]) == size and body == item.data
            assert r.headers["Accept-Ranges"] == "bytes"
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert "Content-Range" not in r.headers
            disposition = r.headers["Content-Disposition"]
            assert f"filename*=UTF-8''{quote(item.download['file_name'])}" in disposition
            etag = r.headers["ETag"]
        for headers in ({}, {"Range": "bytes=0-9"}):
            async with site.http.head(url, headers=headers) as r:
                assert r.status == 200, headers
                assert int(r.headers["Content-Length"]) == size
                assert r.headers["ETag"] == etag
                assert await r.read() == b""
        for value in (
            f"bytes={size}-",
            f"bytes={size}-{size + 10}",
            f"bytes={size + 7}-",
            "bytes=-0",
        ):
            async with site.http.get(url, headers={"Range": value}) as r:
                assert r.status == 416, value
                assert r.headers["Content-Range"] == f"bytes */{size}"
                assert r.content_type == "application/json"
                assert (await r.json())["error"] == "range_not_satisfiable"
        # Invalid, or several ranges (which a server may ignore, RFC 9110 §14.2): the whole file.
        for ignored in (
            "bytes=abc",
            "items=0-1",
            "bytes=5-1",
            "bytes=--1",
            "bytes=1 - 2",
            "bytes=0-1,5-6",
        ):
            async with site.http.get(url, headers={"Range": ignored}) as r:
                assert r.status == 200, ignored
                assert await r.read() == item.data


async def test_if_range(site: Site, served: list[Served]) -> None:
    for item in served:
        url = site.base_url + item.path
        async with site.http.head(url) as r:
            etag = r.headers["ETag"]
        assert etag.startswith('"') and not etag.startswith("W/")
        span = {"Range": "bytes=10-19"}
        async with site.http.get(url, headers={**span, "If-Range": etag}) as r:
            assert r.status == 206
            assert await r.read() == item.data[10:20]
        for other in ('"something-else"', f"W/{etag}", "Mon, 01 Jan 2001 00:00:00 GMT"):
            async with site.http.get(url, headers={**span, "If-Range": other}) as r:
                assert r.status == 200, other
                assert "Content-Range" not in r.headers
                assert await r.read() == item.data


async def test_risky_types_are_never_served_inline(site: Site, file_server: FileServer) -> None:
    for name, payload in (
        ("page.html", b"<script>alert(1)</script>"),
        ("drawing.svg", b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"/>'),
        ("doc.xhtml", b"<html xmlns='http://www.w3.org/1999/xhtml'><script>1</script></html>"),
    ):
        file_server.add_file(name, data=payload)
        download = await site.add_and_complete(file_server.url(name))
        path = "/" + download["stream_url"].split("://", 1)[1].split("/", 1)[1]
        async with site.http.get(site.base_url + path) as r:
            assert r.status == 200
            assert r.headers["Content-Disposition"].startswith("attachment;"), name
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert "sandbox" in r.headers["Content-Security-Policy"]
            assert await r.read() == payload


async def test_stream_links_need_their_signature(site: Site, served: list[Served]) -> None:
    item = served[0]
    other = served[1]
    bare = item.path.split("?", 1)[0]
    for path in (bare, f"{bare}?sig=", f"{bare}?{other.query}", f"{bare}?{item.query}&exp=5"):
        async with site.http.get(site.base_url + path) as r:
            assert r.status == 403, path
            assert (await r.json())["error"] == "forbidden"
            assert item.data[:64] not in await r.read()


# --- names that try to leave their folder -------------------------------------------------------


def relative_to_static(path: Path) -> str:
    return os.path.relpath(path, STATIC_DIR)


def raw_get(port: int, path: str) -> tuple[int, bytes]:
    """GET with the path sent exactly as written (no client-side normalisation)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.putrequest("GET", path, skip_accept_encoding=True)
        connection.endheaders()
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


async def test_no_route_reads_outside_its_folder(
    site: Site, served: list[Served], tmp_path: Path
) -> None:
    root = site.running.root
    data_dir = site.running.config.data_dir
    download_dir = site.running.config.aria2.download_dir
    planted = [
        root / "secret.txt",
        data_dir / "secret.txt",
        download_dir / "secret.txt",
        tmp_path / "secret.txt",
    ]
    for path in planted:
        path.write_bytes(SECRET)
    item = served[0]
    download_id = item.download["id"]
    query = item.query
    up = "..%2f" * 12
    dotted = "%2e%2e%2f" * 12
    to_root = relative_to_static(root / "secret.txt")
    absolute = str(root / "secret.txt")
    attempts = [
        f"/stream/{download_id}/{up}secret.txt?{query}",
        f"/stream/{download_id}/{dotted}secret.txt?{query}",
        f"/stream/{download_id}/../../../secret.txt?{query}",
        f"/stream/{download_id}/{quote(absolute, safe='')}?{query}",
        f"/stream/{download_id}/0/{up}secret.txt?{query}",
        f"/stream/{download_id}/0/{dotted}secret.txt?{query}",
        f"/stream/{download_id}/{up}/secret.txt?{query}",
        f"/stream/{up}secret.txt/x?{query}",
        f"/stream/{download_id}%2f..%2f..%2fsecret.txt/x?{query}",
        f"/static/{up}secret.txt",
        f"/static/{dotted}secret.txt",
        "/static/../../../secret.txt",
        f"/static/{quote(to_root, safe='/')}",
        f"/static/{quote(to_root, safe='')}",
        f"/static/{quote(absolute, safe='')}",
        f"/static//{absolute.lstrip('/')}",
        "/static/..%5c..%5c..%5csecret.txt",
        f"/static/i18n/{up}secret.txt",
        "/static/%2fetc%2fpasswd",
        f"/watch/{download_id}/{up}secret.txt?{query}",
        f"/watch/{up}secret.txt?{query}",
        f"/watch/{download_id}%2f..%2f..%2fsecret.txt?{query}",
        f"/{up}secret.txt",
        f"/login/{up}secret.txt",
    ]
    port = int(site.base_url.rsplit(":", 1)[1])
    for attempt in attempts:
        status, body = await asyncio.to_thread(raw_get, port, attempt)
        assert SECRET not in body, attempt
        assert b"root:x:0:0" not in body, attempt
        if attempt.startswith(("/static", "/watch", "/login", "/%", "/..")):
            assert status in (400, 403, 404), (attempt, status)
        elif status == 200:
            assert body == item.data, attempt  # the download's own file, whatever the name says


# --- oversize bodies ----------------------------------------------------------------------------


async def test_oversize_bodies_get_a_json_413(site: Site) -> None:
    limit = site.running.config.web.max_body_size
    assert limit == 64 * 1024
    big_json = json.dumps({"urls": ["http://example.invalid/" + "a" * 100] * 1000}).encode()
    assert len(big_json) > limit
    requests: tuple[tuple[str, str, dict[str, Any]], ...] = (
        (
            "POST",
            "/api/downloads",
            {"data": big_json, "headers": {"Content-Type": "application/json"}},
        ),
        (
            "DELETE",
            "/api/downloads",
            {"data": big_json, "headers": {"Content-Type": "application/json"}},
        ),
        ("POST", "/login", {"data": big_json, "headers": {"Content-Type": "application/json"}}),
    )
    for method, path, kwargs in requests:
        status, body, response = await site.request(method, path, **kwargs)
        assert status == 413, (method, path, status)
        assert response.content_type == "application/json"
        assert body["error"] == "request_entity_too_large"
    form = aiohttp.FormData()
    form.add_field("file", b"d" + b"x" * (limit + 1000) + b"e", filename="big.torrent")
    status, body, response = await site.request("POST", "/api/downloads/torrent", data=form)
    assert status == 413, status
    assert response.content_type == "application/json"
