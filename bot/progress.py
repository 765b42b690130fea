"""Live progress in the chat: one message per job, edited in place, and a notice when it ends.

Driven by the event hub, never by polling: each committed `download`, `upload` or `cleanup` event
marks its job dirty. One worker per chat then edits that chat's messages one at a time, at most once
every `interval` seconds, so a busy chat never trips Telegram's flood limits; a FloodWait that
still comes back is waited out and the job is retried. The message id is stored with the job
(`progress_message_id`), so editing continues in the same message after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger
from pyrogram import enums
from pyrogram.errors import (
    Flood,
    MessageIdInvalid,
    MessageNotModified,
    RPCError,
)
from pyrogram.types import InlineKeyboardButton, InlineKeyboardMarkup

from aria2_client.models import format_duration, human_size, human_speed
from bot.text import translate
from db import ACTIVE_DOWNLOAD_STATUSES, FINAL_DOWNLOAD_STATUSES, DownloadRow, UploadRow
from events import Event, SubscriptionClosed

if TYPE_CHECKING:
    from bot.runner import TelegramBot

DEFAULT_INTERVAL = 3.0
BAR_WIDTH = 12
STATUS_ICONS = {
    "pending": "⏳",
    "waiting": "🕒",
    "downloading": "⬇️",
    "paused": "⏸",
    "completed": "✅",
    "failed": "❌",
    "cancelled": "🚫",
    "waiting_download": "🕒",
    "uploading": "☁️",
}
_MAX_TRANSIENT_RETRIES = 3
_CACHE_LIMIT = 50_000


# --- rendering (shared with the commands) ---------------------------------------------------------


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    if total <= 0:
        return "░" * width
    filled = min(width, max(0, done * width // total))
    return "█" * filled + "░" * (width - filled)


def percent(done: int, total: int) -> str:
    if total <= 0:
        return "?"
    return f"{min(100.0, done * 100 / total):.1f}%"


def eta_seconds(done: int, total: int, speed: float) -> float | None:
    if speed <= 0 or total <= 0 or done >= total:
        return None
    return (total - done) / speed


def status_name(lang: str, status: str) -> str:
    """A download status in words (shared with the page)."""
    return translate(lang, f"status.{status}")


def upload_status_name(lang: str, status: str) -> str:
    return translate(lang, f"upload_status.{status}")


def download_title(row: DownloadRow) -> str:
    icon = STATUS_ICONS.get(row.status, "•")
    return f"{icon} #{row.id} {row.file_name or row.source_url or row.source_type}"


def download_lines(lang: str, row: DownloadRow) -> list[str]:
    """A download's progress: title, bar, sizes, speed and ETA; or its end state."""
    lines = [download_title(row)]
    total, done = row.total_length, row.completed_length
    if row.status in ("waiting", "downloading", "paused"):
        lines.append(f"[{progress_bar(done, total)}] {percent(done, total)}")
        eta = eta_seconds(done, total, row.download_speed)
        lines.append(
            translate(
                lang,
                "bot.progress.numbers",
                done=human_size(done),
                total=human_size(total) if total else "?",
                speed=human_speed(row.download_speed),
                eta=format_duration(eta),
                status=status_name(lang, row.status),
            )
        )
    elif row.status == "pending":
        lines.append(status_name(lang, row.status))
    elif row.status == "completed":
        lines.append(translate(lang, "bot.progress.completed", size=human_size(total)))
    elif row.status == "failed":
        lines.append(translate(lang, "bot.progress.failed", reason=row.error_message or "?"))
    else:
        lines.append(status_name(lang, row.status))
    return lines


def upload_line(lang: str, upload: UploadRow) -> str:
    icon = STATUS_ICONS.get(upload.status, "•")
    name = upload_status_name(lang, upload.status)
    if upload.status == "uploading":
        return translate(
            lang,
            "bot.progress.upload_running",
            icon=icon,
            target=upload.upload_target,
            percent=percent(upload.uploaded_size, upload.total_size),
            speed=human_speed(upload.upload_speed),
        )
    if upload.status == "completed":
        return translate(
            lang,
            "bot.progress.upload_done",
            icon=icon,
            target=upload.upload_target,
            remote_path=upload.remote_path or "-",
        )
    if upload.status == "failed":
        return translate(
            lang,
            "bot.progress.upload_failed",
            icon=icon,
            target=upload.upload_target,
            reason=upload.error_message or upload.failure_reason or "?",
            tries=upload.retry_count,
            max_tries=upload.max_retries,
        )
    return f"{icon} {upload.upload_target}: {name}"


def download_buttons(
    lang: str, row: DownloadRow, origin: str = "", *, with_id: bool = False
) -> list[InlineKeyboardButton]:
    """The actions that the state machine allows now, as inline buttons."""
    actions: list[str] = []
    if row.status in ("waiting", "downloading"):
        actions = ["pause", "cancel"]
    elif row.status == "paused":
        actions = ["resume", "cancel"]
    elif row.status == "pending":
        actions = ["cancel"]
    elif row.status in ("failed", "cancelled"):
        actions = ["retry"]
    return _action_buttons(lang, "d", "", "#", row.id, actions, origin, with_id)


def upload_buttons(
    lang: str, upload: UploadRow, origin: str = "", *, with_id: bool = False
) -> list[InlineKeyboardButton]:
    actions: list[str] = []
    if upload.status in ("failed", "cancelled"):
        actions = ["retry"]
    elif upload.status in ("pending", "uploading", "paused", "waiting_download"):
        actions = ["cancel"]
    return _action_buttons(lang, "u", "upload_", "↑", upload.id, actions, origin, with_id)


def _action_buttons(
    lang: str,
    prefix: str,
    label_prefix: str,
    marker: str,
    item_id: int,
    actions: Sequence[str],
    origin: str,
    with_id: bool,
) -> list[InlineKeyboardButton]:
    """One button per action; callback data is `<prefix>:<action>:<id>[:<origin>]`."""
    suffix = f":{origin}" if origin else ""
    buttons = []
    for action in actions:
        label = translate(lang, f"bot.button.{label_prefix}{action}")
        if with_id:
            label = f"{label} {marker}{item_id}"
        callback = f"{prefix}:{action}:{item_id}{suffix}"
        buttons.append(InlineKeyboardButton(label, callback_data=callback))
    return buttons


def render_progress(
    lang: str, row: DownloadRow, uploads: Sequence[UploadRow]
) -> tuple[str, InlineKeyboardMarkup | None]:
    """The text and buttons of a job's progress message."""
    lines = download_lines(lang, row)
    lines += [upload_line(lang, upload) for upload in uploads]
    rows: list[list[InlineKeyboardButton]] = []
    buttons = download_buttons(lang, row)
    if buttons:
        rows.append(buttons)
    for upload in uploads:
        if upload.status in ("failed", "cancelled"):
            rows.append(upload_buttons(lang, upload, with_id=True))
    return "\n".join(lines), InlineKeyboardMarkup(rows) if rows else None


def markup_signature(markup: InlineKeyboardMarkup | None) -> str:
    if markup is None:
        return ""
    return "|".join(
        f"{b.text}={b.callback_data!r}" for line in markup.inline_keyboard for b in line
    )


# --- the notifier ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Notice:
    """An end of a job the user hears about once: a download's or an upload's final state."""

    entity: str  # "download" | "upload"
    entity_id: int
    status: str


class ProgressNotifier:
    """Subscribes to the hub and keeps each chat's progress messages current."""

    def __init__(self, bot: TelegramBot, interval: float = DEFAULT_INTERVAL) -> None:
        self.bot = bot
        self.interval = interval
        self._chat_of: dict[int, int | None] = {}
        self._dirty: dict[int, OrderedDict[int, None]] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._next_allowed: dict[int, float] = {}
        self._last_status: dict[tuple[str, int], str] = {}
        self._notices: dict[int, list[Notice]] = {}
        self._rendered: dict[int, tuple[str, str]] = {}
        self._transient_failures: dict[int, int] = {}
        self._task: asyncio.Task[None] | None = None
        self.edits = 0  # Telegram calls made (sent or edited), for the log and tests

    def remember(self, download_id: int, signature: tuple[str, str]) -> None:
        """What a handler just sent as the job's progress message (saves an identical edit)."""
        self._rendered[download_id] = signature

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="telegram-progress")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._workers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._task = None
        self._workers.clear()

    async def _run(self) -> None:
        while True:
            subscription = self.bot.hub.subscribe("telegram-progress", maxsize=10_000)
            try:
                await self._resync()
                while True:
                    try:
                        event = await subscription.get()
                    except SubscriptionClosed:
                        break
                    try:
                        await self._on_event(event)
                    except Exception:
                        logger.exception("progress notifier could not handle an event")
            finally:
                subscription.close()
            if not subscription.dropped:
                return
            logger.warning("progress notifier fell behind; resynchronising")

    async def _resync(self) -> None:
        """Mark every active chat job dirty: after a start (or a drop) its message catches up."""
        rows = await self.bot.db.fetch_downloads_in_states(ACTIVE_DOWNLOAD_STATUSES)
        for row in rows:
            self._chat_of[row.id] = row.chat_id
            self._last_status[("download", row.id)] = row.status
            if row.chat_id is not None:
                self._mark(row.chat_id, row.id)

    # --- events -----------------------------------------------------------------------------------

    async def _chat(self, download_id: int) -> int | None:
        if download_id in self._chat_of:
            return self._chat_of[download_id]
        row = await self.bot.db.get_download_by_id(download_id)
        chat = row.chat_id if row is not None else None
        if len(self._chat_of) > _CACHE_LIMIT:
            self._chat_of.clear()
        self._chat_of[download_id] = chat
        return chat

    def _forget(self, download_id: int) -> None:
        self._chat_of.pop(download_id, None)
        self._notices.pop(download_id, None)
        self._rendered.pop(download_id, None)
        self._last_status.pop(("download", download_id), None)
        for dirty in self._dirty.values():
            dirty.pop(download_id, None)

    async def _on_event(self, event: Event) -> None:
        data = event.data
        if event.kind == "download":
            if data.get("deleted_all"):
                for known in list(self._chat_of):
                    self._forget(known)
                return
            download_id = data.get("download_id")
            if not isinstance(download_id, int):
                return
            if data.get("deleted"):
                self._forget(download_id)
                return
            chat = await self._chat(download_id)
            if chat is None:
                return
            status = data.get("status")
            if (
                isinstance(status, str)
                and self._status_changed("download", download_id, status)
                and status in FINAL_DOWNLOAD_STATUSES
            ):
                self._add_notice(download_id, Notice("download", download_id, status))
            self._mark(chat, download_id)
        elif event.kind in ("upload", "cleanup"):
            owner_download = data.get("download_id")
            upload_id = data.get("upload_id")
            if not isinstance(owner_download, int) or not isinstance(upload_id, int):
                return
            download_id = owner_download
            chat = await self._chat(download_id)
            if chat is None:
                return
            status = data.get("status")
            if (
                event.kind == "upload"
                and isinstance(status, str)
                and self._status_changed("upload", upload_id, status)
                and status in ("completed", "failed")
            ):
                self._add_notice(download_id, Notice("upload", upload_id, status))
            self._mark(chat, download_id)

    def _status_changed(self, entity: str, item_id: int, status: str) -> bool:
        key = (entity, item_id)
        previous = self._last_status.get(key)
        if len(self._last_status) > _CACHE_LIMIT:
            self._last_status.clear()
        self._last_status[key] = status
        return previous != status

    def _add_notice(self, download_id: int, notice: Notice) -> None:
        pending = self._notices.setdefault(download_id, [])
        if notice not in pending:
            pending.append(notice)

    def _mark(self, chat_id: int, download_id: int, *, front: bool = False) -> None:
        dirty = self._dirty.setdefault(chat_id, OrderedDict())
        dirty[download_id] = None
        if front:
            dirty.move_to_end(download_id, last=False)
        worker = self._workers.get(chat_id)
        if worker is None or worker.done():
            self._workers[chat_id] = asyncio.create_task(
                self._chat_worker(chat_id), name=f"telegram-progress-{chat_id}"
            )

    # --- per-chat workers -------------------------------------------------------------------------

    async def _chat_worker(self, chat_id: int) -> None:
        log = logger.bind(chat=chat_id)
        try:
            while True:
                dirty = self._dirty.get(chat_id)
                if not dirty:
                    return
                delay = self._next_allowed.get(chat_id, 0.0) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue  # the queue may have changed while waiting
                download_id, _ = dirty.popitem(last=False)
                try:
                    await self._flush(chat_id, download_id)
                    self._transient_failures.pop(download_id, None)
                except Flood as flood:
                    wait = float(flood.value or 1)  # type: ignore[arg-type]
                    log.bind(job=download_id).warning(
                        "Telegram asks to wait {} s before editing again; waiting", wait
                    )
                    self._next_allowed[chat_id] = time.monotonic() + wait
                    self._mark(chat_id, download_id, front=True)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    failures = self._transient_failures.get(download_id, 0) + 1
                    self._transient_failures[download_id] = failures
                    if failures <= _MAX_TRANSIENT_RETRIES:
                        log.bind(job=download_id).warning(
                            "progress message not updated ({}); retrying", type(exc).__name__
                        )
                        self._next_allowed[chat_id] = time.monotonic() + self.interval * failures
                        self._mark(chat_id, download_id)
                    else:
                        log.bind(job=download_id).error(
                            "progress message not updated after {} tries: {}",
                            failures,
                            type(exc).__name__,
                        )
                        self._transient_failures.pop(download_id, None)
                except RPCError as exc:
                    log.bind(job=download_id).warning(
                        "Telegram refused a progress update: {}", exc.ID or type(exc).__name__
                    )
                except Exception:
                    log.bind(job=download_id).exception("progress update failed")
        finally:
            if self._workers.get(chat_id) is asyncio.current_task():
                del self._workers[chat_id]
            if not self._dirty.get(chat_id):
                self._dirty.pop(chat_id, None)

    def _spent(self, chat_id: int) -> None:
        self.edits += 1
        self._next_allowed[chat_id] = time.monotonic() + self.interval

    async def _flush(self, chat_id: int, download_id: int) -> None:
        """At most one Telegram call for this job; anything left is marked dirty again."""
        bot = self.bot
        client = bot.client
        if client is None:
            return
        async with bot.chat_lock(chat_id):
            row = await bot.db.get_download_by_id(download_id)
            if row is None or row.chat_id is None:
                self._forget(download_id)
                return
            uploads = await bot.db.get_uploads_by_download(download_id)
            lang = bot.language_for(row.owner_id)
            text, markup = render_progress(lang, row, uploads)
            signature = (text, markup_signature(markup))
            if row.progress_message_id is None:
                await self._send_progress(client, row, text, markup)
                self._rendered[download_id] = signature
                self._spent(chat_id)
                self._remark_if_pending(chat_id, download_id)
                return
            if self._rendered.get(download_id) != signature:
                try:
                    await client.edit_message_text(
                        chat_id,
                        row.progress_message_id,
                        text,
                        parse_mode=enums.ParseMode.DISABLED,
                        reply_markup=markup,
                    )
                except MessageNotModified:
                    pass
                except MessageIdInvalid:
                    # The user deleted the message: start a new one.
                    await self._send_progress(client, row, text, markup)
                self._rendered[download_id] = signature
                self._spent(chat_id)
                self._remark_if_pending(chat_id, download_id)
                return
            notices = self._notices.get(download_id)
            if not notices:
                return
            notice = notices[0]
            message = await self._notice_text(lang, row, uploads, notice)
            if message is not None:
                await client.send_message(
                    chat_id,
                    message,
                    parse_mode=enums.ParseMode.DISABLED,
                    reply_to_message_id=row.message_id,
                    disable_web_page_preview=True,
                )
                self._spent(chat_id)
            notices.pop(0)
            if not notices:
                self._notices.pop(download_id, None)
            self._remark_if_pending(chat_id, download_id)

    def _remark_if_pending(self, chat_id: int, download_id: int) -> None:
        if self._notices.get(download_id):
            self._mark(chat_id, download_id)

    async def _send_progress(
        self, client: Any, row: DownloadRow, text: str, markup: InlineKeyboardMarkup | None
    ) -> None:
        assert row.chat_id is not None
        sent = await client.send_message(
            row.chat_id,
            text,
            parse_mode=enums.ParseMode.DISABLED,
            reply_to_message_id=row.message_id,
            reply_markup=markup,
            disable_web_page_preview=True,
        )
        await self.bot.db.set_progress_message(row.id, sent.id)

    async def _notice_text(
        self, lang: str, row: DownloadRow, uploads: Sequence[UploadRow], notice: Notice
    ) -> str | None:
        name = row.file_name or row.source_url or f"#{row.id}"
        if notice.entity == "download":
            if row.status != notice.status:
                return None  # it moved on (e.g. retried) before we got to say it
            if notice.status == "completed":
                link = self.bot.stream_url(row)
                text = translate(
                    lang,
                    "bot.notice.completed",
                    id=row.id,
                    name=name,
                    size=human_size(row.total_length),
                )
                return f"{text}\n{link}" if link else text
            if notice.status == "failed":
                return translate(
                    lang, "bot.notice.failed", id=row.id, name=name, reason=row.error_message or "?"
                )
            return translate(lang, "bot.notice.cancelled", id=row.id, name=name)
        upload = next((u for u in uploads if u.id == notice.entity_id), None)
        if upload is None or upload.status != notice.status:
            return None
        if upload.status == "completed":
            return translate(
                lang,
                "bot.notice.uploaded",
                id=row.id,
                name=name,
                target=upload.upload_target,
                remote_path=upload.remote_path or "-",
            )
        if upload.next_attempt_at is not None and upload.retry_count < upload.max_retries:
            return None  # an automatic retry follows; the progress message shows it
        return translate(
            lang,
            "bot.notice.upload_failed",
            id=row.id,
            name=name,
            target=upload.upload_target,
            reason=upload.error_message or upload.failure_reason or "?",
        )
