"""Live progress in the chat: one message per job, edited in place, and a notice when it ends.

Driven by the event hub, never by polling: each committed `download` event carries the row and its
uploads as committed, each `upload` or `cleanup` event the upload row; the notifier keeps the
latest of each job and marks the job dirty. One worker per chat then edits that chat's messages
one at a time, at most once every `telegram.progress_interval` seconds (read live), so a busy chat
never trips Telegram's flood limits; a FloodWait that still comes back is waited out and the job
is retried. The message id is stored with the job (`progress_message_id`), so editing continues
in the same message after a restart.

What the bot owes a chat when a download ends (its progress message's last edit, then the notice
of how it ended) is in the store's outbox, written in the transaction that ended the download. The
notifier reads it when it starts and whenever a download of a chat ends (on this node or another:
the hub carries both), and marks each notice delivered once sent, so a stop between the end and
the message loses nothing and a restart sends nothing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from loguru import logger
from pyrogram.errors import BadRequest, Flood, Forbidden, MessageIdInvalid, RPCError
from pyrogram.types import InlineKeyboardMarkup

from bot import render
from bot.context import BotContext
from bot.text import Language
from db import ACTIVE_DOWNLOAD_STATUSES, FINAL_DOWNLOAD_STATUSES
from events import Event, SubscriptionClosed
from records import DownloadRemoved, DownloadRow, DownloadSnapshot, UploadRow

_MAX_TRANSIENT_RETRIES = 3
_JOB_LIMIT = 10_000  # jobs remembered; the least recently changed are forgotten first
_NOTIFIED_UPLOAD_STATUSES = ("completed", "failed")
_OUTBOX_BATCH = 100  # owed notices taken from the store at a time
_OUTBOX_RETRY = 5.0  # seconds before reading the outbox again after the store failed


@dataclass
class _Job:
    """The latest committed state of one download, and what its chat has been shown of it."""

    row: DownloadRow
    uploads: dict[int, UploadRow]
    message_id: int | None  # the progress message
    rendered: tuple[str, str] | None = None  # (text, buttons) the message shows now
    upload_statuses: dict[int, str] = field(default_factory=dict)  # as the last upload event said
    notices: list[render.Notice] = field(default_factory=list)
    transient_failures: int = 0

    def upload_rows(self) -> list[UploadRow]:
        return [self.uploads[upload_id] for upload_id in sorted(self.uploads)]


class ProgressNotifier:
    """Subscribes to the hub and keeps each chat's progress messages current."""

    def __init__(self, context: BotContext) -> None:
        self.context = context
        self.running = False
        self._jobs: OrderedDict[int, _Job] = OrderedDict()
        self._dirty: dict[int, OrderedDict[int, None]] = {}
        self._workers: dict[int, asyncio.Task[None]] = {}
        self._next_allowed: dict[int, float] = {}
        self._outbox_wake = asyncio.Event()  # set: read the outbox again
        self._outbox_backlog = False  # the last read was a full batch: more may be owed

    @property
    def interval(self) -> float:
        return self.context.config().telegram.progress_interval

    def _target_names(self) -> list[str]:
        """The configured upload targets, offered on a job's progress message."""
        return [target.name for target in self.context.config().upload.targets]

    async def announce(self, row: DownloadRow, lang: Language) -> None:
        """Send a new job's progress message as the answer to its request (the caller holds the
        chat lock); if Telegram refuses now, the notifier sends it at the job's next event."""
        assert row.chat_id is not None
        text, markup = render.progress_message(lang, row, (), self._target_names())
        try:
            message_id = await self.context.say(
                row.chat_id, text, reply_to=row.message_id, markup=markup
            )
        except (RPCError, OSError, TimeoutError) as exc:
            logger.bind(job=row.id).warning(
                "progress message not sent yet: {}", getattr(exc, "ID", None) or type(exc).__name__
            )
            return
        if message_id is None:
            return
        await self.context.store.set_progress_message(row.id, message_id)
        job = self._jobs.get(row.id) or self._remember(row, {})
        job.message_id = message_id
        job.rendered = (text, render.markup_signature(markup))

    # --- the event loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the hub until cancelled (or until the hub closes)."""
        self.running = True
        outbox = asyncio.create_task(self._follow_outbox(), name="telegram-outbox")
        try:
            while True:
                subscription = self.context.hub.subscribe("telegram-progress", maxsize=10_000)
                try:
                    await self._resync()
                    while True:
                        try:
                            event = await subscription.get()
                        except SubscriptionClosed:
                            break
                        try:
                            await self._on_event(event)
                        except Exception:
                            logger.exception("progress notifier could not handle an event")
                finally:
                    subscription.close()
                if not subscription.dropped:
                    return
                logger.warning("progress notifier fell behind; resynchronising")
        finally:
            self.running = False
            outbox.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await outbox
            await self._stop_workers()

    async def _stop_workers(self) -> None:
        workers = list(self._workers.values())
        for worker in workers:
            worker.cancel()
        for worker in workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        self._workers.clear()

    async def _resync(self) -> None:
        """Take in every active chat job and what the outbox says is owed: after a start (or a
        drop) every message catches up."""
        store = self.context.store
        rows = [
            row
            for row in await store.fetch_downloads_in_states(ACTIVE_DOWNLOAD_STATUSES)
            if row.chat_id is not None
        ]
        uploads = await store.get_uploads_for_downloads([row.id for row in rows])
        for row in rows:
            self._take(row, uploads.get(row.id, ()))
        self._outbox_wake.set()

    # --- the outbox -------------------------------------------------------------------------------

    async def _follow_outbox(self) -> None:
        """Read the outbox whenever woken; each owed notice joins its job, whose chat worker
        delivers it."""
        while True:
            await self._outbox_wake.wait()
            self._outbox_wake.clear()
            try:
                await self._take_owed()
            except Exception as exc:
                logger.warning(
                    "the bot's outbox was not read ({}); trying again in {} s",
                    " ".join(str(exc).split()) or type(exc).__name__,
                    _OUTBOX_RETRY,
                )
                await asyncio.sleep(_OUTBOX_RETRY)
                self._outbox_wake.set()

    async def _take_owed(self) -> None:
        # Taken before the read: a notice leaves its job only once it is marked delivered, so
        # one that the read still shows as owed was already taken then.
        taken = {
            notice.outbox_id
            for job in self._jobs.values()
            for notice in job.notices
            if notice.outbox_id is not None
        }
        owed = await self.context.store.fetch_undelivered_notices(_OUTBOX_BATCH)
        self._outbox_backlog = len(owed) == _OUTBOX_BATCH
        for owed_notice in owed:
            if owed_notice.id in taken:
                continue
            job = self._jobs.get(owed_notice.download_id) or await self._load(
                owed_notice.download_id
            )
            if job is None or job.row.chat_id is None:
                logger.bind(job=owed_notice.download_id).info(
                    "download {} is gone: its chat notice is dropped", owed_notice.download_id
                )
                await self._settle(owed_notice.id)
                continue
            notice = render.Notice("download", job.row.id, owed_notice.kind, owed_notice.id)
            self._add_notice(job, notice)
            self._mark(job.row.chat_id, job.row.id)

    async def _settle(self, outbox_id: int) -> None:
        """Record an owed notice as delivered: sent, or nothing left to send."""
        await self.context.store.mark_notice_delivered(outbox_id)
        if self._outbox_backlog:
            self._outbox_wake.set()  # room for the notices the last read left out

    async def _on_event(self, event: Event) -> None:
        data = event.data
        if isinstance(data, DownloadRemoved):
            if data.download_id is None:
                self._jobs.clear()
                self._dirty.clear()
            else:
                self._forget(data.download_id)
        elif isinstance(data, DownloadSnapshot):
            self._take(data.row, data.uploads)
        elif isinstance(data, UploadRow):
            await self._take_upload(data, notify=event.kind == "upload")

    def _remember(self, row: DownloadRow, uploads: dict[int, UploadRow]) -> _Job:
        job = _Job(row=row, uploads=uploads, message_id=row.progress_message_id)
        self._jobs[row.id] = job
        if len(self._jobs) > _JOB_LIMIT:
            self._jobs.popitem(last=False)
        return job

    def _take(self, row: DownloadRow, uploads: Sequence[UploadRow]) -> None:
        """A download as committed: keep it, note a final status, and mark its chat dirty."""
        by_id = {upload.id: upload for upload in uploads}
        job = self._jobs.get(row.id)
        if job is None:
            previous = None
            job = self._remember(row, by_id)
        else:
            previous = job.row.status
            job.row, job.uploads = row, by_id
            if job.message_id is None:
                job.message_id = row.progress_message_id
            self._jobs.move_to_end(row.id)
        if row.chat_id is None:
            return
        if row.status != previous and row.status in FINAL_DOWNLOAD_STATUSES:
            self._outbox_wake.set()  # its notice was committed with this status
        self._mark(row.chat_id, row.id)

    async def _take_upload(self, upload: UploadRow, *, notify: bool) -> None:
        job = self._jobs.get(upload.download_id) or await self._load(upload.download_id)
        if job is None or job.row.chat_id is None:
            return
        job.uploads[upload.id] = upload
        previous = job.upload_statuses.get(upload.id)
        if notify:
            job.upload_statuses[upload.id] = upload.status
            if upload.status != previous and upload.status in _NOTIFIED_UPLOAD_STATUSES:
                self._add_notice(job, render.Notice("upload", upload.id, upload.status))
        self._mark(job.row.chat_id, upload.download_id)

    async def _load(self, download_id: int) -> _Job | None:
        """A download first heard of through one of its uploads (it changed before we started)."""
        store = self.context.store
        row = await store.get_download_by_id(download_id)
        if row is None:
            return None
        uploads = await store.get_uploads_by_download(download_id) if row.chat_id else []
        # An event may have brought the job in while the rows were read: it is as new.
        return self._jobs.get(download_id) or self._remember(
            row, {upload.id: upload for upload in uploads}
        )

    def _forget(self, download_id: int) -> None:
        self._jobs.pop(download_id, None)
        for dirty in self._dirty.values():
            dirty.pop(download_id, None)

    @staticmethod
    def _add_notice(job: _Job, notice: render.Notice) -> None:
        if notice not in job.notices:
            job.notices.append(notice)

    def _mark(self, chat_id: int, download_id: int, *, front: bool = False) -> None:
        dirty = self._dirty.setdefault(chat_id, OrderedDict())
        dirty[download_id] = None
        if front:
            dirty.move_to_end(download_id, last=False)
        worker = self._workers.get(chat_id)
        if worker is None or worker.done():
            self._workers[chat_id] = asyncio.create_task(
                self._chat_worker(chat_id), name=f"telegram-progress-{chat_id}"
            )

    # --- per-chat workers -------------------------------------------------------------------------

    async def _chat_worker(self, chat_id: int) -> None:
        log = logger.bind(chat=chat_id)
        try:
            while True:
                dirty = self._dirty.get(chat_id)
                if not dirty:
                    return
                delay = self._next_allowed.get(chat_id, 0.0) - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                    continue  # the queue may have changed while waiting
                download_id, _ = dirty.popitem(last=False)
                job = self._jobs.get(download_id)
                if job is None:
                    continue
                try:
                    await self._flush(chat_id, job)
                    job.transient_failures = 0
                except Flood as flood:
                    wait = float(flood.value or 1)  # type: ignore[arg-type]
                    log.bind(job=download_id).warning(
                        "Telegram asks to wait {} s before editing again; waiting", wait
                    )
                    self._next_allowed[chat_id] = time.monotonic() + wait
                    self._mark(chat_id, download_id, front=True)
                except (OSError, TimeoutError, ConnectionError) as exc:
                    job.transient_failures += 1
                    failures = job.transient_failures
                    if failures <= _MAX_TRANSIENT_RETRIES:
                        log.bind(job=download_id).warning(
                            "progress message not updated ({}); retrying", type(exc).__name__
                        )
                        self._next_allowed[chat_id] = time.monotonic() + self.interval * failures
                        self._mark(chat_id, download_id)
                    else:
                        log.bind(job=download_id).error(
                            "progress message not updated after {} tries: {}",
                            failures,
                            type(exc).__name__,
                        )
                        job.transient_failures = 0
                        # The outbox keeps what is owed: the next time it is read, it is tried
                        # again.
                        job.notices = [n for n in job.notices if n.outbox_id is None]
                except RPCError as exc:
                    log.bind(job=download_id).warning(
                        "Telegram refused a progress update: {}", exc.ID or type(exc).__name__
                    )
                except Exception:
                    log.bind(job=download_id).exception("progress update failed")
        finally:
            if self._workers.get(chat_id) is asyncio.current_task():
                del self._workers[chat_id]
            if not self._dirty.get(chat_id):
                self._dirty.pop(chat_id, None)

    def _spent(self, chat_id: int) -> None:
        self._next_allowed[chat_id] = time.monotonic() + self.interval

    async def _flush(self, chat_id: int, job: _Job) -> None:
        """At most one Telegram call for this job; anything left is marked dirty again. The
        progress message is brought up to date before a notice goes out, so a job that ended
        shows its end (and no buttons it no longer has) first."""
        async with self.context.chat_locks(chat_id):
            row, uploads = job.row, job.upload_rows()
            lang = self.context.languages.of(row.owner_id)
            text, markup = render.progress_message(lang, row, uploads, self._target_names())
            signature = (text, render.markup_signature(markup))
            if job.message_id is None or job.rendered != signature:
                await self._show_progress(chat_id, job, text, markup)
                job.rendered = signature
                self._spent(chat_id)
            elif job.notices:
                await self._tell(chat_id, job, lang)
            self._remark_if_pending(chat_id, job)

    async def _show_progress(
        self, chat_id: int, job: _Job, text: str, markup: InlineKeyboardMarkup | None
    ) -> None:
        if job.message_id is None:
            await self._send_progress(job, text, markup)
            return
        try:
            await self.context.edit(chat_id, job.message_id, text, markup)
        except MessageIdInvalid:
            # The user deleted the message: start a new one.
            await self._send_progress(job, text, markup)
        except (BadRequest, Forbidden) as exc:
            # Refused for good (the bot was blocked, the message may not be edited any more):
            # the notice that may follow is still tried.
            logger.bind(chat=chat_id, job=job.row.id).warning(
                "Telegram refused a progress edit: {}", exc.ID or type(exc).__name__
            )

    async def _tell(self, chat_id: int, job: _Job, lang: Language) -> None:
        """Send the job's first notice; a download's is then marked delivered in the outbox."""
        row, notice = job.row, job.notices[0]
        log = logger.bind(chat=chat_id, job=row.id)
        if notice.outbox_id is not None and row.status != notice.status:
            fresh = await self.context.store.get_download_by_id(row.id)
            if fresh is not None and fresh.status == notice.status:
                job.row = fresh  # the copy here was behind the store: show the end first
                return
            log.info("download {} was deleted or retried since it ended: no notice", row.id)
        completed = notice.entity == "download" and notice.status == "completed"
        links = self._links(row) if completed else ()
        message = render.notice_text(lang, row, job.upload_rows(), notice, links)
        if message is not None:
            try:
                await self.context.say(chat_id, message, reply_to=row.message_id)
            except (BadRequest, Forbidden) as exc:
                log.warning("Telegram refused a notice: {}", exc.ID or type(exc).__name__)
            self._spent(chat_id)
        if notice.outbox_id is not None:
            await self._settle(notice.outbox_id)
        job.notices.remove(notice)

    def _remark_if_pending(self, chat_id: int, job: _Job) -> None:
        if job.notices:
            self._mark(chat_id, job.row.id)

    async def _send_progress(
        self, job: _Job, text: str, markup: InlineKeyboardMarkup | None
    ) -> None:
        row = job.row
        assert row.chat_id is not None
        message_id = await self.context.say(
            row.chat_id, text, reply_to=row.message_id, markup=markup
        )
        if message_id is not None:
            await self.context.store.set_progress_message(row.id, message_id)
            job.message_id = message_id

    def _links(self, row: DownloadRow) -> list[str]:
        """Where a completed download's bytes can be fetched: the file, or a torrent's first
        files (render.MAX_LINKS)."""
        links = self.context.links
        if not row.files:
            url = links.stream_url(row)
            return [url] if url else []
        found = (links.file_url(row, f.index, f.path) for f in row.files[: render.MAX_LINKS])
        return [url for url in found if url]
