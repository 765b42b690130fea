"""Commands and inline buttons: status, lists, job control, statistics, the dashboard's address.

Admins see and control every job; allowed users only their own. A button pressed on someone
else's job is answered with a refusal and nothing is done.
"""

from __future__ import annotations

import asyncio
import math
import shutil
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from loguru import logger
from pyrogram import enums, filters
from pyrogram.errors import MessageNotModified, RPCError
from pyrogram.handlers import CallbackQueryHandler, MessageHandler
from pyrogram.types import CallbackQuery, InlineKeyboardButton, InlineKeyboardMarkup, Message

from aria2_client.models import human_size, human_speed
from aria2_client.sources import SourceError
from aria2_client.transport import Aria2RpcError, Aria2Unavailable
from bot.auth import Role
from bot.handlers import Caller, admit, chat_id_of, reply
from bot.progress import (
    STATUS_ICONS,
    download_buttons,
    download_lines,
    percent,
    status_name,
    upload_buttons,
    upload_status_name,
)
from bot.text import translate
from db import (
    ACTIVE_DOWNLOAD_STATUSES,
    DownloadRow,
    NotFound,
    StoreError,
    TransitionError,
    UploadRow,
)

if TYPE_CHECKING:
    from bot.runner import TelegramBot

# (command, arguments shown in /help), in menu order
COMMANDS: tuple[tuple[str, str], ...] = (
    ("start", ""),
    ("help", ""),
    ("status", ""),
    ("downloads", ""),
    ("uploads", ""),
    ("retry", "<id>"),
    ("cancel", "<id>"),
    ("pause", "<id>"),
    ("resume", "<id>"),
    ("stats", ""),
    ("web", ""),
    ("targets", ""),
)
DOWNLOAD_ACTIONS = ("pause", "resume", "cancel", "retry")
UPLOAD_ACTIONS = ("retry", "cancel")
STATUS_PAGE_SIZE = 5
LIST_LIMIT = 15
_TELEGRAM_TEXT_LIMIT = 4000


def _clip(text: str) -> str:
    return text if len(text) <= _TELEGRAM_TEXT_LIMIT else text[: _TELEGRAM_TEXT_LIMIT - 1] + "…"


def public_address(url: str) -> str:
    """The dashboard's address without anything secret: no user info, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def parse_job_id(text: str) -> int | None:
    cleaned = text.strip().lstrip("#")
    if cleaned.isdigit() and len(cleaned) <= 18:
        return int(cleaned)
    return None


class Commands:
    def __init__(self, bot: TelegramBot) -> None:
        self.bot = bot

    # --- plumbing ---------------------------------------------------------------------------------

    def _owner_filter(self, caller: Caller) -> int | None:
        return None if caller.role is Role.ADMIN else caller.user_id

    async def _visible_active(self, caller: Caller) -> list[DownloadRow]:
        rows = await self.bot.db.fetch_downloads_in_states(ACTIVE_DOWNLOAD_STATUSES)
        owner = self._owner_filter(caller)
        return [r for r in rows if owner is None or r.owner_id == owner]

    # --- /start /help -----------------------------------------------------------------------------

    async def start(self, _client: Any, message: Message) -> None:
        caller = await admit(self.bot, message)
        if caller is None:
            return
        user = message.from_user
        name = (user.first_name or user.username or "") if user else ""
        role = translate(caller.lang, f"bot.role.{caller.role.value}")
        await reply(self.bot, message, translate(caller.lang, "bot.start", name=name, role=role))

    def help_text(self, lang: str) -> str:
        lines = [translate(lang, "bot.help.header")]
        for name, args in COMMANDS:
            usage = f"/{name} {args}".strip()
            lines.append(f"{usage} — {translate(lang, f'bot.menu.{name}')}")
        lines.append("")
        lines.append(translate(lang, "bot.help.footer"))
        return "\n".join(lines)

    async def help(self, _client: Any, message: Message) -> None:
        caller = await admit(self.bot, message)
        if caller is None:
            return
        await reply(self.bot, message, self.help_text(caller.lang))

    # --- /status ----------------------------------------------------------------------------------

    async def status_page(
        self, caller: Caller, page: int
    ) -> tuple[str, InlineKeyboardMarkup | None]:
        rows = await self._visible_active(caller)
        lang = caller.lang
        if not rows:
            return translate(lang, "bot.status_empty"), None
        pages = max(1, math.ceil(len(rows) / STATUS_PAGE_SIZE))
        page = min(max(page, 0), pages - 1)
        shown = rows[page * STATUS_PAGE_SIZE : (page + 1) * STATUS_PAGE_SIZE]
        blocks = [translate(lang, "bot.status_header", count=len(rows), page=page + 1, pages=pages)]
        keyboard: list[list[InlineKeyboardButton]] = []
        for row in shown:
            blocks.append("\n".join(download_lines(lang, row)))
            buttons = download_buttons(lang, row, origin=f"s{page}", with_id=True)
            if buttons:
                keyboard.append(buttons)
        navigation: list[InlineKeyboardButton] = []
        if page > 0:
            navigation.append(
                InlineKeyboardButton(
                    translate(lang, "bot.button.prev"), callback_data=f"s:{page - 1}"
                )
            )
        navigation.append(
            InlineKeyboardButton(translate(lang, "bot.button.refresh"), callback_data=f"s:{page}")
        )
        if page < pages - 1:
            navigation.append(
                InlineKeyboardButton(
                    translate(lang, "bot.button.next"), callback_data=f"s:{page + 1}"
                )
            )
        keyboard.append(navigation)
        return _clip("\n\n".join(blocks)), InlineKeyboardMarkup(keyboard)

    async def status(self, _client: Any, message: Message) -> None:
        caller = await admit(self.bot, message)
        if caller is None:
            return
        text, markup = await self.status_page(caller, 0)
        await reply(self.bot, message, text, markup)

    # --- /downloads /uploads ----------------------------------------------------------------------

    def _download_entry(self, lang: str, row: DownloadRow) -> str:
        icon = STATUS_ICONS.get(row.status, "•")
        name = row.file_name or row.source_url or row.source_type
        detail = status_name(lang, row.status)
        if row.status in ("waiting", "downloading", "paused"):
            detail += f" {percent(row.completed_length, row.total_length)}"
        if row.total_length:
            detail += f" · {human_size(row.total_length)}"
        if row.status == "failed" and row.error_message:
            detail += f" · {row.error_message[:80]}"
        return f"{icon} #{row.id} {name}\n    {detail}"

    async def downloads_text(self, caller: Caller) -> str:
        rows = await self.bot.db.fetch_recent_downloads(
            LIST_LIMIT, owner_id=self._owner_filter(caller)
        )
        if not rows:
            return translate(caller.lang, "bot.downloads_empty")
        lines = [translate(caller.lang, "bot.downloads_header", count=len(rows))]
        lines += [self._download_entry(caller.lang, row) for row in rows]
        return _clip("\n".join(lines))

    async def downloads(self, _client: Any, message: Message) -> None:
        caller = await admit(self.bot, message)
        if caller is None:
            return
        await reply(self.bot, message, await self.downloads_text(caller))

    async def _visible_uploads(self, caller: Caller) -> list[UploadRow]:
        owner = self._owner_filter(caller)
        if owner is None:
            return await self.bot.db.fetch_recent_uploads(LIST_LIMIT)
        own = await self.bot.db.fetch_recent_downloads(200, owner_id=owner)
        by_download = await self.bot.db.get_uploads_for_downloads([r.id for r in own])
        uploads = [u for group in by_download.values() for u in group]
        return sorted(uploads, key=lambda u: u.id, reverse=True)[:LIST_LIMIT]

    def _upload_entry(self, lang: str, upload: UploadRow) -> str:
        icon = STATUS_ICONS.get(upload.status, "•")
        detail = upload_status_name(lang, upload.status)
        if upload.status == "uploading":
            detail += f" {percent(upload.uploaded_size, upload.total_size)}"
            detail += f" · {human_speed(upload.upload_speed)}"
        elif upload.status == "completed" and upload.remote_path:
            detail += f" → {upload.remote_path}"
        elif upload.status == "failed":
            reason = upload.error_message or upload.failure_reason or "?"
            detail += f" ({upload.retry_count}/{upload.max_retries}) · {reason[:80]}"
        return f"{icon} ↑{upload.id} #{upload.download_id} → {upload.upload_target}\n    {detail}"

    async def uploads_page(self, caller: Caller) -> tuple[str, InlineKeyboardMarkup | None]:
        uploads = await self._visible_uploads(caller)
        if not uploads:
            return translate(caller.lang, "bot.uploads_empty"), None
        lines = [translate(caller.lang, "bot.uploads_header", count=len(uploads))]
        keyboard: list[list[InlineKeyboardButton]] = []
        for upload in uploads:
            lines.append(self._upload_entry(caller.lang, upload))
            buttons = upload_buttons(caller.lang, upload, origin="l", with_id=True)
            if buttons:
                keyboard.append(buttons)
        return _clip("\n".join(lines)), InlineKeyboardMarkup(keyboard) if keyboard else None

    async def uploads(self, _client: Any, message: Message) -> None:
        caller = await admit(self.bot, message)
        if caller is None:
            return
        text, markup = await self.uploads_page(caller)
        await reply(self.bot, message, text, markup)

    # --- job control ------------------------------------------------------------------------------

    async def download_action(self, caller: Caller, action: str, download_id: int) -> str:
        """Do `action` on a job the caller may control; the answer to show either way."""
        lang = caller.lang
        row = await self.bot.db.get_download_by_id(download_id)
        if row is None:
            return translate(lang, "bot.no_such_job", id=download_id)
        if not self.bot.gatekeeper.may_control(caller.user_id, row):
            logger.bind(job=download_id, user=caller.user_id).info(
                "refused {} on a job of someone else", action
            )
            return translate(lang, "bot.not_yours", id=download_id)
        operation: Callable[[int], Awaitable[DownloadRow]] = getattr(self.bot.downloads, action)
        try:
            updated = await operation(download_id)
        except TransitionError as exc:
            return translate(
                lang,
                "bot.action_refused",
                action=translate(lang, f"bot.action.{action}"),
                id=download_id,
                status=status_name(lang, exc.current or row.status),
            )
        except NotFound:
            return translate(lang, "bot.no_such_job", id=download_id)
        except (Aria2Unavailable, Aria2RpcError, SourceError, StoreError) as exc:
            logger.bind(job=download_id).warning("{} failed: {}", action, exc)
            return translate(lang, "bot.action_failed", id=download_id, reason=str(exc)[:200])
        logger.bind(job=download_id, user=caller.user_id).info("{} by the bot", action)
        return translate(
            lang,
            f"bot.done.{action}",
            id=download_id,
            name=updated.file_name or "",
            status=status_name(lang, updated.status),
        )

    async def upload_action(self, caller: Caller, action: str, upload_id: int) -> str:
        lang = caller.lang
        upload = await self.bot.db.get_upload_by_id(upload_id)
        row = await self.bot.db.get_download_by_id(upload.download_id) if upload else None
        if upload is None or row is None:
            return translate(lang, "bot.no_such_upload", id=upload_id)
        if not self.bot.gatekeeper.may_control(caller.user_id, row):
            return translate(lang, "bot.not_yours", id=row.id)
        manager = self.bot.uploads
        operation = getattr(manager, action, None) if manager is not None else None
        if operation is None:
            return translate(lang, "bot.uploads_unavailable")
        try:
            await operation(upload_id)
        except TransitionError as exc:
            return translate(
                lang,
                "bot.upload_action_refused",
                action=translate(lang, f"bot.action.{action}"),
                id=upload_id,
                status=upload_status_name(lang, exc.current or upload.status),
            )
        except NotFound:
            return translate(lang, "bot.no_such_upload", id=upload_id)
        except StoreError as exc:
            return translate(lang, "bot.action_failed", id=row.id, reason=str(exc)[:200])
        logger.bind(upload=upload_id, user=caller.user_id).info("upload {} by the bot", action)
        return translate(lang, f"bot.done.upload_{action}", id=upload_id)

    def _action_command(self, action: str) -> Callable[[Any, Message], Awaitable[None]]:
        async def handle(_client: Any, message: Message) -> None:
            caller = await admit(self.bot, message)
            if caller is None:
                return
            arguments: Sequence[str] = (message.command or [])[1:]
            download_id = parse_job_id(arguments[0]) if arguments else None
            if download_id is None:
                await reply(
                    self.bot, message, translate(caller.lang, "bot.need_id", command=action)
                )
                return
            await reply(self.bot, message, await self.download_action(caller, action, download_id))

        handle.__name__ = f"command_{action}"
        return handle

    # --- /stats /web /targets ---------------------------------------------------------------------

    async def stats_text(self, lang: str) -> str:
        statistics = await self.bot.db.get_statistics()
        downloads, uploads = statistics["downloads"], statistics["uploads"]
        by_status = downloads["by_status"]
        active = sum(by_status.get(s, 0) for s in ACTIVE_DOWNLOAD_STATUSES)
        download_dir = self.bot.downloads.download_dir
        try:
            usage = await asyncio.to_thread(shutil.disk_usage, download_dir)
            disk = translate(
                lang, "bot.stats.disk", free=human_size(usage.free), total=human_size(usage.total)
            )
        except OSError:
            disk = translate(lang, "bot.stats.disk_unknown")
        up_status = uploads["by_status"]
        return "\n".join(
            [
                translate(lang, "bot.stats.header"),
                translate(
                    lang,
                    "bot.stats.downloads",
                    total=downloads["total"],
                    active=active,
                    completed=by_status.get("completed", 0),
                    failed=by_status.get("failed", 0),
                    cancelled=by_status.get("cancelled", 0),
                ),
                translate(
                    lang,
                    "bot.stats.bytes",
                    completed=human_size(downloads["completed_bytes"]),
                    total=human_size(downloads["total_bytes"]),
                    speed=human_speed(downloads["download_speed"]),
                ),
                translate(
                    lang,
                    "bot.stats.uploads",
                    total=uploads["total"],
                    uploading=up_status.get("uploading", 0),
                    completed=up_status.get("completed", 0),
                    failed=up_status.get("failed", 0),
                    speed=human_speed(uploads["upload_speed"]),
                ),
                disk,
            ]
        )

    async def stats(self, _client: Any, message: Message) -> None:
        caller = await admit(self.bot, message)
        if caller is None:
            return
        await reply(self.bot, message, await self.stats_text(caller.lang))

    async def web(self, _client: Any, message: Message) -> None:
        caller = await admit(self.bot, message)
        if caller is None:
            return
        address = public_address(self.bot.config.web.base_url)
        await reply(self.bot, message, translate(caller.lang, "bot.web", url=address))

    def targets_text(self, lang: str) -> str:
        targets = self.bot.config.upload.targets
        if not targets:
            return translate(lang, "bot.targets_empty")
        lines = [translate(lang, "bot.targets_header", count=len(targets))]
        for target in targets:
            if target.type == "telegram":
                where = translate(lang, "bot.target.chat", chat_id=target.chat_id)
            else:
                where = f"{target.remote}:{target.path}"
            lines.append(f"• {target.name} ({target.type}) → {where}")
        return "\n".join(lines)

    async def targets(self, _client: Any, message: Message) -> None:
        caller = await admit(self.bot, message)
        if caller is None:
            return
        await reply(self.bot, message, self.targets_text(caller.lang))

    # --- inline buttons ---------------------------------------------------------------------------

    async def on_callback(self, client: Any, query: CallbackQuery) -> None:
        user = query.from_user
        lang = self.bot.remember_language(user)
        role = self.bot.gatekeeper.role(user.id if user else None)
        if user is None or role is None:
            await self._answer(query, translate(lang, "bot.refused_short"), alert=True)
            return
        caller = Caller(user.id, role, lang)
        data = query.data if isinstance(query.data, str) else (query.data or b"").decode()
        parts = data.split(":")
        try:
            if parts[0] == "s" and len(parts) == 2 and parts[1].isdigit():
                text, markup = await self.status_page(caller, int(parts[1]))
                await self._edit(query, text, markup)
                await self._answer(query, None)
                return
            if parts[0] in ("d", "u") and len(parts) in (3, 4) and parts[2].isdigit():
                kind, action, item_id = parts[0], parts[1], int(parts[2])
                origin = parts[3] if len(parts) == 4 else ""
                if kind == "d" and action in DOWNLOAD_ACTIONS:
                    answer = await self.download_action(caller, action, item_id)
                elif kind == "u" and action in UPLOAD_ACTIONS:
                    answer = await self.upload_action(caller, action, item_id)
                else:
                    answer = translate(lang, "bot.button_unknown")
                await self._answer(query, answer)
                await self._refresh_origin(query, caller, origin)
                return
        except Exception:
            logger.exception("inline button {!r} failed", data)
            await self._answer(query, translate(lang, "bot.internal_error"), alert=True)
            return
        await self._answer(query, translate(lang, "bot.button_unknown"))

    async def _refresh_origin(self, query: CallbackQuery, caller: Caller, origin: str) -> None:
        """A list the button sat in is redrawn; a progress message is the notifier's to edit."""
        if origin.startswith("s") and origin[1:].isdigit():
            text, markup = await self.status_page(caller, int(origin[1:]))
            await self._edit(query, text, markup)
        elif origin == "l":
            text, markup = await self.uploads_page(caller)
            await self._edit(query, text, markup)

    async def _answer(self, query: CallbackQuery, text: str | None, alert: bool = False) -> None:
        try:
            await query.answer(text[:190] if text else None, show_alert=alert)
        except RPCError as exc:
            # An old button (Telegram allows answers for a short while only).
            logger.debug("callback answer failed: {}", exc.ID or type(exc).__name__)

    async def _edit(
        self, query: CallbackQuery, text: str, markup: InlineKeyboardMarkup | None
    ) -> None:
        message = query.message
        if message is None:
            return
        try:
            await self.bot.client.edit_message_text(
                chat_id_of(message),
                message.id,
                text,
                parse_mode=enums.ParseMode.DISABLED,
                reply_markup=markup,
            )
        except MessageNotModified:
            pass
        except RPCError as exc:
            logger.bind(chat=chat_id_of(message)).warning(
                "list not redrawn: {}", exc.ID or type(exc).__name__
            )


def register_commands(bot: TelegramBot, client: Any) -> Commands:
    """Commands first in group 0: the dispatcher runs the first matching handler of a group."""
    commands = Commands(bot)
    simple: dict[str, Callable[[Any, Message], Awaitable[None]]] = {
        "start": commands.start,
        "help": commands.help,
        "status": commands.status,
        "downloads": commands.downloads,
        "uploads": commands.uploads,
        "stats": commands.stats,
        "web": commands.web,
        "targets": commands.targets,
    }
    for action in DOWNLOAD_ACTIONS:
        simple[action] = commands._action_command(action)
    for name, callback in simple.items():
        client.add_handler(
            MessageHandler(callback, filters.command(name) & filters.incoming), group=0
        )
    client.add_handler(CallbackQueryHandler(commands.on_callback), group=0)
    return commands
