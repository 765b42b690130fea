"""aria2's view of a job mapped onto its download row: ONE pure decision.

:func:`plan` says what an `Aria2Status` asks of a row; it reads nothing and writes nothing. The
download manager applies the decision through the store (for notifications and the poller alike),
and the consistency check compares with it and turns it into a repair.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from aria2_client.models import Aria2Status, human_size
from aria2_client.sources import safe_file_name
from records import DownloadChange, DownloadRow, ProgressUpdate, TorrentFile

# Rows that aria2 does not drive: not handed to it yet, or final.
NOT_DRIVEN = frozenset({"pending", "completed", "failed", "cancelled"})


@dataclass(frozen=True)
class FollowGid:
    """aria2 continued a magnet's metadata job as a new gid: the row follows it."""

    new_gid: str


@dataclass(frozen=True)
class Complete:
    """aria2 holds every byte. From `waiting` or `paused` the row passes through `downloading`."""

    local_path: str | None
    total_length: int


@dataclass(frozen=True)
class Fail:
    message: str
    code: str | None


@dataclass(frozen=True)
class Oversized:
    """The job turned out larger than `aria2.max_download_size`: stop it and fail the row."""

    total_length: int
    limit: int


@dataclass(frozen=True)
class Move:
    """aria2 started (`downloading`), resumed (`waiting`), paused or removed (`cancelled`) it."""

    target: Literal["downloading", "waiting", "paused", "cancelled"]


StatusChange = FollowGid | Complete | Fail | Oversized | Move


@dataclass(frozen=True)
class RowDetails:
    """Names, path, size and torrent file list learnt from aria2 (no status change)."""

    file_name: str | None
    local_path: str | None
    total_length: int | None
    files: tuple[TorrentFile, ...] | None


@dataclass(frozen=True)
class RowSync:
    """What aria2's view asks of one row; all None: nothing."""

    change: StatusChange | None = None
    details: RowDetails | None = None
    progress: ProgressUpdate | None = None


def plan(row: DownloadRow, status: Aria2Status, max_download_size: int = 0) -> RowSync:
    """The decision for `row` from aria2's `status` of its gid (0 = no size limit)."""
    if row.status in NOT_DRIVEN:
        return RowSync()
    if status.followed_by:
        return RowSync(FollowGid(status.followed_by[0]))
    details = row_details(row, status)
    if max_download_size and status.total_length > max_download_size and not status.is_metadata:
        return RowSync(Oversized(status.total_length, max_download_size), details)
    if status.status == "complete" or (status.status == "active" and _torrent_done(status)):
        if status.is_metadata or status.completed_length != status.total_length:
            return RowSync(details=details)
        return RowSync(Complete(local_path(status), status.total_length), details)
    if status.status == "error":
        message = describe_aria2_error(
            status.error_code, status.error_message, ftp=row.source_type == "ftp"
        )
        return RowSync(Fail(message, status.error_code), details)
    if status.status == "removed":
        return RowSync(Move("cancelled"), details)
    progress = ProgressUpdate(
        status.gid, status.completed_length, status.total_length, status.download_speed
    )
    return RowSync(_move(row.status, status), details, progress)


_MOVE_REASONS = {
    "downloading": "aria2 started",
    "waiting": "resumed",
    "paused": "paused",
    "cancelled": "removed from aria2",
}
_STOPS_SPEED = frozenset({"completed", "failed", "cancelled", "paused"})


def store_change(row: DownloadRow, change: StatusChange, *, note: str = "") -> DownloadChange:
    """`change` as the store's conditional change of `row` (left alone if the row has moved on
    since it was read). `note` is added to the history's reason."""
    target: str | None
    columns: dict[str, object] = {}
    new_gid: str | None = None
    match change:
        case FollowGid(gid):
            target, reason, new_gid = None, f"followed {row.gid}", gid
        case Complete(path, total):
            target, reason = "completed", "aria2 completed"
            columns = {"local_path": path, "total_length": total, "completed_length": total}
        case Fail(message, code):
            target, reason = "failed", message
            columns = {"error_message": message, "error_code": code}
        case Oversized(total, limit):
            target, reason = "failed", too_large_message(total, limit)
            columns = {"error_message": reason, "error_code": "too_large"}
        case Move(move_target):
            target, reason = move_target, _MOVE_REASONS[move_target]
    if target in _STOPS_SPEED:
        columns["download_speed"] = 0
    return DownloadChange(
        row.id,
        row.status,
        row.gid,
        f"{reason} ({note})" if note else reason,
        target=target,
        columns=columns,
        new_gid=new_gid,
    )


def too_large_message(size: int, limit: int) -> str:
    return (
        f"{human_size(size)} is larger than the limit of {human_size(limit)}"
        " (aria2.max_download_size)"
    )


def _move(current: str, status: Aria2Status) -> Move | None:
    if status.status == "active" and current != "downloading":
        return Move("downloading")
    if status.status == "waiting" and current == "paused":
        return Move("waiting")
    if status.status == "paused" and current in ("waiting", "downloading"):
        return Move("paused")
    return None


def _torrent_done(status: Aria2Status) -> bool:
    """A torrent may stay `active` (seeding) once every byte is there."""
    return (
        status.is_torrent
        and not status.is_metadata
        and status.total_length > 0
        and status.completed_length == status.total_length
    )


def local_path(status: Aria2Status) -> str | None:
    """Where aria2 puts the bytes: a multi-file torrent's folder, else the one file's path."""
    if status.is_torrent and status.bittorrent_name and len(status.files) > 1:
        # The folder aria2 writes into, as its files' paths say: a torrent added as a file gets
        # the cleaned name (index-out); a magnet's names are only known once aria2 has them.
        first = PurePosixPath(status.files[0].path)
        base = PurePosixPath(status.dir)
        if first.is_relative_to(base) and len(first.relative_to(base).parts) > 1:
            return str(Path(status.dir) / first.relative_to(base).parts[0])
        return str(Path(status.dir) / safe_file_name(status.bittorrent_name, "torrent"))
    if status.files and status.files[0].path:
        return status.files[0].path
    return None


def row_details(row: DownloadRow, status: Aria2Status) -> RowDetails | None:
    """What aria2 knows about the job's files that the row does not record yet (else None)."""
    if not status.files or status.is_metadata:
        return None
    first = status.files[0].path
    raw_name = status.bittorrent_name or (PurePosixPath(first).name if first else None)
    name = safe_file_name(raw_name) if raw_name else None
    path = local_path(status)
    files: tuple[TorrentFile, ...] | None = None
    if status.is_torrent and not row.files:
        base = PurePosixPath(status.dir)
        files = tuple(
            TorrentFile(f.index, _relative(f.path, base), f.length, f.selected)
            for f in status.files
        )
    if (
        (name and (name != row.file_name or path != row.local_path))
        or files is not None
        or (status.total_length and status.total_length != row.total_length)
    ):
        return RowDetails(
            file_name=name,
            local_path=path,
            total_length=status.total_length or None,
            files=files,
        )
    return None


def _relative(path: str, base: PurePosixPath) -> str:
    pure = PurePosixPath(path)
    return str(pure.relative_to(base)) if pure.is_relative_to(base) else pure.name


# aria2's error codes (its manual, "EXIT STATUS"), said in words a user understands.
ARIA2_ERRORS = {
    "2": "timed out",
    "3": "not found on the server",
    "5": "too slow",
    "6": "network problem",
    "9": "not enough disk space",
    "13": "a file of that name already exists",
    "16": "could not create the file",
    "17": "file input/output error",
    "18": "could not create the folder",
    "19": "host name could not be resolved",
    "22": "bad HTTP response header",
    "23": "too many redirects",
    "24": "authorization failed",
    "25": "the torrent could not be parsed",
    "26": "the torrent is corrupted",
    "27": "bad magnet link",
    "32": "checksum validation failed",
}


# FTP replies aria2 reports only as "status=N" (under its catch-all code 1).
FTP_REPLIES = {
    "421": "the FTP server refused the connection (too many users?)",
    "430": "the FTP server refused the user or password",
    "530": "the FTP server refused the user or password",
}
_REPLY_STATUS = re.compile(r"status=(\d{3})\b")


def describe_aria2_error(code: str | None, message: str | None, *, ftp: bool = False) -> str:
    """A readable failure reason: what the code means, then aria2's own words. `ftp`: the job
    is an FTP download, whose server's refusals aria2 gives as bare reply codes."""
    detail = (message or "").strip()
    if "No space left" in detail or "ENOSPC" in detail:
        code = "9"
    reply = _REPLY_STATUS.search(detail)
    if reply and reply.group(1) == "407":
        meaning: str | None = "a proxy refused the credentials it was given (see aria2.proxy)"
    else:
        meaning = FTP_REPLIES.get(reply.group(1)) if reply and ftp else None
    meaning = meaning or ARIA2_ERRORS.get(code or "")
    if meaning and detail:
        return f"{meaning} ({detail})"
    return meaning or detail or f"aria2 error {code}"
