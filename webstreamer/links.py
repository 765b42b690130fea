"""The one builder of signed /stream and /watch links, used by the API, the WebSocket push, the
player page and the bot alike, so that every part gives the same link for the same row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from records import DownloadRow
from webstreamer.signing import LinkSigner


def can_stream(row: DownloadRow) -> bool:
    """Whether /stream may answer for this row (the route still checks the bytes on disk).

    A completed download is served from disk; a Telegram file is served from Telegram itself
    (that is how aria2 fetches it), so its link works before the local copy is complete.
    """
    return row.status == "completed" or row.source_type == "telegram"


def file_name_of(row: DownloadRow) -> str:
    return row.file_name or "file"


def no_other_node(node: str | None) -> str | None:
    """The origin of a single node's jobs: always its own base URL."""
    return None


class StreamLinks:
    """Signed links to a row's bytes, on the public URL of the node that holds the row (or on
    loopback, for aria2)."""

    def __init__(
        self,
        signer: LinkSigner,
        base_url: str,
        loopback_origin: str,
        origin_of: Callable[[str | None], str | None] = no_other_node,
    ) -> None:
        """`loopback_origin` is ``http://address:port`` of our own listener, as seen from this
        machine: it is fixed for the life of the process, unlike the reloadable base URL.
        `origin_of(row.node)` is the public URL of another node that holds a row, else None (the
        row's links are then on our own base URL)."""
        self.signer = signer
        self.base_url = base_url.rstrip("/")
        self.loopback_origin = loopback_origin
        self.origin_of = origin_of

    def origin(self, row: DownloadRow) -> str:
        """Where the row's public links point: the node holding it, or this one."""
        return self.origin_of(row.node) or self.base_url

    def reconfigure(self, *, link_expiry: int, base_url: str) -> None:
        """Apply a reloaded `web.link_expiry` or `web.public_url` to every holder at once."""
        self.signer = replace(self.signer, default_lifetime=link_expiry)
        self.base_url = base_url.rstrip("/")

    def stream_url(self, row: DownloadRow) -> str | None:
        """The whole download's bytes: None for a torrent (its files have links of their own)."""
        if not can_stream(row) or row.files:
            return None
        return self.origin(row) + self.signer.stream_path(row.id, file_name_of(row))

    def watch_url(self, row: DownloadRow) -> str | None:
        if not can_stream(row) or row.files:
            return None
        return self.origin(row) + self.signer.watch_path(row.id)

    def thumbnail_url(self, row: DownloadRow) -> str | None:
        """A frame of a completed single-file video (ffprobe found a picture in it)."""
        if row.status != "completed" or row.files or not (row.media_info or {}).get("width"):
            return None
        return f"{self.origin(row)}/thumb/{row.id}?{self.signer.query(row.id)}"

    def file_url(self, row: DownloadRow, index: int, path: str) -> str | None:
        """One file of a completed torrent, by aria2's 1-based index."""
        if row.status != "completed":
            return None
        name = path.rsplit("/", 1)[-1]
        return self.origin(row) + self.signer.stream_path(row.id, name, index=index)

    def player_source(self, download_id: int, name: str, index: int | None, expires: int) -> str:
        """The relative /stream link the /watch page plays. Both links sign the same (id, index,
        expiry), so the player's link holds exactly as long as the page's own."""
        return self.signer.stream_path(download_id, name, index, expires=expires)

    def loopback_url(self, row: DownloadRow) -> str:
        """A never-expiring link on our own listener: how aria2 fetches a Telegram file."""
        path = self.signer.stream_path(row.id, file_name_of(row), lifetime=0)
        return self.loopback_origin + path
