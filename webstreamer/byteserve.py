"""Serve the bytes of one representation over aiohttp: 200, single-range 206, 304, 412, 416, HEAD.

A local file goes out with the kernel's sendfile after the headers (no copy through Python); any
other source (e.g. a remote file fetched part by part) is iterated and written chunk by chunk.
Once the headers are out, a source that fails or ends early makes us close the connection, so the
client sees a transfer shorter than its Content-Length instead of a body that looks complete.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import os
import stat
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from aiohttp import web
from loguru import logger
from multidict import CIMultiDict

from webstreamer.ranges import (
    ByteRange,
    RangeNotSatisfiable,
    content_disposition,
    evaluate_preconditions,
    guess_mime,
    http_date,
    if_range_allows,
    is_inline_safe,
    parse_range,
)

__all__ = [
    "CACHE_CONTROL",
    "CHUNK_SIZE",
    "CONTENT_SECURITY_POLICY",
    "MEDIA_CONTENT_SECURITY_POLICY",
    "PROTECTED_HEADERS",
    "ByteSource",
    "LocalFileSource",
    "serve_bytes",
]

CHUNK_SIZE = 1024 * 1024
# A transfer at least this long is sent from a file opened for it alone, not from a shared open
# file: the kernel keeps read-ahead state per open file, and concurrent long reads at different
# places of one open file spoil it for each other; the thread hop to open it is nothing next to
# such a transfer.
OWN_FILE_FROM = 4 * 1024 * 1024
# Signed links are per user: no shared cache may keep them; browsers revalidate with the ETag.
CACHE_CONTROL = "private, no-cache"
# Nothing served here may run script or load anything, even if a browser renders it.
CONTENT_SECURITY_POLICY = "default-src 'none'; sandbox"
# Audio, video and images shown in place get the browser's own media page, which loads the file
# itself and styles the page inline; "sandbox" stops Chromium's player from loading it at all.
# These types carry no script, and script stays forbidden through default-src.
MEDIA_CONTENT_SECURITY_POLICY = (
    "default-src 'none'; media-src 'self'; img-src 'self'; style-src 'unsafe-inline'"
)
# Headers this module owns; extra_headers may not replace them.
PROTECTED_HEADERS = frozenset(
    {
        "accept-ranges",
        "content-disposition",
        "content-encoding",
        "content-length",
        "content-range",
        "content-type",
        "etag",
        "last-modified",
        "transfer-encoding",
        "x-content-type-options",
    }
)
_DOWNLOAD = frozenset({"1", "true", "yes"})


class ByteSource(Protocol):
    """A representation whose bytes can be served with ranges.

    ``etag`` is a strong, quoted entity-tag that changes whenever the bytes change. ``path`` is
    set only when the bytes are a local regular file that may be sent with sendfile.
    """

    @property
    def size(self) -> int: ...

    @property
    def name(self) -> str: ...

    @property
    def mime(self) -> str: ...

    @property
    def etag(self) -> str: ...

    @property
    def last_modified(self) -> datetime | None: ...

    @property
    def path(self) -> Path | None: ...

    def iter_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield exactly bytes start..end (inclusive) in order, or raise."""
        ...


@dataclass
class LocalFileSource:
    """A regular file on local disk, described as it was when it was looked at."""

    path: Path
    size: int
    name: str
    mime: str
    etag: str
    last_modified: datetime | None
    chunk_size: int = CHUNK_SIZE

    @classmethod
    def from_path(
        cls, path: Path | str, *, name: str | None = None, mime: str | None = None
    ) -> LocalFileSource:
        """Stat ``path`` (blocking: call it in a thread, or use ``open``)."""
        file_path = Path(path)
        return cls.from_stat(file_path, file_path.stat(), name=name, mime=mime)

    @classmethod
    def from_stat(
        cls,
        path: Path,
        st: os.stat_result,
        *,
        name: str | None = None,
        mime: str | None = None,
    ) -> LocalFileSource:
        """Describe ``path`` by a status already taken (of the path, or of a file open on it)."""
        if not stat.S_ISREG(st.st_mode):
            raise IsADirectoryError(f"not a regular file: {path.name}")
        display_name = name if name is not None else path.name
        identity = f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_dev}".encode()
        return cls(
            path=path,
            size=st.st_size,
            name=display_name,
            mime=mime or guess_mime(display_name),
            etag=f'"{hashlib.blake2b(identity, digest_size=12).hexdigest()}"',
            last_modified=datetime.fromtimestamp(st.st_mtime_ns / 1e9, tz=UTC),
        )

    @classmethod
    async def open(
        cls, path: Path | str, *, name: str | None = None, mime: str | None = None
    ) -> LocalFileSource:
        return await asyncio.to_thread(cls.from_path, path, name=name, mime=mime)

    async def iter_range(self, start: int, end: int) -> AsyncIterator[bytes]:
        file = await asyncio.to_thread(open, self.path, "rb")
        try:
            async for chunk in _read_file_range(file, start, end, self.chunk_size):
                yield chunk
        finally:
            file.close()


async def _read_file_range(
    file: IO[bytes], start: int, end: int, chunk_size: int
) -> AsyncIterator[bytes]:
    fd = file.fileno()
    position = start
    while position <= end:
        want = min(chunk_size, end - position + 1)
        chunk = await asyncio.to_thread(os.pread, fd, want, position)
        if not chunk:
            raise EOFError(f"file ended at byte {position}, expected {end + 1}")
        position += len(chunk)
        yield chunk


def _clean_mime(mime: str) -> str:
    essence = mime.split(";", 1)[0].strip().lower()
    top, slash, sub = essence.partition("/")
    valid = slash and top and sub and all(c.isascii() and c.isprintable() for c in essence)
    if not valid or any(c in essence for c in ' "(),:;<=>?@[\\]{}'):
        return "application/octet-stream"
    return essence


def _fresh_last_modified(last_modified: datetime | None) -> datetime | None:
    # RFC 9110 §8.8.2.1: a modification time in the future is replaced by the response's time.
    if last_modified is None:
        return None
    if last_modified.tzinfo is None:
        last_modified = last_modified.replace(tzinfo=UTC)
    return min(last_modified, datetime.now(UTC))


def _joined(request: web.Request, name: str) -> str | None:
    values = request.headers.getall(name, [])
    return ", ".join(values) if values else None


def _security_headers() -> dict[str, str]:
    return {
        "X-Content-Type-Options": "nosniff",
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "Cache-Control": CACHE_CONTROL,
    }


def _json_error(
    status: int, error: str, detail: Any = None, headers: Mapping[str, str] | None = None
) -> web.Response:
    merged = _security_headers()
    merged.update(headers or {})
    return web.json_response({"error": error, "detail": detail}, status=status, headers=merged)


@functools.lru_cache(maxsize=1024)
def _representation_headers(
    name: str, mime: str, etag: str, last_modified: datetime | None, download: bool
) -> tuple[tuple[str, str], ...]:
    """The headers that describe a representation: a pure function of it, so that repeated
    requests for the same file (a player's ranges) reuse them instead of building them again."""
    mime = _clean_mime(mime)
    inline = is_inline_safe(mime) and not download
    headers = _security_headers()
    if inline and mime.startswith(("video/", "audio/", "image/")):
        headers["Content-Security-Policy"] = MEDIA_CONTENT_SECURITY_POLICY
    headers["Accept-Ranges"] = "bytes"
    headers["ETag"] = etag
    headers["Content-Type"] = f"{mime}; charset=utf-8" if mime == "text/plain" else mime
    headers["Content-Disposition"] = content_disposition(name, inline=inline)
    if last_modified is not None:
        headers["Last-Modified"] = http_date(last_modified)
    return tuple(headers.items())


def _response_headers(
    request: web.Request,
    source: ByteSource,
    last_modified: datetime | None,
    extra_headers: Mapping[str, str] | None,
) -> CIMultiDict[str]:
    download = request.query.get("download", "").lower() in _DOWNLOAD
    headers = CIMultiDict(
        _representation_headers(source.name, source.mime, source.etag, last_modified, download)
    )
    for name, value in (extra_headers or {}).items():
        if name.lower() in PROTECTED_HEADERS:
            raise ValueError(f"extra_headers may not set {name}")
        headers[name] = value
    return headers


async def serve_bytes(
    request: web.Request,
    source: ByteSource,
    *,
    extra_headers: Mapping[str, str] | None = None,
    allow_sendfile: bool = True,
    open_file: IO[bytes] | None = None,
) -> web.StreamResponse:
    """Answer a GET or HEAD for ``source`` per RFC 9110 and return the (finished) response.

    ``open_file`` is ``source.path`` already open (binary, unbuffered or not), possibly shared
    by concurrent responses: a body shorter than ``OWN_FILE_FROM`` is sent from it without
    opening the path again; a longer one from the path opened anew while it is still the same
    file. ``open_file`` is left open.

    Range is honoured for GET only (RFC 9110 §14.2: a HEAD gets the headers of the full GET),
    and only when If-Range, if present, holds. ``?download=1`` forces an attachment.
    ``extra_headers`` are added (e.g. CORS) but may not replace ``PROTECTED_HEADERS``.
    """
    if request.method not in ("GET", "HEAD"):
        return _json_error(405, "method_not_allowed", headers={"Allow": "GET, HEAD"})
    size = source.size
    last_modified = _fresh_last_modified(source.last_modified)
    headers = _response_headers(request, source, last_modified, extra_headers)

    precondition = evaluate_preconditions(
        method=request.method,
        etag=source.etag,
        last_modified=last_modified,
        if_match=_joined(request, "If-Match"),
        if_none_match=_joined(request, "If-None-Match"),
        if_modified_since=request.headers.get("If-Modified-Since"),
        if_unmodified_since=request.headers.get("If-Unmodified-Since"),
    )
    if precondition == 304:
        not_modified = web.StreamResponse(status=304)
        for name in ("ETag", "Last-Modified", "Cache-Control"):
            if name in headers:
                not_modified.headers[name] = headers[name]
        await not_modified.prepare(request)
        await not_modified.write_eof()
        return not_modified
    if precondition == 412:
        return _json_error(412, "precondition_failed", headers={"ETag": source.etag})

    byte_range: ByteRange | None = None
    range_header = _joined(request, "Range")
    if request.method == "GET" and range_header is not None:
        if_range = _joined(request, "If-Range")
        if if_range is None or if_range_allows(if_range, source.etag, last_modified):
            try:
                byte_range = parse_range(range_header, size)
            except RangeNotSatisfiable as unsatisfiable:
                return _json_error(
                    416,
                    "range_not_satisfiable",
                    {"size": size},
                    headers={
                        "Content-Range": unsatisfiable.content_range,
                        "Accept-Ranges": "bytes",
                        "ETag": source.etag,
                    },
                )

    response = web.StreamResponse(status=200 if byte_range is None else 206, headers=headers)
    if byte_range is not None:
        response.headers["Content-Range"] = byte_range.content_range(size)
        start, end = byte_range.start, byte_range.end
    else:
        start, end = 0, size - 1
    length = end - start + 1
    response.content_length = length

    if request.method == "HEAD" or length == 0:
        await response.prepare(request)
        await response.write_eof()
        return response
    log = logger.bind(source=source.name, start=start, end=end, size=size)
    if allow_sendfile and open_file is not None:
        own = None
        if length >= OWN_FILE_FROM and source.path is not None:
            own = await asyncio.to_thread(_open_again, source.path, open_file)
        if own is None:
            return await _send_open_file(request, response, open_file, start, length, log)
        try:
            return await _send_open_file(request, response, own, start, length, log)
        finally:
            own.close()
    if allow_sendfile and source.path is not None:
        return await _send_local_file(request, response, source.path, start, length, log)
    return await _stream_source(request, response, source, start, end, log)


def _abort(request: web.Request) -> None:
    """Cut the connection so the client cannot take a short body for a complete one."""
    transport = request.transport
    if transport is not None and not transport.is_closing():
        transport.close()


async def _send_local_file(
    request: web.Request,
    response: web.StreamResponse,
    path: Path,
    start: int,
    length: int,
    log: Any,
) -> web.StreamResponse:
    try:
        file = await asyncio.to_thread(open, path, "rb")
    except FileNotFoundError:
        return _json_error(404, "not_found")
    except OSError as error:
        log.warning("cannot open file to serve: {}", type(error).__name__)
        return _json_error(500, "read_failed", type(error).__name__)
    try:
        return await _send_open_file(request, response, file, start, length, log)
    finally:
        file.close()


def _open_again(path: Path, shared: IO[bytes]) -> IO[bytes] | None:
    """``path`` opened anew if it still names the file ``shared`` is open on, else None
    (blocking). Non-blocking open: a FIFO put in its place must not hold the thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        own, expected = os.fstat(fd), os.fstat(shared.fileno())
    except OSError:
        os.close(fd)
        return None
    if (own.st_dev, own.st_ino) != (expected.st_dev, expected.st_ino):
        os.close(fd)
        return None
    return os.fdopen(fd, "rb", buffering=0)


def _sendfile_at_once(
    transport: asyncio.Transport, file: IO[bytes], start: int, length: int
) -> int:
    """Bytes sent by one non-blocking sendfile straight to the connection's socket, when the
    transport has nothing buffered (so the bytes follow the headers in order) and is a plain TCP
    one; 0 when it may not, or the socket takes nothing now. A small range usually goes out
    whole here, without the event loop's sendfile machinery (a wait for the buffer to drain, a
    writer registered, a loop turn more)."""
    sock = transport.get_extra_info("socket")
    if (
        sock is None
        or transport.get_extra_info("sslcontext") is not None
        or transport.get_write_buffer_size()
    ):
        return 0
    try:
        return os.sendfile(sock.fileno(), file.fileno(), start, length)
    except ConnectionError:
        raise
    except OSError:  # would block, or sendfile refuses this file: the loop's sendfile decides
        return 0


async def _send_open_file(
    request: web.Request,
    response: web.StreamResponse,
    file: IO[bytes],
    start: int,
    length: int,
    log: Any,
) -> web.StreamResponse:
    """Send bytes start.. of an open file with sendfile (positioned reads: the file may be shared
    by concurrent responses), or chunk by chunk where sendfile is not available."""
    try:
        await response.prepare(request)
    except ConnectionError:
        log.debug("client left before the headers were sent")
        return response
    transport = request.transport
    if transport is None or transport.is_closing():
        log.debug("client left before the body was sent")
        return response
    loop = asyncio.get_running_loop()
    sent = 0
    try:
        sent = _sendfile_at_once(transport, file, start, length)
        if sent < length:
            sent += await loop.sendfile(
                transport, file, start + sent, length - sent, fallback=False
            )
    except RuntimeError:
        # asyncio raises this (or its SendfileNotAvailableError subclass) before sending
        # anything: an SSL transport, a platform without sendfile, or a closing transport.
        if transport.is_closing():
            log.debug("client left before the body was sent")
            return response
        chunks = _read_file_range(file, start + sent, start + length - 1, CHUNK_SIZE)
        try:
            return await _write_chunks(request, response, chunks, length - sent, log)
        finally:
            await _close_iterator(chunks, log)
    except OSError as error:
        log.debug("client left during sendfile: {}", type(error).__name__)
        _abort(request)
        return response
    if sent != length:
        log.warning("file shrank while being sent: {} of {} bytes", sent, length)
        _abort(request)
        return response
    await response.write_eof()
    return response


async def _stream_source(
    request: web.Request,
    response: web.StreamResponse,
    source: ByteSource,
    start: int,
    end: int,
    log: Any,
) -> web.StreamResponse:
    chunks = source.iter_range(start, end)
    try:
        # The first chunk is fetched before the headers: a source that cannot start is answered
        # with a JSON error instead of a 200 that breaks off.
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            log.warning("source yielded nothing")
            return _json_error(502, "source_unavailable", "empty")
        except Exception as error:
            log.warning("source failed before the first byte: {}", type(error).__name__)
            return _json_error(502, "source_unavailable", type(error).__name__)
        return await _write_chunks(request, response, chunks, end - start + 1, log, first)
    finally:
        await _close_iterator(chunks, log)


async def _write_chunks(
    request: web.Request,
    response: web.StreamResponse,
    chunks: AsyncIterator[bytes],
    length: int,
    log: Any,
    first: bytes | None = None,
) -> web.StreamResponse:
    """Write exactly ``length`` bytes from ``chunks``; abort the connection on any shortfall."""
    try:
        await response.prepare(request)
    except ConnectionError:
        log.debug("client left before the headers were sent")
        return response
    sent = 0
    chunk: bytes | memoryview | None = first
    while True:
        if chunk:
            remaining = length - sent
            if len(chunk) > remaining:
                log.warning("source yielded {} bytes more than asked", len(chunk) - remaining)
                chunk = memoryview(chunk)[:remaining]
            try:
                await response.write(chunk)
            except ConnectionError:
                log.debug("client left after {} of {} bytes", sent, length)
                _abort(request)
                return response
            sent += len(chunk)
            if sent >= length:
                break
        transport = request.transport
        if transport is None or transport.is_closing():
            log.debug("client left after {} of {} bytes", sent, length)
            return response
        try:
            chunk = await anext(chunks)
        except StopAsyncIteration:
            log.warning("source ended after {} of {} bytes", sent, length)
            _abort(request)
            return response
        except Exception as error:
            log.warning(
                "source failed after {} of {} bytes: {}", sent, length, type(error).__name__
            )
            _abort(request)
            return response
    await response.write_eof()
    return response


async def _close_iterator(chunks: AsyncIterator[bytes], log: Any) -> None:
    close = getattr(chunks, "aclose", None)
    if close is None:
        return
    try:
        await close()
    except Exception as error:
        log.warning("closing the source failed: {}", type(error).__name__)
