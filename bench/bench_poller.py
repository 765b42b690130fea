"""Poller cost against the number of active downloads: RPC calls per cycle and event-loop lag.

With 10, 100 and 1000 downloads kept active (a loopback HTTP peer, in its own process, sends the
first bytes of each file and then holds the connection; aria2's per-download speed limit is tiny),
each DownloadManager.poll_once cycle is measured for:

- RPC calls: the transport's `rpc_calls` counter before and after the cycle (should stay constant);
- event-loop lag: a heartbeat task sleeping 1 ms in a loop records its worst overshoot during the
  cycle (target below 20 ms at 1000 downloads);
- the cycle's wall time.

    python bench/bench_poller.py [--scales 10,100,1000] [--cycles 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loguru import logger  # noqa: E402

from aria2_client.client import Aria2Client  # noqa: E402
from aria2_client.download_handler import DownloadManager  # noqa: E402
from aria2_client.process import EmbeddedAria2  # noqa: E402
from aria2_client.transport import Aria2Transport  # noqa: E402
from bench.bench_pipeline import FileServerProcess  # noqa: E402
from db import Database  # noqa: E402
from files import DownloadFiles  # noqa: E402

HEARTBEAT_SECONDS = 0.001
SETTLE_TIMEOUT = 120.0
HELD_BYTES = 1024


class Heartbeat:
    """Sleeps 1 ms in a loop and remembers the worst overshoot since the last reset."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    def reset(self) -> None:
        self.worst = 0.0

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(HEARTBEAT_SECONDS)
            self.worst = max(self.worst, time.perf_counter() - before - HEARTBEAT_SECONDS)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass
class Cycle:
    calls: int
    seconds: float
    worst_lag: float


async def settle(manager: DownloadManager, db: Database, count: int) -> None:
    """Poll until `count` rows are `downloading` (aria2 has opened each connection)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        await manager.poll_once()
        rows = await db.fetch_downloads_in_states(("downloading",))
        if len(rows) >= count:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(rows)} of {count} downloads became active")
        await asyncio.sleep(0.2)


async def quiet(transport: Aria2Transport, seconds: float = 1.0) -> None:
    """Wait until no RPC call (e.g. from aria2's start notifications) was made for `seconds`."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while time.monotonic() < deadline:
        before = transport.rpc_calls
        await asyncio.sleep(seconds)
        if transport.rpc_calls == before:
            return


async def measure(
    manager: DownloadManager, transport: Aria2Transport, heartbeat: Heartbeat, cycles: int
) -> list[Cycle]:
    results = []
    for _ in range(cycles):
        await asyncio.sleep(0.2)  # what the poller's interval would leave between cycles
        calls_before = transport.rpc_calls
        heartbeat.reset()
        started = time.perf_counter()
        await manager.poll_once()
        seconds = time.perf_counter() - started
        await asyncio.sleep(HEARTBEAT_SECONDS * 3)  # let the heartbeat report the last stall
        results.append(Cycle(transport.rpc_calls - calls_before, seconds, heartbeat.worst))
    return results


async def bench(scales: list[int], cycles: int) -> None:
    with tempfile.TemporaryDirectory(prefix="mistrelay-poller-") as temp:
        work = Path(temp)
        (work / "www").mkdir()
        (work / "www" / "held.bin").write_bytes(b"\x00" * (HELD_BYTES * 64))
        server = FileServerProcess(work / "www")
        aria2 = EmbeddedAria2(
            download_dir=work / "downloads",
            data_dir=work / "aria2",
            secret=secrets.token_urlsafe(24),
            max_concurrent_downloads=max(scales) + 100,
            extra_options={
                "enable-dht": "false",
                "enable-dht6": "false",
                "bt-enable-lpd": "false",
                "max-download-limit": "1K",
                "timeout": "600",
                "max-tries": "1",
            },
        )
        db = Database(work / "mistrelay.db")
        transport = Aria2Transport(aria2.rpc_url, aria2.secret)
        manager = DownloadManager(db, Aria2Client(transport), DownloadFiles(work / "downloads"))
        heartbeat = Heartbeat()
        report: list[tuple[int, list[Cycle]]] = []
        try:
            await server.start()
            await aria2.start()
            await db.open()
            await transport.start(on_notification=manager.on_notification)
            if not await transport.wait_connected(10):
                raise RuntimeError("could not connect to aria2c")
            heartbeat.start()
            added = 0
            for scale in sorted(scales):
                started = time.perf_counter()
                while added < scale:
                    url = server.url("held.bin", "hold", f"bytes={HELD_BYTES}&n={added}")
                    await manager.add_link(url)
                    added += 1
                await settle(manager, db, scale)
                await quiet(transport)
                print(
                    f"{scale:>5} active downloads ready in {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
                report.append((scale, await measure(manager, transport, heartbeat, cycles)))
        finally:
            await heartbeat.stop()
            await transport.close()
            await aria2.stop(timeout=10)
            await db.close()
            await server.stop()

    print(f"\nDownloadManager.poll_once, {cycles} cycles per scale")
    print(f"{'active':>7} {'RPC calls/cycle':>16} {'cycle ms (median)':>18} {'worst lag ms':>13}")
    for scale, measured in report:
        calls = sorted({c.calls for c in measured})
        calls_text = "/".join(str(c) for c in calls)
        median_ms = statistics.median(c.seconds for c in measured) * 1000
        worst_lag_ms = max(c.worst_lag for c in measured) * 1000
        print(f"{scale:>7} {calls_text:>16} {median_ms:>18.1f} {worst_lag_ms:>13.1f}")
    all_calls = {c.calls for _, measured in report for c in measured}
    biggest = max(report, key=lambda item: item[0])
    lag_at_biggest = max(c.worst_lag for c in biggest[1]) * 1000
    print(
        f"calls per cycle constant: {'yes' if len(all_calls) == 1 else 'NO'} "
        f"({sorted(all_calls)}); worst lag at {biggest[0]}: {lag_at_biggest:.1f} ms "
        f"(target < 20 ms: {'met' if lag_at_biggest < 20 else 'NOT met'})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", default="10,100,1000", help="comma-separated counts")
    parser.add_argument("--cycles", type=int, default=5)
    args = parser.parse_args()
    try:
        scales = sorted({int(s) for s in args.scales.split(",") if s.strip()})
    except ValueError:
        parser.error("--scales takes comma-separated integers")
    if not scales or scales[0] < 1 or args.cycles < 1:
        parser.error("scales and --cycles must be >= 1")
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(bench(scales, args.cycles))
    return 0


if __name__ == "__main__":
    sys.exit(main())
