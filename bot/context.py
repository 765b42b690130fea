"""What the bot's handlers, commands and progress notifier work with, passed in as one object.

They never see the Telegram session or the bot itself: they read and write through the store and
the managers, build links with the one link builder, and talk to Telegram through `say` and
`edit` (which the session provides).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from pyrogram.types import InlineKeyboardMarkup, User

from aria2_client.download_handler import DownloadManager
from bot.auth import Gatekeeper
from bot.text import Language, language_of
from configer import Config
from db import Store
from events import EventHub
from settings_editor import SettingsEditor
from uploads.manager import UploadManager
from webstreamer.links import StreamLinks


class Say(Protocol):
    async def __call__(
        self,
        chat_id: int,
        text: str,
        *,
        reply_to: int | None = None,
        markup: InlineKeyboardMarkup | None = None,
    ) -> int | None:
        """Send plain text (as a reply when `reply_to` is given); the sent message's id (None
        when Telegram answered without it)."""
        ...


class Edit(Protocol):
    async def __call__(
        self, chat_id: int, message_id: int, text: str, markup: InlineKeyboardMarkup | None
    ) -> None:
        """Replace a message's text and buttons (an unchanged message is no error)."""
        ...


class ChatLocks:
    """One lock per chat: job creation and progress edits in a chat take turns, so each job gets
    exactly one progress message."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

    def __call__(self, chat_id: int) -> asyncio.Lock:
        lock = self._locks.get(chat_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[chat_id] = lock
        return lock


class Languages:
    """The language each user last wrote in (from Telegram's language_code), to answer in;
    `setting` (read on every call: telegram.language) may name one language for everyone."""

    _LIMIT = 100_000

    def __init__(self, setting: Callable[[], str] = lambda: "auto") -> None:
        self._setting = setting
        self._by_user: dict[int, Language] = {}

    def _fixed(self) -> Language | None:
        setting = self._setting()
        return None if setting == "auto" else language_of(setting)

    def remember(self, user: User | None) -> Language:
        lang = language_of(user.language_code if user is not None else None)
        if user is not None:
            if len(self._by_user) > self._LIMIT:
                self._by_user.clear()
            self._by_user[user.id] = lang
        return self._fixed() or lang

    def of(self, user_id: int | None) -> Language:
        found = self._by_user.get(user_id, "en") if user_id is not None else "en"
        return self._fixed() or found


@dataclass(frozen=True)
class BotContext:
    """The parts the bot's handlers, commands and progress notifier use.

    `config` returns the live configuration (a reload replaces it); `gatekeeper` reads its
    Telegram section on every call for the same reason.
    """

    store: Store
    downloads: DownloadManager
    uploads: UploadManager
    links: StreamLinks
    hub: EventHub
    say: Say
    edit: Edit
    config: Callable[[], Config]
    gatekeeper: Gatekeeper
    settings: SettingsEditor
    chat_locks: ChatLocks = field(default_factory=ChatLocks)
    languages: Languages = field(default_factory=Languages)
