"""Commands and inline buttons: status, lists, job control, statistics, the dashboard's address.

Admins see and control every job; allowed users only their own. A button pressed on someone
else's job is answered with a refusal and nothing is done.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from loguru import logger
from pyrogram import Client, filters
from pyrogram.errors import RPCError
from pyrogram.handlers import CallbackQueryHandler, MessageHandler
from pyrogram.handlers.handler import Handler
from pyrogram.types import CallbackQuery, InlineKeyboardMarkup, Message

from aria2_client.models import human_speed
from aria2_client.sources import SourceError
from aria2_client.transport import Aria2RpcError, Aria2Unavailable
from bot import render
from bot.auth import Role
from bot.context import BotContext
from bot.file_choice import FileChooser
from bot.handlers import Caller, admit, reply
from bot.messages import chat_id_of
from bot.text import Language, translate
from configer import ConfigError
from db import ACTIVE_DOWNLOAD_STATUSES, NotFound, StoreError, TransitionError
from records import ARCHIVE_ACTIONS, DownloadRow, UploadRow
from webstreamer.signing import SIGN_IN_LIFETIME, SIGN_IN_PATH

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
    ("limit", "[download|upload <limit>]"),
    ("settings", "[<key> <value>]"),
    ("extract", "<id> [password]"),
)
DOWNLOAD_ACTIONS = ("pause", "resume", "cancel", "retry")
UPLOAD_ACTIONS = ("retry", "cancel")
LIST_LIMIT = 15

MessageCallback = Callable[[Client, Message], Awaitable[None]]


_Item = TypeVar("_Item", DownloadRow, UploadRow)


@dataclass(frozen=True)
class _Kind:
    """What control actions on downloads, or on uploads, answer with."""

    name: str
    missing_key: str
    refused_key: str
    status_name: Callable[[Language, str], str]


_DOWNLOAD = _Kind("download", "bot.no_such_job", "bot.action_refused", render.status_name)
_UPLOAD = _Kind(
    "upload", "bot.no_such_upload", "bot.upload_action_refused", render.upload_status_name
)


def parse_job_id(text: str) -> int | None:
    cleaned = text.strip().lstrip("#")
    if cleaned.isdigit() and len(cleaned) <= 18:
        return int(cleaned)
    return None


class Commands:
    def __init__(self, context: BotContext) -> None:
        self.context = context
        downloads, uploads = context.downloads, context.uploads
        self._download_operations: Mapping[str, Callable[[int], Awaitable[DownloadRow]]] = {
            "pause": downloads.pause,
            "resume": downloads.resume,
            "cancel": downloads.cancel,
            "retry": downloads.retry,
        }
        self._upload_operations: Mapping[str, Callable[[int], Awaitable[UploadRow]]] = {
            "retry": uploads.retry,
            "cancel": uploads.cancel,
        }
        self.file_chooser = FileChooser(context)

    def handlers(self) -> list[Handler]:
        """One handler per command, then the buttons' (commands come before the job handlers:
        the dispatcher runs only the first matching handler of a group)."""
        simple: dict[str, MessageCallback] = {
            "start": self.start,
            "help": self.help,
            "status": self.status,
            "downloads": self.downloads,
            "uploads": self.uploads,
            "stats": self.stats,
            "web": self.web,
            "targets": self.targets,
            "limit": self.limit,
            "settings": self.settings,
            "extract": self.extract,
        }
        for action in DOWNLOAD_ACTIONS:
            simple[action] = self._action_command(action)
        handlers: list[Handler] = [
            MessageHandler(callback, filters.command(name) & filters.incoming)
            for name, callback in simple.items()
        ]
        handlers.append(CallbackQueryHandler(self.on_callback))
        return handlers

    # --- reads, limited to what the caller may see ------------------------------------------------

    def _owner_filter(self, caller: Caller) -> int | None:
        return None if caller.role is Role.ADMIN else caller.user_id

    async def _visible_active(self, caller: Caller) -> list[DownloadRow]:
        rows = await self.context.store.fetch_downloads_in_states(ACTIVE_DOWNLOAD_STATUSES)
        owner = self._owner_filter(caller)
        return [r for r in rows if owner is None or r.owner_id == owner]

    async def _visible_uploads(self, caller: Caller) -> list[UploadRow]:
        owner = self._owner_filter(caller)
        return await self.context.store.fetch_recent_uploads(LIST_LIMIT, owner_id=owner)

    async def status_page(
        self, caller: Caller, page: int
    ) -> tuple[str, InlineKeyboardMarkup | None]:
        return render.status_page(caller.lang, await self._visible_active(caller), page)

    async def uploads_page(self, caller: Caller) -> tuple[str, InlineKeyboardMarkup | None]:
        return render.uploads_page(caller.lang, await self._visible_uploads(caller))

    async def _disk_space(self) -> tuple[int, int] | None:
        try:
            usage = await asyncio.to_thread(shutil.disk_usage, self.context.downloads.download_dir)
        except OSError:
            return None
        return usage.free, usage.total

    # --- commands ---------------------------------------------------------------------------------

    async def start(self, _client: Client, message: Message) -> None:
        caller = await admit(self.context, message)
        if caller is None:
            return
        user = message.from_user
        name = (user.first_name or user.username or "") if user else ""
        role = translate(caller.lang, f"bot.role.{caller.role.value}")
        await reply(
            self.context, message, translate(caller.lang, "bot.start", name=name, role=role)
        )

    async def help(self, _client: Client, message: Message) -> None:
        caller = await admit(self.context, message)
        if caller is None:
            return
        await reply(self.context, message, render.help_text(caller.lang, COMMANDS))

    async def status(self, _client: Client, message: Message) -> None:
        caller = await admit(self.context, message)
        if caller is None:
            return
        text, markup = await self.status_page(caller, 0)
        await reply(self.context, message, text, markup)

    async def downloads(self, _client: Client, message: Message) -> None:
        caller = await admit(self.context, message)
        if caller is None:
            return
        rows = await self.context.store.fetch_recent_downloads(
            LIST_LIMIT, owner_id=self._owner_filter(caller)
        )
        await reply(self.context, message, render.downloads_list(caller.lang, rows))

    async def uploads(self, _client: Client, message: Message) -> None:
        caller = await admit(self.context, message)
        if caller is None:
            return
        text, markup = await self.uploads_page(caller)
        await reply(self.context, message, text, markup)

    async def stats(self, _client: Client, message: Message) -> None:
        caller = await admit(self.context, message)
        if caller is None:
            return
        statistics = await self.context.store.get_statistics(self._owner_filter(caller))
        text = render.stats_text(caller.lang, statistics, await self._disk_space())
        await reply(self.context, message, text)

    async def web(self, _client: Client, message: Message) -> None:
        caller = await admit(self.context, message)
        if caller is None:
            return
        address = render.public_address(self.context.config().web.base_url).rstrip("/")
        query = self.context.links.signer.sign_in_query(caller.user_id, SIGN_IN_LIFETIME)
        text = translate(
            caller.lang,
            "bot.web",
            url=f"{address}{SIGN_IN_PATH}?{query}",
            minutes=SIGN_IN_LIFETIME // 60,
        )
        await reply(self.context, message, text)

    async def targets(self, _client: Client, message: Message) -> None:
        caller = await admit(self.context, message)
        if caller is None:
            return
        targets = self.context.config().upload.targets
        await reply(self.context, message, render.targets_text(caller.lang, targets))

    async def limit(self, _client: Client, message: Message) -> None:
        """``/limit`` shows the speed limits; an admin's ``/limit download 2MiB`` sets one."""
        caller = await admit(self.context, message)
        if caller is None:
            return
        arguments = (message.command or [])[1:]
        if not arguments:
            limits = self.context.config().limits
            text = translate(
                caller.lang,
                "bot.limits",
                download=_limit_text(caller.lang, limits.download),
                upload=_limit_text(caller.lang, limits.upload),
            )
        elif len(arguments) != 2 or arguments[0] not in ("download", "upload"):
            text = translate(caller.lang, "bot.limit_usage")
        else:
            text = await self._change(caller, f"limits.{arguments[0]}", arguments[1])
        await reply(self.context, message, text)

    async def settings(self, _client: Client, message: Message) -> None:
        """An admin's ``/settings`` lists the live settings; ``/settings <key> <value>`` (the
        value as in config.yaml) changes one."""
        caller = await admit(self.context, message)
        if caller is None:
            return
        arguments = (message.text or "").split(maxsplit=2)[1:]
        if caller.role is not Role.ADMIN:
            text = translate(caller.lang, "bot.admin_only")
        elif not arguments:
            shown = self.context.settings.current()
            lines = [translate(caller.lang, "bot.settings_header")]
            lines += [
                f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in shown.items()
            ]
            text = "\n".join(lines)
        elif len(arguments) != 2:
            text = translate(caller.lang, "bot.settings_usage")
        else:
            try:
                value = yaml.safe_load(arguments[1])
            except yaml.YAMLError:
                value = arguments[1]
            text = await self._change(caller, arguments[0], value)
        await reply(self.context, message, text)

    async def _change(self, caller: Caller, key: str, value: Any) -> str:
        """Change one live setting for an admin; the answer either way."""
        if caller.role is not Role.ADMIN:
            return translate(caller.lang, "bot.admin_only")
        try:
            changes = await self.context.settings.change({key: value}, f"telegram:{caller.user_id}")
        except ConfigError as exc:
            return translate(caller.lang, "bot.setting_refused", reason=str(exc)[:300])
        if not changes:
            return translate(caller.lang, "bot.setting_unchanged", setting=key)
        change = changes[0]
        return translate(
            caller.lang,
            "bot.setting_changed",
            setting=change.key,
            old=change.old_value,
            new=change.new_value,
        )

    async def extract(self, _client: Client, message: Message) -> None:
        """/extract ID [PASSWORD]: extract the job's archive before uploading it."""
        caller = await admit(self.context, message)
        if caller is None:
            return
        arguments = (message.command or [])[1:]
        download_id = parse_job_id(arguments[0]) if arguments else None
        if download_id is None:
            text = translate(caller.lang, "bot.need_id", command="extract")
        else:
            password = " ".join(arguments[1:]) or None
            text = await self.archive_action(caller, "extract", download_id, password)
        await reply(self.context, message, text)

    def _action_command(self, action: str) -> MessageCallback:
        async def handle(_client: Client, message: Message) -> None:
            caller = await admit(self.context, message)
            if caller is None:
                return
            arguments = (message.command or [])[1:]
            download_id = parse_job_id(arguments[0]) if arguments else None
            if download_id is None:
                text = translate(caller.lang, "bot.need_id", command=action)
            else:
                text = await self.download_action(caller, action, download_id)
            await reply(self.context, message, text)

        handle.__name__ = f"command_{action}"
        return handle

    # --- job control ------------------------------------------------------------------------------

    async def download_action(self, caller: Caller, action: str, download_id: int) -> str:
        """Do `action` on a job the caller may control; the answer to show either way."""
        lang = caller.lang
        row = await self.context.store.get_download_by_id(download_id)
        if row is None:
            return translate(lang, _DOWNLOAD.missing_key, id=download_id)

        def done(updated: DownloadRow) -> str:
            return translate(
                lang,
                f"bot.done.{action}",
                id=download_id,
                name=updated.file_name or "",
                status=render.status_name(lang, updated.status),
            )

        operation = self._download_operations[action]
        return await self._control(caller, action, _DOWNLOAD, row, row, operation, done)

    async def _open_job(self, caller: Caller, download_id: int) -> DownloadRow | str:
        """The caller's job that has not completed (its upload choices still open), or the
        answer why not: no such job (another user's counts as none), or too late."""
        row = await self.context.store.get_download_by_id(download_id)
        if row is None or not self.context.gatekeeper.may_control(caller.user_id, row):
            return translate(caller.lang, _DOWNLOAD.missing_key, id=download_id)
        if row.status not in render.ARCHIVE_OPEN_STATUSES:
            return translate(caller.lang, "bot.archive_too_late", id=row.id)
        return row

    async def archive_action(
        self, caller: Caller, action: str, download_id: int, password: str | None = None
    ) -> str:
        """Ask for the job's archive step (extract or zip) while it has not completed."""
        lang = caller.lang
        row = await self._open_job(caller, download_id)
        if isinstance(row, str):
            return row
        await self.context.store.set_archive_option(row.id, action, password)
        logger.bind(job=row.id, user=caller.user_id).info("{} before upload asked", action)
        return translate(lang, f"bot.archive_{action}_set", id=row.id)

    async def target_action(self, caller: Caller, download_id: int, index: int | None) -> str:
        """Send the job to the upload target at `index` of `upload.targets` only, or (None) keep
        it here only, while it has not completed; the answer either way."""
        lang = caller.lang
        row = await self._open_job(caller, download_id)
        if isinstance(row, str):
            return row
        targets = self.context.config().upload.targets
        if index is not None and index >= len(targets):
            return translate(lang, "bot.button_unknown")  # the targets changed since
        chosen = [] if index is None else [targets[index].name]
        await self.context.store.set_download_targets(row.id, chosen)
        logger.bind(job=row.id, user=caller.user_id).info("upload targets chosen: {}", chosen)
        if index is None:
            return translate(lang, "bot.target_keep_set", id=row.id)
        return translate(lang, "bot.target_set", id=row.id, name=chosen[0])

    async def upload_action(self, caller: Caller, action: str, upload_id: int) -> str:
        """Do `action` on an upload of a job the caller may control; the answer either way."""
        lang = caller.lang
        store = self.context.store
        upload = await store.get_upload_by_id(upload_id)
        row = await store.get_download_by_id(upload.download_id) if upload else None
        if upload is None or row is None:
            return translate(lang, _UPLOAD.missing_key, id=upload_id)

        def done(_updated: UploadRow) -> str:
            return translate(lang, f"bot.done.upload_{action}", id=upload_id)

        operation = self._upload_operations[action]
        return await self._control(caller, action, _UPLOAD, upload, row, operation, done)

    async def _control(
        self,
        caller: Caller,
        action: str,
        kind: _Kind,
        item: _Item,
        job: DownloadRow,
        operation: Callable[[int], Awaitable[_Item]],
        done: Callable[[_Item], str],
    ) -> str:
        """Run `operation` on `item` if its `job` is the caller's to control; the answer (another
        user's job or upload answers as none at all)."""
        lang = caller.lang
        log = logger.bind(job=job.id, user=caller.user_id)
        if not self.context.gatekeeper.may_control(caller.user_id, job):
            log.info("refused {} on {} {} of someone else", action, kind.name, item.id)
            return translate(lang, kind.missing_key, id=item.id)
        try:
            updated = await operation(item.id)
        except TransitionError as exc:
            return translate(
                lang,
                kind.refused_key,
                action=translate(lang, f"bot.action.{action}"),
                id=item.id,
                status=kind.status_name(lang, exc.current or item.status),
            )
        except NotFound:
            return translate(lang, kind.missing_key, id=item.id)
        except (Aria2Unavailable, Aria2RpcError, SourceError, StoreError) as exc:
            log.warning("{} of {} {} failed: {}", action, kind.name, item.id, exc)
            return translate(lang, "bot.action_failed", id=job.id, reason=str(exc)[:200])
        log.info("{} of {} {} by the bot", action, kind.name, item.id)
        return done(updated)

    # --- inline buttons ---------------------------------------------------------------------------

    async def on_callback(self, _client: Client, query: CallbackQuery) -> None:
        user = query.from_user
        lang = self.context.languages.remember(user)
        role = self.context.gatekeeper.role(user.id if user else None)
        if user is None or role is None:
            await _answer(query, translate(lang, "bot.refused_short"), alert=True)
            return
        caller = Caller(user.id, role, lang)
        data = query.data if isinstance(query.data, str) else (query.data or b"").decode()
        parts = data.split(":")
        try:
            if parts[0] == "s" and len(parts) == 2 and parts[1].isdigit():
                await self._redraw(query, *await self.status_page(caller, int(parts[1])))
                await _answer(query, None)
                return
            if parts[0] == "a" and len(parts) == 3 and parts[2].isdigit():
                if parts[1] in ARCHIVE_ACTIONS:
                    answer = await self.archive_action(caller, parts[1], int(parts[2]))
                else:
                    answer = translate(lang, "bot.button_unknown")
                await _answer(query, answer)
                return
            if parts[0] == "t" and len(parts) == 3 and parts[1].isdigit():
                if parts[2] == "-" or parts[2].isdigit():
                    index = None if parts[2] == "-" else int(parts[2])
                    answer = await self.target_action(caller, int(parts[1]), index)
                else:
                    answer = translate(lang, "bot.button_unknown")
                await _answer(query, answer)
                return
            if parts[0] == "f" and query.message is not None:
                message = query.message
                shown, alert = await self.file_chooser.press(
                    caller.user_id, lang, chat_id_of(message), message.id, data
                )
                await _answer(query, shown, alert=alert)
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
                await _answer(query, answer)
                await self._refresh_origin(query, caller, origin)
                return
        except Exception:
            logger.exception("inline button {!r} failed", data)
            await _answer(query, translate(lang, "bot.internal_error"), alert=True)
            return
        await _answer(query, translate(lang, "bot.button_unknown"))

    async def _refresh_origin(self, query: CallbackQuery, caller: Caller, origin: str) -> None:
        """A list the button sat in is redrawn; a progress message is the notifier's to edit."""
        if origin.startswith("s") and origin[1:].isdigit():
            await self._redraw(query, *await self.status_page(caller, int(origin[1:])))
        elif origin == "l":
            await self._redraw(query, *await self.uploads_page(caller))

    async def _redraw(
        self, query: CallbackQuery, text: str, markup: InlineKeyboardMarkup | None
    ) -> None:
        message = query.message
        if message is None:
            return
        try:
            await self.context.edit(chat_id_of(message), message.id, text, markup)
        except RPCError as exc:
            logger.bind(chat=chat_id_of(message)).warning(
                "list not redrawn: {}", exc.ID or type(exc).__name__
            )


def _limit_text(lang: Language, bytes_per_second: int) -> str:
    if not bytes_per_second:
        return translate(lang, "bot.limit_none")
    return human_speed(bytes_per_second)


async def _answer(query: CallbackQuery, text: str | None, alert: bool = False) -> None:
    try:
        await query.answer(text[:190] if text else None, show_alert=alert)
    except RPCError as exc:
        # An old button (Telegram allows answers for a short while only).
        logger.debug("callback answer failed: {}", exc.ID or type(exc).__name__)
