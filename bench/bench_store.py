"""The store's hot paths on PostgreSQL and on SQLite, side by side in one run.

Run from the project root: .venv/bin/python bench/bench_store.py [--rows 10000 100000]
    [--synchronous-commit off|on] [--rounds 21] [--jobs 300]

For each table size, each backend gets a fresh database seeded in bulk with that many
downloads: a quarter of them Telegram jobs in albums of four (with their `tg_media` rows), the
rest HTTP; most completed with an upload each, 1000 downloading with gids (what a poll cycle
updates). Then, through the store's own API, with a hub subscriber drained between two timed runs:

- job creation: `create_download` + `mark_download_queued_by_id` (two transactions a job), jobs/s;
- one progress batch of the 1000 downloading rows, every row changed (ms);
- the grouped list of 100 (`fetch_downloads_grouped(100)`, the page's list) (ms);
- statistics (`get_statistics()`, what the hub pushes) (ms).

Timed paths are medians of --rounds runs after two unmeasured ones. The PostgreSQL server is
a throwaway one (tests/support/postgres.py) started with PostgreSQL's default durability (fsync
on); `synchronous_commit` off (the default here) is the like-for-like of SQLite's WAL with
synchronous=NORMAL, which does not wait for the disk at each commit either; `on` waits for it.
The ratio printed is PostgreSQL / SQLite time (for jobs/s: SQLite / PostgreSQL rate), so above
1 means PostgreSQL is slower; the target is at most 3x, and the progress batch under 20 ms on
both.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger

from db import Database, PostgresLocation
from events import EventHub, Subscription
from records import NewDownload, ProgressUpdate
from tests.support import postgres
from tests.support.postgres import PostgresServer, running_postgres

ACTIVE = 1000  # downloading rows with gids: one poll cycle
WARM_UP = 2  # unmeasured runs of each timed path
STAMP = "2026-01-01T00:00:00.000+00:00"
TARGET_RATIO = 3.0
TARGET_BATCH_MS = 20.0


@dataclass
class Figures:
    jobs_per_s: float
    batch_ms: float
    grouped_ms: float
    statistics_ms: float


async def seed(db: Database, count: int) -> list[str]:
    """`count` downloads in bulk (setup, not measured); the gids of the downloading ones."""
    telegram = count // 4
    media_rows = [
        (f"U{i}", f"file-{i}", -1001234567890, 10 + i, "video", f"v{i}.mp4", 2**31 + i,
         f"album-{i // 4}", STAMP, STAMP)
        for i in range(telegram)
    ]  # fmt: skip
    downloads = []
    gids = []
    for i in range(count):
        active = i >= count - ACTIVE
        gid = f"{i:016x}" if active else None
        if gid:
            gids.append(gid)
        is_telegram = i < telegram
        downloads.append(
            (
                gid,
                "telegram" if is_telegram else "http",
                f"tg:U{i}" if is_telegram else f"http://bench/{i}",
                "downloading" if active else "completed",
                f"album:{i // 4}" if is_telegram else f"download:{i + 1}",
                f"U{i}" if is_telegram else None,
                3_000_000_000,
                0 if active else 3_000_000_000,
                f"/data/{i}/file.bin",
            )
        )
    async with db._write() as tx:
        await tx.executemany(
            "INSERT INTO tg_media (file_unique_id, file_id, chat_id, message_id, media_type,"
            " file_name, file_size, media_group_id, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            media_rows,
        )
        await tx.executemany(
            "INSERT INTO downloads (gid, source_type, source_key, status, group_key,"
            " file_unique_id, total_length, completed_length, local_path, created_at,"
            f" updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, '{STAMP}', '{STAMP}')",
            downloads,
        )
        await tx.execute(
            "INSERT INTO download_gids (gid, download_id, reason, created_at)"
            " SELECT gid, id, 'bench', created_at FROM downloads WHERE gid IS NOT NULL ORDER BY id"
        )
        await tx.execute(
            "INSERT INTO uploads (download_id, upload_target, target_type, status, total_size,"
            " uploaded_size, created_at, updated_at)"
            " SELECT id, 'cloud', 'rclone', 'completed', total_length, total_length,"
            " created_at, updated_at FROM downloads WHERE status = 'completed' ORDER BY id"
        )
    if db._backend.dialect == "postgresql":
        # What autovacuum does after such a load, done now rather than in the middle of the
        # measurements (VACUUM runs outside a transaction: on the read side's pool).
        await db._backend.reads().execute("VACUUM (ANALYZE)")
    return gids


async def drain(subscription: Subscription) -> None:
    """The subscriber keeps up, between two timed runs."""
    while len(subscription):
        await subscription.get()


async def median_ms(
    rounds: int, run: Callable[[int], Awaitable[object]], subscription: Subscription
) -> float:
    for warm_up in range(-WARM_UP, 0):  # first uses of the statements and of the loaded pages
        await run(warm_up)
        await drain(subscription)
    times = []
    for round_number in range(1, rounds + 1):
        started = time.perf_counter()
        await run(round_number)
        times.append(time.perf_counter() - started)
        await drain(subscription)
    return statistics.median(times) * 1000


async def measure(
    db: Database, gids: list[str], rounds: int, jobs: int, subscription: Subscription
) -> Figures:
    async def batch(tick: int) -> None:
        updates = [
            ProgressUpdate(g, (tick + WARM_UP + 1) * 1000 + i, 3_000_000_000, 100 + tick)
            for i, g in enumerate(gids)
        ]
        assert await db.update_progress_batch(updates) == len(gids)

    async def grouped(_: int) -> None:
        assert len(await db.fetch_downloads_grouped(100)) == 100

    async def stats(_: int) -> None:
        assert (await db.get_statistics())["downloads"]["total"] > 0

    started = time.perf_counter()
    for i in range(jobs):
        download_id = await db.create_download(
            NewDownload(source_type="http", source_key=f"http://new/{i}", file_name=f"{i}.bin")
        )
        await db.mark_download_queued_by_id(download_id, f"new-{i:012x}")
    jobs_per_s = jobs / (time.perf_counter() - started)
    await drain(subscription)
    return Figures(
        jobs_per_s=jobs_per_s,
        batch_ms=await median_ms(rounds, batch, subscription),
        grouped_ms=await median_ms(rounds, grouped, subscription),
        statistics_ms=await median_ms(rounds, stats, subscription),
    )


async def run_one(location: Path | PostgresLocation, rows: int, rounds: int, jobs: int) -> Figures:
    hub = EventHub()
    subscription = hub.subscribe("bench", maxsize=10 * ACTIVE)
    try:
        async with Database(location, hub=hub) as db:
            gids = await seed(db, rows)
            return await measure(db, gids, rounds, jobs, subscription)
    finally:
        await hub.close()


async def compare(server: PostgresServer, args: argparse.Namespace) -> None:
    print(f"PostgreSQL: fsync on, synchronous_commit {args.synchronous_commit}; SQLite: WAL, "
          f"synchronous=NORMAL; {args.rounds} rounds, {args.jobs} jobs")  # fmt: skip
    header = f"{'rows':>7}  {'path':<22} {'SQLite':>12} {'PostgreSQL':>12} {'PG/SQLite':>10}"
    print(header)
    print("-" * len(header))
    verdicts = []
    for rows in args.rows:
        name = await asyncio.to_thread(server.create_database)
        await asyncio.to_thread(
            server.execute,
            f"ALTER DATABASE {name} SET synchronous_commit = {args.synchronous_commit}",
        )
        dsn = server.dsn(name)
        with tempfile.TemporaryDirectory(dir="/var/tmp") as folder:
            lite = await run_one(Path(folder) / "bench.db", rows, args.rounds, args.jobs)
        pg = await run_one(PostgresLocation(dsn, dsn), rows, args.rounds, args.jobs)
        await asyncio.to_thread(server.drop_database, name)
        lines = [
            ("job creation (jobs/s)", lite.jobs_per_s, pg.jobs_per_s, True),
            ("progress 1000 (ms)", lite.batch_ms, pg.batch_ms, False),
            ("grouped list 100 (ms)", lite.grouped_ms, pg.grouped_ms, False),
            ("statistics (ms)", lite.statistics_ms, pg.statistics_ms, False),
        ]
        for label, sqlite_value, pg_value, is_rate in lines:
            ratio = sqlite_value / pg_value if is_rate else pg_value / sqlite_value
            print(f"{rows:>7}  {label:<22} {sqlite_value:>12.1f} {pg_value:>12.1f} {ratio:>9.2f}x")
            verdicts.append(ratio <= TARGET_RATIO)
        verdicts.append(max(lite.batch_ms, pg.batch_ms) < TARGET_BATCH_MS)
    met = "met" if all(verdicts) else "NOT met"
    print(
        f"targets (PG/SQLite <= {TARGET_RATIO:g}x, progress batch < {TARGET_BATCH_MS:g} ms): {met}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--synchronous-commit", choices=("off", "on"), default="off")
    args = parser.parse_args()
    logger.remove()
    # PostgreSQL's own durability defaults (fsync on), not the test cluster's fsync=off.
    with mock.patch.object(postgres, "_SETTINGS", ()), running_postgres() as server:
        asyncio.run(compare(server, args))


if __name__ == "__main__":
    main()
