"""JSON shapes of downloads and uploads, shared by the REST API and the WebSocket push."""

from __future__ import annotations

from typing import Any

from db import DownloadRow, HistoryEntry, UploadRow
from webstreamer.server import AppContext

_HIDDEN_DOWNLOAD_FIELDS = ("has_torrent_data",)


def can_stream(row: DownloadRow) -> bool:
    """Whether /stream may answer for this row (the route still checks the bytes on disk)."""
    return row.status == "completed" or row.source_type == "telegram"


def download_json(
    ctx: AppContext,
    row: DownloadRow,
    uploads: list[UploadRow] | None = None,
    history: list[HistoryEntry] | None = None,
) -> dict[str, Any]:
    data = row.to_json()
    for name in _HIDDEN_DOWNLOAD_FIELDS:
        data.pop(name, None)
    data["uploads"] = [upload_json(u) for u in uploads or []]
    data["stream_url"] = None
    data["watch_url"] = None
    streamable = can_stream(row)
    if streamable and not row.files:
        data["stream_url"] = ctx.base_url + ctx.signer.stream_path(row.id, row.file_name or "file")
        data["watch_url"] = ctx.base_url + ctx.signer.watch_path(row.id)
    for entry in data["files"]:
        entry["stream_url"] = None
        if streamable and row.status == "completed":
            name = entry["path"].rsplit("/", 1)[-1]
            entry["stream_url"] = ctx.base_url + ctx.signer.stream_path(
                row.id, name, index=entry["index"]
            )
    if history is not None:
        data["history"] = [
            {"from": h.from_status, "to": h.to_status, "reason": h.reason, "at": h.at}
            for h in history
        ]
    return data


def upload_json(row: UploadRow) -> dict[str, Any]:
    return row.to_json()
