"""What users send: files and albums, text with links, .torrent files — each becomes a job.

Every path checks who is asking first; a stranger gets one polite refusal and nothing is recorded.
Telegram media becomes a `tg_media` row and a download in one transaction (DownloadManager), so a
refused or failed request leaves no half-written rows. The job's first reply is its progress
message, which the notifier then edits in place.
"""

from __future__ import annotations

import io
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from loguru import logger
from pyrogram import Client, filters
from pyrogram.errors import FileReferenceExpired, FileReferenceInvalid, Flood, RPCError
from pyrogram.handlers import MessageHandler
from pyrogram.handlers.handler import Handler
from pyrogram.types import InlineKeyboardMarkup, Message

from aria2_client.download_handler import Requester, TooLarge
from aria2_client.models import human_size
from aria2_client.sources import MAX_TORRENT_SIZE, SourceError, extract_links
from bot.auth import Role
from bot.context import BotContext
from bot.messages import (
    chat_id_of,
    group_key_of,
    is_private,
    is_torrent_document,
    media_record,
)
from bot.progress import ProgressNotifier
from bot.text import Language, translate
from db import DuplicateDownload, StoreError
from records import DownloadRow

_MAX_SHOWN_ITEMS = 10


@dataclass(frozen=True)
class Caller:
    """Who sent an update, what they may do, and the language to answer in."""

    user_id: int
    role: Role
    lang: Language


def requester_of(message: Message, caller: Caller) -> Requester:
    return Requester(
        owner_id=caller.user_id,
        chat_id=chat_id_of(message),
        message_id=message.id,
        group_key=group_key_of(message),
    )


def _shorten(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _has_link_token(line: str) -> bool:
    links, rejected = extract_links(line)
    return bool(links or rejected)


async def admit(context: BotContext, message: Message) -> Caller | None:
    """The caller if they may use the bot; else one polite refusal and None."""
    user = message.from_user
    if user is None:
        return None  # channel posts and anonymous admins: nobody to answer
    lang = context.languages.remember(user)
    role = context.gatekeeper.role(user.id)
    if role is None:
        logger.bind(user=user.id).info("refused a message from a user who is not allowed")
        if context.gatekeeper.should_tell_refusal(user.id):
            await reply(context, message, translate(lang, "bot.refused", user_id=user.id))
        return None
    return Caller(user.id, role, lang)


async def reply(
    context: BotContext,
    message: Message,
    text: str,
    markup: InlineKeyboardMarkup | None = None,
) -> None:
    """Answer `message`; Telegram refusing the answer is logged, never raised into Pyrogram."""
    chat_id = chat_id_of(message)
    try:
        await context.say(chat_id, text, reply_to=message.id, markup=markup)
    except Flood as flood:
        logger.bind(chat=chat_id).warning("reply not sent: Telegram asks to wait {} s", flood.value)
    except (RPCError, OSError, TimeoutError) as exc:
        logger.bind(chat=chat_id).warning(
            "reply not sent: {}", getattr(exc, "ID", None) or type(exc).__name__
        )


async def _read_document(client: Client, message: Message) -> bytes:
    """The document's bytes in memory; an expired file reference is renewed once."""
    try:
        buffer = await client.download_media(message, in_memory=True)
    except (FileReferenceExpired, FileReferenceInvalid):
        logger.bind(chat=chat_id_of(message)).info("file reference expired; reading it again")
        fresh = await client.get_messages(chat_id_of(message), message.id)
        if not isinstance(fresh, Message) or fresh.empty:
            raise
        buffer = await client.download_media(fresh, in_memory=True)
    return bytes(buffer.getbuffer()) if isinstance(buffer, io.BytesIO) else b""


class JobHandlers:
    """Message handlers that create jobs; each job's answer is its progress message."""

    def __init__(self, context: BotContext, progress: ProgressNotifier) -> None:
        self.context = context
        self.progress = progress

    def handlers(self) -> list[Handler]:
        """Media, then text, then anything else; added after the commands (see Commands)."""
        media = (
            filters.document
            | filters.video
            | filters.audio
            | filters.photo
            | filters.animation
            | filters.voice
            | filters.video_note
        )
        return [
            MessageHandler(self.on_media, media & filters.incoming),
            MessageHandler(self.on_text, filters.text & filters.incoming),
            MessageHandler(self.on_other, filters.incoming),
        ]

    async def reply(self, message: Message, text: str) -> None:
        await reply(self.context, message, text)

    # --- media ------------------------------------------------------------------------------------

    async def on_media(self, client: Client, message: Message) -> None:
        caller = await admit(self.context, message)
        if caller is None:
            return
        if is_torrent_document(message):
            await self.on_torrent(client, message, caller)
            return
        record = media_record(message)
        if record is None:
            await self.reply(message, translate(caller.lang, "bot.unsupported"))
            return
        downloads = self.context.downloads
        limit = downloads.max_download_size
        if limit and record.file_size and record.file_size > limit:
            await self.reply(
                message,
                translate(
                    caller.lang,
                    "bot.too_large",
                    name=record.file_name,
                    size=human_size(record.file_size),
                    limit=human_size(limit),
                ),
            )
            return
        await self._create_job(
            message, caller, partial(downloads.add_telegram, record), "bot.refused_job"
        )

    async def on_torrent(self, client: Client, message: Message, caller: Caller) -> None:
        document = message.document
        size = int(document.file_size or 0) if document is not None else 0
        if size > MAX_TORRENT_SIZE:
            await self._torrent_too_large(message, caller, size)
            return
        try:
            data = await _read_document(client, message)
        except Flood as flood:
            await self.reply(
                message, translate(caller.lang, "bot.telegram_busy", seconds=flood.value)
            )
            return
        except (RPCError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "ID", None) or type(exc).__name__
            logger.bind(chat=chat_id_of(message)).warning("torrent file not fetched: {}", reason)
            await self.reply(message, translate(caller.lang, "bot.telegram_error", reason=reason))
            return
        if len(data) > MAX_TORRENT_SIZE:
            await self._torrent_too_large(message, caller, len(data))
            return
        await self._create_job(
            message, caller, partial(self.context.downloads.add_torrent, data), "bot.torrent_bad"
        )

    async def _create_job(
        self,
        message: Message,
        caller: Caller,
        add: Callable[[Requester], Awaitable[DownloadRow]],
        bad_source_key: str,
    ) -> None:
        """Add one job under the chat's lock and answer with its progress message, or with why
        it was refused (`bad_source_key` names the text for a source that cannot be fetched)."""
        log = logger.bind(chat=chat_id_of(message), user=caller.user_id)
        async with self.context.chat_locks(chat_id_of(message)):
            try:
                row = await add(requester_of(message, caller))
            except DuplicateDownload as exc:
                if await self._may_see(caller, exc.existing_id):
                    text = translate(caller.lang, "bot.duplicate", id=exc.existing_id)
                else:
                    text = translate(caller.lang, "bot.duplicate_other")
                await self.reply(message, text)
                return
            except TooLarge as exc:
                await self.reply(message, translate(caller.lang, "bot.refused_job", reason=exc))
                return
            except SourceError as exc:
                log.warning("job not accepted: {}", exc)
                await self.reply(message, translate(caller.lang, bad_source_key, reason=exc))
                return
            except StoreError as exc:
                log.warning("job not recorded: {}", exc)
                await self.reply(message, translate(caller.lang, "bot.refused_job", reason=exc))
                return
            log.bind(job=row.id).info(
                "{} {} accepted as download {}", row.source_type, row.file_name, row.id
            )
            await self.progress.announce(row, caller.lang)

    async def _may_see(self, caller: Caller, download_id: int) -> bool:
        """Whether the caller may know of job `download_id`: its owner or an admin (another
        user's job is not named to them)."""
        row = await self.context.store.get_download_by_id(download_id)
        return row is not None and self.context.gatekeeper.may_control(caller.user_id, row)

    async def _torrent_too_large(self, message: Message, caller: Caller, size: int) -> None:
        await self.reply(
            message,
            translate(
                caller.lang,
                "bot.torrent_too_large",
                size=human_size(size),
                limit=human_size(MAX_TORRENT_SIZE),
            ),
        )

    # --- text ------------------------------------------------------------------------------------

    async def on_text(self, _client: Client, message: Message) -> None:
        text = str(message.text or "")
        if not is_private(message) and not _has_link_token(text):
            return  # group chatter is not addressed to the bot
        caller = await admit(self.context, message)
        if caller is None:
            return
        if text.startswith("/"):
            await self.reply(message, translate(caller.lang, "bot.unknown_command"))
            return
        links, rejected = extract_links(text)
        not_understood = [
            _shorten(line)
            for line in text.splitlines()
            if line.strip() and not _has_link_token(line)
        ]
        if not links and not rejected:
            await self.reply(message, translate(caller.lang, "bot.no_links"))
            return
        problems: list[str] = [
            translate(caller.lang, "bot.link_rejected", reason=reason) for reason in rejected
        ]
        requester = requester_of(message, caller)
        added = 0
        async with self.context.chat_locks(chat_id_of(message)):
            outcomes = await self.context.downloads.add_links(
                [link.url for link in links], requester
            )
            for link, row in zip(links, outcomes, strict=True):
                shown = _shorten(link.url, 80)
                if isinstance(row, DuplicateDownload):
                    if await self._may_see(caller, row.existing_id):
                        text = translate(
                            caller.lang, "bot.link_duplicate", link=shown, id=row.existing_id
                        )
                    else:
                        text = translate(caller.lang, "bot.link_duplicate_other", link=shown)
                    problems.append(text)
                    continue
                if isinstance(row, SourceError):
                    problems.append(
                        translate(caller.lang, "bot.link_refused", link=shown, reason=row)
                    )
                    continue
                added += 1
                logger.bind(job=row.id).info(
                    "{} link accepted as download {}", row.source_type, row.id
                )
                await self.progress.announce(row, caller.lang)
        lines: list[str] = []
        if problems:
            lines += problems[:_MAX_SHOWN_ITEMS]
            if len(problems) > _MAX_SHOWN_ITEMS:
                lines.append(f"… (+{len(problems) - _MAX_SHOWN_ITEMS})")
        if not_understood:
            shown_items = not_understood[:_MAX_SHOWN_ITEMS]
            lines.append(translate(caller.lang, "bot.not_understood", items="\n".join(shown_items)))
        if lines:
            if not added:
                lines.insert(0, translate(caller.lang, "bot.nothing_added"))
            await self.reply(message, "\n".join(lines))

    async def on_other(self, _client: Client, message: Message) -> None:
        if not is_private(message):
            return
        caller = await admit(self.context, message)
        if caller is None:
            return
        await self.reply(message, translate(caller.lang, "bot.unsupported"))
