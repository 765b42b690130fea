"""The one JSON shape of downloads and uploads, shared by the REST API and the WebSocket push.

A download's JSON is every `DownloadRow` field but `has_torrent_data` (the password of a
`source_url` shown as ``***``; the store keeps it for the download), its `uploads`, its signed
`stream_url` / `watch_url` (null when not streamable), and `actions`: what the row allows now.
Of a torrent's files it carries `files_total` and the first `FILES_IN_ROW` (each with a
`stream_url` once completed); `file_json` shapes every page of `GET /api/downloads/{id}/files`.
An upload's JSON is every `UploadRow` field and its `actions`. A WebSocket `download_update`
carries exactly the list row of `GET /api/downloads`. `GET /api/cluster` answers
`cluster_json`: this node, the live leader and every node's last heartbeat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from configer import mask_url_passwords
from db import download_actions, upload_actions
from records import (
    DownloadRemoved,
    DownloadRow,
    DownloadSnapshot,
    EventData,
    HistoryEntry,
    NodeStatus,
    TorrentFile,
    UploadRow,
)
from webstreamer.links import StreamLinks

# A torrent's files in a download's JSON (lists, details and pushes alike); the rest are paged.
FILES_IN_ROW = 20


def download_json(
    links: StreamLinks,
    row: DownloadRow,
    uploads: Sequence[UploadRow],
    history: Sequence[HistoryEntry] | None = None,
) -> dict[str, Any]:
    data = row._asdict()
    del data["has_torrent_data"]
    if row.source_url:
        data["source_url"] = mask_url_passwords(row.source_url)
    data["files"] = [file_json(links, row, entry) for entry in row.files[:FILES_IN_ROW]]
    data["files_total"] = len(row.files)
    data["uploads"] = [upload_json(upload) for upload in uploads]
    data["stream_url"] = links.stream_url(row)
    data["watch_url"] = links.watch_url(row)
    data["thumbnail_url"] = links.thumbnail_url(row)
    data["actions"] = list(download_actions(row.status))
    if history is not None:
        data["history"] = [
            {"from": h.from_status, "to": h.to_status, "reason": h.reason, "at": h.at}
            for h in history
        ]
    return data


def file_json(links: StreamLinks, row: DownloadRow, entry: TorrentFile) -> dict[str, Any]:
    """One file of a torrent: index, path, length, selected, and its link once completed (none
    for a file left out of the choice)."""
    url = links.file_url(row, entry.index, entry.path) if entry.selected else None
    return {**asdict(entry), "stream_url": url}


def upload_json(row: UploadRow) -> dict[str, Any]:
    data = row._asdict()
    data["actions"] = list(upload_actions(row.status))
    return data


def event_json(links: StreamLinks, data: EventData) -> object:
    """The `data` of a WebSocket message for a hub event's record."""
    if isinstance(data, DownloadSnapshot):
        return download_json(links, data.row, data.uploads)
    if isinstance(data, DownloadRemoved):
        if data.download_id is None:
            return {"deleted_all": True}
        return {"id": data.download_id, "deleted": True}
    if isinstance(data, UploadRow):
        return upload_json(data)
    return data  # the statistics, already JSON-shaped


def node_json(status: NodeStatus) -> dict[str, Any]:
    row = status.row
    return {
        "name": row.name,
        "public_url": row.public_url,
        "state": status.state,
        "slots": row.slots,
        "running": row.running,
        "disk_free": row.disk_free,
        "heartbeat_age": status.heartbeat_age,
        "leader": row.leader,
        "started_at": row.started_at,
        "heartbeat_at": row.heartbeat_at,
        "self": status.is_self,
    }


def cluster_json(enabled: bool, node_name: str, nodes: Sequence[NodeStatus]) -> dict[str, Any]:
    """The cluster as one node sees it; the leader is the live node that runs the bot."""
    leader = next((n.row.name for n in nodes if n.row.leader and n.state == "alive"), None)
    return {
        "enabled": enabled,
        "node": node_name,
        "leader": leader,
        "nodes": [node_json(status) for status in nodes],
    }
