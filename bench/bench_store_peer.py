"""The store (SQLite) against the synchronous sqlite3 peer, on the same workload, in one process.

Run from the project root: .venv/bin/python bench/bench_store_peer.py [--rows 10000 100000]
    [--rounds 21] [--jobs 300]

The peer is a plain synchronous `sqlite3` store written here the way the original design (seed
001 §2) lists its functions: one commit per call (saving a Telegram media row; creating a
download with its gid; reading the grouped list; reading the statistics), with the queries such
a store makes (the grouped list groups every row by album, then reads the rows of the newest
groups; the statistics group every download and every upload by status). Both get the same file
settings (WAL, synchronous=NORMAL) and, for each table size, the same rows (bench_store's
workload: a quarter Telegram jobs in albums of four with their media rows, the rest links; most
completed with an upload each, 1000 downloading). Then, side by side:

- job creation, each job a Telegram media row + its download + queued (its gid recorded):
  the peer one call after another (two commits a job); ours the way the engine records a new
  job when it runs alone with aria2 up, the gid chosen first and the job queued under it in the
  transaction that records it: one job at a time (`create_download(..., gid=)`, one commit a
  job), and `--jobs` that came together (a message of many links) as one
  `create_downloads(..., gids=)`; jobs/s;
- the grouped list of 100 (what the page reads on load), ms;
- statistics (what the page reads on load and the hub pushes), ms.

Job creation is the median of fifteen rounds, the three ways alternated (the hub's subscriber is
drained between rounds, not timed); timed reads are medians of --rounds runs after two
unmeasured ones. Ratios are peer time / ours (for jobs/s: ours / peer), so above 1 means ours is
faster. Targets: jobs that come together >= 1.5x the peer; grouped list <= 3 ms at 10k and
<= 5 ms at 100k; statistics <= 2 ms at 10k and <= 3 ms at 100k.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger

from bench.bench_store import STAMP, seed
from db import Database
from events import EventHub, Subscription
from records import NewDownload, TgMediaRecord

WARM_UP = 2
GROUPED_TARGET_MS = {10_000: 3.0, 100_000: 5.0}
STATISTICS_TARGET_MS = {10_000: 2.0, 100_000: 3.0}
CREATION_TARGET = 1.5
CREATION_ROUNDS = 15  # of each way, alternated

PEER_SCHEMA = """
CREATE TABLE media (
    file_unique_id TEXT PRIMARY KEY, file_id TEXT NOT NULL, chat_id INTEGER NOT NULL,
    message_id INTEGER NOT NULL, media_type TEXT NOT NULL, file_name TEXT, file_size INTEGER,
    media_group_id TEXT, created_at TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, gid TEXT UNIQUE,
    file_unique_id TEXT REFERENCES media(file_unique_id) ON DELETE CASCADE,
    source_url TEXT, status TEXT NOT NULL DEFAULT 'pending', local_path TEXT,
    total_length INTEGER NOT NULL DEFAULT 0, completed_length INTEGER NOT NULL DEFAULT 0,
    download_speed INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL,
    started_at TEXT, completed_at TEXT, updated_at TEXT NOT NULL
);
CREATE INDEX jobs_by_status ON jobs(status);
CREATE TABLE transfers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    upload_target TEXT NOT NULL, status TEXT NOT NULL, remote_path TEXT,
    uploaded_size INTEGER NOT NULL DEFAULT 0, total_size INTEGER NOT NULL DEFAULT 0,
    upload_speed REAL NOT NULL DEFAULT 0, cleaned_at TEXT, created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX transfers_by_status ON transfers(status);
"""


class SyncPeer:
    """The synchronous sqlite3 peer: one connection, one commit per call."""

    def __init__(self, path: Path) -> None:
        self.conn = sqlite3.connect(path)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self.conn.executescript(PEER_SCHEMA)

    def close(self) -> None:
        self.conn.close()

    def seed(self, rows: int, active: int) -> None:
        """The same rows as bench_store's seed gives ours (setup, not measured)."""
        telegram = rows // 4
        self.conn.executemany(
            "INSERT INTO media VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (f"U{i}", f"file-{i}", -1001234567890, 10 + i, "video", f"v{i}.mp4",
                 2**31 + i, f"album-{i // 4}", STAMP, STAMP)
                for i in range(telegram)
            ],
        )  # fmt: skip
        jobs = []
        for i in range(rows):
            running = i >= rows - active
            jobs.append(
                (
                    f"{i:016x}" if running else None,
                    f"U{i}" if i < telegram else None,
                    None if i < telegram else f"http://bench/{i}",
                    "downloading" if running else "completed",
                    f"/data/{i}/file.bin",
                    3_000_000_000,
                    0 if running else 3_000_000_000,
                )
            )
        self.conn.executemany(
            "INSERT INTO jobs (gid, file_unique_id, source_url, status, local_path, total_length,"
            f" completed_length, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?,"
            f" '{STAMP}', '{STAMP}')",
            jobs,
        )
        self.conn.execute(
            "INSERT INTO transfers (job_id, upload_target, status, total_size, uploaded_size,"
            " created_at, updated_at) SELECT id, 'cloud', 'completed', total_length,"
            " total_length, created_at, updated_at FROM jobs WHERE status = 'completed'"
        )
        self.conn.commit()

    # --- the peer's functions, one commit each ---

    def save_media(self, media: TgMediaRecord) -> str:
        self.conn.execute(
            "INSERT OR REPLACE INTO media VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (media.file_unique_id, media.file_id, media.chat_id, media.message_id,
             media.media_type, media.file_name, media.file_size, media.media_group_id,
             STAMP, STAMP),
        )  # fmt: skip
        self.conn.commit()
        return media.file_unique_id

    def create_job(self, file_unique_id: str | None, gid: str, source_url: str | None) -> int:
        cursor = self.conn.execute(
            "INSERT INTO jobs (gid, file_unique_id, source_url, status, created_at, updated_at)"
            " VALUES (?, ?, ?, 'pending', ?, ?)",
            (gid, file_unique_id, source_url, STAMP, STAMP),
        )
        self.conn.commit()
        return int(cursor.lastrowid or 0)

    def grouped(self, limit: int) -> list[list[sqlite3.Row]]:
        newest = self.conn.execute(
            "SELECT COALESCE(m.media_group_id, 'job:' || j.id) AS grp, MAX(j.id) AS newest"
            " FROM jobs AS j LEFT JOIN media AS m ON m.file_unique_id = j.file_unique_id"
            " GROUP BY grp ORDER BY newest DESC LIMIT ?",
            (limit,),
        ).fetchall()
        keys = [row["grp"] for row in newest]
        marks = ", ".join("?" for _ in keys)
        rows = self.conn.execute(
            "SELECT j.*, COALESCE(m.media_group_id, 'job:' || j.id) AS grp FROM jobs AS j"
            " LEFT JOIN media AS m ON m.file_unique_id = j.file_unique_id"
            f" WHERE COALESCE(m.media_group_id, 'job:' || j.id) IN ({marks}) ORDER BY j.id",
            keys,
        ).fetchall()
        self.conn.commit()
        groups: dict[str, list[sqlite3.Row]] = {key: [] for key in keys}
        for row in rows:
            groups[row["grp"]].append(row)
        return list(groups.values())

    def statistics(self) -> dict[str, Any]:
        downloads = self.conn.execute(
            "SELECT status, COUNT(*) AS n, COALESCE(SUM(total_length), 0) AS bytes,"
            " COALESCE(SUM(download_speed), 0) AS speed FROM jobs GROUP BY status"
        ).fetchall()
        completed = self.conn.execute(
            "SELECT COALESCE(SUM(total_length), 0) FROM jobs WHERE status = 'completed'"
        ).fetchone()[0]
        uploads = self.conn.execute(
            "SELECT status, COUNT(*) AS n, COALESCE(SUM(total_size), 0) AS bytes,"
            " COALESCE(SUM(upload_speed), 0) AS speed, COUNT(cleaned_at) AS cleaned"
            " FROM transfers GROUP BY status"
        ).fetchall()
        targets = self.conn.execute(
            "SELECT upload_target, status, COUNT(*) AS n FROM transfers"
            " GROUP BY upload_target, status"
        ).fetchall()
        self.conn.commit()
        return {
            "downloads": {row["status"]: row["n"] for row in downloads},
            "total": sum(row["n"] for row in downloads),
            "completed_bytes": completed,
            "uploads": {row["status"]: row["n"] for row in uploads},
            "targets": len(targets),
        }


def new_job(number: int) -> tuple[NewDownload, TgMediaRecord]:
    """A Telegram job (the heaviest: a media row too), alone in its album."""
    unique = f"N{number}"
    media = TgMediaRecord(
        file_unique_id=unique, file_id=f"nf-{number}", chat_id=-1001234567890,
        message_id=10**7 + number, media_type="video", file_name=f"n{number}.mp4",
        file_size=1000, media_group_id=f"new-{number}",
    )  # fmt: skip
    new = NewDownload(
        source_type="telegram", source_key=f"tg:{unique}", file_name=f"n{number}.mp4",
        total_length=1000, file_unique_id=unique, group_key=f"album:new-{number}",
    )  # fmt: skip
    return new, media


async def drain(subscription: Subscription) -> None:
    while len(subscription):
        await subscription.get()


async def median_ms(rounds: int, run: Callable[[], Awaitable[object]]) -> float:
    for _ in range(WARM_UP):
        await run()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        await run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def peer_median_ms(rounds: int, run: Callable[[], object]) -> float:
    for _ in range(WARM_UP):
        run()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def create_on_peer(peer: SyncPeer, numbers: range) -> float:
    """The peer's way: each job's media row, then its download with its gid; jobs/s."""
    started = time.perf_counter()
    for i in numbers:
        new, media = new_job(i)
        peer.save_media(media)
        peer.create_job(new.file_unique_id, f"p{i:015x}", None)
    return len(numbers) / (time.perf_counter() - started)


async def create_one_by_one(db: Database, numbers: range) -> float:
    """Ours, one job at a time: its row (with its media row) queued under its gid; jobs/s."""
    started = time.perf_counter()
    for i in numbers:
        new, media = new_job(i)
        await db.create_download(new, media, gid=f"s{i:015x}")
    return len(numbers) / (time.perf_counter() - started)


async def create_together(db: Database, numbers: range) -> float:
    """Ours, jobs that came together: all rows queued under their gids in one transaction;
    jobs/s."""
    started = time.perf_counter()
    created = await db.create_downloads(
        [new_job(i) for i in numbers], gids=[f"b{i:015x}" for i in numbers]
    )
    assert all(isinstance(i, int) for i in created)
    return len(numbers) / (time.perf_counter() - started)


async def compare(rows: int, args: argparse.Namespace) -> list[tuple[str, float, float, bool]]:
    """(path, peer figure, ours figure, is a rate) for one table size."""
    jobs = args.jobs
    with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
        peer = SyncPeer(Path(folder) / "peer.db")
        hub = EventHub()
        subscription = hub.subscribe("bench", maxsize=10 * jobs)
        try:
            peer.seed(rows, 1000)
            async with Database(Path(folder) / "ours.db", hub=hub) as db:
                await seed(db, rows)
                await db.get_statistics()

                rates: dict[str, list[float]] = {"peer": [], "single": [], "batch": []}
                for number in range(0, CREATION_ROUNDS * 3 * jobs, 3 * jobs):
                    rates["peer"].append(create_on_peer(peer, range(number, number + jobs)))
                    first = number + jobs
                    rates["single"].append(await create_one_by_one(db, range(first, first + jobs)))
                    first += jobs
                    rates["batch"].append(await create_together(db, range(first, first + jobs)))
                    await drain(subscription)  # a subscriber that keeps up, between the runs
                peer_rate, single_rate, batch_rate = (
                    statistics.median(rates[way]) for way in ("peer", "single", "batch")
                )
                peer_grouped = peer_median_ms(args.rounds, lambda: peer.grouped(100))
                ours_grouped = await median_ms(args.rounds, lambda: db.fetch_downloads_grouped(100))
                assert len(await db.fetch_downloads_grouped(100)) == len(peer.grouped(100)) == 100
                peer_stats = peer_median_ms(args.rounds, peer.statistics)
                ours_stats = await median_ms(args.rounds, db.get_statistics)
                made = CREATION_ROUNDS * jobs
                assert (await db.get_statistics())["downloads"]["total"] == rows + 2 * made
                assert peer.statistics()["total"] == rows + made
        finally:
            peer.close()
            await hub.close()
    return [
        ("job creation, one at a time (jobs/s)", peer_rate, single_rate, True),
        (f"job creation, {jobs} together (jobs/s)", peer_rate, batch_rate, True),
        ("grouped list 100 (ms)", peer_grouped, ours_grouped, False),
        ("statistics (ms)", peer_stats, ours_stats, False),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--jobs", type=int, default=300)
    args = parser.parse_args()
    logger.remove()
    print(f"both SQLite: WAL, synchronous=NORMAL; {args.rounds} rounds; {args.jobs} new jobs")
    header = f"{'rows':>7}  {'path':<38} {'peer':>10} {'ours':>10} {'ratio':>8}"
    print(header)
    print("-" * len(header))
    verdicts = []
    for rows in args.rows:
        for label, peer_value, ours_value, is_rate in asyncio.run(compare(rows, args)):
            ratio = ours_value / peer_value if is_rate else peer_value / ours_value
            print(f"{rows:>7}  {label:<38} {peer_value:>10.1f} {ours_value:>10.2f} {ratio:>7.2f}x")
            if label.startswith("grouped"):
                verdicts.append(ours_value <= GROUPED_TARGET_MS.get(rows, 5.0))
            elif label.startswith("statistics"):
                verdicts.append(ours_value <= STATISTICS_TARGET_MS.get(rows, 3.0))
            elif "together" in label:
                verdicts.append(ratio >= CREATION_TARGET)
    met = "met" if all(verdicts) else "NOT met"
    print(
        f"targets (jobs that come together >= {CREATION_TARGET:g}x the peer; grouped list <= 3/5 ms"
        f" and statistics <= 2/3 ms at 10k/100k): {met}"
    )


if __name__ == "__main__":
    main()
