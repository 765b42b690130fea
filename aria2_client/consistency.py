"""Is the database true to aria2 and to the disk? Find out, and repair on request.

The check compares every download row with aria2 (one batched request for all their gids, one
for aria2's own list of unfinished jobs) and every completed row with the disk (the file is there,
inside the download folder, with the recorded size; no aria2 control file says it is partial).
It never changes anything; :func:`repair` applies the fixes it proposes, all in one transaction,
through the store's status machine.

Repairs, kind by kind (none needs a new status or column):

- ``gid_unknown_to_aria2``: an unfinished row whose gid aria2 no longer knows. Running, the
  download manager adds it again; offline, the row is marked ``failed`` ("lost by aria2") so a
  retry downloads it again.
- ``status_differs``: aria2 finished, failed, removed, paused or resumed the job (or continued a
  magnet under a new gid) and the row did not follow: the row is moved the way the poller would.
- ``orphan_aria2_job``: aria2 runs a job that no unfinished row owns: it is removed from aria2
  (files on disk are left alone).
- ``file_missing``, ``size_differs``, ``completed_but_partial``, ``outside_download_dir``: a
  completed row whose bytes are not whole on disk. (aria2's control file is ignored while aria2
  still runs the job: it keeps one while it seeds a finished torrent.) ``completed`` is final in
  the status machine, so the fact is recorded on the row (``error_code`` = the kind,
  ``error_message`` = what was found) and its uploads that have not started are cancelled, so a
  damaged file is never uploaded. The file itself is left as it is. A row so recorded is not
  reported again.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loguru import logger

from aria2_client.client import Aria2Client
from aria2_client.models import Aria2Status
from aria2_client.sync import Complete, Fail, FollowGid, Move, StatusChange, plan, store_change
from aria2_client.transport import Aria2RpcError, Aria2Unavailable
from db import DOWNLOAD_STATUSES, Store
from files import confined_path
from records import DownloadChange, DownloadRow

GID_UNKNOWN = "gid_unknown_to_aria2"
STATUS_DIFFERS = "status_differs"
ORPHAN_JOB = "orphan_aria2_job"
FILE_MISSING = "file_missing"
SIZE_DIFFERS = "size_differs"
PARTIAL = "completed_but_partial"
OUTSIDE = "outside_download_dir"
DISK_KINDS = frozenset({FILE_MISSING, SIZE_DIFFERS, PARTIAL, OUTSIDE})
KINDS = (GID_UNKNOWN, STATUS_DIFFERS, ORPHAN_JOB, *sorted(DISK_KINDS))

LOST_BY_ARIA2 = "lost by aria2"
REPAIR_REASON = "consistency repair"
UNFINISHED = ("waiting", "downloading", "paused")
_IN_CHUNK = 500  # ids per `IN (...)` query
_LISTED = 5  # file names shown in one detail line

_DISK_FIX = (
    "record it on the row (error_code {kind}) and cancel its uploads that have not started; "
    "the file on disk is left as it is"
)


@dataclass(frozen=True)
class Mismatch:
    """One disagreement between a row and aria2 or the disk, and what `repair` would do."""

    download_id: int | None  # None: an aria2 job that no download owns
    file_name: str | None
    kind: str
    detail: str
    fix: str
    gid: str | None = None
    # The row change that fixes it, applied only if the row is still as found; None: an aria2
    # job to remove.
    change: DownloadChange | None = field(default=None, compare=False, repr=False)

    @property
    def subject(self) -> str:
        who = (
            f"download {self.download_id}"
            if self.download_id is not None
            else f"aria2 job {self.gid}"
        )
        return f"{who} ({self.file_name or '?'})"

    def line(self) -> str:
        """`download <id> (<file name>): <kind>: <detail>`."""
        return f"{self.subject}: {self.kind}: {self.detail}"

    @property
    def key(self) -> tuple[int | None, str | None, str]:
        return (self.download_id, self.gid, self.kind)


@dataclass(frozen=True)
class CheckResult:
    mismatches: list[Mismatch]
    aria2_compared: bool
    aria2_note: str | None = None  # why aria2 was left out of the comparison


# --- finding -----------------------------------------------------------------------------------


async def find_mismatches(
    db: Store, aria2: Aria2Client | None, download_dir: Path, *, node: str | None = None
) -> list[Mismatch]:
    """Every mismatch between the rows and aria2 (when reachable) and the disk."""
    result = await check(db, aria2, download_dir, node=node)
    if result.aria2_note is not None:
        logger.warning("consistency check: {}; compared with the disk only", result.aria2_note)
    return result.mismatches


async def check(
    db: Store, aria2: Aria2Client | None, download_dir: Path, *, node: str | None = None
) -> CheckResult:
    """Like :func:`find_mismatches`, also saying whether aria2 took part, and if not, why.

    With `node` (a cluster), only the jobs that node holds: the others run on other machines.
    """
    rows = await db.fetch_downloads_in_states(DOWNLOAD_STATUSES, node=node)
    completed = [r for r in rows if r.status == "completed" and r.error_code not in DISK_KINDS]
    cleaned = await _cleaned_download_ids(db, [r.id for r in completed])
    # A file deleted after its uploads were verified (upload.auto_delete) is not a mismatch.
    on_disk = [r for r in completed if r.id not in cleaned]
    mismatches = await asyncio.to_thread(_disk_mismatches, download_dir, on_disk)

    note: str | None = None
    if aria2 is None:
        note = "no aria2 connection"
    elif not aria2.connected:
        note = "aria2 is not connected"
    else:
        try:
            found, running = await _aria2_mismatches(db, aria2, rows)
        except (Aria2Unavailable, Aria2RpcError) as exc:
            note = f"aria2 did not answer ({exc})"
        else:
            # aria2 keeps a torrent's control file while it seeds the finished download.
            mismatches = [m for m in mismatches if not (m.kind == PARTIAL and m.gid in running)]
            mismatches += found
    mismatches.sort(key=lambda m: (m.download_id is None, m.download_id or 0, m.kind, m.gid or ""))
    return CheckResult(mismatches, aria2_compared=note is None, aria2_note=note)


async def _cleaned_download_ids(db: Store, ids: Sequence[int]) -> set[int]:
    cleaned: set[int] = set()
    for first in range(0, len(ids), _IN_CHUNK):
        uploads = await db.get_uploads_for_downloads(ids[first : first + _IN_CHUNK])
        cleaned.update(i for i, ups in uploads.items() if any(u.cleaned_at for u in ups))
    return cleaned


async def _aria2_mismatches(
    db: Store, aria2: Aria2Client, rows: Sequence[DownloadRow]
) -> tuple[list[Mismatch], set[str]]:
    """The mismatches with aria2, and the gids aria2 is still running (or seeding)."""
    unfinished = [r for r in rows if r.status in UNFINISHED and r.gid]
    statuses = await aria2.statuses([r.gid for r in unfinished if r.gid])
    running = await aria2.poll(max_waiting=max(1000, len(rows)), max_stopped=0)

    found: list[Mismatch] = []
    for row in unfinished:
        assert row.gid is not None
        status = statuses.get(row.gid)
        if status is None:
            lost = DownloadChange(
                row.id,
                row.status,
                row.gid,
                f"{LOST_BY_ARIA2} ({REPAIR_REASON})",
                target="failed",
                columns={
                    "error_message": LOST_BY_ARIA2,
                    "error_code": "lost_by_aria2",
                    "download_speed": 0,
                },
            )
            found.append(
                Mismatch(
                    row.id,
                    row.file_name,
                    GID_UNKNOWN,
                    f"the row is {row.status} with gid {row.gid}, which aria2 does not know",
                    f'mark it failed ("{LOST_BY_ARIA2}") so that a retry downloads it again',
                    gid=row.gid,
                    change=lost,
                )
            )
            continue
        change = plan(row, status).change
        if change is not None:
            detail, fix = _describe(row, status, change)
            follow = store_change(row, change, note=REPAIR_REASON)
            found.append(
                Mismatch(row.id, row.file_name, STATUS_DIFFERS, detail, fix, row.gid, follow)
            )

    by_id = {r.id: r for r in rows}
    current = {r.gid for r in unfinished}
    for job in running:
        if job.gid in current or job.following in current or job.belongs_to in current:
            continue
        owner_id = await db.get_download_id_by_gid(job.gid)
        owner = by_id.get(owner_id) if owner_id is not None else None
        if owner is not None and owner.status == "completed":
            continue  # a finished torrent still seeding: aria2's business
        if owner is None:
            detail = f"aria2 runs job {job.gid} ({job.status}) that no download owns"
        elif owner.gid != job.gid:
            detail = (
                f"aria2 runs job {job.gid} ({job.status}), an earlier gid of this download "
                f"(now {owner.gid or 'none'}, {owner.status})"
            )
        else:
            detail = f"aria2 runs job {job.gid} ({job.status}) but the row is {owner.status}"
        found.append(
            Mismatch(
                owner.id if owner is not None else None,
                owner.file_name if owner is not None else (job.name or None),
                ORPHAN_JOB,
                detail,
                "remove the job from aria2 (its files on disk are left alone)",
                gid=job.gid,
            )
        )
    return found, {job.gid for job in running}


def _describe(row: DownloadRow, status: Aria2Status, change: StatusChange) -> tuple[str, str]:
    """What aria2 did that the row did not follow, and the fix, in words."""
    said = f"the row says {row.status}, aria2 says {status.status} (gid {status.gid})"
    if isinstance(change, FollowGid):
        return (
            f"aria2 continued this magnet as gid {change.new_gid}; the row still has {row.gid}",
            f"record gid {change.new_gid} as the download's gid",
        )
    if isinstance(change, Complete):
        return f"{said}: finished, {change.total_length} bytes", "move the row to completed"
    if isinstance(change, Fail):
        return f"{said}: {change.message}", "move the row to failed with aria2's message"
    target = change.target if isinstance(change, Move) else "failed"
    return said, f"move the row to {target}"


def _disk_mismatches(download_dir: Path, rows: Sequence[DownloadRow]) -> list[Mismatch]:
    """Synchronous file-system checks of completed rows: run it in a thread."""
    root = download_dir.resolve()
    found: list[Mismatch] = []
    for row in rows:
        found += _row_on_disk(root, row)
    return found


def _row_on_disk(root: Path, row: DownloadRow) -> list[Mismatch]:
    def mismatch(kind: str, detail: str) -> Mismatch:
        record = DownloadChange(
            row.id,
            row.status,
            row.gid,
            f"{REPAIR_REASON}: {kind}",
            columns={"error_code": kind, "error_message": detail},
            cancel_unstarted_uploads=True,
            skip_if_error_code_in=DISK_KINDS,
        )
        return Mismatch(
            row.id, row.file_name, kind, detail, _DISK_FIX.format(kind=kind), row.gid, record
        )

    if not row.local_path:
        return [mismatch(FILE_MISSING, "completed, but no file path was recorded")]
    path = confined_path(root, row.local_path)
    if path is None:
        return [mismatch(OUTSIDE, f"{row.local_path} is not inside the download folder")]

    found: list[Mismatch] = []
    if row.files:
        selected = [f for f in row.files if f.selected]
        missing: list[str] = []
        wrong: list[str] = []
        for entry in selected:
            file_path = confined_path(root, path.parent / entry.path)
            if file_path is None or not file_path.is_file():
                missing.append(entry.path)
                continue
            size = file_path.stat().st_size
            if size != entry.length:
                wrong.append(f"{entry.path} has {size} bytes on disk, the row says {entry.length}")
        if missing:
            shown = ", ".join(missing[:_LISTED]) + (", …" if len(missing) > _LISTED else "")
            found.append(
                mismatch(FILE_MISSING, f"{len(missing)} of {len(selected)} files missing: {shown}")
            )
        if wrong:
            shown = "; ".join(wrong[:_LISTED]) + ("; …" if len(wrong) > _LISTED else "")
            found.append(mismatch(SIZE_DIFFERS, shown))
    elif not path.exists():
        found.append(
            mismatch(FILE_MISSING, f"{path.relative_to(root)} is not in the download folder")
        )
    elif not path.is_file():
        found.append(mismatch(FILE_MISSING, f"{path.relative_to(root)} is not a file"))
    else:
        size = path.stat().st_size
        if row.total_length and size != row.total_length:
            found.append(
                mismatch(
                    SIZE_DIFFERS,
                    f"{path.name} has {size} bytes on disk, the row says {row.total_length}",
                )
            )
    control = path.with_name(path.name + ".aria2")
    if control.exists():
        found.append(
            mismatch(
                PARTIAL,
                f"aria2's control file {control.name} is still there: the download never finished",
            )
        )
    return found


# --- repairing ---------------------------------------------------------------------------------


async def repair(db: Store, aria2: Aria2Client | None, mismatches: Sequence[Mismatch]) -> list[str]:
    """Apply the fixes of `mismatches`: every row change in ONE transaction (status changes
    through the status machine, so the history records them), then the aria2 removals.

    A row that changed since the check is left alone (and said so). Returns one line per fix.
    Repairs never touch files.
    """
    lines: list[str] = []
    fixes = [(m, m.change) for m in mismatches if m.change is not None]
    outcomes = await db.apply_download_changes([change for _, change in fixes])
    for (mismatch, _), outcome in zip(fixes, outcomes, strict=True):
        done = outcome.detail
        if outcome.applied and mismatch.kind == GID_UNKNOWN:
            done += f' ("{LOST_BY_ARIA2}"); a retry downloads it again'
        lines.append(f"{mismatch.subject}: {done}")
    for mismatch in (m for m in mismatches if m.kind == ORPHAN_JOB and m.gid):
        assert mismatch.gid is not None
        if aria2 is None or not aria2.connected:
            lines.append(f"{mismatch.subject}: left alone: aria2 is not reachable")
            continue
        try:
            await aria2.remove(mismatch.gid)
        except (Aria2RpcError, Aria2Unavailable) as exc:
            lines.append(f"{mismatch.subject}: aria2 job {mismatch.gid} not removed: {exc}")
            continue
        lines.append(f"{mismatch.subject}: aria2 job {mismatch.gid} removed")
    for line in lines:
        logger.info("consistency repair: {}", line)
    return lines


# --- the periodic check ------------------------------------------------------------------------


class ConsistencyChecker:
    """Runs the check every `interval()` seconds (0 = off) and logs what it finds, one line per
    mismatch with the job id. It never repairs: that is `python app.py check --fix`.

    A mismatch is reported only if a second look `confirm_after` seconds later still sees it: a
    running service is briefly out of step between aria2's change and the poller's next cycle.
    """

    def __init__(
        self,
        db: Store,
        aria2: Aria2Client | None,
        download_dir: Path,
        interval: Callable[[], float],
        *,
        confirm_after: float = 2.0,
        off_recheck: float = 60.0,
        node: str | None = None,
    ) -> None:
        self.db = db
        self.node = node
        self.aria2 = aria2
        self.download_dir = download_dir
        self.interval = interval
        self.confirm_after = confirm_after
        self.off_recheck = off_recheck
        self.checks = 0
        self.last: list[Mismatch] = []
        self._task: asyncio.Task[None] | None = None
        self._aria2_note: str | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="consistency-check")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            seconds = self.interval()
            if seconds <= 0:
                # Off; look again later, as a configuration reload may turn it on.
                await asyncio.sleep(self.off_recheck)
                continue
            await asyncio.sleep(seconds)
            if self.interval() <= 0:
                continue
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next check must still run, whatever broke this one
                logger.exception("consistency check failed")

    async def check_once(self) -> list[Mismatch]:
        """One check (with its confirming second look); logs and returns what it found."""
        started = time.monotonic()
        result = await check(self.db, self.aria2, self.download_dir, node=self.node)
        found = result.mismatches
        if found and self.confirm_after > 0:
            await asyncio.sleep(self.confirm_after)
            first = {m.key for m in found}
            result = await check(self.db, self.aria2, self.download_dir, node=self.node)
            found = [m for m in result.mismatches if m.key in first]
        self.checks += 1
        self.last = found
        if result.aria2_note != self._aria2_note:
            # Said once per outage, not at every check.
            self._aria2_note = result.aria2_note
            if result.aria2_note is None:
                logger.info("consistency check: comparing with aria2 again")
            else:
                logger.warning(
                    "consistency check: {}; comparing with the disk only", result.aria2_note
                )
        for mismatch in found:
            logger.bind(job=mismatch.download_id, gid=mismatch.gid).warning(
                "consistency: {} (fix: {})", mismatch.line(), mismatch.fix
            )
        if found:
            logger.warning(
                "consistency check: {} mismatch(es); `python app.py check --fix` repairs them",
                len(found),
            )
        else:
            logger.debug(
                "consistency check: nothing to report ({:.2f} s)", time.monotonic() - started
            )
        return found
