"""Uploads: one row per finished download per matching target, run, verified, cleaned up.

The life of an upload
---------------------
- A download completes → :meth:`UploadManager.on_download_completed` creates one row per target
  whose ``match`` accepts it (``pending``; creating twice returns the same row) and wakes the
  dispatcher.
- The dispatcher starts ``pending`` rows that are due (no ``next_attempt_at``, or one that has
  passed) and ``uploading`` rows nobody runs (the service stopped while they ran), up to
  ``upload.max_concurrent`` at a time.
- An attempt checks the local file (gone → ``local_file_missing``), moves the row to
  ``uploading``, transfers (rclone, or the Telegram bot), writes progress to the row about every
  second (at least every 2 s), reads the remote copy back to verify it, and only then completes
  the row.
- A failure whose reason can heal by itself (network, unknown rclone error, a verify mismatch)
  while ``retry_count < max_retries`` puts the row back to ``pending`` with ``next_attempt_at``
  ``retry_backoff · 2^retry_count`` seconds ahead; anything else is ``failed``, which is final
  until a person retries it. The local file is never touched on failure.
- With ``upload.auto_delete``, once every upload of a download (one for every target that takes
  it) is completed and verified, the local file is deleted inside the download directory only,
  and every upload of the download gets ``cleaned_at``.

Status changes go through ``db.py`` only, which publishes them to the dashboard and the bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from configer import UploadConfig, UploadTarget
from db import NotFound, Store, StoreError, TransitionError, allowed_sources, parse_utc
from files import DownloadFiles, discard, remove_confined
from records import DownloadRow, HolderAction, UploadRow
from uploads import telegram as telegram_upload
from uploads.archives import ArchiveError, ArchiveLimits, archive_stem, extract, zip_folder
from uploads.rclone import (
    LOCAL_FILE_MISSING,
    Rclone,
    RcloneError,
    TransferProgress,
    local_total_size,
)
from uploads.telegram import TelegramClient, TelegramSender, TelegramUploadError

if TYPE_CHECKING:
    from loguru import Logger

PROGRESS_INTERVAL = 1.0  # seconds between progress writes while bytes move
PROGRESS_HEARTBEAT = 2.0  # a running upload's row is rewritten at least this often
_IDLE_DISPATCH_SECONDS = 30.0  # the dispatcher looks again at least this often
_CANCEL_WAIT_SECONDS = 15.0
_STOP_WAIT_SECONDS = 15.0
_SPEED_WINDOW_SECONDS = 3.0

# rclone's own defaults (3 retries of 10 low-level retries, each behind pacer sleeps) keep an
# attempt against a cloud that went away `uploading` without progress for ~10 minutes; MistRelay
# retries whole attempts itself, with backoff, so rclone gives up after a few seconds instead.
# An RCLONE_<FLAG> variable in the environment takes precedence over these.
DEFAULT_RCLONE_FLAGS: tuple[tuple[str, str], ...] = (("retries", "1"), ("low-level-retries", "3"))

# Failure reasons of our own (rclone's are in uploads.rclone).
TARGET_NOT_CONFIGURED = "target_not_configured"
TELEGRAM_UNAVAILABLE = "telegram_unavailable"
INTERNAL_ERROR = "internal_error"
ARCHIVE_REFUSED = "archive_refused"


class UploadFailure(Exception):
    """An attempt that did not end in a verified remote copy."""

    def __init__(
        self, reason: str, message: str, *, code: str | None = None, retryable: bool
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code
        self.retryable = retryable

    @classmethod
    def from_rclone(cls, error: RcloneError) -> UploadFailure:
        code = f"rclone_exit_{error.exit_code}" if error.exit_code is not None else error.reason
        return cls(error.reason, error.message, code=code, retryable=error.retryable)

    @classmethod
    def from_telegram(cls, error: TelegramUploadError) -> UploadFailure:
        return cls(error.reason, error.message, code=error.code, retryable=error.retryable)


def _iso_after(seconds: float) -> str:
    """A timestamp `seconds` from now, in the format db.utc_now() writes."""
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


def default_rclone_args(environment: Mapping[str, str] | None = None) -> list[str]:
    """DEFAULT_RCLONE_FLAGS as arguments, leaving out any the environment sets itself."""
    environment = os.environ if environment is None else environment
    args: list[str] = []
    for flag, value in DEFAULT_RCLONE_FLAGS:
        if "RCLONE_" + flag.upper().replace("-", "_") not in environment:
            args += [f"--{flag}", value]
    return args


def remote_path_for(target: UploadTarget, name: str) -> str:
    """``<remote>:<target.path>/<name>`` for rclone; ``telegram:<chat>/<name>`` for Telegram."""
    if target.type == "telegram":
        return f"telegram:{target.chat_id}/{name}"
    return f"{target.remote}:{posixpath.join(target.path or '/', name)}"


def upload_name(row: DownloadRow) -> str:
    """What the upload is called remotely: the file (or torrent folder) name on disk."""
    if row.local_path:
        name = Path(row.local_path).name
        if name:
            return name
    return row.file_name or f"download-{row.id}"


class ProgressWriter:
    """Keeps the row's uploaded bytes, total and speed current while an attempt runs.

    Reports are cheap (they only keep the latest value); a loop writes the latest value every
    `interval` seconds when it changed, and at least every `heartbeat` seconds regardless, so a
    watcher can tell a stalled upload from a dead one.
    """

    def __init__(
        self,
        store: Store,
        upload_id: int,
        total: int,
        *,
        interval: float = PROGRESS_INTERVAL,
        heartbeat: float = PROGRESS_HEARTBEAT,
    ) -> None:
        self.store = store
        self.upload_id = upload_id
        self.total = total
        self.interval = interval
        self.heartbeat = heartbeat
        self.done = 0
        self.speed = 0.0
        self.writes = 0
        self._samples: list[tuple[float, int]] = []
        self._written: tuple[int, int, float] | None = None
        self._written_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def report(self, done: int, total: int | None = None, speed: float | None = None) -> None:
        """The latest numbers; the speed is measured here when the caller has none."""
        now = time.monotonic()
        self.done = done
        if total:
            self.total = total
        if speed is None:
            self._samples.append((now, done))
            while self._samples and now - self._samples[0][0] > _SPEED_WINDOW_SECONDS:
                self._samples.pop(0)
            first_at, first_done = self._samples[0]
            elapsed = now - first_at
            speed = (done - first_done) / elapsed if elapsed > 0.2 else self.speed
        self.speed = max(0.0, speed)

    def report_rclone(self, progress: TransferProgress) -> None:
        self.report(progress.bytes_done, progress.total, progress.speed)

    async def write(self, *, force: bool = False) -> None:
        current = (self.done, self.total, round(self.speed, 1))
        now = time.monotonic()
        # Half an interval early, so a loop tick never lands just short of the heartbeat.
        due = now - self._written_at >= self.heartbeat - self.interval / 2
        if not force and current == self._written and not due:
            return
        await self.store.update_upload_progress(self.upload_id, self.done, self.total, self.speed)
        self._written, self._written_at = current, now
        self.writes += 1

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.write()
            except StoreError as exc:
                logger.bind(upload=self.upload_id).debug("progress not written: {}", exc)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"upload-progress-{self.upload_id}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


@dataclass
class _Attempt:
    """One running upload: the supervising task and the transfer it awaits."""

    upload_id: int
    download_id: int
    task: asyncio.Task[None] | None = None
    transfer: asyncio.Task[None] | None = None
    cancel_requested: bool = False
    cancel_reason: str = "cancelled by user"
    finished: asyncio.Event = field(default_factory=asyncio.Event)


class UploadManager:
    """Creates, runs, retries, cancels, verifies and cleans up uploads.

    `files` is the download directory: uploads read only what lies inside it, and cleanup deletes
    through it. `data_dir` holds rclone's pid files and the Telegram target's scratch folders.
    `telegram_client` is asked at each Telegram upload for the bot's client and answers None
    while the bot is not logged in; without it (no bot), Telegram uploads fail as
    ``telegram_unavailable``. `rclone_args` are added to every rclone command (e.g.
    ``--bwlimit 8M``) after DEFAULT_RCLONE_FLAGS, so they win.
    `telegram_part_size` is the largest piece one Telegram message carries (None: the module
    constant ``telegram_upload.TELEGRAM_PART_SIZE``, read at each upload).
    """

    def __init__(
        self,
        store: Store,
        config: UploadConfig,
        *,
        files: DownloadFiles,
        data_dir: Path,
        telegram_client: Callable[[], TelegramClient | None] | None = None,
        rclone_args: Sequence[str] = (),
        telegram_part_size: int | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
        node: str | None = None,
        ask_holder: HolderAction | None = None,
    ) -> None:
        self.store = store
        self.config = config
        # In a cluster, the uploads of the files on this node's disk only (None: every upload);
        # an action on another node's upload is done by that node (`ask_holder`).
        self.node = node
        self.ask_holder = ask_holder
        self.files = files
        self.data_dir = data_dir
        self.telegram_client = telegram_client
        self.telegram_part_size = telegram_part_size
        self.progress_interval = progress_interval
        self.pid_dir = data_dir / "rclone-pids"
        self.rclone = Rclone(
            executable=config.rclone_executable,
            config_path=Path(config.rclone_config) if config.rclone_config else None,
            pid_dir=self.pid_dir,
            extra_args=[*default_rclone_args(), *rclone_args],
            proxy=config.proxy,
        )
        self.missing_remotes: dict[str, str] = {}  # target name → its unconfigured remote
        self._attempts: dict[int, _Attempt] = {}
        self._wake = asyncio.Event()
        self._dispatcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._cleanup_lock = asyncio.Lock()
        self._archive_lock = asyncio.Lock()  # one extraction or zip at a time
        self._stopping = False
        self._started = False

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Kill rclone leftovers of a crash, check the remotes, then pick up unfinished work."""
        self._stopping = False
        killed = await asyncio.to_thread(self.rclone.kill_leftovers)
        if killed:
            logger.warning("stopped {} rclone process(es) left by an earlier run", len(killed))
        await self.check_remotes()
        self._started = True
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="upload-dispatcher")
        self._spawn(self.catch_up(), "upload-catch-up")
        logger.info(
            "uploads ready: {} target(s), at most {} at a time",
            len(self.config.targets),
            self.config.max_concurrent,
        )

    async def stop(self) -> None:
        """Stop every transfer; rows being uploaded stay `uploading` and resume on next start."""
        self._stopping = True
        self._started = False
        self._wake.set()
        tasks = [a.task for a in self._attempts.values() if a.task is not None]
        for extra in [*self._background, self._dispatcher]:
            if extra is not None:
                tasks.append(extra)
        for task in tasks:
            task.cancel()
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=_STOP_WAIT_SECONDS)
            for task in pending:
                logger.warning("upload task {} did not stop in time", task.get_name())
        self._dispatcher = None
        self._attempts.clear()

    def apply_config(self, config: UploadConfig) -> None:
        """Take over a reloaded `upload` section (targets, retries, concurrency, auto-delete).

        The rclone executable and config file are read at start only.
        """
        self.config = config
        if self._started:
            self._spawn(self._after_reload(), "upload-reload")
            self._wake.set()

    def set_upload_limit(self, bytes_per_second: int) -> None:
        """Limit each rclone upload that starts from now on (0 = no limit); running ones keep
        the limit they started with."""
        self.rclone.bwlimit = bytes_per_second

    async def _after_reload(self) -> None:
        await self.check_remotes()
        await self.catch_up()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.opt(exception=task.exception()).error("{} failed", task.get_name())

    async def check_remotes(self) -> dict[str, str]:
        """Log an error naming every rclone target whose remote is not configured.

        The service runs on; uploads to such a target fail with reason remote_not_found.
        """
        rclone_targets = [t for t in self.config.targets if t.type == "rclone"]
        missing: dict[str, str] = {}
        if rclone_targets:
            try:
                known = set(await self.rclone.list_remotes())
            except RcloneError as exc:
                logger.error("cannot check the rclone remotes: {}", exc.message)
                self.missing_remotes = {}
                return {}
            where = f" in {self.rclone.config_path}" if self.rclone.config_path else ""
            for target in rclone_targets:
                if target.remote not in known:
                    missing[target.name] = target.remote
                    logger.error(
                        "upload target {!r}: rclone remote {!r} is not configured{}; uploads to it"
                        " will fail (remote_not_found)",
                        target.name,
                        target.remote,
                        where,
                    )
        self.missing_remotes = missing
        return missing

    # --- creating uploads -----------------------------------------------------------------------

    async def targets_for(self, row: DownloadRow) -> list[UploadTarget]:
        """The targets chosen for this download when it was added (none = keep it here only),
        else the configured targets whose `match` takes it."""
        return self._targets_of(row, await self.store.get_download_targets(row.id))

    def _targets_of(self, row: DownloadRow, chosen: Sequence[str] | None) -> list[UploadTarget]:
        if chosen is not None:
            configured = {t.name: t for t in self.config.targets}
            gone = [name for name in chosen if name not in configured]
            if gone:
                logger.bind(job=row.id).warning(
                    "download {}: chosen target(s) {} no longer configured; skipped",
                    row.id,
                    ", ".join(gone),
                )
            return [configured[name] for name in chosen if name in configured]
        name = upload_name(row)
        size = row.total_length if row.total_length > 0 else None
        return [t for t in self.config.targets if t.accepts(row.source_type, name, size)]

    async def create_uploads(self, row: DownloadRow) -> list[int]:
        """One row per matching target (an existing one is kept, never duplicated)."""
        ids: list[int] = []
        name = upload_name(row)
        for target in await self.targets_for(row):
            upload_id = await self.store.create_upload(
                row.id,
                target.name,
                remote_path_for(target, name),
                self.config.retries_for(target),
                target_type=target.type,
                ready=True,
            )
            ids.append(upload_id)
        skipped = len(self.config.targets) - len(ids)
        if skipped:
            logger.bind(job=row.id).debug("{} target(s) skip download {}", skipped, row.id)
        return ids

    async def on_download_completed(self, row: DownloadRow) -> None:
        """A download's bytes are whole on disk: queue its uploads."""
        await self.create_uploads(row)
        await self.store.release_waiting_uploads(row.id)
        self._wake.set()

    async def on_download_removed(self, row: DownloadRow) -> None:
        """The download is cancelled or about to be deleted: stop and cancel its uploads."""
        for upload in await self.store.get_uploads_by_download(row.id):
            if upload.status in ("completed", "failed", "cancelled"):
                continue
            with contextlib.suppress(StoreError):
                await self.cancel(upload.id, reason="download removed")

    async def catch_up(self) -> None:
        """Start-up and reload: finish what an earlier run left.

        Uploads waiting for a download that has completed are released; completed downloads whose
        file is still on disk get rows for targets they have none for; downloads whose every
        upload is done are cleaned up (auto_delete).
        """
        completed = await self.store.fetch_downloads_in_states(("completed",), node=self.node)
        uploads = await self.store.get_uploads_for_downloads([r.id for r in completed])
        choices = await self.store.get_targets_for_downloads([r.id for r in completed])
        created = 0
        for row in completed:
            existing = uploads.get(row.id, [])
            if any(u.status == "waiting_download" for u in existing):
                await self.store.release_waiting_uploads(row.id)
            if any(u.cleaned_at is not None for u in existing):
                continue
            have = {u.upload_target for u in existing}
            chosen = choices.get(row.id)
            wanted = [t for t in self._targets_of(row, chosen) if t.name not in have]
            on_disk = bool(wanted) and await asyncio.to_thread(self._on_disk, row)
            if on_disk:
                created += len(await self.create_uploads(row))
            elif existing and all(u.status == "completed" for u in existing):
                await self.cleanup_if_done(row.id)
        if created:
            logger.info("{} upload(s) created for downloads that had none", created)
        self._wake.set()

    def _on_disk(self, row: DownloadRow) -> bool:
        path = self._local_path(row)
        return path is not None and path.exists()

    def _local_path(self, row: DownloadRow) -> Path | None:
        """The download's file or folder, only if it lies inside the download directory.

        Synchronous (it resolves symlinks): call it in a thread.
        """
        if not row.local_path:
            return None
        return self.files.confined(row.local_path)

    def _drop_left_out(self, row: DownloadRow) -> None:
        """Delete the files of a torrent left out of the choice, so only the chosen ones are
        uploaded (aria2 writes into them the pieces they share with chosen files). Blocking."""
        if not row.local_path or len(row.files) < 2 or all(f.selected for f in row.files):
            return
        base = Path(row.local_path).parent
        for entry in row.files:
            if not entry.selected:
                remove_confined(self.files.root, base / entry.path)

    # --- actions --------------------------------------------------------------------------------

    async def retry(self, upload_id: int) -> UploadRow:
        """By hand: a failed or cancelled upload, or one waiting for its automatic retry, starts
        again now with its retry count reset. TransitionError for any other status."""
        if await self._held_elsewhere(upload_id, "retry"):
            return await self._row(upload_id)
        await self.store.reset_upload_for_retry(upload_id)
        upload = await self._row(upload_id)
        logger.bind(upload=upload_id, job=upload.download_id).info("upload retried by hand")
        self._wake.set()
        return upload

    async def cancel(self, upload_id: int, *, reason: str = "cancelled by user") -> UploadRow:
        """Stop a running transfer (its rclone process group, or the Telegram send) and mark the
        upload cancelled; a queued one is cancelled at once. Raises TransitionError when the
        machine forbids it (completed, failed, cancelled)."""
        upload = await self.store.get_upload_by_id(upload_id)
        if upload is None:
            raise NotFound("upload", upload_id)
        if upload.status not in allowed_sources("upload", "cancelled"):
            raise TransitionError("upload", upload_id, upload.status, "cancelled")
        if await self._held_elsewhere(upload_id, "cancel"):
            return await self._row(upload_id)
        attempt = self._attempts.get(upload_id)
        if attempt is not None and upload.status in ("pending", "uploading"):
            attempt.cancel_requested = True
            attempt.cancel_reason = reason
            if attempt.transfer is not None:
                attempt.transfer.cancel()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CANCEL_WAIT_SECONDS):
                    await attempt.finished.wait()
            upload = await self._row(upload_id)
            if upload.status == "cancelled":
                return upload
        await self.store.mark_upload_cancelled(upload_id, reason)
        logger.bind(upload=upload_id, job=upload.download_id).info("upload cancelled: {}", reason)
        return await self._row(upload_id)

    async def _held_elsewhere(self, upload_id: int, action: str) -> bool:
        """In a cluster, have the node whose disk holds the file do `action` on the upload (its
        rclone runs it); True when it did."""
        if self.ask_holder is None:
            return False
        upload = await self._row(upload_id)
        download = await self.store.get_download_by_id(upload.download_id)
        if download is None or download.node in (None, self.node):
            return False
        await self.ask_holder(download.node, f"upload-{action}", upload_id)
        return True

    async def _row(self, upload_id: int) -> UploadRow:
        row = await self.store.get_upload_by_id(upload_id)
        if row is None:
            raise NotFound("upload", upload_id)
        return row

    def running(self) -> list[int]:
        """Ids of the uploads running now."""
        return list(self._attempts)

    # --- the dispatcher -------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                delay = await self.dispatch_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("upload dispatcher failed; trying again shortly")
                delay = 5.0
            # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a cancel that
            # arrives as the event is set, and the loop would then outlive stop().
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    async def dispatch_once(self) -> float:
        """Start what may start now; returns the seconds until a retry falls due (capped)."""
        now = datetime.now(UTC)
        next_due = _IDLE_DISPATCH_SECONDS
        candidates: list[UploadRow] = []
        for upload in await self.store.fetch_uploads_in_states(
            ("uploading", "pending"), node=self.node
        ):
            due = parse_utc(upload.next_attempt_at) if upload.next_attempt_at else None
            if due is not None and due > now:
                next_due = min(next_due, (due - now).total_seconds())
            else:
                candidates.append(upload)
        # Rows left `uploading` by a stopped service come first: they were started before.
        candidates.sort(key=lambda u: (u.status != "uploading", u.id))
        for upload in candidates:
            if len(self._attempts) >= self.config.max_concurrent:
                break
            if upload.id in self._attempts or self._stopping:
                continue
            self._launch(upload)
        return max(0.05, next_due)

    def _launch(self, upload: UploadRow) -> None:
        attempt = _Attempt(upload.id, upload.download_id)
        self._attempts[upload.id] = attempt
        attempt.task = asyncio.create_task(self._run(attempt), name=f"upload-{upload.id}")

    def _attempt_done(self, attempt: _Attempt) -> None:
        if self._attempts.get(attempt.upload_id) is attempt:
            del self._attempts[attempt.upload_id]
        attempt.finished.set()
        self._wake.set()

    # --- one attempt ----------------------------------------------------------------------------

    async def _run(self, attempt: _Attempt) -> None:
        upload_id = attempt.upload_id
        log = logger.bind(upload=upload_id, job=attempt.download_id)
        try:
            attempt.transfer = asyncio.create_task(self._attempt(attempt, log))
            try:
                await attempt.transfer
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._stopping or (current is not None and current.cancelling()):
                    raise
                await self._finish_cancelled(attempt, log)
                return
            except UploadFailure as failure:
                if attempt.cancel_requested:
                    await self._finish_cancelled(attempt, log)
                    return
                with contextlib.suppress(NotFound, TransitionError):
                    await self._record_failure(upload_id, failure, log)
                return
            except (NotFound, TransitionError) as exc:
                # The row was deleted or moved on under us (e.g. the download was deleted).
                log.info("upload {} ended: {}", upload_id, exc)
                return
            except Exception as exc:
                log.exception("upload {} failed unexpectedly", upload_id)
                unexpected = UploadFailure(
                    INTERNAL_ERROR, f"unexpected error: {type(exc).__name__}", retryable=True
                )
                with contextlib.suppress(StoreError):
                    await self._record_failure(upload_id, unexpected, log)
                return
            if attempt.cancel_requested:
                log.info("upload {} finished before the cancel reached it", upload_id)
            await self.cleanup_if_done(attempt.download_id)
        finally:
            transfer = attempt.transfer
            if transfer is not None and not transfer.done():
                # Cancel once only: a second cancel would interrupt rclone's own clean-up.
                if not transfer.cancelling():
                    transfer.cancel()
                with contextlib.suppress(BaseException):
                    await transfer
            self._attempt_done(attempt)

    async def _finish_cancelled(self, attempt: _Attempt, log: Logger) -> None:
        with contextlib.suppress(TransitionError, NotFound):
            await self.store.mark_upload_cancelled(attempt.upload_id, attempt.cancel_reason)
        log.info("upload {} cancelled: {}", attempt.upload_id, attempt.cancel_reason)

    async def _attempt(self, attempt: _Attempt, log: Logger) -> None:
        """Transfer, verify, complete. Raises UploadFailure; CancelledError when cancelled."""
        upload = await self._row(attempt.upload_id)
        if upload.status not in ("pending", "uploading"):
            return
        download = await self.store.get_download_by_id(upload.download_id)
        if download is None:
            raise NotFound("download", upload.download_id)
        target = self.config.target(upload.upload_target)
        local = await asyncio.to_thread(self._local_path, download)
        if local is None:
            # No file recorded, or one outside the download directory: never upload or delete it.
            raise UploadFailure(
                LOCAL_FILE_MISSING,
                "the download has no local file inside the download directory",
                retryable=False,
            )
        exists = await asyncio.to_thread(local.exists)
        if not await self.store.check_and_update_download_status_if_file_exists(
            upload.id, local, exists=exists
        ):
            log.warning("upload {}: the local file is gone: {}", upload.id, local.name)
            return
        await asyncio.to_thread(self._drop_left_out, download)
        name = upload_name(download)
        option = await self.store.get_archive_option(download.id)
        if option is not None:
            local = await self._prepare_archive(download.id, local, log)
            name = local.name
        total = await asyncio.to_thread(local_total_size, local)
        await self.store.mark_upload_started(upload.id, total)
        if target is None:
            raise UploadFailure(
                TARGET_NOT_CONFIGURED,
                f"upload target {upload.upload_target!r} is not in upload.targets any more",
                retryable=False,
            )
        # An extracted or zipped job goes under its new name, not the one planned at creation.
        remote_path = remote_path_for(target, name) if option else upload.remote_path
        remote_path = remote_path or remote_path_for(target, name)
        progress = ProgressWriter(self.store, upload.id, total, interval=self.progress_interval)
        if upload.status == "uploading":
            log.info("upload {} to {} resumes after a restart", upload.id, target.name)
        link: str | None = None
        if target.type == "rclone":
            await self._upload_rclone(upload.id, local, remote_path, progress, log)
            link = await self.rclone.public_link(remote_path)
        else:
            remote_path = await self._upload_telegram(upload.id, target, local, name, progress)
        await self.store.mark_upload_completed(upload.id, remote_path, link)
        log.info("upload {} to {} completed and verified ({} bytes)", upload.id, target.name, total)

    async def _prepare_archive(self, download_id: int, local: Path, log: Logger) -> Path:
        """The job's archive extracted, or its folder zipped, next to it, once for all targets.

        Raises UploadFailure (archive_refused) for an archive that is refused or cannot be read.
        """
        async with self._archive_lock:
            option = await self.store.get_archive_option(download_id)
            if option is None:
                return local
            if option.prepared_path:
                done = await asyncio.to_thread(self.files.confined, option.prepared_path)
                if done is not None and await asyncio.to_thread(done.exists):
                    return done
            is_dir = await asyncio.to_thread(local.is_dir)
            try:
                if option.action == "zip":
                    if not is_dir:
                        raise ArchiveError(f"{local.name} is one file, not a folder to zip")
                    dest = local.parent / f"{local.name}.zip"
                    await asyncio.to_thread(discard, dest)  # a leftover of an interrupted run
                    prepared = await zip_folder(local, dest)
                else:
                    stem = None if is_dir else archive_stem(local.name)
                    if stem is None:
                        raise ArchiveError(f"{local.name} is not an archive that can be extracted")
                    dest = local.parent / stem
                    await asyncio.to_thread(discard, dest)  # a leftover of an interrupted run
                    limits = ArchiveLimits(
                        self.config.extract_max_size, self.config.extract_max_ratio
                    )
                    prepared = await extract(local, dest, limits, password=option.password)
            except ArchiveError as exc:
                raise UploadFailure(ARCHIVE_REFUSED, str(exc), retryable=False) from exc
            await self.store.record_archive_prepared(download_id, str(prepared))
            log.info("download {}: {} ready as {}", download_id, option.action, prepared.name)
            return prepared

    async def _upload_rclone(
        self,
        upload_id: int,
        local: Path,
        remote_path: str,
        progress: ProgressWriter,
        log: Logger,
    ) -> None:
        progress.start()
        try:
            await self.rclone.transfer(
                local,
                remote_path,
                on_progress=progress.report_rclone,
                job_key=f"upload-{upload_id}",
            )
        except RcloneError as exc:
            raise UploadFailure.from_rclone(exc) from exc
        finally:
            await progress.stop()
        await self.verify_rclone(upload_id, local, remote_path)

    async def verify_rclone(self, upload_id: int, local: Path, remote_path: str) -> None:
        """Read the remote copy back (size, and a hash both ends have); record it as verified.

        Raises UploadFailure (verify_size_mismatch, verify_hash_mismatch, …) when it differs.
        """
        try:
            result = await self.rclone.verify(local, remote_path)
        except RcloneError as exc:
            raise UploadFailure.from_rclone(exc) from exc
        verified_hash = f"{result.hash_type}:{result.hash}" if result.hash else None
        if verified_hash is None and result.hash_type:
            verified_hash = f"{result.hash_type}:every file"
        await self.store.record_upload_verified(upload_id, result.size, verified_hash)

    async def _upload_telegram(
        self,
        upload_id: int,
        target: UploadTarget,
        local: Path,
        name: str,
        progress: ProgressWriter,
    ) -> str:
        client = self.telegram_client() if self.telegram_client is not None else None
        if client is None or target.chat_id is None:
            raise UploadFailure(
                TELEGRAM_UNAVAILABLE,
                "the Telegram bot is not running (telegram.* credentials)",
                retryable=True,
            )
        sender = TelegramSender(
            client,
            target.chat_id,
            part_size=self.telegram_part_size or telegram_upload.TELEGRAM_PART_SIZE,
            work_dir=self.data_dir / "telegram-uploads" / str(upload_id),
        )
        progress.start()
        try:
            result = await sender.send(local, name, on_progress=progress.report)
        except TelegramUploadError as exc:
            raise UploadFailure.from_telegram(exc) from exc
        finally:
            await progress.stop()
        await self.store.record_upload_verified(upload_id, result.size, None)
        return result.remote_path

    async def _record_failure(self, upload_id: int, failure: UploadFailure, log: Logger) -> None:
        upload = await self._row(upload_id)
        if upload.status == "pending":
            await self.store.mark_upload_started(upload_id, upload.total_size)
        target = self.config.target(upload.upload_target)
        max_retries = self.config.retries_for(target) if target else upload.max_retries
        if failure.retryable and upload.retry_count < max_retries:
            delay = self.config.retry_backoff * (2**upload.retry_count)
            tries = await self.store.schedule_upload_retry(
                upload_id, failure.reason, failure.message, failure.code, _iso_after(delay)
            )
            log.warning(
                "upload {} failed ({}): {}; retry {}/{} in {:.1f} s",
                upload_id,
                failure.reason,
                failure.message,
                tries,
                max_retries,
                delay,
            )
            self._wake.set()
        else:
            await self.store.mark_upload_failed(
                upload_id, failure.reason, failure.message, failure.code
            )
            why = (
                "not retryable" if not failure.retryable else f"after {upload.retry_count} retries"
            )
            log.error(
                "upload {} failed ({}, {}): {}; the local file is kept",
                upload_id,
                failure.reason,
                why,
                failure.message,
            )

    # --- cleanup --------------------------------------------------------------------------------

    async def cleanup_if_done(self, download_id: int) -> bool:
        """With auto_delete: delete the local file once every upload of the download (one per
        target that takes it) is completed and verified. Returns True when it was cleaned."""
        if not self.config.auto_delete:
            return False
        async with self._cleanup_lock:
            download = await self.store.get_download_by_id(download_id)
            if download is None or download.status != "completed" or not download.local_path:
                return False
            uploads = await self.store.get_uploads_by_download(download_id)
            if not uploads or all(u.cleaned_at is not None for u in uploads):
                return False
            if any(u.status != "completed" or u.verified_at is None for u in uploads):
                return False
            have = {u.upload_target for u in uploads}
            if any(t.name not in have for t in await self.targets_for(download)):
                return False
            log = logger.bind(job=download_id)
            path = await asyncio.to_thread(self.files.confined, download.local_path)
            if path is None:
                log.warning(
                    "download {}: its file lies outside the download directory; not deleted",
                    download_id,
                )
                return False
            option = await self.store.get_archive_option(download_id)
            if option is not None and option.prepared_path:
                await self.files.remove(option.prepared_path)
            removed = await self.files.remove(path)
            if not removed and await asyncio.to_thread(path.exists):
                log.warning("download {}: the local file could not be deleted", download_id)
                return False
            await self.store.mark_download_cleaned_by_id(download_id)
            log.info("download {} uploaded everywhere; local file deleted", download_id)
            return True
