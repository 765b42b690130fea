"""The bot's front end: commands, job handlers and the progress notifier, on a Telegram session.

Handlers are registered on the session's client when the front end is built, before the session
logs in, so no update arrives unhandled. Once the session is logged in, the front end sets the
command menu and follows the event hub until it is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from loguru import logger
from pyrogram.errors import RPCError

from aria2_client.download_handler import DownloadManager
from bot import render
from bot.auth import NO_ONE_SERVED, Gatekeeper
from bot.commands import COMMANDS, Commands
from bot.context import BotContext, Languages
from bot.handlers import JobHandlers
from bot.progress import ProgressNotifier
from bot.session import TelegramSession
from bot.text import Language
from configer import Config
from db import Store
from events import EventHub
from settings_editor import SettingsEditor
from uploads.manager import UploadManager
from webstreamer.links import StreamLinks

# (Telegram language_code, ours)
_MENU_LANGUAGES: tuple[tuple[str, Language], ...] = (("", "en"), ("zh", "zh"))


class TelegramBot:
    """MistRelay's Telegram front end, started and stopped by the service.

    `config` returns the live configuration: who may use the bot and the progress interval
    follow a reload at once.
    """

    def __init__(
        self,
        session: TelegramSession,
        *,
        store: Store,
        downloads: DownloadManager,
        uploads: UploadManager,
        links: StreamLinks,
        hub: EventHub,
        config: Callable[[], Config],
        settings: SettingsEditor,
    ) -> None:
        self._session = session
        self.context = BotContext(
            store=store,
            downloads=downloads,
            uploads=uploads,
            links=links,
            hub=hub,
            say=session.say,
            edit=session.edit,
            config=config,
            gatekeeper=Gatekeeper(lambda: config().telegram),
            settings=settings,
            languages=Languages(lambda: config().telegram.language),
        )
        self.progress = ProgressNotifier(self.context)
        commands = Commands(self.context)
        jobs = JobHandlers(self.context, self.progress)
        session.add_handlers([*commands.handlers(), *jobs.handlers()])
        self.started = asyncio.Event()  # set once logged in, with the menu set
        # Waits for the login, then runs the notifier; None while stopped.
        self._serving: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Returns at once: the front end comes up whenever the session has logged in."""
        if self.context.gatekeeper.serves_no_one:
            logger.warning(NO_ONE_SERVED)
        if self._serving is None:
            self._serving = asyncio.create_task(self._serve(), name="telegram-bot")

    async def _serve(self) -> None:
        await self._session.logged_in.wait()
        await self._set_menu()
        self.started.set()
        await self.progress.run()

    async def _set_menu(self) -> None:
        client = self._session.client
        if client is None:
            return
        for language_code, lang in _MENU_LANGUAGES:
            try:
                await client.set_bot_commands(
                    render.command_menu(lang, COMMANDS), language_code=language_code
                )
            except RPCError as exc:
                logger.warning("could not set the command menu: {}", exc.ID or exc)

    async def stop(self) -> None:
        if self._serving is not None:
            self._serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._serving
            self._serving = None
        self.started.clear()
        logger.info("Telegram bot stopped")
