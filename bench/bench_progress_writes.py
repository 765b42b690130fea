"""One poll cycle of 1000 progress updates: one transaction versus one commit per row.

Run from the project root: .venv/bin/python bench/bench_progress_writes.py
After one unmeasured warm-up of each, both ways are alternated, five rounds each; the medians
and their ratio are printed. Every round writes new values, so every row really changes.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loguru import logger

from db import Database
from events import EventHub
from records import ProgressUpdate

ROWS = 1000
ROUNDS = 5
TARGET_RATIO = 50.0


async def seed(db: Database, count: int) -> list[str]:
    """`count` downloading rows with gids, inserted in one transaction (setup, not measured)."""
    now = "2026-01-01T00:00:00.000+00:00"
    gids = [f"{i:016x}" for i in range(count)]
    async with db._write() as tx:
        await tx.executemany(
            "INSERT INTO downloads (gid, source_type, source_key, status, group_key,"
            " total_length, created_at, updated_at)"
            " VALUES (?, 'http', ?, 'downloading', ?, 1000000000, ?, ?)",
            [(gid, f"http://bench/{gid}", f"bench:{gid}", now, now) for gid in gids],
        )
        await tx.execute(
            "INSERT INTO download_gids (gid, download_id, reason, created_at)"
            " SELECT gid, id, 'bench', created_at FROM downloads"
        )
    return gids


def cycle(gids: list[str], tick: int) -> list[ProgressUpdate]:
    """A poll cycle in which every download moved (so every row really changes)."""
    return [
        ProgressUpdate(gid, tick * 1000 + index, 1_000_000_000, 1000 + tick)
        for index, gid in enumerate(gids)
    ]


async def batched(db: Database, updates: list[ProgressUpdate]) -> float:
    started = time.perf_counter()
    changed = await db.update_progress_batch(updates)
    elapsed = time.perf_counter() - started
    assert changed == len(updates), f"batch changed {changed} rows, expected {len(updates)}"
    return elapsed


async def per_row(db: Database, updates: list[ProgressUpdate]) -> float:
    started = time.perf_counter()
    for update in updates:
        await db.update_download_progress(
            update.gid, update.completed_length, update.total_length, update.download_speed
        )
    return time.perf_counter() - started


async def main() -> float:
    logger.remove()
    with tempfile.TemporaryDirectory() as folder:
        hub = EventHub()
        subscription = hub.subscribe("bench", maxsize=10 * ROWS)
        async with Database(Path(folder) / "bench.db", hub=hub) as db:
            gids = await seed(db, ROWS)
            batch_times: list[float] = []
            row_times: list[float] = []
            tick = 0
            for warm_up in (batched, per_row):  # first use of each statement, not measured
                tick += 1
                await warm_up(db, cycle(gids, tick))
            for _ in range(ROUNDS):
                tick += 1
                batch_times.append(await batched(db, cycle(gids, tick)))
                tick += 1
                row_times.append(await per_row(db, cycle(gids, tick)))
                while len(subscription):  # a subscriber that keeps up
                    await subscription.get()
        await hub.close()
    batch_median = statistics.median(batch_times)
    row_median = statistics.median(row_times)
    ratio = row_median / batch_median
    verdict = "met" if ratio >= TARGET_RATIO else "NOT met"
    print(f"rows per poll cycle      {ROWS}")
    print(f"rounds (alternated)      {ROUNDS} each, after one warm-up of each")
    print(f"batch, one transaction   median {batch_median * 1000:7.1f} ms")
    print(f"per row, one commit each median {row_median * 1000:7.1f} ms")
    print(f"ratio per-row / batch    {ratio:.1f}x (target >= {TARGET_RATIO:.0f}x: {verdict})")
    print(f"batch runs (ms)          {', '.join(f'{t * 1000:.1f}' for t in batch_times)}")
    print(f"per-row runs (ms)        {', '.join(f'{t * 1000:.1f}' for t in row_times)}")
    return ratio


if __name__ == "__main__":
    asyncio.run(main())
