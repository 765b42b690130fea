"""Downloads: the one way in for every source, user actions, and keeping rows true to aria2.

Every job becomes a `downloads` row (committed) before aria2 is asked; the gid is attached after.
aria2's notifications and the poller both feed :meth:`DownloadManager.apply_status`, which maps
aria2's view onto the store's status machine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from loguru import logger

from aria2_client.client import Aria2Client
from aria2_client.models import PROGRESS_KEYS, Aria2Notification, Aria2Status
from aria2_client.sources import (
    ParsedLink,
    SourceError,
    TorrentMeta,
    ensure_public_host,
    parse_link,
    parse_torrent,
)
from aria2_client.transport import Aria2RpcError, Aria2Unavailable
from db import (
    Database,
    DownloadRow,
    NewDownload,
    NotFound,
    ProgressUpdate,
    StoreError,
    TgMediaRecord,
    TorrentFile,
    TransitionError,
)
from files import remove_empty_tree

CompletionListener = Callable[[DownloadRow], Awaitable[None]]
TelegramLinkMaker = Callable[[DownloadRow], str]
ActionListener = Callable[[DownloadRow], Awaitable[None]]


class TooLarge(SourceError):
    """The job is larger than `aria2.max_download_size`."""


@dataclass(frozen=True)
class Requester:
    """Who asked for a job, and where the answer goes (a chat), if anywhere."""

    owner_id: int | None = None
    chat_id: int | None = None
    message_id: int | None = None
    group_key: str | None = None
    is_admin: bool = True


def human_limit(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def safe_file_name(name: str, fallback: str = "file") -> str:
    """A name that is one path element: no separators, NUL, control or bidi-override chars."""
    cleaned = "".join(
        ch
        for ch in name
        if ch >= " " and ch not in "/\\\x7f" and not ("\u202a" <= ch <= "\u202e")
        if not ("\u2066" <= ch <= "\u2069")
    ).strip()
    cleaned = cleaned.lstrip(".") or fallback
    encoded = cleaned.encode("utf-8")
    if len(encoded) > 200:
        _stem, dot, suffix = cleaned.rpartition(".")
        keep = suffix if dot and len(suffix.encode()) <= 16 else ""
        budget = 200 - len(keep.encode()) - 1
        cleaned = cleaned.encode()[:budget].decode("utf-8", "ignore") + ("." + keep if keep else "")
    return cleaned


class DownloadManager:
    def __init__(
        self,
        db: Database,
        aria2: Aria2Client,
        *,
        download_dir: Path,
        max_download_size: int = 0,
        allow_private_addresses: bool = False,
        telegram_link: TelegramLinkMaker | None = None,
    ) -> None:
        self.db = db
        self.aria2 = aria2
        self.download_dir = download_dir
        self.max_download_size = max_download_size
        self.allow_private_addresses = allow_private_addresses
        self.telegram_link = telegram_link
        self.completion_listeners: list[CompletionListener] = []
        self.removal_listeners: list[ActionListener] = []
        self._apply_lock = asyncio.Lock()
        self._submitting: set[int] = set()

    # --- the one way in ---------------------------------------------------------------------------

    async def add_link(self, url: str, requester: Requester | None = None) -> DownloadRow:
        """http/https/ftp/magnet → a committed row, then aria2.

        Raises SourceError (bad or refused link) or DuplicateDownload.
        """
        requester = requester or Requester()
        link = parse_link(url)
        if not requester.is_admin and not self.allow_private_addresses:
            await ensure_public_host(link)
        return await self._create_and_submit(self._new_from_link(link, requester))

    def _new_from_link(self, link: ParsedLink, requester: Requester) -> NewDownload:
        return NewDownload(
            source_type=link.source_type,  # type: ignore[arg-type]
            source_key=link.source_key,
            source_url=link.url,
            file_name=safe_file_name(link.display_name, "download"),
            info_hash=link.info_hash,
            owner_id=requester.owner_id,
            chat_id=requester.chat_id,
            message_id=requester.message_id,
            group_key=requester.group_key,
        )

    async def add_torrent(self, data: bytes, requester: Requester | None = None) -> DownloadRow:
        requester = requester or Requester()
        meta = parse_torrent(data)
        self._check_size(meta.total_length)
        new = NewDownload(
            source_type="torrent",
            source_key=meta.source_key,
            source_url=None,
            file_name=safe_file_name(meta.name, "torrent"),
            total_length=meta.total_length,
            torrent_data=data,
            info_hash=meta.info_hash,
            owner_id=requester.owner_id,
            chat_id=requester.chat_id,
            message_id=requester.message_id,
            group_key=requester.group_key,
        )
        row = await self._create_and_submit(new, files=self._torrent_files(meta))
        return row

    async def add_telegram(
        self, media: TgMediaRecord, requester: Requester | None = None
    ) -> DownloadRow:
        requester = requester or Requester()
        self._check_size(media.file_size or 0)
        new = NewDownload(
            source_type="telegram",
            source_key=f"tg:{media.file_unique_id}",
            file_name=safe_file_name(media.file_name or f"{media.media_type}_{media.message_id}"),
            total_length=media.file_size or 0,
            file_unique_id=media.file_unique_id,
            owner_id=requester.owner_id,
            chat_id=requester.chat_id,
            message_id=requester.message_id,
            group_key=requester.group_key,
        )
        return await self._create_and_submit(new, media=media)

    def _check_size(self, size: int) -> None:
        if self.max_download_size and size > self.max_download_size:
            raise TooLarge(
                f"{human_limit(size)} is larger than the limit of "
                f"{human_limit(self.max_download_size)} (aria2.max_download_size)"
            )

    @staticmethod
    def _torrent_files(meta: TorrentMeta) -> list[TorrentFile]:
        return [TorrentFile(f.index, f.path, f.length) for f in meta.files]

    async def _create_and_submit(
        self,
        new: NewDownload,
        *,
        media: TgMediaRecord | None = None,
        files: Sequence[TorrentFile] | None = None,
    ) -> DownloadRow:
        download_id = await self.db.create_download(new, media)
        if files:
            await self.db.update_download_details(download_id, files=files)
        await self.submit(download_id)
        row = await self.db.get_download_by_id(download_id)
        assert row is not None
        return row

    def job_dir(self, download_id: int) -> Path:
        return self.download_dir / str(download_id)

    async def _uris_and_options(self, row: DownloadRow) -> tuple[list[str] | None, dict[str, str]]:
        options = {"dir": str(self.job_dir(row.id))}
        if row.source_type == "telegram":
            if self.telegram_link is None:
                raise SourceError("Telegram downloads need the bot to be running")
            options["out"] = row.file_name or f"telegram_{row.id}"
            return [self.telegram_link(row)], options
        if row.source_type == "torrent":
            return None, options
        if row.source_url is None:
            raise SourceError(f"download {row.id} has no source link")
        if row.source_type in ("http", "ftp") and not _safe_link_name(row.source_url):
            # aria2 would use the link's last segment as it is (too long, "..", bidi marks…).
            options["out"] = row.file_name or "download"
        return [row.source_url], options

    async def submit(self, download_id: int, *, paused: bool = False) -> None:
        """Hand a `pending` row to aria2; if aria2 is down the row stays pending for later."""
        # The API and start-up reconciliation may both reach a pending row: one submit at a time.
        if download_id in self._submitting:
            return
        self._submitting.add(download_id)
        try:
            await self._submit_pending(download_id, paused)
        finally:
            self._submitting.discard(download_id)

    async def _submit_pending(self, download_id: int, paused: bool) -> None:
        row = await self.db.get_download_by_id(download_id)
        if row is None or row.status != "pending":
            return
        log = logger.bind(job=download_id)
        try:
            uris, options = await self._uris_and_options(row)
            if paused:
                options["pause"] = "true"
            if uris is None:
                data = await self.db.get_torrent_data(download_id)
                if data is None:
                    raise SourceError("the torrent file of this download is missing")
                gid = await self.aria2.add_torrent(data, options)
            else:
                gid = await self.aria2.add_uri(uris, options)
        except Aria2Unavailable:
            log.warning("aria2 is unavailable; download {} stays pending", download_id)
            return
        except (Aria2RpcError, SourceError) as exc:
            message = exc.message if isinstance(exc, Aria2RpcError) else str(exc)
            log.warning("aria2 refused download {}: {}", download_id, message)
            await self.db.mark_download_failed_by_id(download_id, message, "refused")
            return
        await self.db.mark_download_queued(
            download_id, gid, status="paused" if paused else "waiting"
        )
        log.bind(gid=gid).info("download {} queued in aria2 as {}", download_id, gid)

    async def reconcile_pending(self) -> int:
        """Submit every row that never reached aria2 (e.g. the service stopped in between)."""
        rows = await self.db.fetch_downloads_in_states(("pending",))
        for row in rows:
            await self.submit(row.id)
        return len(rows)

    # --- user actions -----------------------------------------------------------------------------

    async def _row(self, download_id: int) -> DownloadRow:
        row = await self.db.get_download_by_id(download_id)
        if row is None:
            raise NotFound("download", download_id)
        return row

    async def pause(self, download_id: int) -> DownloadRow:
        row = await self._row(download_id)
        if row.status not in ("waiting", "downloading") or row.gid is None:
            raise TransitionError("download", download_id, row.status, "paused")
        try:
            await self.aria2.pause(row.gid)
        except Aria2RpcError as exc:
            logger.bind(job=download_id, gid=row.gid).info("aria2 pause: {}", exc.message)
        await self.db.mark_download_paused(row.gid)
        return await self._row(download_id)

    async def resume(self, download_id: int) -> DownloadRow:
        row = await self._row(download_id)
        if row.status != "paused" or row.gid is None:
            raise TransitionError("download", download_id, row.status, "waiting")
        try:
            await self.aria2.unpause(row.gid)
        except Aria2RpcError:
            status = (await self.aria2.statuses([row.gid])).get(row.gid)
            if status is None:
                await self._readd(row)
                return await self._row(download_id)
            if status.status != "active":
                raise
        await self.db.mark_download_resumed(row.gid)
        return await self._row(download_id)

    async def cancel(self, download_id: int) -> DownloadRow:
        row = await self._row(download_id)
        if row.status not in ("pending", "waiting", "downloading", "paused"):
            raise TransitionError("download", download_id, row.status, "cancelled")
        if row.gid is not None:
            await self.aria2.remove(row.gid)
        await self.db.mark_download_cancelled_by_id(download_id, "cancelled by user")
        updated = await self._row(download_id)
        for listener in self.removal_listeners:
            await listener(updated)
        return updated

    async def retry(self, download_id: int) -> DownloadRow:
        row = await self._row(download_id)
        if row.status not in ("failed", "cancelled"):
            raise TransitionError("download", download_id, row.status, "pending")
        if row.gid is not None:
            await self.aria2.remove(row.gid)
        await self.db.reset_download_for_retry(download_id)
        await self.submit(download_id)
        return await self._row(download_id)

    async def delete(self, download_id: int, *, delete_file: bool = False) -> DownloadRow:
        """Stop the aria2 job and running uploads first, then remove the rows (and the file)."""
        row = await self._row(download_id)
        if row.gid is not None and row.is_active:
            await self.aria2.remove(row.gid)
        for listener in self.removal_listeners:
            await listener(row)
        deleted = await self.db.delete_download_record(download_id, delete_local_file=delete_file)
        if delete_file:
            job_dir = self.job_dir(download_id)
            await asyncio.to_thread(remove_empty_tree, self.download_dir, job_dir)
        return deleted

    async def delete_all(self, *, delete_files: bool = False) -> int:
        for row in await self.db.fetch_downloads_in_states(
            ("pending", "waiting", "downloading", "paused")
        ):
            if row.gid is not None:
                await self.aria2.remove(row.gid)
        for row in await self.db.fetch_recent_downloads(limit=-1):
            for listener in self.removal_listeners:
                await listener(row)
        return await self.db.delete_all_downloads(delete_local_files=delete_files)

    async def _readd(self, row: DownloadRow) -> None:
        """aria2 forgot this job (restarted without its session): add it again under a new gid."""
        log = logger.bind(job=row.id, gid=row.gid)
        paused = row.status == "paused"
        try:
            uris, options = await self._uris_and_options(row)
            if paused:
                options["pause"] = "true"
            if uris is None:
                data = await self.db.get_torrent_data(row.id)
                if data is None:
                    raise SourceError("the torrent file of this download is missing")
                gid = await self.aria2.add_torrent(data, options)
            else:
                gid = await self.aria2.add_uri(uris, options)
        except (Aria2RpcError, SourceError) as exc:
            message = exc.message if isinstance(exc, Aria2RpcError) else str(exc)
            await self.db.mark_download_failed_by_id(
                row.id, f"could not re-add after aria2 lost it: {message}"
            )
            return
        await self.db.mark_download_queued(row.id, gid, status=row.status)
        log.info("aria2 had lost download {}; re-added as {}", row.id, gid)

    # --- keeping rows true to aria2 ---------------------------------------------------------------

    async def on_notification(self, notification: Aria2Notification) -> None:
        try:
            status = await self.aria2.tell_status(notification.gid)
        except Aria2RpcError:
            return
        except Aria2Unavailable:
            return
        await self.apply_status([status])

    async def poll_once(self) -> int:
        """One poller cycle: at most two RPC calls whatever the number of downloads.

        Returns the number of active rows (the caller chooses the busy or idle interval).
        """
        rows = await self.db.fetch_downloads_in_states(("waiting", "downloading", "paused"))
        rows_by_gid = {row.gid: row for row in rows if row.gid is not None}
        statuses = await self.aria2.poll(
            max_waiting=max(1000, len(rows)), max_stopped=0, keys=PROGRESS_KEYS
        )
        by_gid = {s.gid: s for s in statuses if s.gid in rows_by_gid}
        # Full details only where they matter: jobs aria2 did not list, jobs whose file is not
        # known yet, and jobs that look finished (a magnet's metadata step must be told apart).
        details = [
            gid
            for gid, row in rows_by_gid.items()
            if gid not in by_gid or row.local_path is None or _looks_finished(by_gid[gid])
        ]
        if details:
            found = await self.aria2.statuses(details)
            for gid, status in found.items():
                if status is not None:
                    by_gid[gid] = status
                elif gid not in by_gid:
                    await self._readd(rows_by_gid[gid])
        await self.apply_status(list(by_gid.values()), rows_by_gid)
        return len(rows)

    async def apply_status(
        self,
        statuses: Sequence[Aria2Status],
        rows_by_gid: Mapping[str, DownloadRow] | None = None,
    ) -> None:
        """Map aria2's view of some gids onto their rows (transitions, progress, details).

        `rows_by_gid` saves a lookup per status when the caller (the poller) has the rows.
        """
        async with self._apply_lock:
            progress: list[ProgressUpdate] = []
            completed: list[int] = []
            for position, status in enumerate(statuses, start=1):
                if position % 100 == 0:
                    await asyncio.sleep(0)  # a cycle over many downloads must not hog the loop
                row = (rows_by_gid or {}).get(status.gid)
                if row is None:
                    row = await self.db.get_download_by_gid(status.gid)
                if row is None or row.gid != status.gid:
                    continue
                try:
                    done = await self._apply_one(row, status, progress)
                except (TransitionError, StoreError) as exc:
                    logger.bind(job=row.id, gid=status.gid).debug("status not applied: {}", exc)
                    continue
                if done:
                    completed.append(row.id)
            await self.db.update_progress_batch(progress)
        for download_id in completed:
            row = await self.db.get_download_by_id(download_id)
            if row is None:
                continue
            for listener in self.completion_listeners:
                try:
                    await listener(row)
                except Exception:
                    logger.bind(job=download_id).exception("completion listener failed")

    async def _apply_one(
        self, row: DownloadRow, status: Aria2Status, progress: list[ProgressUpdate]
    ) -> bool:
        """Returns True when this status completed the download."""
        log = logger.bind(job=row.id, gid=status.gid)
        if row.status in ("completed", "failed", "cancelled", "pending"):
            return False
        if status.followed_by:
            await self.db.follow_gid(status.gid, status.followed_by[0])
            log.info("magnet metadata done; download {} follows {}", row.id, status.followed_by[0])
            return False
        if status.files and not status.is_metadata:
            await self._learn_details(row, status)
        if (
            self.max_download_size
            and status.total_length > self.max_download_size
            and not status.is_metadata
        ):
            await self.aria2.remove(status.gid)
            await self.db.mark_download_failed(
                status.gid,
                f"{human_limit(status.total_length)} is larger than the limit of "
                f"{human_limit(self.max_download_size)} (aria2.max_download_size)",
                "too_large",
            )
            return False
        aria2_state = status.status
        bt_done = (
            status.is_torrent
            and not status.is_metadata
            and status.total_length > 0
            and status.completed_length == status.total_length
        )
        if aria2_state == "complete" or (aria2_state == "active" and bt_done):
            if status.completed_length != status.total_length or status.is_metadata:
                return False
            if row.status in ("waiting", "paused"):
                await self.db.mark_download_started(status.gid)
            await self.db.mark_download_completed(
                status.gid, self._local_path(status), status.total_length
            )
            log.info("download {} completed ({} bytes)", row.id, status.total_length)
            return True
        if aria2_state == "error":
            message = describe_aria2_error(status.error_code, status.error_message)
            await self.db.mark_download_failed(status.gid, message, status.error_code)
            log.warning("download {} failed: {}", row.id, message)
            return False
        if aria2_state == "removed":
            await self.db.mark_download_cancelled_by_id(row.id, "removed from aria2")
            return False
        if aria2_state == "active" and row.status != "downloading":
            await self.db.mark_download_started(status.gid)
        elif aria2_state == "waiting" and row.status == "paused":
            await self.db.mark_download_resumed(status.gid)
        elif aria2_state == "paused" and row.status in ("waiting", "downloading"):
            await self.db.mark_download_paused(status.gid)
        progress.append(
            ProgressUpdate(
                status.gid, status.completed_length, status.total_length, status.download_speed
            )
        )
        return False

    def _local_path(self, status: Aria2Status) -> str | None:
        if status.is_torrent and status.bittorrent_name and len(status.files) > 1:
            return str(Path(status.dir) / status.bittorrent_name)
        if status.files and status.files[0].path:
            return status.files[0].path
        return None

    async def _learn_details(self, row: DownloadRow, status: Aria2Status) -> None:
        name = status.bittorrent_name or (
            PurePosixPath(status.files[0].path).name if status.files[0].path else None
        )
        local_path = self._local_path(status)
        files: list[TorrentFile] | None = None
        if status.is_torrent and not row.files:
            base = PurePosixPath(status.dir)
            files = [
                TorrentFile(f.index, _relative(f.path, base), f.length, f.selected)
                for f in status.files
            ]
        if (
            (name and (name != row.file_name or local_path != row.local_path))
            or files is not None
            or (status.total_length and status.total_length != row.total_length)
        ):
            await self.db.update_download_details(
                row.id,
                file_name=safe_file_name(name) if name else None,
                local_path=local_path,
                files=files,
                total_length=status.total_length or None,
            )


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


def describe_aria2_error(code: str | None, message: str | None) -> str:
    """A readable failure reason: what the code means, then aria2's own words."""
    detail = (message or "").strip()
    if "No space left" in detail or "ENOSPC" in detail:
        code = "9"
    meaning = ARIA2_ERRORS.get(code or "")
    if meaning and detail:
        return f"{meaning} ({detail})"
    return meaning or detail or f"aria2 error {code}"


def _safe_link_name(url: str) -> bool:
    segment = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return segment in ("", safe_file_name(segment, "")) and segment not in (".", "..")


def _looks_finished(status: Aria2Status) -> bool:
    return (
        status.status in ("complete", "error", "removed")
        or bool(status.followed_by)
        or (status.total_length > 0 and status.completed_length == status.total_length)
    )


def _relative(path: str, base: PurePosixPath) -> str:
    pure = PurePosixPath(path)
    return str(pure.relative_to(base)) if pure.is_relative_to(base) else pure.name
