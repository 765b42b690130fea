"""What users send: files and albums, text with links, .torrent files — each becomes a job.

Every path checks who is asking first; a stranger gets one polite refusal and nothing is recorded.
Telegram media becomes a `tg_media` row and a download in one transaction (DownloadManager), so a
refused or failed request leaves no half-written rows. The job's first reply is its progress
message, which the notifier then edits in place.
"""

from __future__ import annotations

import mimetypes
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from loguru import logger
from pyrogram import enums, filters
from pyrogram.errors import FileReferenceExpired, FileReferenceInvalid, Flood, RPCError
from pyrogram.file_id import FileId
from pyrogram.handlers import MessageHandler
from pyrogram.types import Message

from aria2_client.download_handler import Requester, TooLarge, human_limit
from aria2_client.models import human_size
from aria2_client.sources import MAX_TORRENT_SIZE, SourceError, extract_links
from bot.auth import Role
from bot.progress import markup_signature, render_progress
from bot.text import Language, translate
from db import DownloadRow, DuplicateDownload, StoreError, TgMediaRecord

if TYPE_CHECKING:
    from bot.runner import TelegramBot

MEDIA_KINDS = ("document", "video", "audio", "photo", "animation", "voice", "video_note")
_DEFAULT_EXTENSIONS = {
    "photo": ".jpg",
    "voice": ".ogg",
    "video": ".mp4",
    "animation": ".mp4",
    "video_note": ".mp4",
    "audio": ".mp3",
}
_TORRENT_MIME = "application/x-bittorrent"
_MAX_SHOWN_ITEMS = 10


@dataclass(frozen=True)
class Caller:
    """Who sent an update, what they may do, and the language to answer in."""

    user_id: int
    role: Role
    lang: Language

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


# --- Pyrogram message → plain records -----------------------------------------------------------


def chat_id_of(message: Message) -> int:
    """Every message the handlers see belongs to a chat."""
    chat = message.chat
    if chat is None or chat.id is None:
        raise ValueError("a message without a chat")
    return int(chat.id)


def media_of(message: Message) -> tuple[str, Any] | None:
    """(kind, media object) of the first downloadable media in `message`."""
    for kind in MEDIA_KINDS:
        media = getattr(message, kind, None)
        if media is not None and getattr(media, "file_unique_id", None):
            return kind, media
    return None


def _int_or_none(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return int(value.total_seconds())
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _dc_of(file_id: str) -> int | None:
    try:
        return int(FileId.decode(file_id).dc_id)
    except Exception:
        return None


def _sender_name(message: Message) -> str | None:
    user = message.from_user
    if user is None:
        chat = message.sender_chat
        return getattr(chat, "title", None) if chat is not None else None
    parts = [user.first_name or "", user.last_name or ""]
    name = " ".join(p for p in parts if p).strip()
    return name or user.username or None


def _file_name(kind: str, media: Any, message: Message, mime: str | None) -> str:
    name = getattr(media, "file_name", None)
    if name:
        return str(name)
    if kind == "audio":
        title = getattr(media, "title", None)
        performer = getattr(media, "performer", None)
        if title:
            stem = f"{performer} - {title}" if performer else str(title)
            return stem + (mimetypes.guess_extension(mime or "") or ".mp3")
    extension = (mime and mimetypes.guess_extension(mime)) or _DEFAULT_EXTENSIONS.get(kind, "")
    return f"{kind}_{chat_id_of(message)}_{message.id}{extension}"


def media_record(message: Message) -> TgMediaRecord | None:
    """The plain record of a message's media (what `tg_media` stores); None without media."""
    found = media_of(message)
    if found is None:
        return None
    kind, media = found
    mime = getattr(media, "mime_type", None) or ("image/jpeg" if kind == "photo" else None)
    date = message.date
    return TgMediaRecord(
        file_unique_id=str(media.file_unique_id),
        file_id=str(media.file_id),
        chat_id=int(chat_id_of(message)),
        message_id=int(message.id),
        media_type=kind,
        sender_id=message.from_user.id if message.from_user else None,
        sender_name=_sender_name(message),
        file_name=_file_name(kind, media, message, mime),
        mime_type=mime,
        file_size=_int_or_none(getattr(media, "file_size", None)),
        duration=_int_or_none(getattr(media, "duration", None)),
        width=_int_or_none(getattr(media, "width", None)),
        height=_int_or_none(getattr(media, "height", None)),
        caption=str(message.caption) if message.caption else None,
        media_group_id=str(message.media_group_id) if message.media_group_id else None,
        message_date=date.isoformat() if date is not None else None,
        dc_id=_dc_of(str(media.file_id)),
    )


def group_key_of(message: Message) -> str:
    """An album's files share one group; any other message is a group of its own."""
    if message.media_group_id:
        return f"album:{message.media_group_id}"
    return f"message:{chat_id_of(message)}:{message.id}"


def requester_of(message: Message, caller: Caller) -> Requester:
    return Requester(
        owner_id=caller.user_id,
        chat_id=chat_id_of(message),
        message_id=message.id,
        group_key=group_key_of(message),
        is_admin=caller.is_admin,
    )


def is_torrent_document(message: Message) -> bool:
    document = message.document
    if document is None:
        return False
    name = (document.file_name or "").lower()
    return name.endswith(".torrent") or (document.mime_type or "") == _TORRENT_MIME


def is_private(message: Message) -> bool:
    return message.chat is not None and message.chat.type == enums.ChatType.PRIVATE


def _shorten(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- the handlers ---------------------------------------------------------------------------------


async def admit(bot: TelegramBot, message: Message) -> Caller | None:
    """The caller if they may use the bot; else one polite refusal and None."""
    user = message.from_user
    if user is None:
        return None  # channel posts and anonymous admins: nobody to answer
    lang = bot.remember_language(user)
    role = bot.gatekeeper.role(user.id)
    if role is None:
        logger.bind(user=user.id).info("refused a message from a user who is not allowed")
        if bot.gatekeeper.should_tell_refusal(user.id):
            await reply(bot, message, translate(lang, "bot.refused", user_id=user.id))
        return None
    return Caller(user.id, role, lang)


async def reply(bot: TelegramBot, message: Message, text: str, markup: Any = None) -> None:
    """Answer `message`; Telegram refusing the answer is logged, never raised into Pyrogram."""
    try:
        await bot.say(chat_id_of(message), text, reply_to=message.id, markup=markup)
    except Flood as flood:
        logger.bind(chat=chat_id_of(message)).warning(
            "reply not sent: Telegram asks to wait {} s", flood.value
        )
    except (RPCError, OSError, TimeoutError) as exc:
        logger.bind(chat=chat_id_of(message)).warning(
            "reply not sent: {}", getattr(exc, "ID", None) or type(exc).__name__
        )


class JobHandlers:
    """Message handlers that create jobs; registered on the client by :func:`register_handlers`."""

    def __init__(self, bot: TelegramBot) -> None:
        self.bot = bot

    async def admit(self, message: Message) -> Caller | None:
        return await admit(self.bot, message)

    async def reply(self, message: Message, text: str) -> None:
        await reply(self.bot, message, text)

    async def announce(self, row: DownloadRow, caller: Caller) -> None:
        """The job's progress message, sent as the answer (caller holds the chat lock)."""
        text, markup = render_progress(caller.lang, row, [])
        assert row.chat_id is not None
        try:
            sent = await self.bot.say(row.chat_id, text, reply_to=row.message_id, markup=markup)
        except (RPCError, OSError, TimeoutError) as exc:
            # The notifier sends the progress message at its next event instead.
            logger.bind(job=row.id).warning(
                "progress message not sent yet: {}", getattr(exc, "ID", None) or type(exc).__name__
            )
            return
        await self.bot.db.set_progress_message(row.id, sent.id)
        self.bot.progress.remember(row.id, (text, markup_signature(markup)))

    # --- media ------------------------------------------------------------------------------------

    async def on_media(self, _client: Any, message: Message) -> None:
        caller = await self.admit(message)
        if caller is None:
            return
        if is_torrent_document(message):
            await self.on_torrent(message, caller)
            return
        record = media_record(message)
        if record is None:
            await self.reply(message, translate(caller.lang, "bot.unsupported"))
            return
        limit = self.bot.downloads.max_download_size
        if limit and record.file_size and record.file_size > limit:
            await self.reply(
                message,
                translate(
                    caller.lang,
                    "bot.too_large",
                    name=record.file_name,
                    size=human_size(record.file_size),
                    limit=human_limit(limit),
                ),
            )
            return
        log = logger.bind(chat=chat_id_of(message), user=caller.user_id)
        async with self.bot.chat_lock(chat_id_of(message)):
            try:
                row = await self.bot.downloads.add_telegram(record, requester_of(message, caller))
            except DuplicateDownload as exc:
                await self.reply(
                    message, translate(caller.lang, "bot.duplicate", id=exc.existing_id)
                )
                return
            except TooLarge as exc:
                await self.reply(message, translate(caller.lang, "bot.refused_job", reason=exc))
                return
            except (SourceError, StoreError) as exc:
                log.warning("Telegram file not accepted: {}", exc)
                await self.reply(message, translate(caller.lang, "bot.refused_job", reason=exc))
                return
            log.bind(job=row.id).info(
                "Telegram {} accepted as download {}", record.media_type, row.id
            )
            await self.announce(row, caller)

    async def on_torrent(self, message: Message, caller: Caller) -> None:
        document = message.document
        size = int(getattr(document, "file_size", 0) or 0)
        if size > MAX_TORRENT_SIZE:
            await self.reply(
                message,
                translate(
                    caller.lang,
                    "bot.torrent_too_large",
                    size=human_size(size),
                    limit=human_size(MAX_TORRENT_SIZE),
                ),
            )
            return
        try:
            buffer = await self._fetch_small_file(message)
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
        data = bytes(buffer.getbuffer()) if buffer is not None else b""
        if len(data) > MAX_TORRENT_SIZE:
            await self.reply(
                message,
                translate(
                    caller.lang,
                    "bot.torrent_too_large",
                    size=human_size(len(data)),
                    limit=human_size(MAX_TORRENT_SIZE),
                ),
            )
            return
        async with self.bot.chat_lock(chat_id_of(message)):
            try:
                row = await self.bot.downloads.add_torrent(data, requester_of(message, caller))
            except DuplicateDownload as exc:
                await self.reply(
                    message, translate(caller.lang, "bot.duplicate", id=exc.existing_id)
                )
                return
            except TooLarge as exc:
                await self.reply(message, translate(caller.lang, "bot.refused_job", reason=exc))
                return
            except SourceError as exc:
                await self.reply(message, translate(caller.lang, "bot.torrent_bad", reason=exc))
                return
            logger.bind(job=row.id).info(
                "torrent {} accepted as download {}", row.file_name, row.id
            )
            await self.announce(row, caller)

    async def _fetch_small_file(self, message: Message) -> Any:
        """The document's bytes in memory; an expired file reference is renewed once."""
        client = self.bot.client
        try:
            return await client.download_media(message, in_memory=True)
        except (FileReferenceExpired, FileReferenceInvalid):
            logger.bind(chat=chat_id_of(message)).info("file reference expired; reading it again")
            fresh = await client.get_messages(chat_id_of(message), message.id)
            if fresh is None or getattr(fresh, "empty", False):
                raise
            return await client.download_media(fresh, in_memory=True)

    # --- text ------------------------------------------------------------------------------------

    async def on_text(self, _client: Any, message: Message) -> None:
        text = str(message.text or "")
        if not is_private(message) and not _has_link_token(text):
            return  # group chatter is not addressed to the bot
        caller = await self.admit(message)
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
        async with self.bot.chat_lock(chat_id_of(message)):
            for link in links:
                try:
                    row = await self.bot.downloads.add_link(link.url, requester)
                except DuplicateDownload as exc:
                    problems.append(
                        translate(
                            caller.lang,
                            "bot.link_duplicate",
                            link=_shorten(link.url, 80),
                            id=exc.existing_id,
                        )
                    )
                    continue
                except SourceError as exc:
                    problems.append(
                        translate(
                            caller.lang,
                            "bot.link_refused",
                            link=_shorten(link.url, 80),
                            reason=exc,
                        )
                    )
                    continue
                added += 1
                logger.bind(job=row.id).info(
                    "{} link accepted as download {}", row.source_type, row.id
                )
                await self.announce(row, caller)
        lines: list[str] = []
        if problems:
            lines += problems[:_MAX_SHOWN_ITEMS]
            if len(problems) > _MAX_SHOWN_ITEMS:
                lines.append(f"… (+{len(problems) - _MAX_SHOWN_ITEMS})")
        if not_understood:
            shown = not_understood[:_MAX_SHOWN_ITEMS]
            lines.append(translate(caller.lang, "bot.not_understood", items="\n".join(shown)))
        if lines:
            if not added:
                lines.insert(0, translate(caller.lang, "bot.nothing_added"))
            await self.reply(message, "\n".join(lines))

    async def on_other(self, _client: Any, message: Message) -> None:
        if not is_private(message):
            return
        caller = await self.admit(message)
        if caller is None:
            return
        await self.reply(message, translate(caller.lang, "bot.unsupported"))


def _has_link_token(line: str) -> bool:
    links, rejected = extract_links(line)
    return bool(links or rejected)


def register_handlers(bot: TelegramBot, client: Any) -> JobHandlers:
    """Job handlers, registered after the commands in the same group: the dispatcher runs the
    first handler of a group that matches, so a command is never taken for link text."""
    handlers = JobHandlers(bot)
    media = (
        filters.document
        | filters.video
        | filters.audio
        | filters.photo
        | filters.animation
        | filters.voice
        | filters.video_note
    )
    client.add_handler(MessageHandler(handlers.on_media, media & filters.incoming), group=0)
    client.add_handler(MessageHandler(handlers.on_text, filters.text & filters.incoming), group=0)
    client.add_handler(MessageHandler(handlers.on_other, filters.incoming), group=0)
    return handlers
