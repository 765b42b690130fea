"""A local HTTP file server for tests and benchmarks, running in the caller's event loop.

Routes (NAME is a path relative to the server root; it may contain slashes):

- ``/files/NAME``                 static file with Range support; ``?disposition=FILENAME`` adds a
                                  ``Content-Disposition: attachment`` header.
- ``/slow/NAME?rate=B&delay=S``   the file at about ``rate`` bytes/s (Range supported), after
                                  sleeping ``delay`` seconds before the headers.
- ``/status/CODE``                answers CODE with a small HTML page (an error page a download
                                  tool must never save as the file).
- ``/redirect/NAME?hops=N``       302 chain of N hops (default 1) ending at ``/files/NAME``.
- ``/hold/NAME?bytes=N&then=rest|close``
                                  headers plus the first N bytes, then stalls until the test
                                  releases NAME (``release``/``hold_event``); afterwards sends the
                                  rest, or with ``then=close`` cuts the connection mid-body. Once
                                  released, later requests pass the hold point without waiting
                                  (``then=close`` then cuts every response after N bytes).
- ``/flaky/NAME?fail=N``          the first N requests to this path get 503, later ones the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from loguru import logger

MIB = 1024 * 1024
_STAMP_STRIDE = 4096
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class RequestRecord:
    """One request the server received, for assertions such as "the client resumed with Range"."""

    method: str
    path: str
    query: str
    range_header: str | None
    user_agent: str | None


@dataclass(frozen=True)
class ByteSpan:
    """Inclusive byte interval ``start..end`` of a file of ``total`` bytes."""

    start: int
    end: int
    total: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


class RangeNotSatisfiable(Exception):
    pass


def deterministic_bytes(size: int, seed: int = 0) -> bytes:
    """Pseudo-random bytes that differ at every offset, fast for large sizes.

    One random 1 MiB block is repeated; every 4 KiB of each copy is stamped with (seed, MiB index)
    so a misplaced chunk (even by a whole MiB) changes the content.
    """
    if size < 0:
        raise ValueError("size must be >= 0")
    block = random.Random(seed).randbytes(MIB)
    parts: list[bytes] = []
    for mib_index in range((size + MIB - 1) // MIB):
        copy = bytearray(block)
        stamp = seed.to_bytes(8, "big", signed=True) + mib_index.to_bytes(8, "big")
        for offset in range(0, MIB, _STAMP_STRIDE):
            copy[offset : offset + len(stamp)] = stamp
        parts.append(bytes(copy))
    return b"".join(parts)[:size]


def parse_range(header: str | None, total: int) -> ByteSpan | None:
    """Single-range ``bytes=`` parser. None means "send the whole file"."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # unsupported forms are answered with the whole file, as RFC 9110 allows
    first, _, last = spec.strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                raise RangeNotSatisfiable
            return ByteSpan(max(0, total - suffix), total - 1, total)
        start = int(first)
        end = int(last) if last else total - 1
    except ValueError:
        return None
    if start >= total or end < start:
        raise RangeNotSatisfiable
    return ByteSpan(start, min(end, total - 1), total)


class FileServer:
    """aiohttp file server on 127.0.0.1; build it with ``start_file_server``."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.base_url = ""
        self.port = 0
        self.hits: dict[str, int] = {}
        self.requests: list[RequestRecord] = []
        # Body bytes sent by the streaming routes (slow, hold), by request path: how much of a
        # file a client fetched in all, resumes and repeats included.
        self.bytes_sent: dict[str, int] = {}
        self._release: dict[str, asyncio.Event] = {}
        self._reached: dict[str, asyncio.Event] = {}
        self._runner: web.AppRunner | None = None
        self._log = logger.bind(component="test-file-server")

    # ---- test-facing helpers -------------------------------------------------------------

    def add_file(
        self, name: str, size: int | None = None, data: bytes | None = None, seed: int = 0
    ) -> bytes:
        """Write DATA, or SIZE deterministic bytes from SEED, as NAME; return the bytes written."""
        if data is None:
            if size is None:
                raise ValueError("give size or data")
            data = deterministic_bytes(size, seed)
        elif size is not None and size != len(data):
            raise ValueError("size and len(data) differ")
        path = self._resolve(name)
        if path is None:
            raise ValueError(f"name escapes the server root: {name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return data

    def url(self, name: str, route: str = "files", **query: str | int | float) -> str:
        """URL of NAME on a route (files, slow, hold, flaky, redirect), with query parameters."""
        url = f"{self.base_url}/{route}/{quote(name)}"
        return f"{url}?{urlencode(query)}" if query else url

    def status_url(self, code: int) -> str:
        return f"{self.base_url}/status/{code}"

    def hold_event(self, name: str) -> asyncio.Event:
        """The event that releases ``/hold/NAME`` requests; set it (or call ``release``)."""
        return self._release.setdefault(name, asyncio.Event())

    def release(self, name: str | None = None) -> None:
        """Release held requests for NAME, or every hold when NAME is None."""
        if name is None:
            for event in self._release.values():
                event.set()
        else:
            self.hold_event(name).set()

    async def wait_held(self, name: str, within_s: float = 10.0) -> None:
        """Wait until a ``/hold/NAME`` request has sent its first bytes and is stalled."""
        reached = self._reached.setdefault(name, asyncio.Event())
        await asyncio.wait_for(reached.wait(), within_s)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        app = web.Application(middlewares=[self._count_middleware])
        app.router.add_get("/files/{name:.+}", self._files)
        app.router.add_get("/slow/{name:.+}", self._slow)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/redirect/{name:.+}", self._redirect)
        app.router.add_get("/hold/{name:.+}", self._hold)
        app.router.add_get("/flaky/{name:.+}", self._flaky)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        # Binding the socket ourselves with port 0 avoids the pick-a-port-then-bind race.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self.base_url = f"http://127.0.0.1:{self.port}"
        await web.SockSite(self._runner, sock).start()
        self._log.debug("file server listening on {}", self.base_url)

    async def stop(self) -> None:
        self.release()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- internals -----------------------------------------------------------------------

    def _resolve(self, name: str) -> Path | None:
        path = (self.root / name).resolve()
        return path if path.is_relative_to(self.root) and path != self.root else None

    def _file_or_404(self, request: web.Request) -> Path:
        path = self._resolve(request.match_info["name"])
        if path is None or not path.is_file():
            raise web.HTTPNotFound(text="no such file\n")
        return path

    @web.middleware
    async def _count_middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        self.requests.append(
            RequestRecord(
                method=request.method,
                path=request.path,
                query=request.query_string,
                range_header=request.headers.get("Range"),
                user_agent=request.headers.get("User-Agent"),
            )
        )
        return await handler(request)

    async def _files(self, request: web.Request) -> web.StreamResponse:
        path = self._file_or_404(request)
        response = web.FileResponse(path)
        if disposition := request.query.get("disposition"):
            response.headers["Content-Disposition"] = (
                f"attachment; filename*=UTF-8''{quote(disposition)}"
            )
        return response

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        path = self._file_or_404(request)
        rate = int(request.query.get("rate", "262144"))
        if rate <= 0:
            raise web.HTTPBadRequest(text="rate must be > 0\n")
        delay = float(request.query.get("delay", "0"))
        if delay > 0:
            await asyncio.sleep(delay)
        return await self._stream(request, path, rate=rate)

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        path = self._file_or_404(request)
        first_bytes = int(request.query.get("bytes", str(_CHUNK)))
        then = request.query.get("then", "rest")
        if then not in ("rest", "close"):
            raise web.HTTPBadRequest(text="then must be rest or close\n")
        return await self._stream(
            request, path, hold_after=first_bytes, hold_name=name, close_after_hold=then == "close"
        )

    async def _flaky(self, request: web.Request) -> web.StreamResponse:
        path = self._file_or_404(request)
        if self.hits[request.path] <= int(request.query.get("fail", "1")):
            raise web.HTTPServiceUnavailable(text="try again later\n")
        return web.FileResponse(path)

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        hops = int(request.query.get("hops", "1"))
        if hops > 1:
            raise web.HTTPFound(f"/redirect/{quote(name)}?hops={hops - 1}")
        raise web.HTTPFound(f"/files/{quote(name)}")

    async def _status(self, request: web.Request) -> web.StreamResponse:
        try:
            code = int(request.match_info["code"])
        except ValueError:
            raise web.HTTPBadRequest(text="status code must be a number\n") from None
        if not 200 <= code <= 599:
            raise web.HTTPBadRequest(text="status code must be 200..599\n")
        if code in (204, 304):
            return web.Response(status=code)
        body = (
            f"<!DOCTYPE html><html><head><title>{code}</title></head>"
            f"<body><h1>Error {code}</h1><p>This is an error page.</p></body></html>\n"
        )
        return web.Response(status=code, text=body, content_type="text/html")

    async def _stream(
        self,
        request: web.Request,
        path: Path,
        *,
        rate: int | None = None,
        hold_after: int | None = None,
        hold_name: str = "",
        close_after_hold: bool = False,
    ) -> web.StreamResponse:
        total = (await asyncio.to_thread(path.stat)).st_size
        try:
            span = parse_range(request.headers.get("Range"), total)
        except RangeNotSatisfiable:
            raise web.HTTPRequestRangeNotSatisfiable(
                headers={"Content-Range": f"bytes */{total}"}
            ) from None
        response = web.StreamResponse(status=206 if span else 200)
        response.content_type = "application/octet-stream"
        response.headers["Accept-Ranges"] = "bytes"
        if span is None:
            span = ByteSpan(0, total - 1, total)
        else:
            response.headers["Content-Range"] = f"bytes {span.start}-{span.end}/{total}"
        response.content_length = span.length
        await response.prepare(request)
        if request.method == "HEAD" or span.length <= 0:
            return response

        sent = 0
        held = False
        started = time.monotonic()
        with path.open("rb") as source:  # opening is cheap; the reads go to a thread
            source.seek(span.start)
            while sent < span.length:
                if hold_after is not None and not held and sent >= hold_after:
                    held = True
                    self._reached.setdefault(hold_name, asyncio.Event()).set()
                    await self.hold_event(hold_name).wait()
                    if close_after_hold:
                        # Cut the connection mid-body: the client sees a short read.
                        if request.transport is not None:
                            request.transport.close()
                        return response
                size = min(_CHUNK, span.length - sent)
                if rate is not None:
                    size = min(size, max(1, rate // 20))
                if hold_after is not None and not held:
                    size = min(size, hold_after - sent)
                chunk = await asyncio.to_thread(source.read, size)
                if not chunk:
                    break
                await response.write(chunk)
                sent += len(chunk)
                self.bytes_sent[request.path] = self.bytes_sent.get(request.path, 0) + len(chunk)
                if rate is not None:
                    ahead = sent / rate - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        await response.write_eof()
        return response


async def start_file_server(root: Path, port: int = 0) -> FileServer:
    """Start a file server serving ROOT on 127.0.0.1 (port 0 = any free port)."""
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    server = FileServer(root)
    await server.start(port)
    return server


@pytest.fixture
async def file_server(tmp_path: Path) -> AsyncIterator[FileServer]:
    server = await start_file_server(tmp_path / "www")
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            await server.stop()


__all__ = [
    "MIB",
    "ByteSpan",
    "FileServer",
    "RequestRecord",
    "deterministic_bytes",
    "file_server",
    "parse_range",
    "start_file_server",
]
