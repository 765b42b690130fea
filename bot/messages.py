"""Pyrogram messages as plain records: which media a message carries, its `tg_media` record, and
where it belongs (chat, album or message group)."""

from __future__ import annotations

import mimetypes
from datetime import timedelta
from typing import Any

from pyrogram import enums
from pyrogram.file_id import FileId
from pyrogram.types import Animation, Audio, Document, Message, Photo, Video, VideoNote, Voice

from records import TgMediaRecord

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

Media = Document | Video | Audio | Photo | Animation | Voice | VideoNote


def chat_id_of(message: Message) -> int:
    """Every message the handlers see belongs to a chat."""
    chat = message.chat
    if chat is None or chat.id is None:
        raise ValueError("a message without a chat")
    return int(chat.id)


def media_of(message: Message) -> tuple[str, Media] | None:
    """(kind, Pyrogram media object) of the first downloadable media in `message`."""
    for kind in MEDIA_KINDS:
        media = getattr(message, kind, None)
        if isinstance(media, Media) and media.file_unique_id:
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


def _file_name(kind: str, media: Media, message: Message, mime: str | None) -> str:
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
        chat_id=chat_id_of(message),
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


def is_torrent_document(message: Message) -> bool:
    document = message.document
    if document is None:
        return False
    name = (document.file_name or "").lower()
    return name.endswith(".torrent") or (document.mime_type or "") == _TORRENT_MIME


def is_private(message: Message) -> bool:
    return message.chat is not None and message.chat.type == enums.ChatType.PRIVATE
