"""Typed records for what aria2 reports, and the human-readable formatting the front ends share.

aria2's JSON-RPC returns every number as a string and leaves out keys that do not apply, so every
parser here converts and tolerates missing keys.
"""

from __future__ import annotations

import math
import posixpath
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args
from urllib.parse import unquote, urlsplit

Aria2State = Literal["active", "waiting", "paused", "error", "complete", "removed"]
ARIA2_STATES: tuple[str, ...] = get_args(Aria2State)

# The keys a poller asks for: enough for progress, reconciliation (followedBy, belongsTo) and names,
# without aria2's bitfield, which grows with the number of pieces.
STATUS_KEYS: tuple[str, ...] = (
    "gid",
    "status",
    "totalLength",
    "completedLength",
    "downloadSpeed",
    "uploadSpeed",
    "errorCode",
    "errorMessage",
    "followedBy",
    "following",
    "belongsTo",
    "dir",
    "files",
    "bittorrent",
    "infoHash",
    "seeder",
    "connections",
)

# What the poller reads for every download each cycle: progress and state only. File lists and
# torrent details are fetched (with STATUS_KEYS) only for the few downloads that need them.
PROGRESS_KEYS: tuple[str, ...] = (
    "gid",
    "status",
    "totalLength",
    "completedLength",
    "downloadSpeed",
    "errorCode",
    "errorMessage",
    "followedBy",
)

METADATA_PREFIX = "[METADATA]"


def new_gid() -> str:
    """A gid for aria2 to take a new job under: 16 hex digits, never all zeros (reserved)."""
    while (gid := secrets.token_hex(8)) == "0" * 16:
        pass
    return gid


def _to_int(value: Any, default: int = 0) -> int:
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() == "true"


def _to_optional_str(value: Any) -> str | None:
    if value is None or value == "":
        return None
    return str(value)


def _uri_basename(uri: str) -> str:
    path = urlsplit(uri).path
    return unquote(posixpath.basename(path.rstrip("/")))


@dataclass(frozen=True)
class Aria2File:
    """One file of a download, as `aria2.getFiles` or the `files` key of `tellStatus` gives it."""

    index: int
    path: str
    length: int
    completed_length: int
    selected: bool
    uris: tuple[str, ...] = ()

    @classmethod
    def from_struct(cls, d: Mapping[str, Any]) -> Aria2File:
        uris: list[str] = []
        for entry in d.get("uris") or ():
            if isinstance(entry, Mapping) and entry.get("uri"):
                uris.append(str(entry["uri"]))
        return cls(
            index=_to_int(d.get("index")),
            path=str(d.get("path") or ""),
            length=_to_int(d.get("length")),
            completed_length=_to_int(d.get("completedLength")),
            selected=_to_bool(d.get("selected", "true")),
            uris=tuple(dict.fromkeys(uris)),
        )

    @property
    def name(self) -> str:
        """Base name of the file on disk, else of its first URI; empty when aria2 knows neither."""
        if self.path:
            return posixpath.basename(self.path)
        if self.uris:
            return _uri_basename(self.uris[0])
        return ""


@dataclass(frozen=True)
class Aria2Status:
    """One download as aria2 reports it (`tellStatus` / `tellActive` / ... with `STATUS_KEYS`)."""

    gid: str
    status: Aria2State
    total_length: int = 0
    completed_length: int = 0
    download_speed: int = 0
    upload_speed: int = 0
    error_code: str | None = None
    error_message: str | None = None
    followed_by: tuple[str, ...] = ()
    following: str | None = None
    belongs_to: str | None = None
    dir: str = ""
    files: tuple[Aria2File, ...] = ()
    bittorrent_name: str | None = None
    info_hash: str | None = None
    seeder: bool = False
    connections: int = 0
    # "single" or "multi" for a torrent whose metadata is known; None otherwise.
    bittorrent_mode: str | None = None
    has_bittorrent: bool = False

    @classmethod
    def from_struct(cls, d: Mapping[str, Any]) -> Aria2Status:
        raw_status = str(d.get("status") or "")
        if raw_status not in ARIA2_STATES:
            raise ValueError(f"unknown aria2 status {raw_status!r}")
        bittorrent = d.get("bittorrent")
        bt_name: str | None = None
        bt_mode: str | None = None
        if isinstance(bittorrent, Mapping):
            info = bittorrent.get("info")
            if isinstance(info, Mapping):
                bt_name = _to_optional_str(info.get("name"))
            bt_mode = _to_optional_str(bittorrent.get("mode"))
        files = tuple(
            Aria2File.from_struct(f) for f in d.get("files") or () if isinstance(f, Mapping)
        )
        return cls(
            gid=str(d.get("gid") or ""),
            status=cast(Aria2State, raw_status),
            total_length=_to_int(d.get("totalLength")),
            completed_length=_to_int(d.get("completedLength")),
            download_speed=_to_int(d.get("downloadSpeed")),
            upload_speed=_to_int(d.get("uploadSpeed")),
            error_code=_to_optional_str(d.get("errorCode")),
            error_message=_to_optional_str(d.get("errorMessage")),
            followed_by=tuple(str(g) for g in d.get("followedBy") or ()),
            following=_to_optional_str(d.get("following")),
            belongs_to=_to_optional_str(d.get("belongsTo")),
            dir=str(d.get("dir") or ""),
            files=files,
            bittorrent_name=bt_name,
            info_hash=_to_optional_str(d.get("infoHash")),
            seeder=_to_bool(d.get("seeder", "false")),
            connections=_to_int(d.get("connections")),
            bittorrent_mode=bt_mode,
            has_bittorrent=isinstance(bittorrent, Mapping),
        )

    @property
    def progress(self) -> float:
        """Fraction done, 0..1; a completed download with unknown length counts as 1."""
        if self.total_length > 0:
            return min(1.0, max(0.0, self.completed_length / self.total_length))
        return 1.0 if self.status == "complete" else 0.0

    def progress_string(self) -> str:
        return f"{self.progress * 100:.2f}%"

    @property
    def remaining_length(self) -> int:
        return max(0, self.total_length - self.completed_length)

    @property
    def eta_seconds(self) -> int | None:
        """Seconds left at the current speed; None when the speed or the length is unknown."""
        if self.status == "complete":
            return 0
        if self.total_length <= 0 or self.download_speed <= 0:
            return None
        return math.ceil(self.remaining_length / self.download_speed)

    def eta_string(self) -> str:
        return format_duration(self.eta_seconds)

    @property
    def name(self) -> str:
        """The torrent's name, else the first file's base name, else the first URI's; may be ''."""
        if self.bittorrent_name:
            return self.bittorrent_name
        for file in self.files[:1]:
            if file.path:
                return posixpath.basename(file.path)
            if file.uris:
                return _uri_basename(file.uris[0])
        return ""

    @property
    def is_torrent(self) -> bool:
        return self.has_bittorrent or self.info_hash is not None

    @property
    def is_metadata(self) -> bool:
        """A magnet's metadata download, which aria2 follows with the real torrent's gid."""
        return bool(self.files) and self.files[0].path.startswith(METADATA_PREFIX)

    @property
    def is_finished(self) -> bool:
        """aria2 will do nothing more for this gid by itself (it may still seed if active)."""
        return self.status in ("complete", "error", "removed")


@dataclass(frozen=True)
class Aria2Notification:
    """A WebSocket notification: `event` without its "aria2." prefix, e.g. "onDownloadStart"."""

    event: str
    gid: str

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> list[Aria2Notification]:
        """All notifications in one JSON-RPC notification message (aria2 sends one gid each)."""
        method = message.get("method")
        if not isinstance(method, str):
            return []
        event = method.removeprefix("aria2.")
        found: list[Aria2Notification] = []
        for param in message.get("params") or ():
            if isinstance(param, Mapping) and param.get("gid"):
                found.append(cls(event=event, gid=str(param["gid"])))
        return found


_SIZE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_size(n: float | int | None) -> str:
    """Bytes in binary units: 0 -> "0 B", 1536 -> "1.5 KiB", 1572864 -> "1.5 MiB"."""
    value = float(n or 0)
    sign = "-" if value < 0 else ""
    value = abs(value)
    unit_index = 0
    while value >= 1024 and unit_index < len(_SIZE_UNITS) - 1:
        value /= 1024
        unit_index += 1
    if unit_index == 0:
        return f"{sign}{int(value)} B"
    return f"{sign}{value:.1f} {_SIZE_UNITS[unit_index]}"


def human_speed(n: float | int | None) -> str:
    """Bytes per second: 1572864 -> "1.5 MiB/s"."""
    return f"{human_size(n)}/s"


def format_duration(seconds: int | float | None) -> str:
    """None -> "-", 5 -> "5s", 65 -> "1m 05s", 3725 -> "1h 02m", 90000 -> "1d 01h"."""
    if seconds is None or seconds < 0:
        return "-"
    total = math.ceil(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"
