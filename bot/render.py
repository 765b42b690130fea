"""What the bot shows: texts and inline buttons made from records and a language, nothing else.

No I/O and no context here: every function takes the rows (and the links, statistics or settings
it shows) and returns text or markup, so each can be tested on its own. The buttons offered are
exactly the actions the store's tables allow for the row's status (`db.download_actions`,
`db.upload_actions`), the same ones the web page offers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

from pyrogram.types import BotCommand, InlineKeyboardButton, InlineKeyboardMarkup

from aria2_client.models import format_duration, human_size, human_speed
from bot.text import Language, translate
from configer import UploadTarget, mask_url_passwords
from db import ACTIVE_DOWNLOAD_STATUSES, download_actions, parse_utc, upload_actions
from records import DownloadRow, Statistics, UploadRow
from uploads.archives import archive_stem

BAR_WIDTH = 12
STATUS_PAGE_SIZE = 5
MAX_LINKS = 10  # stream links in one completion notice (a torrent's first files)
TEXT_LIMIT = 4000  # Telegram takes 4096 characters per message
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
_RUNNING = ("waiting", "downloading", "paused")

Markup = InlineKeyboardMarkup | None


@dataclass(frozen=True)
class Notice:
    """An end of a job the user hears about once: a download's or an upload's final state.
    `outbox_id` is the store's record of a download's notice (`bot_notices`), marked delivered
    once it has been sent."""

    entity: Literal["download", "upload"]
    entity_id: int
    status: str
    outbox_id: int | None = None


def clip(text: str) -> str:
    return text if len(text) <= TEXT_LIMIT else text[: TEXT_LIMIT - 1] + "…"


def progress_bar(done: int, total: int, width: int = BAR_WIDTH) -> str:
    if total <= 0:
        return "░" * width
    filled = min(width, max(0, done * width // total))
    return "█" * filled + "░" * (width - filled)


def percent(done: int | float, total: int | float) -> str:
    if total <= 0:
        return "?"
    return f"{min(100.0, done * 100 / total):.1f}%"


def eta_seconds(done: int, total: int, speed: float) -> float | None:
    if speed <= 0 or total <= 0 or done >= total:
        return None
    return (total - done) / speed


def status_name(lang: Language, status: str) -> str:
    """A download status in words (the page's words)."""
    return translate(lang, f"status.{status}")


def upload_status_name(lang: Language, status: str) -> str:
    return translate(lang, f"upload_status.{status}")


def public_address(url: str) -> str:
    """The dashboard's address without anything secret: no user info, query or fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# --- one job ------------------------------------------------------------------------------------


def shown_name(row: DownloadRow, fallback: str) -> str:
    """A job's name in a chat: its file name, else its link (a password in it masked)."""
    return row.file_name or (row.source_url and mask_url_passwords(row.source_url)) or fallback


def download_title(row: DownloadRow) -> str:
    icon = STATUS_ICONS.get(row.status, "•")
    return f"{icon} #{row.id} {shown_name(row, row.source_type)}"


def download_lines(lang: Language, row: DownloadRow) -> list[str]:
    """A download's progress: title, bar, sizes, speed and ETA; or its end state."""
    lines = [download_title(row)]
    total, done = row.total_length, row.completed_length
    if row.status in _RUNNING:
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
    elif row.status == "completed":
        lines.append(translate(lang, "bot.progress.completed", size=human_size(total)))
    elif row.status == "failed":
        lines.append(translate(lang, "bot.progress.failed", reason=row.error_message or "?"))
    else:
        lines.append(status_name(lang, row.status))
    return lines


def retry_wait(upload: UploadRow) -> int | None:
    """The wait in whole seconds an upload got when it failed and was put back to `pending` with
    `next_attempt_at`; None for any other upload. Measured from the row's own last change, not
    the clock: the text changes only when the row does, like the rest of a progress message."""
    if upload.status != "pending" or upload.next_attempt_at is None:
        return None
    due, failed_at = parse_utc(upload.next_attempt_at), parse_utc(upload.updated_at)
    if due is None or failed_at is None:
        return 0
    return max(0, math.ceil((due - failed_at).total_seconds()))


def upload_line(lang: Language, upload: UploadRow) -> str:
    icon = STATUS_ICONS.get(upload.status, "•")
    details: dict[str, object]
    wait = retry_wait(upload)
    if wait is not None:
        key = "bot.progress.upload_retrying"
        details = {
            "seconds": wait,
            "reason": _upload_reason(upload),
            "tries": upload.retry_count,
            "max_tries": upload.max_retries,
        }
    elif upload.status == "uploading":
        key = "bot.progress.upload_running"
        details = {
            "percent": percent(upload.uploaded_size, upload.total_size),
            "speed": human_speed(upload.upload_speed),
        }
    elif upload.status == "completed":
        key, details = "bot.progress.upload_done", {"remote_path": upload.remote_path or "-"}
    elif upload.status == "failed":
        key = "bot.progress.upload_failed"
        details = {
            "reason": _upload_reason(upload),
            "tries": upload.retry_count,
            "max_tries": upload.max_retries,
        }
    else:
        return f"{icon} {upload.upload_target}: {upload_status_name(lang, upload.status)}"
    return translate(lang, key, icon=icon, target=upload.upload_target, **details)


def _upload_reason(upload: UploadRow) -> str:
    return upload.error_message or upload.failure_reason or "?"


# A job may still ask for an archive step while it has not completed.
ARCHIVE_OPEN_STATUSES = ("pending", "waiting", "downloading", "paused")


def download_buttons(
    lang: Language, row: DownloadRow, origin: str = "", *, with_id: bool = False
) -> list[InlineKeyboardButton]:
    """The actions the download's status allows now, as inline buttons."""
    actions = download_actions(row.status)
    return _action_buttons(lang, "d", "", "#", row.id, actions, origin, with_id)


def archive_buttons(lang: Language, row: DownloadRow) -> list[InlineKeyboardButton]:
    """Until the job completes: extract an archive it downloads, or zip a torrent's folder,
    before uploading. Callback data is `a:<action>:<id>`."""
    if row.status not in ARCHIVE_OPEN_STATUSES:
        return []
    actions = []
    if archive_stem(row.file_name or "") is not None:
        actions.append("extract")
    if row.source_type in ("magnet", "torrent"):
        actions.append("zip")
    return [
        InlineKeyboardButton(
            translate(lang, f"bot.button.archive_{action}"), callback_data=f"a:{action}:{row.id}"
        )
        for action in actions
    ]


CHOICE_SOURCES = ("magnet", "torrent")


def offers_choice(row: DownloadRow) -> bool:
    """Whether the job's files may be chosen in the chat now: a live torrent or magnet whose
    files are known, more than one."""
    return (
        row.source_type in CHOICE_SOURCES
        and len(row.files) > 1
        and row.status in ACTIVE_DOWNLOAD_STATUSES
    )


def choice_button(lang: Language, row: DownloadRow) -> list[InlineKeyboardButton]:
    """The "Choose files" button that opens the chat's file chooser (bot.file_choice)."""
    if not offers_choice(row):
        return []
    label = translate(lang, "bot.button.choose_files")
    return [InlineKeyboardButton(label, callback_data=f"f:{row.id}:o")]


MAX_TARGET_LABEL = 40  # characters of a target's name on its button
TARGET_BUTTONS_PER_LINE = 3


def target_buttons(
    lang: Language, row: DownloadRow, targets: Sequence[str]
) -> list[list[InlineKeyboardButton]]:
    """With several upload targets, until the job completes: send it to one of them only, or
    keep it here only (otherwise the targets' `match` rules decide). Callback data is
    `t:<id>:<index in upload.targets>`, `t:<id>:-` for "keep here only"."""
    if len(targets) < 2 or row.status not in ARCHIVE_OPEN_STATUSES:
        return []
    buttons = [
        InlineKeyboardButton(
            translate(lang, "bot.button.target", name=name[:MAX_TARGET_LABEL]),
            callback_data=f"t:{row.id}:{index}",
        )
        for index, name in enumerate(targets)
    ]
    buttons.append(
        InlineKeyboardButton(translate(lang, "bot.button.keep_here"), callback_data=f"t:{row.id}:-")
    )
    return [
        buttons[first : first + TARGET_BUTTONS_PER_LINE]
        for first in range(0, len(buttons), TARGET_BUTTONS_PER_LINE)
    ]


def upload_buttons(
    lang: Language, upload: UploadRow, origin: str = "", *, with_id: bool = False
) -> list[InlineKeyboardButton]:
    actions = upload_actions(upload.status)
    return _action_buttons(lang, "u", "upload_", "↑", upload.id, actions, origin, with_id)


def _action_buttons(
    lang: Language,
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


def progress_message(
    lang: Language, row: DownloadRow, uploads: Sequence[UploadRow], targets: Sequence[str] = ()
) -> tuple[str, Markup]:
    """The text and buttons of a job's progress message: the download's actions, the choice of
    upload `targets` (names, when there are several), and a retry for each upload that ended
    without its file arriving."""
    lines = download_lines(lang, row)
    lines += [upload_line(lang, upload) for upload in uploads]
    keyboard: list[list[InlineKeyboardButton]] = []
    buttons = download_buttons(lang, row)
    if buttons:
        keyboard.append(buttons)
    archive = archive_buttons(lang, row)
    if archive:
        keyboard.append(archive)
    choice = choice_button(lang, row)
    if choice:
        keyboard.append(choice)
    keyboard += target_buttons(lang, row, targets)
    for upload in uploads:
        if upload.status in ("failed", "cancelled"):
            keyboard.append(upload_buttons(lang, upload, with_id=True))
    return "\n".join(lines), InlineKeyboardMarkup(keyboard) if keyboard else None


def markup_signature(markup: Markup) -> str:
    """What a markup shows and does, to tell whether an edit would change anything."""
    if markup is None:
        return ""
    return "|".join(
        f"{b.text}={b.callback_data!r}" for line in markup.inline_keyboard for b in line
    )


def notice_text(
    lang: Language,
    row: DownloadRow,
    uploads: Sequence[UploadRow],
    notice: Notice,
    links: Sequence[str] = (),
) -> str | None:
    """The one message that tells how a job ended (a failed upload is final); None when it has
    moved on since (retried by hand). `links` are the stream links of a completed download (at
    most MAX_LINKS; a torrent's further files are counted, not linked)."""
    name = shown_name(row, f"#{row.id}")
    if notice.entity == "download":
        if row.status != notice.status:
            return None
        if notice.status == "completed":
            text = translate(
                lang,
                "bot.notice.completed",
                id=row.id,
                name=name,
                size=human_size(row.total_length),
            )
            shown = list(links[:MAX_LINKS])
            hidden = max(len(row.files), len(links)) - len(shown)
            if hidden > 0:
                shown.append(f"… (+{hidden})")
            return clip("\n".join([text, *shown]))
        if notice.status == "failed":
            return translate(
                lang, "bot.notice.failed", id=row.id, name=name, reason=row.error_message or "?"
            )
        return translate(lang, "bot.notice.cancelled", id=row.id, name=name)
    upload = next((u for u in uploads if u.id == notice.entity_id), None)
    if upload is None or upload.status != notice.status:
        return None
    if upload.status == "completed":
        # The remote's own link where it made one (`rclone link`), else where the file lies.
        where = upload.public_link or upload.remote_path or "-"
        key, details = "bot.notice.uploaded", {"remote_path": where}
    else:
        key, details = "bot.notice.upload_failed", {"reason": _upload_reason(upload)}
    return translate(lang, key, id=row.id, name=name, target=upload.upload_target, **details)


# --- lists --------------------------------------------------------------------------------------


def status_page(lang: Language, rows: Sequence[DownloadRow], page: int) -> tuple[str, Markup]:
    """Active jobs, STATUS_PAGE_SIZE per page, each with its buttons; `page` is clamped."""
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
        navigation.append(_page_button(lang, "prev", page - 1))
    navigation.append(_page_button(lang, "refresh", page))
    if page < pages - 1:
        navigation.append(_page_button(lang, "next", page + 1))
    keyboard.append(navigation)
    return clip("\n\n".join(blocks)), InlineKeyboardMarkup(keyboard)


def _page_button(lang: Language, label: str, page: int) -> InlineKeyboardButton:
    return InlineKeyboardButton(translate(lang, f"bot.button.{label}"), callback_data=f"s:{page}")


def download_entry(lang: Language, row: DownloadRow) -> str:
    icon = STATUS_ICONS.get(row.status, "•")
    name = shown_name(row, row.source_type)
    detail = status_name(lang, row.status)
    if row.status in _RUNNING:
        detail += f" {percent(row.completed_length, row.total_length)}"
    if row.total_length:
        detail += f" · {human_size(row.total_length)}"
    if row.status == "failed" and row.error_message:
        detail += f" · {row.error_message[:80]}"
    return f"{icon} #{row.id} {name}\n    {detail}"


def downloads_list(lang: Language, rows: Sequence[DownloadRow]) -> str:
    if not rows:
        return translate(lang, "bot.downloads_empty")
    lines = [translate(lang, "bot.downloads_header", count=len(rows))]
    lines += [download_entry(lang, row) for row in rows]
    return clip("\n".join(lines))


def upload_entry(lang: Language, upload: UploadRow) -> str:
    icon = STATUS_ICONS.get(upload.status, "•")
    detail = upload_status_name(lang, upload.status)
    if upload.status == "uploading":
        detail += f" {percent(upload.uploaded_size, upload.total_size)}"
        detail += f" · {human_speed(upload.upload_speed)}"
    elif upload.status == "completed" and upload.remote_path:
        detail += f" → {upload.remote_path}"
    elif upload.status == "failed" or retry_wait(upload) is not None:
        reason = _upload_reason(upload)
        detail += f" ({upload.retry_count}/{upload.max_retries}) · {reason[:80]}"
    return f"{icon} ↑{upload.id} #{upload.download_id} → {upload.upload_target}\n    {detail}"


def uploads_page(lang: Language, uploads: Sequence[UploadRow]) -> tuple[str, Markup]:
    """Recent uploads, with a button for each action an upload allows (redraws the list)."""
    if not uploads:
        return translate(lang, "bot.uploads_empty"), None
    lines = [translate(lang, "bot.uploads_header", count=len(uploads))]
    keyboard: list[list[InlineKeyboardButton]] = []
    for upload in uploads:
        lines.append(upload_entry(lang, upload))
        buttons = upload_buttons(lang, upload, origin="l", with_id=True)
        if buttons:
            keyboard.append(buttons)
    return clip("\n".join(lines)), InlineKeyboardMarkup(keyboard) if keyboard else None


# --- the service --------------------------------------------------------------------------------


def stats_text(
    lang: Language,
    statistics: Statistics,
    disk: tuple[int, int] | None,
) -> str:
    """Counts, bytes and speeds; `disk` is (free, total) bytes of the download folder, if known."""
    downloads, uploads = statistics["downloads"], statistics["uploads"]
    by_status, up_status = downloads["by_status"], uploads["by_status"]
    if disk is None:
        disk_line = translate(lang, "bot.stats.disk_unknown")
    else:
        free, total = disk
        disk_line = translate(
            lang, "bot.stats.disk", free=human_size(free), total=human_size(total)
        )
    return "\n".join(
        [
            translate(lang, "bot.stats.header"),
            translate(
                lang,
                "bot.stats.downloads",
                total=downloads["total"],
                active=sum(by_status.get(s, 0) for s in ACTIVE_DOWNLOAD_STATUSES),
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
            disk_line,
        ]
    )


def targets_text(lang: Language, targets: Sequence[UploadTarget]) -> str:
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


def help_text(lang: Language, commands: Sequence[tuple[str, str]]) -> str:
    """`commands` is (name, arguments shown) in menu order."""
    lines = [translate(lang, "bot.help.header")]
    for name, args in commands:
        usage = f"/{name} {args}".strip()
        lines.append(f"{usage} — {translate(lang, f'bot.menu.{name}')}")
    lines.append("")
    lines.append(translate(lang, "bot.help.footer"))
    return "\n".join(lines)


def command_menu(lang: Language, commands: Sequence[tuple[str, str]]) -> list[BotCommand]:
    return [BotCommand(name, translate(lang, f"bot.menu.{name}")) for name, _args in commands]
