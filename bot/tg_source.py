"""Telegram files as a byte source for the web server: ranges fetched in 1 MiB parts, several ahead.

Telegram serves a file through ``upload.GetFile`` parts whose offset and limit follow its rules
(both divisible by 4 KiB, 1 MiB divisible by the limit, no part across a 1 MiB boundary). Asking
for whole 1 MiB parts aligned to 1 MiB satisfies all of them. A stream keeps up to
``parts_in_flight`` parts requested at once on one media session per data centre and hands them
out in order, trimmed to the asked range, so one stream moves about ``parts_in_flight`` parts
per round trip instead of one. ``iter_parts`` is that ordered window over any part fetcher: the
pool of worker bots (``bot/workers.py``) spreads the same window over several sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyrogram
from loguru import logger
from pyrogram import raw
from pyrogram.errors import (
    FileReferenceExpired,
    FileReferenceInvalid,
    FloodPremiumWait,
    FloodWait,
    InternalServerError,
    ServiceUnavailable,
)
from pyrogram.file_id import FileId, FileType
from pyrogram.session import Session

from bot.messages import media_of
from records import TgMediaRecord

if TYPE_CHECKING:
    from loguru import Logger

PART_SIZE = 1024 * 1024
"""Bytes per ``upload.GetFile`` part: the largest limit Telegram accepts, aligned to itself."""

FileIdRefresher = Callable[[], Awaitable[str]]
PartFetcher = Callable[[int], Awaitable[bytes]]

_CANCEL_ROUNDS = 5
_CANCEL_ROUND_SECONDS = 1.0


class TelegramStreamError(Exception):
    """Telegram could not deliver the asked bytes exactly; the stream stops instead of lying."""


@dataclass
class TelegramFileRef:
    """Where a Telegram file lives.

    ``file_id`` is Pyrogram's encoded file id (it carries the data centre, the media id, its
    access hash and the file reference). ``refresh`` re-reads the message the file came from and
    returns a fresh file id, used when Telegram says the file reference expired.
    """

    file_id: str
    size: int
    refresh: FileIdRefresher | None = None


@dataclass
class FileLocation:
    """The decoded file id of one stream, replaced (once for all its parts) on refresh."""

    ref: TelegramFileRef
    max_refreshes: int
    file_id: FileId = field(init=False)
    generation: int = 0
    refreshes: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.file_id = _decode_file_id(self.ref.file_id)

    @property
    def dc_id(self) -> int:
        return int(self.file_id.dc_id)

    def input_location(self) -> tuple[raw.base.InputFileLocation, int]:
        return _input_location(self.file_id), self.generation

    async def refresh(self, seen_generation: int) -> None:
        """Get a fresh file reference, once for all parts that saw the same expired one."""
        async with self.lock:
            if self.generation != seen_generation:
                return
            if self.ref.refresh is None:
                raise TelegramStreamError("file reference expired and no way to refresh it")
            if self.refreshes >= self.max_refreshes:
                raise TelegramStreamError("file reference still expired after refreshing it")
            fresh = _decode_file_id(await self.ref.refresh())
            if fresh.media_id != self.file_id.media_id or fresh.dc_id != self.file_id.dc_id:
                raise TelegramStreamError("the refreshed file id names another file")
            self.file_id = fresh
            self.generation += 1
            self.refreshes += 1


def _decode_file_id(encoded: str) -> FileId:
    file_id: FileId = FileId.decode(encoded)
    if file_id.file_type in (FileType.CHAT_PHOTO, FileType.THUMBNAIL):
        raise ValueError(f"cannot stream a {file_id.file_type.name.lower()} file id")
    _input_location(file_id)  # refuses ids without a media id or access hash
    return file_id


def _input_location(file_id: FileId) -> raw.base.InputFileLocation:
    # The same locations Pyrogram's own downloader builds for these file types.
    media_id, access_hash = file_id.media_id, file_id.access_hash
    if media_id is None or access_hash is None:
        raise ValueError("the file id names no downloadable file")
    if file_id.file_type == FileType.PHOTO:
        return raw.types.InputPhotoFileLocation(
            id=media_id,
            access_hash=access_hash,
            file_reference=file_id.file_reference,
            thumb_size=file_id.thumbnail_size,
        )
    return raw.types.InputDocumentFileLocation(
        id=media_id,
        access_hash=access_hash,
        file_reference=file_id.file_reference,
        thumb_size=file_id.thumbnail_size,
    )


class TelegramStreamer:
    """Streams byte ranges of Telegram files over one kept media session per data centre.

    ``parts_in_flight`` parts are requested at once per stream; ``part_timeout`` bounds one
    request; a part that fails with a timeout or a server error is tried ``transient_attempts``
    times with exponential backoff starting at ``retry_backoff`` seconds; flood waits are slept
    through while one part's total wait stays within ``max_flood_wait`` seconds.
    """

    def __init__(
        self,
        client: pyrogram.Client,
        *,
        parts_in_flight: int = 4,
        part_timeout: float = 30.0,
        transient_attempts: int = 3,
        retry_backoff: float = 0.5,
        max_flood_wait: float = 60.0,
        max_refreshes: int = 2,
        on_flood_wait: Callable[[float], None] | None = None,
    ) -> None:
        if parts_in_flight < 1:
            raise ValueError("parts_in_flight must be at least 1")
        if transient_attempts < 1:
            raise ValueError("transient_attempts must be at least 1")
        self._client = client
        self.parts_in_flight = parts_in_flight
        self.part_timeout = part_timeout
        self.transient_attempts = transient_attempts
        self.retry_backoff = retry_backoff
        self.max_flood_wait = max_flood_wait
        self.max_refreshes = max_refreshes
        self.on_flood_wait = on_flood_wait  # told the seconds each FloodWait asks for
        self._sessions: dict[int, Session] = {}
        self._session_lock = asyncio.Lock()
        self._closed = False

    @property
    def client(self) -> pyrogram.Client:
        return self._client

    async def media_session(self, dc_id: int) -> Session:
        """The stream session for ``dc_id``, created once (auth exported/imported if foreign)."""
        session = self._sessions.get(dc_id)
        if session is not None:
            return session
        async with self._session_lock:
            session = self._sessions.get(dc_id)
            if session is None:
                if self._closed:
                    raise TelegramStreamError("the streamer is closed")
                # A temporary media session is built exactly like Pyrogram's own (auth key of
                # that DC, exported authorization for a foreign DC) but belongs to us: it lives
                # until close(), independent of the client's download sessions.
                session = await self._client.get_session(dc_id, is_media=True, temporary=True)
                self._sessions[dc_id] = session
                logger.bind(dc=dc_id).debug("Telegram media session opened for streaming")
        return session

    async def close(self) -> None:
        """Stop every media session this streamer opened. Safe to call more than once."""
        async with self._session_lock:
            self._closed = True
            sessions = list(self._sessions.items())
            self._sessions.clear()
        for dc_id, session in sessions:
            try:
                await session.stop()
            except Exception as error:
                logger.bind(dc=dc_id).warning("Stopping a Telegram media session failed: {}", error)

    def locate(self, ref: TelegramFileRef) -> FileLocation:
        """The decoded location of one stream of ``ref`` (refreshed once for all its parts)."""
        return FileLocation(ref, max_refreshes=self.max_refreshes)

    async def iter_range(
        self, location: TelegramFileRef, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        """Yield exactly bytes ``start..end`` (inclusive) of the file, in order, or raise.

        Stopping early (``aclose()`` or cancelling the consumer) cancels every part still being
        fetched before this generator finishes.
        """
        check_range(location, start, end)
        file = self.locate(location)
        session = await self.media_session(file.dc_id)
        log = logger.bind(dc=file.dc_id, media_id=file.file_id.media_id)
        parts = iter_parts(
            lambda part: self._fetch_part(session, file, part),
            start,
            end,
            window=self.parts_in_flight,
            log=log,
        )
        async with contextlib.aclosing(parts):
            async for chunk in parts:
                yield chunk

    async def fetch_part(
        self, session: Session, file: FileLocation, part: int, *, sleep_flood: bool = True
    ) -> bytes:
        """One part of the file; a flood wait is slept through within ``max_flood_wait`` (or,
        without ``sleep_flood``, raised at once for the caller to move the part elsewhere)."""
        return await self._fetch_part(session, file, part, sleep_flood=sleep_flood)

    async def _fetch_part(
        self, session: Session, file: FileLocation, part: int, *, sleep_flood: bool = True
    ) -> bytes:
        offset = part * PART_SIZE
        expected = min(PART_SIZE, file.ref.size - offset)
        flood_waited = 0.0
        attempt = 0
        log = logger.bind(dc=file.dc_id, media_id=file.file_id.media_id, offset=offset)
        while True:
            location, generation = file.input_location()
            try:
                result: Any = await session.invoke(
                    raw.functions.upload.GetFile(location=location, offset=offset, limit=PART_SIZE),
                    retries=1,
                    timeout=self.part_timeout,
                    sleep_threshold=0,
                    retry_delay=0,
                )
            except (FloodWait, FloodPremiumWait) as error:
                wait = float(error.value) if isinstance(error.value, int) else 0.0
                if self.on_flood_wait is not None:
                    self.on_flood_wait(wait)
                if not sleep_flood or flood_waited + wait > self.max_flood_wait:
                    raise
                flood_waited += wait
                log.info("Telegram asks to wait {} s before the next part", wait)
                await asyncio.sleep(wait)
                continue
            except (FileReferenceExpired, FileReferenceInvalid):
                log.info("Telegram file reference expired; refreshing it")
                await file.refresh(generation)
                continue
            except (TimeoutError, OSError, InternalServerError, ServiceUnavailable) as error:
                attempt += 1
                if attempt >= self.transient_attempts:
                    raise TelegramStreamError(
                        f"part at offset {offset} failed {attempt} times: {error}"
                    ) from error
                delay = self.retry_backoff * 2 ** (attempt - 1)
                log.info("Part failed ({}); retrying in {:.2f} s", error, delay)
                await asyncio.sleep(delay)
                continue

            if not isinstance(result, raw.types.upload.File):
                raise TelegramStreamError(
                    f"unexpected answer {type(result).__name__} for the part at offset {offset}"
                )
            data: bytes = result.bytes
            if len(data) != expected:
                raise TelegramStreamError(
                    f"Telegram returned {len(data)} bytes at offset {offset}, expected {expected}"
                )
            return data


def check_range(location: TelegramFileRef, start: int, end: int) -> None:
    """Refuse a range outside the file, or a file of unknown size."""
    if location.size <= 0:
        raise ValueError("the file size must be known and positive")
    if not 0 <= start <= end < location.size:
        raise ValueError(f"range {start}-{end} outside a file of {location.size} bytes")


async def iter_parts(
    fetch: PartFetcher, start: int, end: int, *, window: int, log: Logger
) -> AsyncGenerator[bytes, None]:
    """Bytes ``start..end`` in order, from ``fetch(part)`` of 1 MiB parts, ``window`` parts
    requested ahead. Stopping early cancels every part still being fetched before it ends."""
    first_part = start // PART_SIZE
    last_part = end // PART_SIZE
    next_part = first_part
    in_flight: deque[tuple[int, asyncio.Task[bytes]]] = deque()

    def fill() -> None:
        nonlocal next_part
        while next_part <= last_part and len(in_flight) < window:
            task = asyncio.ensure_future(fetch(next_part))
            in_flight.append((next_part, task))
            next_part += 1

    try:
        fill()
        while in_flight:
            part, task = in_flight[0]
            # Waiting through asyncio.wait keeps a cancelled consumer cancelled: awaiting the
            # task itself would hand the cancellation to the part, and Python 3.11's wait_for
            # inside Pyrogram's invoke can swallow it there.
            if not task.done():
                await asyncio.wait((task,))
            data = task.result()
            in_flight.popleft()
            fill()
            part_start = part * PART_SIZE
            low = start - part_start if part == first_part else 0
            high = end - part_start + 1 if part == last_part else len(data)
            yield data[low:high]
    finally:
        await _cancel_all([task for _, task in in_flight], log)


async def _cancel_all(tasks: list[asyncio.Task[bytes]], log: Logger) -> None:
    """Cancel the parts still being fetched and wait until every one has really ended."""
    pending = {task for task in tasks if not task.done()}
    try:
        # A cancellation can be swallowed once (see iter_range), so it is repeated, a bounded number
        # of times, until the task is gone.
        for _ in range(_CANCEL_ROUNDS):
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=_CANCEL_ROUND_SECONDS)
    finally:
        for task in pending:
            task.cancel()
        if pending:
            log.warning("{} Telegram part requests did not stop when cancelled", len(pending))
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.debug("A prefetched part failed after the stream ended: {}", task.exception())


def refresh_from_message(
    client: pyrogram.Client,
    chat_id: int | str,
    message_id: int,
    *,
    file_unique_id: str | None = None,
) -> FileIdRefresher:
    """A ``TelegramFileRef.refresh`` that re-reads the message and returns its media's file id
    (refusing, when ``file_unique_id`` is given, a message that now carries another file)."""

    async def refresh() -> str:
        message = await client.get_messages(chat_id=chat_id, message_ids=message_id)
        found = media_of(message) if isinstance(message, pyrogram.types.Message) else None
        if found is None or file_unique_id not in (None, found[1].file_unique_id):
            raise TelegramStreamError("the message no longer carries its file")
        return str(found[1].file_id)

    return refresh


def _sent_at(message_date: str | None) -> datetime | None:
    """A recorded message date as an aware instant (Pyrogram gives naive local times)."""
    if not message_date:
        return None
    try:
        return datetime.fromisoformat(message_date).astimezone(UTC)
    except ValueError:
        return None


class RangeReader(Protocol):
    """Reads byte ranges of Telegram files: one bot's streamer, or the pool of worker bots."""

    def iter_range(
        self, location: TelegramFileRef, start: int, end: int
    ) -> AsyncGenerator[bytes, None]: ...


@dataclass
class TelegramByteSource:
    """A Telegram file as the web layer's byte source (its ``ByteSource`` protocol)."""

    streamer: RangeReader
    location: TelegramFileRef
    name: str
    mime: str
    file_unique_id: str
    last_modified: datetime | None = None
    path: Path | None = None

    @property
    def size(self) -> int:
        return self.location.size

    @property
    def etag(self) -> str:
        # file_unique_id is the same for every copy of the bytes, and URL-safe base64: a valid
        # strong entity-tag.
        return f'"tg-{self.file_unique_id}"'

    def iter_range(self, start: int, end: int) -> AsyncGenerator[bytes, None]:
        return self.streamer.iter_range(self.location, start, end)

    @classmethod
    def for_media(
        cls,
        streamer: RangeReader,
        media: TgMediaRecord,
        *,
        refresh: FileIdRefresher | None = None,
        name: str | None = None,
    ) -> TelegramByteSource:
        """The source for a recorded Telegram file; its size must be known."""
        if not media.file_size:
            raise ValueError("the media has no known size")
        return cls(
            streamer=streamer,
            location=TelegramFileRef(file_id=media.file_id, size=media.file_size, refresh=refresh),
            name=name or media.file_name or "file",
            mime=media.mime_type or "application/octet-stream",
            file_unique_id=media.file_unique_id,
            last_modified=_sent_at(media.message_date),
        )
