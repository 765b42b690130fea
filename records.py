"""The store's records: rows as read, jobs as written, repairs, and the payloads of hub events.

Plain frozen data, importable by the store (db.py), the event hub and every caller without an
import circle: this module imports nothing of the project.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, TypedDict

SourceType = Literal["telegram", "http", "ftp", "magnet", "torrent"]


@dataclass(frozen=True)
class TgMediaRecord:
    """Telegram media metadata, converted from a Pyrogram message by the bot."""

    file_unique_id: str
    file_id: str
    chat_id: int
    message_id: int
    media_type: str
    sender_id: int | None = None
    sender_name: str | None = None
    file_name: str | None = None
    mime_type: str | None = None
    file_size: int | None = None
    duration: int | None = None
    width: int | None = None
    height: int | None = None
    caption: str | None = None
    media_group_id: str | None = None
    message_date: str | None = None
    dc_id: int | None = None


@dataclass(frozen=True)
class TorrentFile:
    index: int
    path: str
    length: int
    selected: bool = True


@dataclass(frozen=True)
class NewDownload:
    """Everything known about a job before aria2 sees it."""

    source_type: SourceType
    source_key: str
    source_url: str | None = None
    file_name: str | None = None
    total_length: int = 0
    file_unique_id: str | None = None
    owner_id: int | None = None
    chat_id: int | None = None
    message_id: int | None = None
    group_key: str | None = None
    torrent_data: bytes | None = None
    info_hash: str | None = None


class DownloadRow(NamedTuple):
    """A `downloads` row as read. Rows are named tuples, not dataclasses: a poll cycle builds one
    per changed download (a thousand at a time), and a tuple is built several times faster."""

    id: int
    gid: str | None
    source_type: str
    source_key: str
    source_url: str | None
    status: str
    file_name: str | None
    local_path: str | None
    total_length: int
    completed_length: int
    download_speed: int
    error_message: str | None
    error_code: str | None
    file_unique_id: str | None
    owner_id: int | None
    chat_id: int | None
    message_id: int | None
    group_key: str
    progress_message_id: int | None
    info_hash: str | None
    files: tuple[TorrentFile, ...]
    media_info: dict[str, Any] | None  # ffprobe's JSON, as probed
    created_at: str
    started_at: str | None
    completed_at: str | None
    updated_at: str
    has_torrent_data: bool = False
    node: str | None = None  # the node holding the job (None: a single node's store)


# What a job may ask done to its file before uploading it: extract an archive, zip a folder.
ARCHIVE_ACTIONS = ("extract", "zip")


class ArchiveRequest(NamedTuple):
    """The archive step asked for with a new job (`action` of ARCHIVE_ACTIONS)."""

    action: str
    password: str | None = None


class ArchiveOption(NamedTuple):
    """A job's archive step: the action, the password (until used), what it produced."""

    download_id: int
    action: str
    password: str | None
    prepared_path: str | None


class UploadRow(NamedTuple):
    """An `uploads` row as read (a named tuple, like `DownloadRow`)."""

    id: int
    download_id: int
    upload_target: str
    target_type: str
    status: str
    remote_path: str | None
    uploaded_size: int
    total_size: int
    upload_speed: float
    retry_count: int
    max_retries: int
    failure_reason: str | None
    error_message: str | None
    error_code: str | None
    verified_size: int | None
    verified_hash: str | None
    verified_at: str | None
    next_attempt_at: str | None
    created_at: str
    started_at: str | None
    completed_at: str | None
    cleaned_at: str | None
    updated_at: str
    public_link: str | None = None  # the remote's link to the uploaded file, if it makes one


class NodeRow(NamedTuple):
    """A `nodes` row: one MistRelay node of a cluster, as its last heartbeat left it."""

    name: str
    instance: str  # a random id of the running process: tells a restart from a second node
    public_url: str
    slots: int  # aria2.max_concurrent_downloads
    running: int  # jobs it holds that are pending, waiting or downloading
    disk_free: int  # bytes free in its download folder
    leader: bool  # it runs the Telegram bot
    started_at: str
    heartbeat_at: str
    stopped_at: str | None


NodeState = Literal["alive", "dead", "stopped"]
# (node holding a job, action, download or upload id): the action done by that node's service.
HolderAction = Callable[[str, str, int], Awaitable[None]]


class NodeStatus(NamedTuple):
    """A node as the cluster sees it now: its row, whether it lives, and how old its heartbeat
    is (seconds)."""

    row: NodeRow
    state: NodeState
    heartbeat_age: float
    is_self: bool


@dataclass(frozen=True)
class NodeHeartbeat:
    """What a node reports about itself on each heartbeat."""

    name: str
    instance: str
    public_url: str
    slots: int
    disk_free: int
    leader: bool


class WebSession(NamedTuple):
    """A signed-in dashboard session, kept on the server (the cookie holds only its secret,
    `token_hash` is that secret's SHA-256)."""

    token_hash: str
    created_at: str
    last_used_at: str
    expires_at: str
    revoked_at: str | None
    address: str | None
    user_agent: str | None
    # The Telegram user a one-time sign-in link made it for (None: signed in with web.token).
    user_id: int | None = None


class ApiToken(NamedTuple):
    """A personal API token: the store keeps its SHA-256 only (the token is shown once)."""

    token_hash: str
    user_id: int | None  # the Telegram user it acts for (None: made with web.token)
    name: str
    created_at: str
    last_used_at: str | None
    revoked_at: str | None


class SettingsChange(NamedTuple):
    """One live setting changed at run time: who changed it (``web:<session>``, ``api`` or
    ``telegram:<user id>``), when, and its values before and after (secrets as ``***``)."""

    id: int
    changed_at: str
    changed_by: str
    key: str
    old_value: str
    new_value: str


class BotNotice(NamedTuple):
    """What the bot owes a chat for a download that reached a final status (`kind`: completed,
    failed or cancelled): recorded with the status change, delivered once."""

    id: int
    download_id: int
    chat_id: int
    kind: str
    created_at: str


@dataclass(frozen=True)
class ProgressUpdate:
    gid: str
    completed_length: int
    total_length: int
    download_speed: int


@dataclass(frozen=True)
class HistoryEntry:
    entity: str
    entity_id: int
    from_status: str | None
    to_status: str
    reason: str | None
    at: str


@dataclass
class DownloadGroup:
    group_key: str
    source_type: str
    media_group_id: str | None
    downloads: list[DownloadRow] = field(default_factory=list)


@dataclass(frozen=True)
class DownloadSearch:
    """The filters of the flat download list; None (or an empty name) = any."""

    name: str | None = None  # a part of the file name, whatever the letter case
    status: str | None = None
    source: str | None = None  # a source type
    target: str | None = None  # an upload target the job has an upload to
    before: int | None = None  # only ids below this one (the next page)
    owner_id: int | None = None  # only this Telegram user's jobs (a user's own dashboard)


# --- repairs (the consistency check) -----------------------------------------------------------


@dataclass(frozen=True)
class DownloadChange:
    """One conditional change of a download row, applied by `apply_download_changes`."""

    download_id: int
    expected_status: str  # left alone if the row's status differs now
    expected_gid: str | None  # left alone if the row's gid differs now
    reason: str  # written to the status history
    target: str | None = None  # new status, through the machine; None = no status change
    columns: Mapping[str, object] = field(default_factory=dict)  # set with the change
    new_gid: str | None = None  # follow a new gid (magnet metadata → real download)
    cancel_unstarted_uploads: bool = False  # uploads in waiting_download/pending/paused
    skip_if_error_code_in: frozenset[str] = frozenset()  # left alone when already recorded


@dataclass(frozen=True)
class ChangeOutcome:
    download_id: int
    applied: bool
    detail: str  # 'downloading → completed', 'left alone: the download no longer exists', …


# --- hub event payloads ------------------------------------------------------------------------


class DownloadSnapshot(NamedTuple):
    """A download as committed, with its uploads (read in the committing transaction)."""

    row: DownloadRow
    uploads: tuple[UploadRow, ...]


@dataclass(frozen=True)
class DownloadRemoved:
    download_id: int | None  # None: every download was removed


class DownloadStatistics(TypedDict):
    total: int
    by_status: dict[str, int]
    total_bytes: int
    completed_bytes: int
    download_speed: int


class UploadStatistics(TypedDict):
    total: int
    by_status: dict[str, int]
    by_target: dict[str, dict[str, int]]
    total_bytes: int
    upload_speed: float
    cleaned: int


class Statistics(TypedDict):
    downloads: DownloadStatistics
    uploads: UploadStatistics


EventData = DownloadSnapshot | DownloadRemoved | UploadRow | Statistics


@dataclass(frozen=True)
class ImportedUpload:
    """An upload row of another store, mapped into ours (see importer.py)."""

    origin: str  # "upload:<id>|<created_at>" in the other store: imported once
    upload_target: str
    target_type: str
    status: str
    reason: str  # the history row's reason
    remote_path: str | None = None
    uploaded_size: int = 0
    total_size: int = 0
    retry_count: int = 0
    max_retries: int = 3
    failure_reason: str | None = None
    error_message: str | None = None
    error_code: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    cleaned_at: str | None = None


@dataclass(frozen=True)
class ImportedDownload:
    """A download row of another store, mapped into ours, with its uploads."""

    origin: str  # "download:<id>|<created_at>" in the other store: imported once
    new: NewDownload
    status: str
    reason: str  # the history row's reason
    local_path: str | None = None
    completed_length: int = 0
    files: tuple[TorrentFile, ...] = ()
    error_message: str | None = None
    error_code: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    completed_at: str | None = None
    uploads: tuple[ImportedUpload, ...] = ()


@dataclass(frozen=True)
class ImportBatch:
    """What one import writes, in one transaction."""

    media: tuple[TgMediaRecord, ...] = ()
    downloads: tuple[ImportedDownload, ...] = ()
    # Uploads of downloads imported by an earlier run: (our download id, the upload).
    late_uploads: tuple[tuple[int, ImportedUpload], ...] = ()


@dataclass(frozen=True)
class ImportResult:
    media: int
    downloads: int
    uploads: int
