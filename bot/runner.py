"""The Telegram bot: builds the client inside the running loop, wires handlers, progress and bytes.

Jobs never depend on the bot's connection: they live in the database and in aria2, which fetches
Telegram media through our own /stream route. If Telegram drops the connection, Pyrogram
reconnects; if the bot cannot log in at start, it keeps trying in the background while the rest
of MistRelay runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from loguru import logger
from pyrogram import Client, enums
from pyrogram.errors import (
    AccessTokenExpired,
    AccessTokenInvalid,
    ApiIdInvalid,
    BadRequest,
    RPCError,
    Unauthorized,
)
from pyrogram.types import (
    BotCommand,
    InlineKeyboardMarkup,
    LinkPreviewOptions,
    Message,
    ReplyParameters,
)

from aria2_client.download_handler import DownloadManager
from bot.auth import NO_ONE_SERVED, Gatekeeper
from bot.commands import COMMANDS, register_commands
from bot.handlers import media_of, media_record, register_handlers
from bot.progress import ProgressNotifier
from bot.text import Language, language_of, translate
from bot.tg_source import TelegramByteSource, TelegramFileRef, TelegramStreamer
from configer import Config, TelegramConfig
from db import Database, DownloadRow
from events import EventHub
from webstreamer.byteserve import ByteSource
from webstreamer.signing import LinkSigner

_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0
_RETRY_START_DELAYS = (5.0, 15.0, 30.0, 60.0, 120.0)
# Telegram will not accept these credentials however often we ask.
_REFUSED_CREDENTIALS = (AccessTokenInvalid, AccessTokenExpired, ApiIdInvalid, Unauthorized)


class TelegramBot:
    """MistRelay's Telegram front end, started and stopped by the service."""

    def __init__(
        self,
        config: Config,
        *,
        db: Database,
        downloads: DownloadManager,
        hub: EventHub,
        signer: LinkSigner,
        client_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.downloads = downloads
        self.hub = hub
        self.signer = signer
        self.client_factory = client_factory
        self.client: Any = None
        self.uploads: Any = None  # the upload manager; set by the service after construction
        self.streamer: TelegramStreamer | None = None
        self.gatekeeper = Gatekeeper(lambda: self.config.telegram)
        interval = config.telegram.progress_interval
        self.progress = ProgressNotifier(self, interval)
        self.languages: dict[int, Language] = {}
        self._chat_locks: weakref.WeakValueDictionary[int, asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self.commands: Any = None
        self.job_handlers: Any = None
        self._starter: asyncio.Task[None] | None = None
        self.started = asyncio.Event()

    @property
    def telegram(self) -> TelegramConfig:
        return self.config.telegram

    # --- lifecycle --------------------------------------------------------------------------------

    def _build_client(self) -> Any:
        if self.client_factory is not None:
            return self.client_factory()
        telegram = self.telegram
        return Client(
            name="mistrelay",
            api_id=telegram.api_id,
            api_hash=telegram.api_hash,
            bot_token=telegram.bot_token,
            workdir=str(self.config.data_dir),
            parse_mode=enums.ParseMode.DISABLED,
            fetch_replies=False,
            fetch_topics=False,
            fetch_stories=False,
            fetch_stickers=False,
        )

    async def start(self) -> None:
        """Build the client in this loop, register handlers, log in; jobs never wait for it."""
        if self.gatekeeper.serves_no_one:
            logger.warning(NO_ONE_SERVED)
        self.client = client = self._build_client()
        self.commands = register_commands(self, client)
        self.job_handlers = register_handlers(self, client)
        self.streamer = TelegramStreamer(client, parts_in_flight=self.telegram.parts_in_flight)
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
            self._starter = asyncio.create_task(self._keep_trying(), name="telegram-login")

    async def _log_in(self) -> None:
        await self.client.start()
        me = getattr(self.client, "me", None)
        username = getattr(me, "username", None)
        logger.info("Telegram bot @{} is running", username or "?")
        await self._set_menu()
        self.progress.start()  # idempotent: a later login attempt does not start a second one
        self.started.set()

    async def _keep_trying(self) -> None:
        attempt = 0
        while not self.started.is_set():
            delay = _RETRY_START_DELAYS[min(attempt, len(_RETRY_START_DELAYS) - 1)]
            attempt += 1
            await asyncio.sleep(delay)
            with contextlib.suppress(ConnectionError):
                # A half-started client refuses to start again until it is stopped.
                if getattr(self.client, "is_connected", False):
                    await self.client.stop()
            try:
                await asyncio.wait_for(self._log_in(), timeout=_START_TIMEOUT)
            except _REFUSED_CREDENTIALS as exc:
                logger.error("Telegram refused the bot's credentials ({})", exc.ID or exc)
                return
            except (OSError, TimeoutError, RPCError) as exc:
                logger.warning("Telegram login attempt {} failed: {}", attempt, type(exc).__name__)

    async def _set_menu(self) -> None:
        for language_code, lang in (("", "en"), ("zh", "zh")):
            commands = [
                BotCommand(name, translate(lang, f"bot.menu.{name}")) for name, _args in COMMANDS
            ]
            try:
                await self.client.set_bot_commands(commands, language_code=language_code)
            except RPCError as exc:
                logger.warning("could not set the command menu: {}", exc.ID or exc)

    async def stop(self) -> None:
        if self._starter is not None:
            self._starter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starter
            self._starter = None
        await self.progress.stop()
        if self.streamer is not None:
            try:
                await asyncio.wait_for(self.streamer.close(), timeout=_STOP_TIMEOUT)
            except Exception as exc:
                logger.warning("closing Telegram media sessions failed: {}", type(exc).__name__)
            self.streamer = None
        client = self.client
        if client is not None and getattr(client, "is_connected", False):
            try:
                await asyncio.wait_for(client.stop(), timeout=_STOP_TIMEOUT)
            except (ConnectionError, TimeoutError, OSError) as exc:
                logger.warning("the Telegram client did not stop cleanly: {}", type(exc).__name__)
        self.started.clear()
        logger.info("Telegram bot stopped")

    # --- shared helpers for handlers, commands and progress ---------------------------------------

    def chat_lock(self, chat_id: int) -> asyncio.Lock:
        """Serialises job creation and progress edits in one chat (one progress message per job)."""
        lock = self._chat_locks.get(chat_id)
        if lock is None:
            lock = asyncio.Lock()
            self._chat_locks[chat_id] = lock
        return lock

    def remember_language(self, user: Any) -> Language:
        lang = language_of(getattr(user, "language_code", None))
        user_id = getattr(user, "id", None)
        if user_id is not None:
            if len(self.languages) > 100_000:
                self.languages.clear()
            self.languages[user_id] = lang
        return lang

    def language_for(self, user_id: int | None) -> Language:
        if user_id is None:
            return "en"
        return self.languages.get(user_id, "en")

    def stream_url(self, row: DownloadRow, index: int | None = None) -> str | None:
        """A signed link to the job's bytes on the dashboard's address (no secret but the MAC)."""
        if row.status != "completed" or (row.files and len(row.files) > 1 and index is None):
            return None
        base = self.config.web.base_url.rstrip("/")
        return base + self.signer.stream_path(row.id, row.file_name or "file", index)

    async def say(
        self,
        chat_id: int,
        text: str,
        *,
        reply_to: int | None = None,
        markup: InlineKeyboardMarkup | None = None,
    ) -> Message:
        """Send plain text (never parsed as markup: names come from users), as a reply if asked."""
        kwargs: dict[str, Any] = {
            "parse_mode": enums.ParseMode.DISABLED,
            "link_preview_options": LinkPreviewOptions(is_disabled=True),
            "reply_markup": markup,
        }
        if reply_to is not None:
            try:
                return await self.client.send_message(
                    chat_id, text, reply_parameters=ReplyParameters(message_id=reply_to), **kwargs
                )
            except BadRequest as exc:
                if "REPLY" not in (exc.ID or "") and "MESSAGE_ID" not in (exc.ID or ""):
                    raise
                # The message we answer was deleted: say it without the reply.
        return await self.client.send_message(chat_id, text, **kwargs)

    # --- Telegram files as bytes for /stream ------------------------------------------------------

    async def byte_source(self, row: DownloadRow, index: int | None) -> ByteSource | None:
        """The bytes of a Telegram download, fetched from Telegram part by part."""
        if row.source_type != "telegram" or not row.file_unique_id or index not in (None, 0):
            return None
        if self.streamer is None or not self.started.is_set():
            return None  # not logged in (yet): the route answers "not ready" instead of failing
        media = await self.db.get_tg_media(row.file_unique_id)
        if media is None or not media.file_size:
            return None
        unique_id, chat_id, message_id = media.file_unique_id, media.chat_id, media.message_id

        async def refresh() -> str:
            """A fresh file_id (new file reference) from the original message."""
            message = await self.client.get_messages(chat_id, message_id)
            found = media_of(message) if message is not None else None
            if found is None or found[1].file_unique_id != unique_id:
                raise FileNotFoundError(f"the message of Telegram file {unique_id} is gone")
            file_id = str(found[1].file_id)
            await self.db.update_tg_media_file_id(unique_id, file_id)
            logger.bind(job=row.id).info("Telegram file reference refreshed")
            return file_id

        ref = TelegramFileRef(file_id=media.file_id, size=media.file_size, refresh=refresh)
        return TelegramByteSource(
            streamer=self.streamer,
            location=ref,
            name=row.file_name or media.file_name or "file",
            mime=media.mime_type or "application/octet-stream",
            file_unique_id=unique_id,
            last_modified=_sent_at(media.message_date),
        )


def _sent_at(message_date: str | None) -> datetime | None:
    """The message's date as an aware instant (Pyrogram gives naive local times)."""
    if not message_date:
        return None
    try:
        return datetime.fromisoformat(message_date).astimezone(UTC)
    except ValueError:
        return None


__all__ = ["TelegramBot", "media_record"]
