"""Downloads: the one way in for every source, user actions, and keeping rows true to aria2.

Every job becomes a `downloads` row (committed) before aria2 is asked; the gid is attached after.
aria2's notifications and the poller both feed :meth:`DownloadManager.apply_status`, which applies
the decision of :func:`aria2_client.sync.plan` through the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit, urlunsplit

from loguru import logger

from aria2_client.client import Aria2Client
from aria2_client.egress import EgressProxy
from aria2_client.models import (
    PROGRESS_KEYS,
    Aria2Notification,
    Aria2Status,
    human_size,
    new_gid,
)
from aria2_client.sources import (
    AddressPolicy,
    ParsedLink,
    SourceError,
    blocked_sources,
    ensure_public_host,
    index_out_for,
    magnet_sources,
    parse_link,
    parse_torrent,
    safe_file_name,
    torrent_sources,
    without_magnet_sources,
    without_torrent_sources,
)
from aria2_client.sync import (
    Oversized,
    RowDetails,
    plan,
    row_details,
    store_change,
    too_large_message,
)
from aria2_client.transport import Aria2RpcError, Aria2Unavailable
from configer import DEFAULT_BLOCKED_NETWORKS, ProxyParts, Quotas
from db import (
    ACTIVE_DOWNLOAD_STATUSES,
    STORE_ERRORS,
    DuplicateDownload,
    NotFound,
    Store,
    StoreError,
    TransitionError,
    parse_utc,
)
from files import DownloadFiles
from records import (
    ArchiveRequest,
    DownloadChange,
    DownloadRow,
    HolderAction,
    NewDownload,
    ProgressUpdate,
    TgMediaRecord,
    TorrentFile,
)

DownloadListener = Callable[[DownloadRow], Awaitable[None]]
TelegramLinkMaker = Callable[[DownloadRow], str]
HANDOFF_WAIT = 10.0  # seconds a refusal by the egress proxy waits for its job's hand-off


@dataclass(frozen=True)
class Placement:
    """This node in a cluster: jobs are claimed, up to `slots()` at a time (pending, waiting
    and downloading), and an action on a job another node holds is done by that node."""

    node: str
    slots: Callable[[], int]
    ask_holder: HolderAction


class TooLarge(SourceError):
    """The job is larger than `aria2.max_download_size`."""


class QuotaExceeded(SourceError):
    """A user's new job refused: they reached a quota of `telegram.quotas`."""


@dataclass(frozen=True)
class Requester:
    """Who asked for a job, and where the answer goes (a chat), if anywhere."""

    owner_id: int | None = None
    chat_id: int | None = None
    message_id: int | None = None
    group_key: str | None = None


class DownloadManager:
    """Adds jobs, acts on them for users, and keeps their rows true to aria2.

    `on_completed` listeners hear of every download aria2 completed (a failing listener is
    logged and the others still run); `on_removed` listeners hear of every download cancelled or
    deleted by a user, before its rows go.
    """

    def __init__(
        self,
        store: Store,
        aria2: Aria2Client,
        files: DownloadFiles,
        *,
        max_download_size: int = 0,
        max_torrent_files: int = 0,
        ask_file_selection: str = "never",
        file_selection_timeout: float = 300,
        allow_private_addresses: bool = False,
        blocked_networks: Sequence[str] = DEFAULT_BLOCKED_NETWORKS,
        admins: Callable[[], Collection[int]] = tuple,
        quotas: Callable[[], Quotas] = Quotas,
        egress: EgressProxy | None = None,
        proxy: ProxyParts | None = None,
        telegram_link: TelegramLinkMaker | None = None,
        on_completed: Sequence[DownloadListener] = (),
        on_removed: Sequence[DownloadListener] = (),
        placement: Placement | None = None,
    ) -> None:
        self.store = store
        self.placement = placement
        # The rows this process runs: with a placement, those its node holds; else every row.
        self.node = placement.node if placement is not None else None
        self.aria2 = aria2
        self.files = files
        self.max_download_size = max_download_size
        self.max_torrent_files = max_torrent_files  # 0: no cap
        self.ask_file_selection = ask_file_selection  # never, chats or always
        self.file_selection_timeout = file_selection_timeout  # seconds
        self.allow_private_addresses = allow_private_addresses
        self.policy = AddressPolicy(blocked_networks)
        self.admins = admins
        self.quotas = quotas
        self.egress = egress
        self.proxy = proxy
        self.telegram_link = telegram_link
        self._on_completed = tuple(on_completed)
        self._on_removed = tuple(on_removed)
        self._apply_lock = asyncio.Lock()
        self._submitting: set[int] = set()
        self._claim_lock = asyncio.Lock()
        self._handoffs: dict[int, asyncio.Event] = {}  # jobs being handed to aria2
        # Gids chosen for new jobs, from before their rows commit until aria2 has them: a row
        # that names one is not "lost by aria2" yet.
        self._gids_in_hand: set[str] = set()
        # Jobs waiting, paused, for their files to be chosen: each one's deadline.
        self._choosing: dict[int, asyncio.Task[None]] = {}

    @property
    def download_dir(self) -> Path:
        return self.files.root

    # --- the one way in ---------------------------------------------------------------------------

    async def add_link(
        self,
        url: str,
        requester: Requester | None = None,
        *,
        archive: ArchiveRequest | None = None,
        targets: Sequence[str] | None = None,
    ) -> DownloadRow:
        """http/https/ftp/magnet → a committed row (with its archive step), then aria2.

        Raises SourceError (bad or refused link) or DuplicateDownload.
        """
        [added] = await self.add_links([url], requester, archive=archive, targets=targets)
        if isinstance(added, Exception):
            raise added
        return added

    async def add_links(
        self,
        urls: Sequence[str],
        requester: Requester | None = None,
        *,
        archive: ArchiveRequest | None = None,
        targets: Sequence[str] | None = None,
    ) -> list[DownloadRow | SourceError | DuplicateDownload]:
        """Many links that came together (one message, one API call): the rows of all that are
        accepted committed in ONE transaction (one batch of events), each with its archive step
        and its chosen upload targets if asked for (`targets`: names, [] = keep here only; None =
        the targets' `match` rules decide), then each handed to aria2.
        For each link, in order: its row, or the SourceError (bad or refused link) or
        DuplicateDownload it is."""
        requester = requester or Requester()
        restricted = self._restricted(requester.owner_id)
        answers: list[DownloadRow | SourceError | DuplicateDownload | None] = []
        accepted: list[tuple[int, NewDownload]] = []
        room, problem = await self._quota_room(requester.owner_id)
        for url in urls:
            try:
                link = parse_link(url)
                if restricted:
                    await ensure_public_host(link, self.policy)
                if room is not None:
                    if room <= 0:
                        raise QuotaExceeded(problem)
                    room -= 1
            except SourceError as exc:
                answers.append(exc)
                continue
            accepted.append((len(answers), self._new_from_link(link, requester)))
            answers.append(None)
        gids = self._gids_for(len(accepted))
        with self._holding_gids(gids):
            created = await self.store.create_downloads(
                [(new, None) for _, new in accepted], gids=gids
            )
            new_ids = [outcome for outcome in created if isinstance(outcome, int)]
            for download_id in new_ids:
                await self._set_job_options(download_id, archive, targets)
            if gids is None:
                await self.submit_many(new_ids)
            else:
                for outcome, gid in zip(created, gids, strict=True):
                    if isinstance(outcome, int):
                        await self._hand_queued(outcome, gid)
        for (position, _), outcome in zip(accepted, created, strict=True):
            answers[position] = (
                outcome if isinstance(outcome, DuplicateDownload) else await self._row(outcome)
            )
        done = [answer for answer in answers if answer is not None]
        assert len(done) == len(urls)  # every link answered, in its place
        return done

    async def _quota_room(self, owner_id: int | None) -> tuple[int | None, str]:
        """How many more jobs this owner may add now under `telegram.quotas` (None: no cap),
        and why none when that is 0. Admins and jobs without an owner have no quota."""
        quotas = self.quotas()
        if owner_id is None or owner_id in self.admins():
            return None, ""
        if not (quotas.active_jobs or quotas.bytes_per_day):
            return None, ""
        rows = await self.store.fetch_recent_downloads(-1, owner_id=owner_id)
        if quotas.bytes_per_day:
            since = datetime.now(UTC) - timedelta(days=1)
            added = sum(
                row.total_length or 0
                for row in rows
                if (created := parse_utc(row.created_at)) is not None and created > since
            )
            if added >= quotas.bytes_per_day:
                return 0, (
                    f"daily quota reached: your jobs of the last 24 hours hold"
                    f" {human_size(added)} of {human_size(quotas.bytes_per_day)} allowed"
                )
        if not quotas.active_jobs:
            return None, ""
        active = sum(row.status in ACTIVE_DOWNLOAD_STATUSES for row in rows)
        return max(0, quotas.active_jobs - active), (
            f"quota reached: you have {active} unfinished job(s), at most"
            f" {quotas.active_jobs} at once; wait for one to finish or cancel one"
        )

    def _restricted(self, owner_id: int | None) -> bool:
        """Whether a job of this owner may reach only addresses outside `aria2.blocked_networks`:
        a Telegram user's (jobs of the page and the API have no owner) who is not an admin,
        unless `aria2.allow_private_addresses` is on. Judged from the row at every hand-off."""
        return (
            owner_id is not None
            and not self.allow_private_addresses
            and owner_id not in self.admins()
        )

    def _new_from_link(self, link: ParsedLink, requester: Requester) -> NewDownload:
        return NewDownload(
            source_type=link.source_type,
            source_key=link.source_key,
            source_url=link.url,
            file_name=safe_file_name(link.display_name, "download"),
            info_hash=link.info_hash,
            owner_id=requester.owner_id,
            chat_id=requester.chat_id,
            message_id=requester.message_id,
            group_key=requester.group_key,
        )

    async def add_torrent(
        self,
        data: bytes,
        requester: Requester | None = None,
        *,
        archive: ArchiveRequest | None = None,
        targets: Sequence[str] | None = None,
    ) -> DownloadRow:
        """A .torrent → a committed row with its file list, then aria2. Raises SourceError (a bad
        torrent, or more files than `aria2.max_torrent_files`), TooLarge or DuplicateDownload."""
        requester = requester or Requester()
        room, problem = await self._quota_room(requester.owner_id)
        if room is not None and room <= 0:
            raise QuotaExceeded(problem)
        # Reading a torrent of many files takes a second of CPU: not on the event loop.
        meta = await asyncio.to_thread(parse_torrent, data, max_files=self.max_torrent_files)
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
        return await self._create_and_submit(
            new, files=meta.files, archive=archive, targets=targets
        )

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
            raise TooLarge(too_large_message(size, self.max_download_size))

    async def _create_and_submit(
        self,
        new: NewDownload,
        *,
        media: TgMediaRecord | None = None,
        files: Sequence[TorrentFile] | None = None,
        archive: ArchiveRequest | None = None,
        targets: Sequence[str] | None = None,
    ) -> DownloadRow:
        gids = self._gids_for(1)
        with self._holding_gids(gids):
            download_id = await self.store.create_download(
                new, media, gid=None if gids is None else gids[0]
            )
            if files:
                await self.store.update_download_details_by_id(download_id, files=files)
            await self._set_job_options(download_id, archive, targets)
            ask = self._asks_choice(new.chat_id, len(files or ()))
            if gids is None:
                await self.submit(download_id, paused=ask)
            else:
                await self._hand_queued(download_id, gids[0], paused=ask)
        row = await self._row(download_id)
        if ask and row.status == "paused":
            self._await_choice(download_id)
        return row

    def _asks_choice(self, chat_id: int | None, file_count: int) -> bool:
        """Whether a torrent of `file_count` files waits, paused, for its files to be chosen."""
        if file_count < 2:
            return False
        return self.ask_file_selection == "always" or (
            self.ask_file_selection == "chats" and chat_id is not None
        )

    def _await_choice(self, download_id: int) -> None:
        """Take every file once the deadline for the choice has passed."""
        logger.bind(job=download_id, within_s=self.file_selection_timeout).info(
            "download {} waits for its files to be chosen", download_id
        )
        self._choosing[download_id] = asyncio.create_task(
            self._take_all_files_later(download_id, self.file_selection_timeout),
            name=f"file-choice-{download_id}",
        )

    async def _take_all_files_later(self, download_id: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._choosing.get(download_id) is asyncio.current_task():
            del self._choosing[download_id]
        log = logger.bind(job=download_id)
        log.info("download {}: no choice of files in time, every file is taken", download_id)
        try:
            await self.resume(download_id)
        except (TransitionError, NotFound, StoreError, Aria2RpcError, Aria2Unavailable) as exc:
            log.info("download {} not started after the wait: {}", download_id, exc)

    def _end_choice_wait(self, download_id: int) -> bool:
        """Forget the job's deadline for a choice of files; whether it had one."""
        waiting = self._choosing.pop(download_id, None)
        if waiting is None:
            return False
        waiting.cancel()
        return True

    async def stop(self) -> None:
        """Drop the deadlines of the choices still awaited (their jobs stay paused)."""
        waits = list(self._choosing.values())
        self._choosing.clear()
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)

    async def _set_job_options(
        self,
        download_id: int,
        archive: ArchiveRequest | None,
        targets: Sequence[str] | None,
    ) -> None:
        """What the job asked for beyond its bytes, stored before it can complete."""
        if archive is not None:
            await self.store.set_archive_option(download_id, archive.action, archive.password)
        if targets is not None:
            await self.store.set_download_targets(download_id, targets)

    async def _hand_to_aria2(
        self, row: DownloadRow, *, paused: bool, gid: str | None = None
    ) -> str:
        """Add the row's job to aria2 (paused if asked; under `gid` if given); returns its gid.

        Raises SourceError (nothing aria2 could fetch), Aria2RpcError or Aria2Unavailable.
        """
        options = {"dir": str(self.files.job_dir(row.id))}
        if gid is not None:
            options["gid"] = gid
        if paused:
            options["pause"] = "true"
        # Telegram files come from our own loopback link, never through the proxy.
        restricted = row.source_type != "telegram" and self._restricted(row.owner_id)
        if restricted:
            if self.egress is None:
                raise SourceError("downloads of users who are not admins need the egress proxy")
            options.update(self.egress.options(row.id, tunnel=row.source_type == "ftp"))
        elif row.source_type != "telegram" and self.proxy is not None:
            options.update(proxy_options(self.proxy, tunnel=row.source_type == "ftp"))
        if row.source_type == "torrent":
            data = await self.store.get_torrent_data(row.id)
            if data is None:
                raise SourceError("the torrent file of this download is missing")
            meta = await asyncio.to_thread(parse_torrent, data)
            if meta.index_out:  # the files whose names the name policy cleaned
                options["index-out"] = meta.index_out
            options.update(chosen_files_option(row))  # a choice made earlier holds
            if restricted:
                sources = await asyncio.to_thread(torrent_sources, data)
                dropped = await self._blocked_sources(row, sources)
                if dropped:
                    data = await asyncio.to_thread(without_torrent_sources, data, dropped)
            return await self.aria2.add_torrent(data, options)
        if row.source_type == "telegram":
            if self.telegram_link is None:
                raise SourceError("Telegram downloads need the bot to be running")
            options["out"] = row.file_name or f"telegram_{row.id}"
            return await self.aria2.add_uri([self.telegram_link(row)], options)
        if row.source_url is None:
            raise SourceError(f"download {row.id} has no source link")
        if row.source_type in ("http", "ftp") and not _safe_link_name(row.source_url):
            # aria2 would use the link's last segment as it is (too long, "..", bidi marks…).
            options["out"] = row.file_name or "download"
        url = row.source_url
        if row.source_type == "magnet":
            # The files are known once the metadata is in: the download that follows waits,
            # paused, until their names on disk are set (see _start_follow_up).
            options["pause-metadata"] = "true"
        if row.source_type in ("http", "ftp"):
            url = _credentials_to_options(url, options)
        if restricted and row.source_type == "magnet":
            dropped = await self._blocked_sources(row, magnet_sources(url))
            url = without_magnet_sources(url, dropped) if dropped else url
        return await self.aria2.add_uri([url], options)

    async def _blocked_sources(self, row: DownloadRow, sources: Sequence[str]) -> set[str]:
        """The trackers and web seeds of a restricted job it may not contact (logged with their
        reasons; the URLs themselves may carry a tracker's passkey and are not)."""
        dropped = await blocked_sources(sources, self.policy)
        if dropped:
            logger.bind(job=row.id).warning(
                "download {}: {} of {} trackers and web seeds dropped: {}",
                row.id,
                len(dropped),
                len(sources),
                "; ".join(sorted(set(dropped.values()))),
            )
        return set(dropped)

    @contextlib.contextmanager
    def _handing_off(self, download_id: int) -> Iterator[None]:
        """While a job is handed to aria2 and its row told so (aria2 may fetch at once)."""
        done = self._handoffs.setdefault(download_id, asyncio.Event())
        try:
            yield
        finally:
            if self._handoffs.get(download_id) is done:
                del self._handoffs[download_id]
            done.set()

    async def egress_refused(self, download_id: int, reason: str) -> None:
        """The egress proxy refused a connection of this job. A link's job fails with the reason,
        recorded before aria2 hears the refusal (which would fail it with a bare status code); a
        torrent's goes on without that tracker or web seed. aria2 waits for the proxy's answer,
        so a refusal that comes while the job is still being handed over waits for its row."""
        handoff = self._handoffs.get(download_id)
        if handoff is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(handoff.wait(), HANDOFF_WAIT)
        row = await self.store.get_download_by_id(download_id)
        if row is None or row.source_type not in ("http", "ftp"):
            return
        if row.status not in ("waiting", "downloading", "paused"):
            return
        try:
            await self.store.mark_download_failed_by_id(download_id, reason, "blocked")
        except TransitionError:
            return  # it moved on meanwhile
        if row.gid is not None:
            try:
                await self.aria2.remove(row.gid)
            except (Aria2RpcError, Aria2Unavailable) as exc:
                logger.bind(job=download_id, gid=row.gid).info("aria2 remove: {}", exc)

    def _gids_for(self, count: int) -> list[str] | None:
        """Gids for `count` new jobs, so that each is recorded queued in the transaction that
        records it (aria2 takes a job under a gid given to it); None when they are to wait,
        `pending`: in a cluster (until a node claims them) or while aria2 is away."""
        if self.placement is not None or not self.aria2.connected:
            return None
        return [new_gid() for _ in range(count)]

    @contextlib.contextmanager
    def _holding_gids(self, gids: Sequence[str] | None) -> Iterator[None]:
        """While new jobs' gids are recorded but not yet given to aria2."""
        held = set(gids or ())
        self._gids_in_hand |= held
        try:
            yield
        finally:
            self._gids_in_hand -= held

    async def _hand_queued(self, download_id: int, gid: str, *, paused: bool = False) -> None:
        """Give aria2 a new job recorded queued under `gid`. aria2 gone meanwhile: the poller
        adds the job once aria2 is back (its gid unknown there); aria2 refusing it: it fails."""
        log = logger.bind(job=download_id, gid=gid)
        with self._handing_off(download_id):
            row = await self.store.get_download_by_id(download_id)
            if row is None or row.status != "waiting" or row.gid != gid:
                return  # cancelled or deleted meanwhile
            try:
                await self._hand_to_aria2(row, paused=paused, gid=gid)
            except Aria2Unavailable:
                log.warning("aria2 is unavailable; download {} is added once it is back", row.id)
                return
            except (Aria2RpcError, SourceError) as exc:
                message = exc.message if isinstance(exc, Aria2RpcError) else str(exc)
                log.warning("aria2 refused download {}: {}", download_id, message)
                await self.store.mark_download_failed_by_id(download_id, message, "refused")
                return
            if paused:  # queued first: a job never goes from pending to paused
                await self.store.mark_download_paused(gid)
        log.info("download {} queued in aria2 as {}", download_id, gid)

    async def submit(self, download_id: int, *, paused: bool = False) -> None:
        """Hand a `pending` row to aria2; if aria2 is down the row stays pending for later."""
        # The API and start-up reconciliation may both reach a pending row: one submit at a time.
        if download_id in self._submitting:
            return
        self._submitting.add(download_id)
        try:
            if await self._claim(download_id):
                await self._submit_pending(download_id, paused)
        finally:
            self._submitting.discard(download_id)

    async def _claim(self, download_id: int) -> bool:
        """Whether this node runs the job: always alone; in a cluster, if it holds the job or
        has a free slot to claim it (else it waits, pending, for any node)."""
        if self.placement is None:
            return True
        row = await self.store.get_download_by_id(download_id)
        if row is None or row.node not in (None, self.placement.node):
            return False
        if row.node is not None:
            return True
        async with self._claim_lock:
            if await self._free_slots() <= 0:
                return False
            claimed = await self.store.claim_downloads(self.placement.node, 1, [download_id])
        return download_id in claimed

    async def _free_slots(self) -> int:
        assert self.placement is not None
        held = await self.store.count_node_jobs(self.placement.node)
        return self.placement.slots() - held

    async def _submit_pending(self, download_id: int, paused: bool) -> None:
        with self._handing_off(download_id):
            gid = await self._hand_over(download_id, paused)
            if gid is None:
                return
            await self.store.mark_download_queued_by_id(download_id, gid)
            if paused:  # queued first: a job never goes from pending to paused
                await self.store.mark_download_paused(gid)
        logger.bind(job=download_id, gid=gid).info(
            "download {} queued in aria2 as {}", download_id, gid
        )

    async def submit_many(self, download_ids: Sequence[int]) -> None:
        """Hand new `pending` rows that came together to aria2 (one call each) and record them
        all queued in ONE transaction; as :meth:`submit` for each otherwise."""
        handed: list[tuple[int, str]] = []
        with contextlib.ExitStack() as stack:
            for download_id in download_ids:
                if download_id in self._submitting:
                    continue
                self._submitting.add(download_id)
                stack.callback(self._submitting.discard, download_id)
                if not await self._claim(download_id):
                    continue
                stack.enter_context(self._handing_off(download_id))
                gid = await self._hand_over(download_id, paused=False)
                if gid is not None:
                    handed.append((download_id, gid))
            queued = set(await self.store.mark_downloads_queued(handed)) if handed else set()
        for download_id, gid in handed:
            if download_id in queued:
                logger.bind(job=download_id, gid=gid).info(
                    "download {} queued in aria2 as {}", download_id, gid
                )

    async def _hand_over(self, download_id: int, paused: bool) -> str | None:
        """Add a `pending` row's job to aria2; its gid, or None when it is not pending, aria2
        is unavailable (the row stays pending) or aria2 refused it (the row failed)."""
        row = await self.store.get_download_by_id(download_id)
        if row is None or row.status != "pending":
            return None
        log = logger.bind(job=download_id)
        try:
            return await self._hand_to_aria2(row, paused=paused)
        except Aria2Unavailable:
            log.warning("aria2 is unavailable; download {} stays pending", download_id)
        except (Aria2RpcError, SourceError) as exc:
            message = exc.message if isinstance(exc, Aria2RpcError) else str(exc)
            log.warning("aria2 refused download {}: {}", download_id, message)
            await self.store.mark_download_failed_by_id(download_id, message, "refused")
        return None

    async def reconcile_pending(self) -> int:
        """Submit every row that never reached aria2 (e.g. the service stopped in between); in a
        cluster, those this node holds, then as many more as it has free slots for."""
        rows = await self.store.fetch_downloads_in_states(("pending",), node=self.node)
        for row in rows:
            await self.submit(row.id)
        if self.placement is None:
            return len(rows)
        node = self.placement.node
        async with self._claim_lock:  # slots counted and taken in one step
            free = await self._free_slots()
            claimed = await self.store.claim_downloads(node, free) if free > 0 else []
        for download_id in claimed:
            logger.bind(job=download_id).info("download {} claimed", download_id)
            await self.submit(download_id)
        return len(rows) + len(claimed)

    async def release_others_jobs(self) -> int:
        """A cluster node back from the dead: other nodes took its unfinished jobs meanwhile.
        Stop what its aria2 still runs for them and delete their partial files here; the number
        of jobs released."""
        if self.placement is None:
            return 0
        mine = await self.store.fetch_downloads_in_states(ACTIVE_DOWNLOAD_STATUSES, node=self.node)
        gids = {row.gid for row in mine}
        stale = [s.gid for s in await self.aria2.poll(max_stopped=0) if s.gid not in gids]
        for gid in stale:
            await self.aria2.remove(gid)
        released = 0
        for download_id in await asyncio.to_thread(self.files.job_ids):
            row = await self.store.get_download_by_id(download_id)
            # A job back in the queue (no node) may be claimed here again: aria2 resumes its file.
            if row is None or row.node in (None, self.node):
                continue
            await self.files.remove(self.files.job_dir(download_id), job=download_id)
            logger.bind(job=download_id).info(
                "download {} is another node's now; its partial files here are deleted",
                download_id,
            )
            released += 1
        if stale:
            logger.info("aria2 jobs no row of this node runs any more, stopped: {}", len(stale))
        return released

    # --- user actions -----------------------------------------------------------------------------

    async def _row(self, download_id: int) -> DownloadRow:
        row = await self.store.get_download_by_id(download_id)
        if row is None:
            raise NotFound("download", download_id)
        return row

    async def _held_elsewhere(self, row: DownloadRow, action: str) -> bool:
        """In a cluster, have the node holding `row` do `action` itself (its aria2 runs the job,
        its disk has the file); True when it did."""
        if self.placement is None or row.node in (None, self.placement.node):
            return False
        await self.placement.ask_holder(row.node, action, row.id)
        return True

    async def pause(self, download_id: int) -> DownloadRow:
        row = await self._row(download_id)
        if await self._held_elsewhere(row, "pause"):
            return await self._row(download_id)
        if row.status not in ("waiting", "downloading") or row.gid is None:
            raise TransitionError("download", download_id, row.status, "paused")
        try:
            await self.aria2.pause(row.gid)
        except Aria2RpcError as exc:
            logger.bind(job=download_id, gid=row.gid).info("aria2 pause: {}", exc.message)
        await self.store.mark_download_paused(row.gid)
        return await self._row(download_id)

    async def set_download_limit(self, download_id: int, bytes_per_second: int) -> DownloadRow:
        """Limit one running, waiting or paused job (aria2's max-download-limit; 0 = none)."""
        row = await self._row(download_id)
        if row.node not in (None, self.placement.node if self.placement else None):
            raise TransitionError("download", download_id, row.status, f"limited on {row.node}")
        if row.status not in ("waiting", "downloading", "paused") or row.gid is None:
            raise TransitionError("download", download_id, row.status, "limited")
        try:
            await self.aria2.change_option(row.gid, {"max-download-limit": str(bytes_per_second)})
        except Aria2RpcError as exc:  # the job left aria2 since the row was read
            raise StoreError(f"aria2 did not take the limit: {exc.message}") from None
        logger.bind(job=download_id, gid=row.gid, limit=bytes_per_second).info(
            "download limit of the job: {} B/s", bytes_per_second
        )
        return row

    async def select_files(self, download_id: int, indexes: Collection[int]) -> DownloadRow:
        """Fetch only these files of a torrent (1-based, as aria2 numbers them): aria2's
        `select-file` on the live job, and the row's file list marked in the same step.

        Raises ValueError naming what is wrong with `indexes`, TransitionError once the job is
        over, StoreError when aria2 refuses the choice."""
        row = await self._row(download_id)
        if row.node not in (None, self.placement.node if self.placement else None):
            raise TransitionError("download", download_id, row.status, f"changed on {row.node}")
        if row.status not in ACTIVE_DOWNLOAD_STATUSES:
            raise TransitionError("download", download_id, row.status, "files chosen")
        if not row.files:
            raise ValueError(f"download {download_id} has no file list (yet)")
        chosen = check_file_choice(indexes, [f.index for f in row.files])
        if row.gid is not None and row.status != "pending":
            option = {"select-file": ",".join(str(i) for i in sorted(chosen))}
            try:
                await self.aria2.change_option(row.gid, option)
            except Aria2RpcError as exc:  # the job left aria2 since the row was read
                raise StoreError(f"aria2 did not take the choice: {exc.message}") from None
        files = [replace(f, selected=f.index in chosen) for f in row.files]
        await self.store.update_download_details_by_id(download_id, files=files)
        logger.bind(job=download_id, gid=row.gid, chosen=len(chosen), of=len(files)).info(
            "files chosen: {}", ",".join(str(i) for i in sorted(chosen))
        )
        if self._end_choice_wait(download_id):  # the choice it waited for: now it starts
            return await self.resume(download_id)
        return await self._row(download_id)

    async def resume(self, download_id: int) -> DownloadRow:
        self._end_choice_wait(download_id)  # resumed before a choice: every file is taken
        row = await self._row(download_id)
        if await self._held_elsewhere(row, "resume"):
            return await self._row(download_id)
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
        await self.store.mark_download_resumed(row.gid)
        return await self._row(download_id)

    async def cancel(self, download_id: int) -> DownloadRow:
        row = await self._row(download_id)
        if row.status in ("waiting", "downloading", "paused") and await self._held_elsewhere(
            row, "cancel"
        ):
            return await self._row(download_id)
        if row.status not in ACTIVE_DOWNLOAD_STATUSES:
            raise TransitionError("download", download_id, row.status, "cancelled")
        if row.gid is not None:
            await self.aria2.remove(row.gid)
        await self.store.mark_download_cancelled_by_id(download_id, "cancelled by user")
        updated = await self._row(download_id)
        await self._tell_removed(updated)
        return updated

    async def retry(self, download_id: int) -> DownloadRow:
        row = await self._row(download_id)
        if row.status not in ("failed", "cancelled"):
            raise TransitionError("download", download_id, row.status, "pending")
        if row.gid is not None:
            await self.aria2.remove(row.gid)
        await self.store.reset_download_for_retry(download_id)
        await self.submit(download_id)
        return await self._row(download_id)

    async def delete(self, download_id: int, *, delete_file: bool = False) -> DownloadRow:
        """Stop the aria2 job and running uploads first, then remove the rows (and the file)."""
        row = await self._row(download_id)
        if await self._held_elsewhere(row, "delete-with-file" if delete_file else "delete"):
            return row
        if row.gid is not None and row.status in ACTIVE_DOWNLOAD_STATUSES:
            await self.aria2.remove(row.gid)
        await self._tell_removed(row)
        deleted = await self.store.delete_download_record(download_id)
        if delete_file:
            await self._delete_files(deleted)
        return deleted

    async def delete_file_only(self, download_id: int) -> DownloadRow:
        """Remove a finished, failed or cancelled job's file and keep its record (and uploads)."""
        row = await self._row(download_id)
        if row.node not in (None, self.placement.node if self.placement else None):
            raise TransitionError("download", download_id, row.status, f"emptied on {row.node}")
        if row.status in ACTIVE_DOWNLOAD_STATUSES:
            raise TransitionError("download", download_id, row.status, "emptied of its file")
        uploads = await self.store.get_uploads_by_download(download_id)
        if any(u.status in ("pending", "uploading", "paused") for u in uploads):
            raise TransitionError("download", download_id, row.status, "emptied while uploading")
        await self._delete_files(row)
        logger.bind(job=download_id).info("file of download {} deleted, record kept", download_id)
        return row

    async def delete_all(self, *, delete_files: bool = False) -> int:
        for row in await self.store.fetch_downloads_in_states(
            ACTIVE_DOWNLOAD_STATUSES, node=self.node
        ):
            if row.gid is not None:
                await self.aria2.remove(row.gid)
        for row in await self.store.fetch_recent_downloads(limit=-1):
            await self._tell_removed(row)
        deleted = await self.store.delete_all_downloads()
        if delete_files:
            for row in deleted:
                await self._delete_files(row)
        return len(deleted)

    async def _tell_removed(self, row: DownloadRow) -> None:
        for listener in self._on_removed:
            await listener(row)

    async def _delete_files(self, row: DownloadRow) -> None:
        """The download's file or folder (inside the download folder only), then its job folder
        if nothing else is left in it."""
        if row.local_path:
            await self.files.remove(row.local_path, job=row.id)
        await self.files.remove_job_dir_if_empty(row.id)

    async def _readd(self, row: DownloadRow) -> None:
        """aria2 forgot this job (restarted without its session): add it again under a new gid."""
        log = logger.bind(job=row.id, gid=row.gid)
        with self._handing_off(row.id):
            try:
                gid = await self._hand_to_aria2(row, paused=row.status == "paused")
            except (Aria2RpcError, SourceError) as exc:
                message = exc.message if isinstance(exc, Aria2RpcError) else str(exc)
                await self.store.mark_download_failed_by_id(
                    row.id, f"could not re-add after aria2 lost it: {message}"
                )
                return
            await self.store.mark_download_queued_by_id(row.id, gid, status=row.status)
        log.info("aria2 had lost download {}; re-added as {}", row.id, gid)

    # --- keeping rows true to aria2 ---------------------------------------------------------------

    async def on_notification(self, notification: Aria2Notification) -> None:
        try:
            status = await self.aria2.tell_status(notification.gid)
            await self.apply_status([status])
        except (Aria2RpcError, Aria2Unavailable):
            return
        except STORE_ERRORS as exc:
            # The database is away: the poller applies aria2's view once it is back.
            logger.bind(gid=notification.gid).warning(
                "aria2's {} not recorded yet: {}", notification.event, " ".join(str(exc).split())
            )

    async def poll_once(self) -> int:
        """One poller cycle: at most two RPC calls whatever the number of downloads.

        Returns the number of active rows (the caller chooses the busy or idle interval).
        """
        rows = await self.store.fetch_downloads_in_states(
            ("waiting", "downloading", "paused"), node=self.node
        )
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
                elif gid not in by_gid and gid not in self._gids_in_hand:
                    await self._readd(rows_by_gid[gid])
        await self.apply_status(list(by_gid.values()), rows_by_gid)
        if self.placement is not None:
            await self.reconcile_pending()  # slots freed this cycle take the next jobs
        return len(rows)

    async def apply_status(
        self,
        statuses: Sequence[Aria2Status],
        rows_by_gid: Mapping[str, DownloadRow] | None = None,
    ) -> None:
        """Map aria2's view of some gids onto their rows: every status change in one transaction,
        then the progress in another.

        `rows_by_gid` saves a lookup per status when the caller (the poller) has the rows.
        """
        async with self._apply_lock:
            progress: list[ProgressUpdate] = []
            changes: list[DownloadChange] = []
            for position, status in enumerate(statuses, start=1):
                if position % 100 == 0:
                    await asyncio.sleep(0)  # a cycle over many downloads must not hog the loop
                row = (rows_by_gid or {}).get(status.gid)
                if row is None:
                    row = await self.store.get_download_by_gid(status.gid)
                if row is None or row.gid != status.gid:
                    continue
                sync = plan(row, status, self.max_download_size)
                if sync.details is not None:
                    await self._learn(row, sync.details)
                if sync.progress is not None:
                    progress.append(sync.progress)
                if sync.change is None:
                    continue
                if isinstance(sync.change, Oversized):
                    await self.aria2.remove(status.gid)
                changes.append(store_change(row, sync.change))
            outcomes = await self.store.apply_download_changes(changes)
            await self.store.update_progress_batch(progress)
            # Under the lock: no other cycle sees a follow-up download paused in between.
            for change, outcome in zip(changes, outcomes, strict=True):
                if outcome.applied and change.new_gid is not None:
                    await self._start_follow_up(change.download_id, change.new_gid)
        completed: list[int] = []
        for change, outcome in zip(changes, outcomes, strict=True):
            log = logger.bind(job=change.download_id, gid=change.expected_gid)
            if not outcome.applied:
                log.debug("aria2's view not applied: {}", outcome.detail)
            elif change.target == "completed":
                log.info("download {} completed ({})", change.download_id, outcome.detail)
                completed.append(change.download_id)
            elif change.target == "failed":
                log.warning("download {} failed: {}", change.download_id, change.reason)
            else:
                log.info("download {}: {} ({})", change.download_id, outcome.detail, change.reason)
        for download_id in completed:
            row = await self.store.get_download_by_id(download_id)
            if row is not None:
                await self._tell_completed(await self._clean_name_on_disk(row))

    async def _learn(self, row: DownloadRow, details: RowDetails) -> None:
        try:
            await self.store.update_download_details_by_id(
                row.id,
                file_name=details.file_name,
                local_path=details.local_path,
                files=details.files,
                total_length=details.total_length,
            )
        except StoreError as exc:
            logger.bind(job=row.id, gid=row.gid).debug("details not recorded: {}", exc)

    async def _start_follow_up(self, download_id: int, gid: str) -> None:
        """A magnet's metadata is in: give its files their names on disk (the one name policy,
        aria2's `index-out`), then start the download aria2 created paused for it."""
        row = await self.store.get_download_by_id(download_id)
        if row is None or row.source_type != "magnet" or row.gid != gid:
            return
        log = logger.bind(job=download_id, gid=gid)
        try:
            status = await self.aria2.tell_status(gid)
            if status.status != "paused":
                return
            base = PurePosixPath(status.dir)
            files = [
                (f.index, PurePosixPath(f.path).relative_to(base).parts)
                for f in status.files
                if f.path and PurePosixPath(f.path).is_relative_to(base)
            ]
            index_out = await asyncio.to_thread(index_out_for, files)
            if index_out:
                await self.aria2.change_option(gid, {"index-out": index_out})
                log.info("download {}: file names cleaned on disk", download_id)
            chosen = chosen_files_option(row)  # a retried magnet keeps its choice
            if chosen:
                await self.aria2.change_option(gid, chosen)
            if row.status != "paused" and self._asks_choice(row.chat_id, len(status.files)):
                details = row_details(row, status)
                if details is not None:
                    await self._learn(row, details)  # the files to choose from
                await self.store.mark_download_paused(gid)
                self._await_choice(download_id)
            elif row.status != "paused":  # a person's pause stays
                await self.aria2.unpause(gid)
        except (Aria2RpcError, Aria2Unavailable) as exc:
            log.warning("the magnet's download could not be started: {}", exc)

    async def _clean_name_on_disk(self, row: DownloadRow) -> DownloadRow:
        """aria2 may name a link's file after the server's Content-Disposition, as it comes: the
        name on disk (and so the uploaded one) follows the one name policy like every other."""
        if row.source_type not in ("http", "ftp") or not row.local_path or row.files:
            return row
        name = os.path.basename(row.local_path)
        clean = safe_file_name(name, "download")
        if clean == name:
            return row
        renamed = await self.files.rename(row.local_path, clean, job=row.id)
        if renamed is None:
            return row
        await self.store.update_download_details_by_id(
            row.id, file_name=renamed.name, local_path=str(renamed)
        )
        return await self._row(row.id)

    async def _tell_completed(self, row: DownloadRow) -> None:
        for listener in self._on_completed:
            try:
                await listener(row)
            except Exception:
                logger.bind(job=row.id).exception("completion listener failed")


def proxy_options(proxy: ProxyParts, *, tunnel: bool) -> dict[str, str]:
    """aria2's per-job options that send a job through the HTTP proxy `proxy` (`aria2.proxy`),
    its user and password as options of their own, never inside a URL. `tunnel` (FTP) sends
    every connection as CONNECT."""
    host = f"[{proxy.host}]" if ":" in proxy.host else proxy.host
    options = {
        "all-proxy": f"http://{host}:{proxy.port}",
        "proxy-method": "tunnel" if tunnel else "get",
    }
    if proxy.username:
        options["all-proxy-user"] = proxy.username
        options["all-proxy-passwd"] = proxy.password
    return options


def _credentials_to_options(url: str, options: dict[str, str]) -> str:
    """The link without its user and password, which go to aria2 as options instead: aria2
    writes every link it fetches into its log, the options not."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    prefix = "ftp" if parts.scheme.lower() == "ftp" else "http"
    options[f"{prefix}-user"] = unquote(parts.username or "")
    options[f"{prefix}-passwd"] = unquote(parts.password or "")
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host))


def _safe_link_name(url: str) -> bool:
    segment = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    return segment in ("", safe_file_name(segment, "")) and segment not in (".", "..")


def _looks_finished(status: Aria2Status) -> bool:
    return (
        status.status in ("complete", "error", "removed")
        or bool(status.followed_by)
        or (status.total_length > 0 and status.completed_length == status.total_length)
    )


def chosen_files_option(row: DownloadRow) -> dict[str, str]:
    """aria2's `select-file` for the files chosen of the row's torrent; none when all are."""
    if not row.files or all(f.selected for f in row.files):
        return {}
    return {"select-file": ",".join(str(f.index) for f in row.files if f.selected)}


def check_file_choice(indexes: Collection[int], known: Collection[int]) -> frozenset[int]:
    """The chosen file indexes, checked: at least one, no repeats, each one of `known`."""
    if not indexes:
        raise ValueError("choose at least one file")
    chosen = frozenset(indexes)
    if len(chosen) != len(indexes):
        repeated = sorted(i for i, n in Counter(indexes).items() if n > 1)
        raise ValueError(f"file indexes repeated: {', '.join(map(str, repeated))}")
    unknown = sorted(chosen - set(known))
    if unknown:
        shown = ", ".join(map(str, unknown[:10]))
        raise ValueError(f"no file with index {shown} (the files are 1 to {max(known)})")
    return chosen
