"""`app.py import-upstream`: take the jobs of the relay bot MistRelay grew from into our store.

That bot keeps one SQLite file with the tables `tg_media`, `downloads`, `uploads` and
`config_settings` (the core spec describes them). Reading it never writes to it (it is opened
read-only). Each of its rows is mapped into ours, or reported with the reason it could not be:

- downloads: `completed`, `failed` and `cancelled` keep their status; an unfinished one
  (`pending`, `waiting`, `downloading`, `paused`) cannot be continued, as its aria2 job belongs
  to the other service, so it becomes `pending` here and downloads again from the start.
- uploads: finished ones keep their status (a `cleaned` one is `completed` with `cleaned_at`);
  an unfinished one waits for its download (`waiting_download`), or goes again (`pending`) when
  the file was found, or is `failed` with the reason when it cannot go (no file, no such target).
- `config_settings`: not imported (the configuration is `config.yaml`); their keys are listed.

With `--files DIR` (the download folder or a folder inside it), each completed download is
matched to a file or folder on disk: by name and size first, then by size alone, and where
several files of that size remain, by their content hash (identical copies are one match;
different contents are left unmatched, and said so). A completed download with no file found
is recorded as such (`error_code` file_missing), the way `app.py check` records a lost file.

Every imported row gets a history row saying "imported", and its origin is kept, so importing
the same database again only adds what is new there.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any

from aria2_client.sources import SourceError, parse_link, safe_file_name
from configer import UploadConfig
from db import ACTIVE_DOWNLOAD_STATUSES, StoreError, read_sqlite_tables
from files import confined_path
from records import (
    ImportBatch,
    ImportedDownload,
    ImportedUpload,
    ImportResult,
    NewDownload,
    SourceType,
    TgMediaRecord,
    TorrentFile,
)

FILE_MISSING = "file_missing"  # the code `app.py check` records a lost file with
_UNFINISHED_DOWNLOADS = frozenset(ACTIVE_DOWNLOAD_STATUSES)
_FINAL_DOWNLOADS = frozenset({"completed", "failed", "cancelled"})
_UNFINISHED_UPLOADS = frozenset({"pending", "waiting_download", "uploading", "paused"})
_FINAL_UPLOADS = {
    "completed": "completed",
    "cleaned": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
}
_UPSTREAM_TABLES = ("tg_media", "downloads", "uploads", "config_settings")
_HASH_CHUNK = 1024 * 1024
_MAX_TEXT = 4096  # characters kept of a free text (an error message) from the other store


class UpstreamError(Exception):
    """The other database cannot be read as the relay bot's store; the message says why."""


# --- reading the other store --------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """The rows of the other store, as plain mappings (columns it lacks are absent)."""

    path: Path
    media: Mapping[str, Mapping[str, Any]]
    downloads: Sequence[Mapping[str, Any]]
    uploads: Sequence[Mapping[str, Any]]
    settings: Sequence[str]


def read_upstream(path: Path) -> Upstream:
    """Every row of the relay bot's database at `path`, opened read-only (blocking: call it
    in a thread)."""
    try:
        tables, rows = read_sqlite_tables(path, _UPSTREAM_TABLES)
    except StoreError as exc:
        raise UpstreamError(str(exc)) from None
    if "downloads" not in tables:
        found = ", ".join(sorted(tables)) or "none"
        raise UpstreamError(
            f"{path}: has no downloads table (tables: {found}); not the relay bot's database"
        )
    media = {
        str(r["file_unique_id"]): r for r in rows.get("tg_media", []) if r.get("file_unique_id")
    }
    settings = sorted(str(r["key"]) for r in rows.get("config_settings", []) if r.get("key"))
    return Upstream(path, media, rows["downloads"], rows.get("uploads", []), settings)


# --- files on disk ------------------------------------------------------------------------------


@dataclass
class FileIndex:
    """The files and folders under one folder, found by name and by size; symlinks are left out
    (an imported row must not point outside the download folder)."""

    root: Path
    by_name: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))
    by_size: dict[int, list[Path]] = field(default_factory=lambda: defaultdict(list))
    sizes: dict[Path, int] = field(default_factory=dict)
    claimed: set[Path] = field(default_factory=set)
    hashes: dict[Path, str] = field(default_factory=dict)

    @classmethod
    def scan(cls, root: Path) -> FileIndex:
        index = cls(root)
        index._scan_folder(root)
        return index

    def _scan_folder(self, folder: Path) -> int:
        total = 0
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_symlink() or entry.name.endswith(".aria2"):
                    continue
                path = Path(entry.path)
                if entry.is_dir(follow_symlinks=False):
                    size = self._scan_folder(path)
                elif entry.is_file(follow_symlinks=False):
                    if Path(entry.path + ".aria2").exists():
                        continue  # aria2 never finished it
                    size = entry.stat(follow_symlinks=False).st_size
                else:
                    continue
                self.by_name[entry.name].append(path)
                self.by_size[size].append(path)
                self.sizes[path] = size
                total += size
        return total

    def match(self, name: str | None, size: int) -> tuple[Path | None, str]:
        """The unclaimed file or folder for a download of `name` and `size` bytes, and how it
        was found (or why not)."""
        free = [p for p in self.by_name.get(name or "", []) if p not in self.claimed]
        named = [p for p in free if size <= 0 or self.sizes[p] == size]
        if len(named) == 1:
            return self._claim(named[0]), "by name and size"
        if size <= 0:
            return None, "not found (no size recorded to match by)"
        pool = named or [p for p in self.by_size.get(size, []) if p not in self.claimed]
        files = [p for p in pool if p.is_file()]
        if not pool:
            return None, "not found"
        if len(pool) == 1:
            return self._claim(pool[0]), "by size"
        if len(files) != len(pool):
            return None, f"not matched: {len(pool)} files or folders of that size"
        digests = {self._digest(p) for p in files}
        if len(digests) == 1:
            return self._claim(sorted(files)[0]), "by content hash (identical copies)"
        return None, f"not matched: {len(files)} different files of that size"

    def _claim(self, path: Path) -> Path:
        self.claimed.add(path)
        return path

    def _digest(self, path: Path) -> str:
        if path not in self.hashes:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
            self.hashes[path] = digest.hexdigest()
        return self.hashes[path]

    def folder_files(self, folder: Path) -> tuple[TorrentFile, ...]:
        """A matched folder's files as a multi-file job lists them (paths from its parent)."""
        paths = sorted(p for p in self.sizes if folder in p.parents and p.is_file())
        return tuple(
            TorrentFile(i, str(p.relative_to(folder.parent)), self.sizes[p])
            for i, p in enumerate(paths, start=1)
        )


def files_root(files: Path, download_dir: Path) -> Path:
    """`files` resolved, if it is the download folder or inside it; else UpstreamError."""
    resolved = files.resolve()
    root = download_dir.resolve()
    if not resolved.is_dir():
        raise UpstreamError(f"--files {files}: not a folder")
    if resolved != root and confined_path(root, resolved) is None:
        raise UpstreamError(
            f"--files {files}: must be the download folder ({download_dir}) or a folder inside "
            "it, so that the imported files can be streamed, uploaded and cleaned up; move "
            "them there first"
        )
    return resolved


# --- mapping -----------------------------------------------------------------------------------


@dataclass
class ImportPlan:
    batch: ImportBatch
    already: int = 0  # rows an earlier import took
    unmapped: list[str] = field(default_factory=list)
    notes: Counter[str] = field(default_factory=Counter)
    settings: list[str] = field(default_factory=list)

    def lines(self, result: ImportResult | None = None) -> list[str]:
        """The report: what was imported (`result`), or in a dry run what would be, and what
        could not be, with why."""
        batch = self.batch
        if result is None:
            uploads = sum(len(d.uploads) for d in batch.downloads) + len(batch.late_uploads)
            lines = [
                f"Would import: {len(batch.downloads)} download(s), {uploads} upload(s), "
                f"{len(batch.media)} Telegram media row(s) (those not here yet)."
            ]
        else:
            lines = [
                f"Imported in one transaction: {result.downloads} download(s), "
                f"{result.uploads} upload(s), {result.media} Telegram media row(s)."
            ]
        lines += [f"  {what}: {count}" for what, count in sorted(self.notes.items())]
        if self.already:
            lines.append(f"Already imported before (left alone): {self.already} row(s).")
        if self.unmapped:
            lines.append(f"Not imported: {len(self.unmapped)} row(s):")
            lines += [f"  {line}" for line in self.unmapped]
        if self.settings:
            lines.append(
                "Settings not imported (the configuration is config.yaml): "
                + ", ".join(self.settings)
            )
        return lines


def plan_import(
    upstream: Upstream,
    *,
    imported: Mapping[str, int],
    active_sources: Iterable[str],
    uploads: UploadConfig,
    files: FileIndex | None,
) -> ImportPlan:
    """Map the other store's rows into ours (blocking when `files` needs hashing: call it in
    a thread)."""
    mapper = _Mapper(upstream, imported, set(active_sources), uploads, files)
    return mapper.plan()


class _Mapper:
    def __init__(
        self,
        upstream: Upstream,
        imported: Mapping[str, int],
        active_sources: set[str],
        uploads: UploadConfig,
        files: FileIndex | None,
    ) -> None:
        self.upstream = upstream
        self.imported = imported
        self.active_sources = active_sources
        self.upload_config = uploads
        self.files = files
        self.unmapped: list[str] = []
        self.notes: Counter[str] = Counter()
        self.already = 0
        self.uploads_of: dict[object, list[Mapping[str, Any]]] = defaultdict(list)
        for row in upstream.uploads:
            self.uploads_of[row.get("download_id")].append(row)

    def plan(self) -> ImportPlan:
        media: dict[str, TgMediaRecord] = {}
        downloads: list[ImportedDownload] = []
        late: list[tuple[int, ImportedUpload]] = []
        for row in sorted(self.upstream.downloads, key=lambda r: _int(r.get("id"))):
            origin = _origin("download", row)
            if origin in self.imported:
                self.already += 1
                late.extend(
                    (self.imported[origin], upload)
                    for upload in self._uploads(row, download_status=None, has_file=False)
                )
                continue
            try:
                item, record = self._download(row, origin)
            except _Unmapped as exc:
                self.unmapped.append(f"download {row.get('id')}: {exc}")
                continue
            if record is not None:
                media[record.file_unique_id] = record
            downloads.append(item)
        return ImportPlan(
            ImportBatch(tuple(media.values()), tuple(downloads), tuple(late)),
            self.already,
            self.unmapped,
            self.notes,
            list(self.upstream.settings),
        )

    def _download(
        self, row: Mapping[str, Any], origin: str
    ) -> tuple[ImportedDownload, TgMediaRecord | None]:
        was = str(row.get("status") or "")
        if was not in _UNFINISHED_DOWNLOADS and was not in _FINAL_DOWNLOADS:
            raise _Unmapped(f"unknown status {was!r}")
        new, record = self._source(row)
        status = "pending" if was in _UNFINISHED_DOWNLOADS else was
        reason = "imported"
        local_path: str | None = None
        found: tuple[TorrentFile, ...] = ()
        error_code = None
        error_message = _text(row.get("error_message"))
        if status == "pending":
            if new.source_key in self.active_sources:
                raise _Unmapped(f"{_shown(new)} is already being downloaded here")
            self.active_sources.add(new.source_key)
            reason = f"imported (was {was}: downloads again)"
            self.notes["unfinished downloads, to download again"] += 1
            error_message = None
        elif status == "completed":
            if self._cleaned(row):
                self.notes["completed downloads, uploaded and cleaned there"] += 1
            else:
                local_path, found, how = self._find_file(row, new)
                if local_path is None:
                    error_code = FILE_MISSING
                    error_message = f"imported: file {how}"
                self.notes[f"completed downloads, file {how}"] += 1
        total = max(_int(row.get("total_length")), 0) or new.total_length
        item = ImportedDownload(
            origin=origin,
            new=new,
            status=status,
            reason=reason,
            local_path=local_path,
            completed_length=total if status == "completed" else 0,
            files=found,
            error_message=error_message,
            error_code=error_code or (_text(row.get("error_code")) if status == "failed" else None),
            created_at=_timestamp(row.get("created_at")),
            started_at=None if status == "pending" else _timestamp(row.get("started_at")),
            completed_at=_timestamp(row.get("completed_at")) if status == "completed" else None,
            uploads=tuple(
                self._uploads(row, download_status=status, has_file=local_path is not None)
            ),
        )
        return item, record

    def _source(self, row: Mapping[str, Any]) -> tuple[NewDownload, TgMediaRecord | None]:
        total = max(_int(row.get("total_length")), 0)
        name = _text(row.get("file_name"))
        path_name = PurePath(str(row["local_path"])).name if row.get("local_path") else None
        unique_id = _text(row.get("file_unique_id"))
        if unique_id:
            record = _media(self.upstream.media.get(unique_id), unique_id)
            group = (
                f"album:{record.media_group_id}"
                if record.media_group_id
                else f"message:{record.chat_id}:{record.message_id}"
            )
            fallback = f"{record.media_type}_{record.message_id}"
            shown = name or record.file_name or path_name or fallback
            new = NewDownload(
                source_type="telegram",
                source_key=f"tg:{unique_id}",
                file_name=safe_file_name(shown),
                total_length=total or record.file_size or 0,
                file_unique_id=unique_id,
                owner_id=record.sender_id,
                chat_id=record.chat_id,
                message_id=record.message_id,
                group_key=group,
            )
            return new, record
        url = _text(row.get("source_url"))
        if not url:
            raise _Unmapped("neither a Telegram file nor a link")
        try:
            link = parse_link(url)
        except SourceError as exc:
            raise _Unmapped(f"link refused: {exc}") from None
        source_type: SourceType = link.source_type
        new = NewDownload(
            source_type=source_type,
            source_key=link.source_key,
            source_url=link.url,
            file_name=safe_file_name(name or path_name or link.display_name),
            total_length=total,
            info_hash=link.info_hash,
        )
        return new, None

    def _find_file(
        self, row: Mapping[str, Any], new: NewDownload
    ) -> tuple[str | None, tuple[TorrentFile, ...], str]:
        if self.files is None:
            return None, (), "not looked for (no --files)"
        path_name = PurePath(str(row["local_path"])).name if row.get("local_path") else None
        total = max(_int(row.get("total_length")), 0) or new.total_length
        path, how = self.files.match(path_name or new.file_name, total)
        if path is None:
            return None, (), how
        folder = self.files.folder_files(path) if path.is_dir() else ()
        return str(path), folder, f"found {how}"

    def _cleaned(self, row: Mapping[str, Any]) -> bool:
        """The other service deleted the file after uploading it: nothing is missing."""
        return any(
            u.get("cleaned_at") or u.get("status") == "cleaned"
            for u in self.uploads_of.get(row.get("id"), [])
        )

    def _uploads(
        self, row: Mapping[str, Any], *, download_status: str | None, has_file: bool
    ) -> list[ImportedUpload]:
        found: list[ImportedUpload] = []
        seen: set[str] = set()
        for upload in self.uploads_of.get(row.get("id"), []):
            origin = _origin("upload", upload)
            if origin in self.imported:
                if download_status is not None:
                    self.already += 1
                continue
            try:
                item = self._upload(upload, origin, download_status, has_file)
            except _Unmapped as exc:
                self.unmapped.append(f"upload {upload.get('id')}: {exc}")
                continue
            if item.upload_target in seen:
                self.unmapped.append(
                    f"upload {upload.get('id')}: a second upload of download {row.get('id')} "
                    f"to {item.upload_target}"
                )
                continue
            seen.add(item.upload_target)
            found.append(item)
        return found

    def _upload(
        self,
        row: Mapping[str, Any],
        origin: str,
        download_status: str | None,
        has_file: bool,
    ) -> ImportedUpload:
        target = _text(row.get("upload_target"))
        if not target:
            raise _Unmapped("no upload target")
        was = str(row.get("status") or "")
        configured = self.upload_config.target(target)
        target_type = (
            configured.type if configured else ("telegram" if target == "telegram" else "rclone")
        )
        reason = "imported"
        failure = _text(row.get("failure_reason"))
        if was in _FINAL_UPLOADS:
            status = _FINAL_UPLOADS[was]
        elif was not in _UNFINISHED_UPLOADS:
            raise _Unmapped(f"unknown status {was!r}")
        elif download_status is None:
            raise _Unmapped("new unfinished upload of a download imported before; retry it here")
        elif configured is None:
            status, failure = "failed", f"imported: no target {target!r} is configured here"
        elif download_status == "pending":
            status, reason = "waiting_download", f"imported (was {was}: waits for the download)"
        elif download_status == "completed" and has_file:
            status, reason = "pending", f"imported (was {was}: uploads again)"
        else:
            status, failure = "failed", "imported: the file to upload was not found"
        cleaned = _timestamp(row.get("cleaned_at"))
        if was == "cleaned" and cleaned is None:
            cleaned = (
                _timestamp(row.get("updated_at"))
                or _timestamp(row.get("completed_at"))
                or datetime.now(UTC).isoformat(timespec="milliseconds")
            )
        self.notes[f"uploads {status}"] += 1
        return ImportedUpload(
            origin=origin,
            upload_target=target,
            target_type=target_type,
            status=status,
            reason=reason if status != "failed" or was == "failed" else f"imported ({failure})",
            remote_path=_text(row.get("remote_path")),
            uploaded_size=max(_int(row.get("uploaded_size")), 0) if status == "completed" else 0,
            total_size=max(_int(row.get("total_size")), 0),
            retry_count=max(_int(row.get("retry_count")), 0),
            max_retries=max(_int(row.get("max_retries"), 3), 0),
            failure_reason=failure if status == "failed" else None,
            error_message=_text(row.get("error_message")) if status == "failed" else None,
            error_code=_text(row.get("error_code")) if status == "failed" else None,
            created_at=_timestamp(row.get("created_at")),
            started_at=_timestamp(row.get("started_at")) if status != "pending" else None,
            completed_at=_timestamp(row.get("completed_at")) if status == "completed" else None,
            cleaned_at=cleaned if status == "completed" else None,
        )


class _Unmapped(Exception):
    pass


def _media(row: Mapping[str, Any] | None, unique_id: str) -> TgMediaRecord:
    if row is None:
        raise _Unmapped(f"its Telegram media row ({unique_id}) is missing")
    missing = [k for k in ("file_id", "chat_id", "message_id") if row.get(k) in (None, "")]
    if missing:
        raise _Unmapped(f"its Telegram media row lacks {', '.join(missing)}")
    try:
        chat_id, message_id = int(row["chat_id"]), int(row["message_id"])
    except (TypeError, ValueError):
        raise _Unmapped(
            "its Telegram media row has a chat or message id that is not a number"
        ) from None

    def number(key: str) -> int | None:
        value = row.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return TgMediaRecord(
        file_unique_id=unique_id,
        file_id=str(row["file_id"]),
        chat_id=chat_id,
        message_id=message_id,
        media_type=_text(row.get("media_type")) or "document",
        sender_id=number("sender_id"),
        sender_name=_text(row.get("sender_name")),
        file_name=_text(row.get("file_name")),
        mime_type=_text(row.get("mime_type")),
        file_size=number("file_size"),
        duration=number("duration"),
        width=number("width"),
        height=number("height"),
        caption=_text(row.get("caption")),
        media_group_id=_text(row.get("media_group_id")),
        message_date=_timestamp(row.get("message_date")),
        dc_id=number("dc_id"),
    )


def _origin(kind: str, row: Mapping[str, Any]) -> str:
    """A row's identity in the other store: its id, and its creation time, so that a second
    database whose ids start over again is not taken for the first."""
    return f"{kind}:{row.get('id')}|{row.get('created_at') or ''}"


def _shown(new: NewDownload) -> str:
    return new.file_name or new.source_key


def _int(value: object, default: int = 0) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return default


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text[:_MAX_TEXT] or None


def _timestamp(value: object) -> str | None:
    """Our timestamp format for the other store's (ISO text, SQLite's CURRENT_TIMESTAMP, or
    seconds since the epoch); None when it is none of those."""
    if value is None or isinstance(value, bool):
        return None
    try:
        if isinstance(value, int | float):
            moment = datetime.fromtimestamp(value, UTC)
        else:
            moment = datetime.fromisoformat(str(value).strip())
    except (ValueError, OverflowError, OSError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="milliseconds")
