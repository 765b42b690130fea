"""Worker bots: more Telegram sessions that read the parts of Telegram files with the main bot.

One bot session reads one file at about ``parts_in_flight`` parts at once before Telegram
throttles it. A file reference belongs to one bot, so the main bot forwards the file's message
once to the storage channel (``telegram.storage_channel``, where every worker bot is a member;
the copy's id is kept in the store) and each worker reads that copy to get a reference of its
own (kept per file). The parts of a stream then go to the session with the fewest in flight
(the least recently used among equals), each session with its own limit and its own FloodWait:
a session Telegram asks to wait takes no parts until the wait is over, and the part it was
asked for moves to another session. A worker Telegram refuses (its credentials, or it is no
member of the channel) is dropped with one log line; the others carry on, and with none left
the main bot reads alone.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

from loguru import logger
from pyrogram import Client, enums
from pyrogram.connection.proxy import ProxyDict
from pyrogram.errors import (
    AccessTokenExpired,
    AccessTokenInvalid,
    ChannelInvalid,
    ChannelPrivate,
    FloodPremiumWait,
    FloodWait,
    Forbidden,
    PeerIdInvalid,
    RPCError,
    Unauthorized,
)
from pyrogram.types import Message

from bot.tg_source import (
    FileIdRefresher,
    FileLocation,
    TelegramFileRef,
    TelegramStreamer,
    TelegramStreamError,
    check_range,
    iter_parts,
    refresh_from_message,
)
from configer import TelegramConfig, proxy_parts
from db import Store
from records import TgMediaRecord

if TYPE_CHECKING:
    from loguru import Logger

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0
_FILE_IDS_KEPT = 4096  # per worker: its file ids of the files read last
# Answers that mean a worker cannot read through the storage channel at all.
_WORKER_REFUSED: tuple[type[RPCError], ...] = (
    Unauthorized,
    Forbidden,
    AccessTokenInvalid,
    AccessTokenExpired,
    ChannelPrivate,
    ChannelInvalid,
    PeerIdInvalid,
)

WorkerClientFactory = Callable[[str], Client]


def _reason(error: BaseException) -> str:
    """What Telegram answered (its error id), or the kind of failure; never a value."""
    return (error.ID if isinstance(error, RPCError) else None) or type(error).__name__


def client_proxy(telegram: TelegramConfig) -> ProxyDict | None:
    """`telegram.proxy` in the form the Pyrogram client takes (None: connect directly)."""
    if not telegram.proxy:
        return None
    parts = proxy_parts(telegram.proxy)
    proxy = {"scheme": parts.scheme, "hostname": parts.host, "port": parts.port}
    if parts.username:
        proxy.update(username=parts.username, password=parts.password)
    return cast(ProxyDict, proxy)


def _worker_client(telegram: TelegramConfig, token: str, workdir: Path) -> Client:
    return Client(
        name=f"mistrelay-worker-{_bot_id(token)}",
        api_id=telegram.api_id,
        api_hash=telegram.api_hash,
        bot_token=token,
        workdir=str(workdir),
        proxy=client_proxy(telegram),
        no_updates=True,
        parse_mode=enums.ParseMode.DISABLED,
        fetch_replies=False,
        fetch_topics=False,
        fetch_stories=False,
        fetch_stickers=False,
    )


def _bot_id(token: str) -> str:
    """The bot's id: the part of its token before the colon (public, unlike the rest)."""
    return token.partition(":")[0]


@dataclass(eq=False)
class _Lane:
    """One session that reads parts: the main bot's, or a worker's (with its own client)."""

    name: str
    streamer: TelegramStreamer
    client: Client | None = None
    in_flight: int = 0
    flood_until: float = 0.0  # loop time before which Telegram wants no part from it
    last_taken: int = 0
    dropped: bool = False
    closed: bool = False
    file_ids: dict[str, str] = field(default_factory=dict)  # file_unique_id -> its file id

    @property
    def limit(self) -> int:
        return self.streamer.parts_in_flight

    def keep_file_id(self, file_unique_id: str, file_id: str) -> None:
        self.file_ids.pop(file_unique_id, None)
        self.file_ids[file_unique_id] = file_id
        while len(self.file_ids) > _FILE_IDS_KEPT:
            del self.file_ids[next(iter(self.file_ids))]


@dataclass(eq=False)
class _Route:
    """One session's way to one file within one stream."""

    lane: _Lane
    file: FileLocation


class WorkerPool:
    """The main bot's streamer and the worker bots' sessions, sharing the parts of streams.

    ``client_factory`` builds a worker's client from its token (tests pass one wired to an
    offline Telegram).
    """

    def __init__(
        self,
        main: TelegramStreamer,
        telegram: TelegramConfig,
        *,
        workdir: Path,
        store: Store,
        client_factory: WorkerClientFactory | None = None,
    ) -> None:
        self._main = _Lane("the main bot", main)
        self._max_flood_wait = main.max_flood_wait
        self._telegram = telegram
        self._channel = telegram.storage_channel
        self._workdir = workdir
        self._store = store
        self._client_factory = client_factory
        self._workers: list[_Lane] = []
        self._forward_lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self._taken = 0
        self._closing: set[asyncio.Task[None]] = set()
        self.ready = asyncio.Event()  # set once every worker has logged in or been left out

    @property
    def workers(self) -> int:
        """How many worker sessions read parts now."""
        return sum(not lane.dropped for lane in self._workers)

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Log every worker in (without updates); one Telegram refuses is left out."""
        if self.ready.is_set():
            return
        tokens = self._telegram.worker_bot_tokens
        await asyncio.gather(*(self._start_worker(token) for token in tokens))
        self.ready.set()
        logger.info(
            "{} of {} worker bots read Telegram files with the main bot",
            len(self._workers),
            len(tokens),
        )

    async def _start_worker(self, token: str) -> None:
        name = f"worker bot {_bot_id(token)}"
        if self._client_factory is not None:
            client = self._client_factory(token)
        else:
            client = _worker_client(self._telegram, token, self._workdir)
        client.no_updates = True
        try:
            await asyncio.wait_for(client.start(), timeout=_START_TIMEOUT)
        except (RPCError, OSError, TimeoutError) as error:
            logger.error("{} could not log in ({}); left out", name, _reason(error))
            await _stop_client(client, name)
            return
        except asyncio.CancelledError:
            await _stop_client(client, name)
            raise
        main = self._main.streamer
        streamer = TelegramStreamer(
            client,
            parts_in_flight=main.parts_in_flight,
            part_timeout=main.part_timeout,
            transient_attempts=main.transient_attempts,
            retry_backoff=main.retry_backoff,
            max_flood_wait=main.max_flood_wait,
            on_flood_wait=main.on_flood_wait,
            max_refreshes=main.max_refreshes,
        )
        self._workers.append(_Lane(name, streamer, client=client))

    async def stop(self) -> None:
        """Stop every worker session (those dropped included); a later start logs in again."""
        lanes, self._workers = self._workers, []
        self.ready.clear()
        await asyncio.gather(*(self._close(lane) for lane in lanes))
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def _close(self, lane: _Lane) -> None:
        if lane.closed:
            return
        lane.closed = True
        try:
            await asyncio.wait_for(lane.streamer.close(), timeout=_STOP_TIMEOUT)
        except Exception as error:
            logger.warning("closing the media sessions of {} failed: {}", lane.name, _reason(error))
        if lane.client is not None:
            await _stop_client(lane.client, lane.name)

    def _drop(self, lane: _Lane, error: BaseException) -> None:
        if lane.dropped:
            return
        lane.dropped = True
        logger.warning(
            "{} dropped: Telegram refused it ({}); the other sessions carry on",
            lane.name,
            _reason(error),
        )
        task = asyncio.create_task(self._close(lane), name="telegram-worker-stop")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._signal()

    # --- reading ----------------------------------------------------------------------------------

    def reader(self, media: TgMediaRecord) -> MediaReader:
        """The byte ranges of one recorded Telegram file, read by every session."""
        return MediaReader(self, media)

    async def iter_range(
        self, media: TgMediaRecord, location: TelegramFileRef, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        """Exactly bytes ``start..end`` of the file, in order, its parts spread over the
        sessions; stopping early cancels every part still being fetched."""
        check_range(location, start, end)
        routes = [_Route(self._main, self._main.streamer.locate(location))]
        routes += await self._worker_routes(media, location.size)
        log = logger.bind(
            media_id=routes[0].file.file_id.media_id,
            file=media.file_unique_id,
            sessions=len(routes),
        )
        parts = iter_parts(
            lambda part: self._fetch_part(routes, part, log),
            start,
            end,
            window=sum(route.lane.limit for route in routes),
            log=log,
        )
        async with contextlib.aclosing(parts):
            async for chunk in parts:
                yield chunk

    async def _worker_routes(self, media: TgMediaRecord, size: int) -> list[_Route]:
        workers = [lane for lane in self._workers if not lane.dropped]
        found = await asyncio.gather(*(self._route(lane, media, size) for lane in workers))
        return [route for route in found if route is not None]

    async def _route(self, lane: _Lane, media: TgMediaRecord, size: int) -> _Route | None:
        refresh = self._refresher(lane, media)
        try:
            file_id = lane.file_ids.get(media.file_unique_id) or await refresh()
            route = _Route(lane, lane.streamer.locate(TelegramFileRef(file_id, size, refresh)))
        except _WORKER_REFUSED as error:
            self._drop(lane, error)
            return None
        except (RPCError, OSError, TimeoutError, TelegramStreamError, ValueError) as error:
            logger.bind(file=media.file_unique_id).warning(
                "{} cannot read this file ({}); the other sessions read it",
                lane.name,
                _reason(error),
            )
            return None
        return route

    def _refresher(self, lane: _Lane, media: TgMediaRecord) -> FileIdRefresher:
        """The worker's own file id for the file, read from the copy in the storage channel."""

        async def refresh() -> str:
            assert lane.client is not None  # workers have their own client
            message_id = await self._storage_message(media)
            if message_id is None:
                raise TelegramStreamError("the file has no copy in the storage channel")
            reread = refresh_from_message(
                lane.client, self._channel, message_id, file_unique_id=media.file_unique_id
            )
            file_id = await reread()
            lane.keep_file_id(media.file_unique_id, file_id)
            return file_id

        return refresh

    async def _storage_message(self, media: TgMediaRecord) -> int | None:
        """The id of the file's copy in the storage channel: forwarded there by the main bot
        the first time a worker needs it, and kept in the store."""
        key = media.file_unique_id
        known = await self._store.get_tg_storage_message(key, self._channel)
        if known is not None:
            return known
        async with self._forward_lock:
            known = await self._store.get_tg_storage_message(key, self._channel)
            if known is not None:
                return known
            log = logger.bind(file=key)
            try:
                # Without the sender's name or the caption: the copy only carries the file.
                forwarded = await self._main.streamer.client.forward_messages(
                    chat_id=self._channel,
                    from_chat_id=media.chat_id,
                    message_ids=media.message_id,
                    disable_notification=True,
                    hide_sender_name=True,
                    hide_captions=True,
                )
            except (RPCError, OSError, TimeoutError) as error:
                log.warning(
                    "forwarding the file to the storage channel failed ({}); "
                    "the main bot reads it alone",
                    _reason(error),
                )
                return None
            if not isinstance(forwarded, Message):
                log.warning("Telegram answered the forward without a message")
                return None
            await self._store.save_tg_storage_message(key, self._channel, forwarded.id)
            log.info("file forwarded to the storage channel for the worker bots")
            return forwarded.id

    async def _fetch_part(self, routes: list[_Route], part: int, log: Logger) -> bytes:
        """One part from the least loaded session free to take it; moved to another session
        when Telegram asks this one to wait, or a worker fails."""
        loop = asyncio.get_running_loop()
        flood_told = 0.0  # seconds of waits Telegram asked of the sessions that tried this part
        while True:
            route = await self._take(routes)
            lane = route.lane
            try:
                session = await lane.streamer.media_session(route.file.dc_id)
                return await lane.streamer.fetch_part(session, route.file, part, sleep_flood=False)
            except (FloodWait, FloodPremiumWait) as error:
                wait = float(error.value) if isinstance(error.value, int) else 0.0
                lane.flood_until = max(lane.flood_until, loop.time() + wait)
                flood_told += wait
                if flood_told > self._max_flood_wait:
                    raise TelegramStreamError(
                        f"Telegram asked {flood_told:.0f} s of waits for one part"
                    ) from error
                log.info("Telegram asks {} to wait {} s; others take its parts", lane.name, wait)
            except _WORKER_REFUSED as error:
                if lane is self._main:
                    raise
                self._drop(lane, error)
            except (RPCError, OSError, TelegramStreamError) as error:
                if lane is self._main:
                    raise
                if route in routes:
                    routes.remove(route)
                    log.warning(
                        "{} failed a part ({}); the other sessions read this file",
                        lane.name,
                        _reason(error),
                    )
            finally:
                lane.in_flight -= 1
                self._signal()

    async def _take(self, routes: list[_Route]) -> _Route:
        """Wait for a session with room and no FloodWait; the least loaded one is taken."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            usable = [route for route in routes if not route.lane.dropped]
            ready = [
                route
                for route in usable
                if route.lane.flood_until <= now and route.lane.in_flight < route.lane.limit
            ]
            if ready:
                route = min(ready, key=lambda r: (r.lane.in_flight, r.lane.last_taken))
                self._taken += 1
                route.lane.last_taken = self._taken
                route.lane.in_flight += 1
                return route
            flood_ends = [r.lane.flood_until for r in usable if r.lane.flood_until > now]
            timeout = min(flood_ends) - now if flood_ends else None
            every_session_waits = len(flood_ends) == len(usable)
            if every_session_waits and timeout is not None and timeout > self._max_flood_wait:
                raise TelegramStreamError(
                    f"Telegram asks every session to wait {timeout:.0f} s or more"
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()

    def _signal(self) -> None:
        """Wake the parts waiting for a session."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


@dataclass(frozen=True)
class MediaReader:
    """One recorded Telegram file read through the pool (a ``RangeReader``)."""

    pool: WorkerPool
    media: TgMediaRecord

    def iter_range(
        self, location: TelegramFileRef, start: int, end: int
    ) -> AsyncGenerator[bytes, None]:
        return self.pool.iter_range(self.media, location, start, end)


async def _stop_client(client: Client, name: str) -> None:
    if not client.is_connected:
        return
    try:
        await asyncio.wait_for(client.stop(), timeout=_STOP_TIMEOUT)
    except (ConnectionError, TimeoutError, OSError, RPCError) as error:
        logger.warning("{} did not stop cleanly: {}", name, _reason(error))
