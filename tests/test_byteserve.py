"""serve_bytes over real HTTP on 127.0.0.1: local files (sendfile) and in-memory async sources."""

from __future__ import annotations

import asyncio
import json
import os
import random
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from webstreamer.byteserve import (
    CONTENT_SECURITY_POLICY,
    MEDIA_CONTENT_SECURITY_POLICY,
    ByteSource,
    LocalFileSource,
    serve_bytes,
)
from webstreamer.ranges import http_date

MIB = 1024 * 1024
SIZES = [0, MIB - 1, MIB, MIB + 1, 3 * MIB - 1, 3 * MIB, 3 * MIB + 1]


def payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


@dataclass
class MemorySource:
    """An async source like a remote file: yields odd-sized chunks, can fail or stall."""

    data: bytes
    name: str = "memory.bin"
    mime: str = "application/octet-stream"
    etag: str = '"memory-v1"'
    last_modified: datetime | None = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    path: Path | None = None
    chunk: int = 100_003
    fail_after: int | None = None  # raise once this many bytes of the range were yielded
    end_after: int | None = None  # stop quietly once this many bytes were yielded
    delay: float = 0.0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    completed: bool = False

    @property
    def size(self) -> int:
        return len(self.data)

    async def iter_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        try:
            position = start
            while position <= end:
                done = position - start
                if self.fail_after is not None and done >= self.fail_after:
                    raise OSError("upstream went away")
                if self.end_after is not None and done >= self.end_after:
                    return
                take = min(self.chunk, end - position + 1)
                yield self.data[position : position + take]
                position += take
                if self.delay:
                    await asyncio.sleep(self.delay)
            self.completed = True
        finally:
            self.closed.set()


def make_app(sources: dict[str, ByteSource], allow_sendfile: bool = True) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        source = sources[request.match_info["key"]]
        return await serve_bytes(request, source, allow_sendfile=allow_sendfile)

    app = web.Application()
    app.router.add_get("/s/{key}", handler)  # HEAD is routed here too
    return app


async def start_client(
    app: web.Application,
    ssl_context: ssl.SSLContext | None = None,
    handler_cancellation: bool = False,
) -> TestClient:
    """A started client. TestServer cancels handlers when the client leaves; aiohttp's
    default outside tests does not, so that is the default here too."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server(ssl=ssl_context)
    assert server.runner is not None and server.runner.server is not None
    server.runner.server.handler_cancellation = handler_cancellation
    client = TestClient(server)
    await client.start_server()
    return client


@dataclass(frozen=True)
class Expect:
    status: int
    start: int = 0
    end: int = -1


def forms(size: int) -> list[tuple[str | None, Expect]]:
    """Range headers and what RFC 9110 says they get for a representation of ``size`` bytes."""
    full = Expect(200, 0, size - 1)
    if size == 0:
        return [
            (None, full),
            ("bytes=0-0", Expect(416)),
            ("bytes=0-", Expect(416)),
            ("bytes=-0", Expect(416)),
            ("bytes=-5", full),  # satisfiable, but an empty 206 cannot be written: send it all
        ]
    last = size - 1
    return [
        (None, full),
        ("bytes=0-0", Expect(206, 0, 0)),  # first byte
        (f"bytes={last}-{last}", Expect(206, last, last)),  # last byte
        ("bytes=-1", Expect(206, last, last)),
        ("bytes=1-", Expect(206, 1, last)),
        (f"bytes=1000-{MIB}", Expect(206, 1000, min(MIB, last))),
        (
            f"bytes={MIB - 1}-{MIB}",
            Expect(206, MIB - 1, min(MIB, last)) if size > MIB - 1 else Expect(416),
        ),
        (f"bytes={MIB}-", Expect(206, MIB, last) if size > MIB else Expect(416)),
        (f"bytes=-{MIB}", Expect(206, max(0, size - MIB), last)),
        (f"bytes=-{size + 10}", Expect(206, 0, last)),  # suffix longer than the file
        (f"bytes=0-{2 * size}", Expect(206, 0, last)),
        (f"bytes={size}-", Expect(416)),  # first-pos beyond the end
        (f"bytes={size + 5}-{size + 10}", Expect(416)),
        ("bytes=5-1", full),  # invalid: ignored
        ("items=0-1", full),  # unknown unit: ignored
        ("bytes=0-0,2-2", full),  # disjoint ranges: no multipart, whole file
        ("bytes=0-9, 5-19", Expect(206, 0, min(19, last))),  # overlapping: coalesced
    ]


async def check_form(
    client: TestClient, url: str, size: int, data: bytes, header: str | None, expect: Expect
) -> None:
    headers = {} if header is None else {"Range": header}
    async with client.get(url, headers=headers) as response:
        body = await response.read()
        where = f"{url} Range={header!r} size={size}"
        assert response.status == expect.status, where
        assert response.headers["Accept-Ranges"] == "bytes", where
        assert response.headers["ETag"].startswith('"'), where
        if expect.status == 416:
            assert response.headers["Content-Range"] == f"bytes */{size}", where
            assert response.content_type == "application/json", where
            assert json.loads(body)["error"] == "range_not_satisfiable", where
            return
        expected = data[expect.start : expect.end + 1]
        assert int(response.headers["Content-Length"]) == len(expected), where
        assert "Transfer-Encoding" not in response.headers, where
        assert "Content-Encoding" not in response.headers, where
        assert body == expected, where
        if expect.status == 206:
            assert response.headers["Content-Range"] == (
                f"bytes {expect.start}-{expect.end}/{size}"
            ), where
        else:
            assert "Content-Range" not in response.headers, where


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("byteserve")
    paths = {}
    for size in SIZES:
        path = root / f"file-{size}.bin"
        path.write_bytes(payload(size))
        paths[size] = path
    return paths


@pytest.mark.parametrize("kind", ["local", "local-no-sendfile", "memory"])
@pytest.mark.parametrize("size", SIZES)
async def test_every_range_form(files: dict[int, Path], size: int, kind: str) -> None:
    data = payload(size)
    source: ByteSource
    if kind == "memory":
        source = MemorySource(data)
    else:
        source = await LocalFileSource.open(files[size])
    client = await start_client(make_app({"f": source}, allow_sendfile=kind != "local-no-sendfile"))
    try:
        for header, expect in forms(size):
            await check_form(client, "/s/f", size, data, header, expect)
    finally:
        await client.close()


@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_head_sends_the_get_headers_and_ignores_range(
    files: dict[int, Path], kind: str
) -> None:
    size = MIB + 1
    source: ByteSource = (
        MemorySource(payload(size)) if kind == "memory" else await LocalFileSource.open(files[size])
    )
    client = await start_client(make_app({"f": source}))
    try:
        async with client.get("/s/f") as get:
            await get.read()
            get_headers = {k: v for k, v in get.headers.items() if k != "Date"}
        for range_header in (None, "bytes=0-99", "bytes=-1", f"bytes={size}-"):
            headers = {} if range_header is None else {"Range": range_header}
            async with client.head("/s/f", headers=headers) as head:
                # RFC 9110 §14.2: Range is defined for GET only, so HEAD answers as a full GET.
                assert head.status == 200, range_header
                assert await head.read() == b""
                head_headers = {k: v for k, v in head.headers.items() if k != "Date"}
                assert head_headers == get_headers, range_header
                assert head.headers["Content-Length"] == str(size)
    finally:
        await client.close()


@pytest.mark.parametrize("kind", ["local", "memory"])
async def test_if_range(files: dict[int, Path], kind: str) -> None:
    size = MIB + 1
    data = payload(size)
    source: ByteSource = (
        MemorySource(data) if kind == "memory" else await LocalFileSource.open(files[size])
    )
    client = await start_client(make_app({"f": source}))
    etag = source.etag
    assert source.last_modified is not None
    last_modified = http_date(source.last_modified)
    cases = [
        (etag, 206),
        ('"something-else"', 200),
        (f"W/{etag}", 200),  # weak tags never match (strong comparison)
        (last_modified, 206),
        (http_date(source.last_modified + timedelta(seconds=1)), 200),
        ("not a validator", 200),
    ]
    try:
        for if_range, status in cases:
            headers = {"Range": f"bytes={MIB}-", "If-Range": if_range}
            async with client.get("/s/f", headers=headers) as response:
                body = await response.read()
                assert response.status == status, if_range
                if status == 206:
                    assert body == data[MIB:]
                    assert response.headers["Content-Range"] == f"bytes {MIB}-{MIB}/{size}"
                else:
                    assert body == data
                    assert response.headers["Content-Length"] == str(size)
        # If-Range without Range is ignored; a failed If-Range also skips the 416 check.
        async with client.get("/s/f", headers={"If-Range": '"x"'}) as response:
            assert response.status == 200
        headers = {"Range": f"bytes={size}-", "If-Range": '"x"'}
        async with client.get("/s/f", headers=headers) as response:
            assert response.status == 200
            assert len(await response.read()) == size
    finally:
        await client.close()


async def test_conditional_requests(files: dict[int, Path]) -> None:
    source = await LocalFileSource.open(files[MIB])
    client = await start_client(make_app({"f": source}))
    try:
        async with client.get("/s/f", headers={"If-None-Match": source.etag}) as response:
            assert response.status == 304
            assert await response.read() == b""
            assert response.headers["ETag"] == source.etag
        async with client.get("/s/f", headers={"If-None-Match": '"old"'}) as response:
            assert response.status == 200
            assert len(await response.read()) == MIB
        async with client.get("/s/f", headers={"If-Match": '"old"'}) as response:
            assert response.status == 412
            assert (await response.json())["error"] == "precondition_failed"
        async with client.get(
            "/s/f", headers={"If-Match": source.etag, "Range": "bytes=0-9"}
        ) as response:
            assert response.status == 206
            assert len(await response.read()) == 10
    finally:
        await client.close()


async def test_local_file_source_describes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "Clip One.MP4"
    path.write_bytes(b"x" * 10)
    source = await LocalFileSource.open(path)
    assert (source.size, source.name, source.mime, source.path) == (
        10,
        "Clip One.MP4",
        "video/mp4",
        path,
    )
    assert source.etag.startswith('"') and source.etag.endswith('"') and len(source.etag) > 10
    assert source.last_modified is not None and source.last_modified.tzinfo is not None
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert (await LocalFileSource.open(path)).etag != source.etag
    assert b"".join([chunk async for chunk in source.iter_range(2, 5)]) == b"xxxx"
    with pytest.raises(IsADirectoryError):
        await LocalFileSource.open(tmp_path)
    path.write_bytes(b"x" * 3)  # the file shrank after it was described
    with pytest.raises(EOFError):
        async for _ in source.iter_range(0, 9):
            pass


async def test_future_modification_time_is_clamped(tmp_path: Path) -> None:
    future = datetime.now(UTC) + timedelta(days=30)
    client = await start_client(make_app({"f": MemorySource(b"abc", last_modified=future)}))
    try:
        async with client.get("/s/f") as response:
            sent = response.headers["Last-Modified"]
            assert datetime.strptime(sent, "%a, %d %b %Y %H:%M:%S GMT").replace(
                tzinfo=UTC
            ) <= datetime.now(UTC)
    finally:
        await client.close()


async def test_active_content_is_an_attachment(tmp_path: Path) -> None:
    sources: dict[str, ByteSource] = {}
    for key, name in [
        ("html", "page.html"),
        ("svg", "drawing.svg"),
        ("xhtml", "page.xhtml"),
        ("video", "clip.mp4"),
        ("image", "photo.png"),
        ("text", "notes.txt"),
        ("unknown", "blob"),
    ]:
        path = tmp_path / name
        path.write_bytes(b"<svg onload=alert(1)></svg>" if key == "svg" else b"<script>1</script>")
        sources[key] = await LocalFileSource.open(path)
    sources["lying"] = MemorySource(b"<html>", name="x.mp4", mime="text/html")
    client = await start_client(make_app(sources))
    try:
        for key, disposition, content_type, policy in [
            ("html", "attachment", "text/html", CONTENT_SECURITY_POLICY),
            ("svg", "attachment", "image/svg+xml", CONTENT_SECURITY_POLICY),
            ("xhtml", "attachment", "application/xhtml+xml", CONTENT_SECURITY_POLICY),
            ("lying", "attachment", "text/html", CONTENT_SECURITY_POLICY),
            ("unknown", "attachment", "application/octet-stream", CONTENT_SECURITY_POLICY),
            ("video", "inline", "video/mp4", MEDIA_CONTENT_SECURITY_POLICY),
            ("image", "inline", "image/png", MEDIA_CONTENT_SECURITY_POLICY),
            ("text", "inline", "text/plain; charset=utf-8", CONTENT_SECURITY_POLICY),
        ]:
            async with client.get(f"/s/{key}") as response:
                await response.read()
                assert response.headers["Content-Disposition"].startswith(f"{disposition};"), key
                assert response.headers["Content-Type"] == content_type, key
                assert response.headers["X-Content-Type-Options"] == "nosniff", key
                assert response.headers["Content-Security-Policy"] == policy, key
                assert "no-cache" in response.headers["Cache-Control"], key
        async with client.get("/s/video?download=1") as response:
            assert response.headers["Content-Disposition"].startswith("attachment;")
            assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
    finally:
        await client.close()


async def test_extra_headers_cannot_replace_protected_ones() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        extra = dict(request.query)
        return await serve_bytes(request, MemorySource(b"abc"), extra_headers=extra)

    app = web.Application()
    app.router.add_get("/x", handler)
    client = await start_client(app)
    try:
        async with client.get("/x", params={"Access-Control-Allow-Origin": "*"}) as response:
            assert response.status == 200
            assert response.headers["Access-Control-Allow-Origin"] == "*"
        async with client.get("/x", params={"content-length": "1"}) as response:
            assert response.status == 500
    finally:
        await client.close()


async def test_source_failing_mid_stream_truncates_the_transfer() -> None:
    size = 3 * MIB
    source = MemorySource(payload(size), fail_after=MIB)
    client = await start_client(make_app({"f": source}))
    try:
        async with client.get("/s/f") as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(size)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        assert source.closed.is_set()
        # the server still answers new requests afterwards
        source.fail_after = None
        async with client.get("/s/f", headers={"Range": "bytes=0-9"}) as response:
            assert await response.read() == source.data[:10]
    finally:
        await client.close()


async def test_source_ending_early_truncates_the_transfer() -> None:
    size = 3 * MIB
    source = MemorySource(payload(size), end_after=2 * MIB)
    client = await start_client(make_app({"f": source}))
    try:
        async with client.get("/s/f", headers={"Range": "bytes=100-"}) as response:
            assert response.status == 206
            assert response.headers["Content-Length"] == str(size - 100)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
    finally:
        await client.close()


async def test_source_failing_before_the_first_byte_is_a_json_error() -> None:
    source = MemorySource(payload(1000), fail_after=0)
    client = await start_client(make_app({"f": source}))
    try:
        async with client.get("/s/f", headers={"Accept": "text/html"}) as response:
            assert response.status == 502
            assert response.content_type == "application/json"
            assert (await response.json())["error"] == "source_unavailable"
        assert source.closed.is_set()
    finally:
        await client.close()


async def test_missing_file_is_a_json_404(tmp_path: Path) -> None:
    path = tmp_path / "gone.bin"
    path.write_bytes(b"abc")
    source = await LocalFileSource.open(path)
    path.unlink()
    client = await start_client(make_app({"f": source}))
    try:
        async with client.get("/s/f") as response:
            assert response.status == 404
            assert (await response.json())["error"] == "not_found"
    finally:
        await client.close()


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_client_disconnect_closes_the_source(handler_cancellation: bool) -> None:
    source = MemorySource(payload(16 * MIB), chunk=64 * 1024, delay=0.01)
    client = await start_client(make_app({"f": source}), handler_cancellation=handler_cancellation)
    try:
        response = await client.get("/s/f")
        assert response.status == 200
        assert len(await response.content.readexactly(64 * 1024)) == 64 * 1024
        response.close()  # drops the connection mid-body
        await asyncio.wait_for(source.closed.wait(), timeout=20)
        assert not source.completed
    finally:
        await client.close()


def open_descriptors_to(path: Path) -> int:
    count = 0
    for entry in os.scandir("/proc/self/fd"):
        try:
            if os.readlink(entry.path) == str(path):
                count += 1
        except OSError:
            continue
    return count


@pytest.mark.parametrize("handler_cancellation", [True, False])
@pytest.mark.parametrize("allow_sendfile", [True, False])
async def test_client_disconnect_releases_the_local_file(
    tmp_path: Path, allow_sendfile: bool, handler_cancellation: bool
) -> None:
    path = tmp_path / "big.bin"
    with path.open("wb") as file:
        file.truncate(256 * MIB)  # sparse: big enough to outlast the socket buffers
    source = await LocalFileSource.open(path)
    client = await start_client(
        make_app({"f": source}, allow_sendfile=allow_sendfile),
        handler_cancellation=handler_cancellation,
    )
    try:
        response = await client.get("/s/f")
        assert len(await response.content.readexactly(MIB)) == MIB
        assert open_descriptors_to(path) == 1
        response.close()
        for _ in range(200):
            if open_descriptors_to(path) == 0:
                break
            await asyncio.sleep(0.05)
        assert open_descriptors_to(path) == 0
    finally:
        await client.close()


@pytest.fixture(scope="module")
def tls_context(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    root = tmp_path_factory.mktemp("tls")
    key, cert = root / "key.pem", root / "cert.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def test_tls_falls_back_from_sendfile(
    files: dict[int, Path], tls_context: ssl.SSLContext
) -> None:
    size = 3 * MIB + 1
    data = payload(size)
    source = await LocalFileSource.open(files[size])
    client = await start_client(make_app({"f": source}), ssl_context=tls_context)
    try:
        assert str(client.make_url("/")).startswith("https://")
        async with client.get("/s/f", ssl=False) as response:
            assert response.status == 200
            assert await response.read() == data
        async with client.get("/s/f", ssl=False, headers={"Range": f"bytes={MIB}-"}) as response:
            assert response.status == 206
            assert await response.read() == data[MIB:]
    finally:
        await client.close()


async def test_other_methods_are_refused() -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await serve_bytes(request, MemorySource(b"abc"))

    app = web.Application()
    app.router.add_route("*", "/x", handler)
    client = await start_client(app)
    try:
        async with client.post("/x") as response:
            assert response.status == 405
            assert response.headers["Allow"] == "GET, HEAD"
            assert (await response.json())["error"] == "method_not_allowed"
    finally:
        await client.close()
