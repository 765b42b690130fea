"""The bot's Telegram session: one Pyrogram client, its login, and Telegram files as bytes.

Built first among the Telegram parts: uploads to Telegram send through its client, the web server
streams Telegram files through its byte source, and the bot's front end answers through it. Jobs
never depend on the connection: they live in the database and in aria2, which fetches Telegram
media through our own /stream route. If Telegram drops the connection, Pyrogram reconnects; if
the first login fails, the session keeps trying in the background while the rest of MistRelay
runs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path

from loguru import logger
from pyrogram import Client, enums
from pyrogram.errors import (
    AccessTokenExpired,
    AccessTokenInvalid,
    ApiIdInvalid,
    BadRequest,
    MessageNotModified,
    RPCError,
    Unauthorized,
)
from pyrogram.handlers.handler import Handler
from pyrogram.types import InlineKeyboardMarkup, LinkPreviewOptions, ReplyParameters

from bot.tg_source import (
    FileIdRefresher,
    RangeReader,
    TelegramByteSource,
    TelegramStreamer,
    refresh_from_message,
)
from bot.workers import WorkerClientFactory, WorkerPool, client_proxy
from configer import TelegramConfig
from db import Store
from records import DownloadRow, TgMediaRecord

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0
_RETRY_START_DELAYS = (5.0, 15.0, 30.0, 60.0, 120.0)
# Telegram will not accept these credentials however often we ask.
_REFUSED_CREDENTIALS = (AccessTokenInvalid, AccessTokenExpired, ApiIdInvalid, Unauthorized)
# Parts of the error ids Telegram answers with when the message replied to no longer exists.
_REPLY_GONE = ("REPLY", "MESSAGE_ID")


def _new_client(telegram: TelegramConfig, workdir: Path) -> Client:
    return Client(
        name="mistrelay",
        api_id=telegram.api_id,
        api_hash=telegram.api_hash,
        bot_token=telegram.bot_token,
        workdir=str(workdir),
        proxy=client_proxy(telegram),
        parse_mode=enums.ParseMode.DISABLED,
        fetch_replies=False,
        fetch_topics=False,
        fetch_stories=False,
        fetch_stickers=False,
    )


class TelegramSession:
    """Owns the Pyrogram client (built here, in the running loop) and the media streamer.

    `client_factory` replaces the client built from `telegram` (tests pass one wired to an
    offline Telegram), and `worker_client_factory` those of the worker bots (from a token).
    `store` gives the recorded Telegram media behind a download.
    """

    def __init__(
        self,
        telegram: TelegramConfig,
        *,
        workdir: Path,
        store: Store,
        client_factory: Callable[[], Client] | None = None,
        on_flood_wait: Callable[[float], None] | None = None,
        worker_client_factory: WorkerClientFactory | None = None,
    ) -> None:
        self._store = store
        self._client = (
            client_factory() if client_factory is not None else _new_client(telegram, workdir)
        )
        self._streamer = TelegramStreamer(
            self._client, parts_in_flight=telegram.parts_in_flight, on_flood_wait=on_flood_wait
        )
        # Worker bots read the parts of Telegram files with the main bot (none: it reads alone).
        self.workers = (
            WorkerPool(
                self._streamer,
                telegram,
                workdir=workdir,
                store=store,
                client_factory=worker_client_factory,
            )
            if telegram.worker_bot_tokens
            else None
        )
        self.logged_in = asyncio.Event()
        # The background login after a failed first attempt; None while none runs.
        self._retry: asyncio.Task[None] | None = None
        self._workers_start: asyncio.Task[None] | None = None

    @property
    def client(self) -> Client | None:
        """The client once logged in; None before that (Telegram unreachable or the credentials
        refused), so that a caller never talks through a client that cannot answer."""
        return self._client if self.logged_in.is_set() else None

    @property
    def retrying(self) -> bool:
        """Whether a background login is still trying."""
        return self._retry is not None and not self._retry.done()

    def add_handlers(self, handlers: Iterable[Handler]) -> None:
        """Register update handlers in one dispatcher group, in order (the first that matches
        an update handles it)."""
        for handler in handlers:
            self._client.add_handler(handler, group=0)

    # --- lifecycle --------------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether it is logged in, connected or still trying to log in."""
        return self.logged_in.is_set() or self.retrying or self._client.is_connected

    async def start(self, *, updates: bool = True) -> None:
        """Log in; when the first attempt fails, keep trying in the background instead.

        Without `updates` the session only acts (files, uploads, messages) and Telegram sends it
        no updates: in a cluster, the one consumer of the bot's updates is the leader's session.
        """
        self._client.no_updates = not updates
        try:
            await asyncio.wait_for(self._log_in(), timeout=_START_TIMEOUT)
        except _REFUSED_CREDENTIALS as exc:
            logger.error(
                "Telegram refused the bot's credentials ({}): check telegram.api_id, "
                "telegram.api_hash and telegram.bot_token; the bot stays off",
                exc.ID or type(exc).__name__,
            )
        except (OSError, TimeoutError, RPCError) as exc:
            logger.warning(
                "the Telegram bot could not log in yet ({}); retrying in the background",
                type(exc).__name__,
            )
            self._retry = asyncio.create_task(self._keep_trying(), name="telegram-login")

    async def _log_in(self) -> None:
        await self._client.start()
        me = self._client.me
        logger.info("Telegram bot @{} is running", (me.username if me else None) or "?")
        self.logged_in.set()
        if self.workers is not None:
            # The main bot reads alone until the workers are in.
            self._workers_start = asyncio.create_task(
                self.workers.start(), name="telegram-workers-start"
            )

    async def _keep_trying(self) -> None:
        attempt = 0
        while not self.logged_in.is_set():
            delay = _RETRY_START_DELAYS[min(attempt, len(_RETRY_START_DELAYS) - 1)]
            attempt += 1
            await asyncio.sleep(delay)
            with contextlib.suppress(ConnectionError):
                # A half-started client refuses to start again until it is stopped.
                if self._client.is_connected:
                    await self._client.stop(clear_handlers=False)
            try:
                await asyncio.wait_for(self._log_in(), timeout=_START_TIMEOUT)
            except _REFUSED_CREDENTIALS as exc:
                logger.error("Telegram refused the bot's credentials ({})", exc.ID or exc)
                return
            except (OSError, TimeoutError, RPCError) as exc:
                logger.warning("Telegram login attempt {} failed: {}", attempt, type(exc).__name__)

    async def stop(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retry
        self.logged_in.clear()
        if self._workers_start is not None:
            self._workers_start.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._workers_start
            self._workers_start = None
        if self.workers is not None:
            await self.workers.stop()
        try:
            await asyncio.wait_for(self._streamer.close(), timeout=_STOP_TIMEOUT)
        except Exception as exc:
            logger.warning("closing Telegram media sessions failed: {}", type(exc).__name__)
        if self._client.is_connected:
            try:
                # The bot's handlers stay registered for the next start (leadership returns).
                await asyncio.wait_for(
                    self._client.stop(clear_handlers=False), timeout=_STOP_TIMEOUT
                )
            except (ConnectionError, TimeoutError, OSError) as exc:
                logger.warning("the Telegram client did not stop cleanly: {}", type(exc).__name__)
        logger.info("Telegram session closed")

    # --- talking --------------------------------------------------------------------------------

    async def say(
        self,
        chat_id: int,
        text: str,
        *,
        reply_to: int | None = None,
        markup: InlineKeyboardMarkup | None = None,
    ) -> int | None:
        """Send plain text (never parsed as markup: names come from users), as a reply if asked
        and the message answered still exists; the sent message's id (None when Telegram
        answered without it)."""
        reply = ReplyParameters(message_id=reply_to) if reply_to is not None else None
        try:
            sent = await self._client.send_message(
                chat_id,
                text,
                parse_mode=enums.ParseMode.DISABLED,
                link_preview_options=LinkPreviewOptions(is_disabled=True),
                reply_markup=markup,
                reply_parameters=reply,
            )
        except BadRequest as exc:
            if reply is None or not any(part in (exc.ID or "") for part in _REPLY_GONE):
                raise
            # The message we answer was deleted: say it without the reply.
            return await self.say(chat_id, text, markup=markup)
        return sent.id if sent is not None else None

    async def edit(
        self, chat_id: int, message_id: int, text: str, markup: InlineKeyboardMarkup | None
    ) -> None:
        """Replace a message's text and buttons; an unchanged message is left as it is."""
        with contextlib.suppress(MessageNotModified):
            await self._client.edit_message_text(
                chat_id,
                message_id,
                text,
                parse_mode=enums.ParseMode.DISABLED,
                reply_markup=markup,
            )

    # --- Telegram files as bytes for /stream ------------------------------------------------------

    async def byte_source(self, row: DownloadRow, index: int | None) -> TelegramByteSource | None:
        """The bytes of a Telegram download, fetched from Telegram part by part; None for any
        other download, and while not logged in (the route then answers "not ready")."""
        if row.source_type != "telegram" or not row.file_unique_id or index not in (None, 0):
            return None
        if not self.logged_in.is_set():
            return None
        media = await self._store.get_tg_media(row.file_unique_id)
        if media is None or not media.file_size:
            return None
        reader: RangeReader = self._streamer
        if self.workers is not None and self.workers.workers:
            reader = self.workers.reader(media)
        return TelegramByteSource.for_media(
            reader, media, refresh=self._refresher(media, row.id), name=row.file_name
        )

    def _refresher(self, media: TgMediaRecord, download_id: int) -> FileIdRefresher:
        """A fresh file id (new file reference) from the original message, kept in the store."""
        reread = refresh_from_message(
            self._client, media.chat_id, media.message_id, file_unique_id=media.file_unique_id
        )

        async def refresh() -> str:
            file_id = await reread()
            await self._store.update_tg_media_file_id(media.file_unique_id, file_id)
            logger.bind(job=download_id).info("Telegram file reference refreshed")
            return file_id

        return refresh
