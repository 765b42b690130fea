"""The one builder of signed /stream and /watch links, used by the API, the WebSocket push, the
player page and the bot alike, so that every part gives the same link for the same row."""

from __future__ import annotations

from urllib.parse import quote

from db import DownloadRow
from webstreamer.signing import LinkSigner


def can_stream(row: DownloadRow) -> bool:
    """Whether /stream may answer for this row (the route still checks the bytes on disk).

    A completed download is served from disk; a Telegram file is served from Telegram itself
    (that is how aria2 fetches it), so its link works before the local copy is complete.
    """
    return row.status == "completed" or row.source_type == "telegram"


def file_name_of(row: DownloadRow) -> str:
    return row.file_name or "file"


class StreamLinks:
    """Signed links to a row's bytes, on the public base URL (or loopback, for aria2)."""

    def __init__(self, signer: LinkSigner, base_url: str) -> None:
        self.signer = signer
        self.base_url = base_url.rstrip("/")

    def reconfigure(self, signer: LinkSigner, base_url: str) -> None:
        """Apply a reloaded `web.link_expiry` or `web.public_url` to every holder at once."""
        self.signer = signer
        self.base_url = base_url.rstrip("/")

    def stream_url(self, row: DownloadRow) -> str | None:
        """The whole download's bytes: None for a torrent (its files have links of their own)."""
        if not can_stream(row) or row.files:
            return None
        return self.base_url + self.signer.stream_path(row.id, file_name_of(row))

    def watch_url(self, row: DownloadRow) -> str | None:
        if not can_stream(row) or row.files:
            return None
        return self.base_url + self.signer.watch_path(row.id)

    def file_url(self, row: DownloadRow, index: int, path: str) -> str | None:
        """One file of a completed torrent, by aria2's 1-based index."""
        if row.status != "completed":
            return None
        name = path.rsplit("/", 1)[-1]
        return self.base_url + self.signer.stream_path(row.id, name, index=index)

    @staticmethod
    def player_source(download_id: int, name: str, query: str, index: int | None = None) -> str:
        """The relative stream path the player page plays, reusing the page's own signature."""
        middle = f"{index}/" if index is not None else ""
        return f"/stream/{download_id}/{middle}{quote(name or 'file', safe='')}?{query}"

    def loopback_url(self, row: DownloadRow, host: str, port: int) -> str:
        """A never-expiring link on our own listener: how aria2 fetches a Telegram file."""
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        path = self.signer.stream_path(row.id, file_name_of(row), lifetime=0)
        return f"http://{host}:{port}{path}"
