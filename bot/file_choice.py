"""Choosing a torrent's files in the chat: a paged list of buttons, applied in one step.

The job's progress message offers "Choose files" (`f:<id>:o`) while the job is live and has more
than one file. That opens a chooser: a message of its own (the progress message is the
notifier's to edit), FILES_PER_PAGE files a page, each a ✅/⬜ button, with ◀ ▶, "All", "None",
"Videos only", "Largest" and "Apply". Callback data stays far below Telegram's 64 bytes:
`f:<id>:<op>[:<number>]`. The choice being made is kept in memory per chooser message; a
chooser the service no longer remembers (after a restart) starts again from the job's stored
choice. Applying calls `DownloadManager.select_files`, which also starts a job that waits,
paused, for its choice.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from loguru import logger
from pyrogram.errors import RPCError
from pyrogram.types import InlineKeyboardButton, InlineKeyboardMarkup

from aria2_client.models import human_size
from aria2_client.sources import SourceError
from aria2_client.transport import Aria2RpcError, Aria2Unavailable
from bot.context import BotContext
from bot.render import offers_choice
from bot.text import Language, translate
from db import NotFound, StoreError, TransitionError
from records import DownloadRow, TorrentFile
from uploads.media import VIDEO_EXTENSIONS

FILES_PER_PAGE = 8
MAX_FILE_LABEL = 48  # characters of a file's name on its button
MAX_CHOOSERS = 500  # choices being made, remembered at once (the oldest is forgotten first)
SHORTCUTS = ("all", "none", "videos", "largest")  # buttons `bot.button.choice_<shortcut>`


def is_video(file: TorrentFile) -> bool:
    return PurePosixPath(file.path).suffix.lower().lstrip(".") in VIDEO_EXTENSIONS


def page_of(files: Sequence[TorrentFile], index: int) -> int:
    """The page that shows the file numbered `index`."""
    position = next((n for n, f in enumerate(files) if f.index == index), 0)
    return position // FILES_PER_PAGE


def _label(file: TorrentFile, chosen: bool) -> str:
    name = PurePosixPath(file.path).name or file.path
    if len(name) > MAX_FILE_LABEL:
        name = name[: MAX_FILE_LABEL - 1] + "…"
    return f"{'✅' if chosen else '⬜'} {name} ({human_size(file.length)})"


def chooser(
    lang: Language, row: DownloadRow, chosen: Collection[int], page: int
) -> tuple[str, InlineKeyboardMarkup]:
    """The chooser's text and buttons at `page` (clamped)."""
    files = row.files
    pages = max(1, math.ceil(len(files) / FILES_PER_PAGE))
    page = min(max(page, 0), pages - 1)
    size = sum(f.length for f in files if f.index in chosen)
    text = translate(
        lang,
        "bot.choice.header",
        id=row.id,
        name=row.file_name or f"#{row.id}",
        chosen=len(chosen),
        count=len(files),
        size=human_size(size),
        page=page + 1,
        pages=pages,
    )

    def button(label: str, op: str) -> InlineKeyboardButton:
        return InlineKeyboardButton(label, callback_data=f"f:{row.id}:{op}")

    keyboard = [
        [button(_label(f, f.index in chosen), f"t:{f.index}")]
        for f in files[page * FILES_PER_PAGE : (page + 1) * FILES_PER_PAGE]
    ]
    if pages > 1:
        navigation = []
        if page > 0:
            navigation.append(button("◀", f"p:{page - 1}"))
        navigation.append(button(f"{page + 1}/{pages}", f"p:{page}"))
        if page < pages - 1:
            navigation.append(button("▶", f"p:{page + 1}"))
        keyboard.append(navigation)
    keyboard.append([button(translate(lang, f"bot.button.choice_{op}"), op) for op in SHORTCUTS])
    keyboard.append([button(translate(lang, "bot.button.choice_apply"), "apply")])
    return text, InlineKeyboardMarkup(keyboard)


@dataclass
class _Pending:
    """A choice being made in one chooser message."""

    download_id: int
    chosen: set[int]
    page: int = 0


class FileChooser:
    """The `f:` buttons: open a chooser, change the choice in it, apply it."""

    def __init__(self, context: BotContext) -> None:
        self.context = context
        self._pending: OrderedDict[tuple[int, int], _Pending] = OrderedDict()

    async def press(
        self, user_id: int, lang: Language, chat_id: int, message_id: int, data: str
    ) -> tuple[str | None, bool]:
        """Act on the button `data` (`f:<id>:<op>[:<number>]`) pressed in message `message_id`;
        the answer to show, and whether as an alert."""
        parts = data.split(":")
        if len(parts) not in (3, 4) or not parts[1].isdigit() or len(parts[1]) > 18:
            return translate(lang, "bot.button_unknown"), False
        op, number = parts[2], (parts[3] if len(parts) == 4 else None)
        if number is not None and not (number.isdigit() and len(number) <= 9):
            return translate(lang, "bot.button_unknown"), False
        download_id = int(parts[1])
        row = await self.context.store.get_download_by_id(download_id)
        if row is None:
            return translate(lang, "bot.no_such_job", id=download_id), False
        if not self.context.gatekeeper.may_control(user_id, row):
            logger.bind(job=row.id, user=user_id).info("refused a file choice on another's job")
            return translate(lang, "bot.no_such_job", id=download_id), False
        if not offers_choice(row):
            return translate(lang, "bot.choice.closed", id=row.id), False
        if op == "o" and number is None:
            await self._open(lang, chat_id, message_id, row)
            return None, False
        key = (chat_id, message_id)
        pending = self._pending.get(key)
        if pending is None or pending.download_id != row.id:
            pending = _Pending(row.id, {f.index for f in row.files if f.selected})
        known = [f.index for f in row.files]
        answer: str | None = None
        if op == "p" and number is not None:
            pending.page = int(number)
        elif op == "t" and number is not None and int(number) in known:
            pending.chosen ^= {int(number)}
            pending.page = page_of(row.files, int(number))
        elif op == "all" and number is None:
            pending.chosen = set(known)
        elif op == "none" and number is None:
            pending.chosen = set()
        elif op == "videos" and number is None:
            videos = {f.index for f in row.files if is_video(f)}
            if videos:
                pending.chosen = videos
            else:
                answer = translate(lang, "bot.choice.no_videos")
        elif op == "largest" and number is None:
            pending.chosen = {max(row.files, key=lambda f: f.length).index}
        elif op == "apply" and number is None:
            return await self._apply(user_id, lang, key, row, pending)
        else:
            return translate(lang, "bot.button_unknown"), False
        self._remember(key, pending)
        await self._show(chat_id, message_id, *chooser(lang, row, pending.chosen, pending.page))
        return answer, False

    async def _open(self, lang: Language, chat_id: int, reply_to: int, row: DownloadRow) -> None:
        chosen = {f.index for f in row.files if f.selected}
        text, markup = chooser(lang, row, chosen, 0)
        try:
            message_id = await self.context.say(chat_id, text, reply_to=reply_to, markup=markup)
        except (RPCError, OSError, TimeoutError) as exc:
            logger.bind(chat=chat_id, job=row.id).warning(
                "file chooser not sent: {}", getattr(exc, "ID", None) or type(exc).__name__
            )
            return
        if message_id is not None:
            self._remember((chat_id, message_id), _Pending(row.id, chosen))

    async def _apply(
        self,
        user_id: int,
        lang: Language,
        key: tuple[int, int],
        row: DownloadRow,
        pending: _Pending,
    ) -> tuple[str | None, bool]:
        if not pending.chosen:
            self._remember(key, pending)
            return translate(lang, "bot.choice.need_one"), True
        log = logger.bind(job=row.id, user=user_id)
        try:
            updated = await self.context.downloads.select_files(row.id, sorted(pending.chosen))
        except ValueError as exc:
            return translate(lang, "bot.choice.refused", id=row.id, reason=str(exc)[:150]), True
        except TransitionError:
            return translate(lang, "bot.choice.closed", id=row.id), False
        except NotFound:
            return translate(lang, "bot.no_such_job", id=row.id), False
        except (Aria2Unavailable, Aria2RpcError, SourceError, StoreError) as exc:
            log.warning("file choice of download {} failed: {}", row.id, exc)
            return translate(lang, "bot.action_failed", id=row.id, reason=str(exc)[:150]), True
        self._pending.pop(key, None)
        log.info("files of download {} chosen in the chat", row.id)
        size = sum(f.length for f in updated.files if f.selected)
        done = translate(
            lang,
            "bot.choice.applied",
            id=row.id,
            chosen=len(pending.chosen),
            count=len(updated.files),
            size=human_size(size),
        )
        await self._show(*key, done, None)
        return done, False

    def _remember(self, key: tuple[int, int], pending: _Pending) -> None:
        self._pending[key] = pending
        self._pending.move_to_end(key)
        while len(self._pending) > MAX_CHOOSERS:
            self._pending.popitem(last=False)

    async def _show(
        self, chat_id: int, message_id: int, text: str, markup: InlineKeyboardMarkup | None
    ) -> None:
        try:
            await self.context.edit(chat_id, message_id, text, markup)
        except RPCError as exc:
            logger.bind(chat=chat_id).warning(
                "file chooser not redrawn: {}", exc.ID or type(exc).__name__
            )
