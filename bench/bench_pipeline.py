"""Download pipeline: MistRelay's API versus a bare aria2c with the same options, side by side.

N files of S MB come from a loopback HTTP file server (in its own process, so it never shares an
event loop with what is measured). Each run is timed from the request to the moment every file is
complete:

- A (MistRelay): one POST /api/downloads with every link, until each row's `completed` status is
  committed in the database;
- B (bare aria2c): the same links added through aria2's RPC with aria2p, until aria2 reports each
  one complete.

After one untimed warm-up round each, runs alternate A, B, A, B, ... in one process; the medians
and their ratio are printed.

    python bench/bench_pipeline.py [--files 20] [--size 50] [--runs 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

THIS_FILE = Path(__file__).resolve()
ROOT = THIS_FILE.parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import aria2p  # noqa: E402
from loguru import logger  # noqa: E402

from app import Service  # noqa: E402
from aria2_client.process import EmbeddedAria2  # noqa: E402
from configer import Config, load_config  # noqa: E402
from tests.support.http_files import MIB, deterministic_bytes, start_file_server  # noqa: E402
from tests.support.service import service_config  # noqa: E402

POLL_SECONDS = 0.02
RUN_TIMEOUT = 300.0


# --- the HTTP peer in a child process -------------------------------------------------------------


async def _serve(root: Path) -> None:
    logger.remove()
    # Clients hanging up mid-body (held or cancelled downloads) are expected here.
    logging.getLogger("aiohttp.server").disabled = True
    server = await start_file_server(root)
    print(server.base_url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop()


class FileServerProcess:
    """`start_file_server` run in a child Python process; stopped by its PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.base_url = ""
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(THIS_FILE),
            "--serve",
            str(self.root),
            stdout=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
        )
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), 30)
        self.base_url = line.decode().strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            await self.stop()
            raise RuntimeError(f"file server did not start: {line!r}")

    def url(self, name: str, route: str = "files", query: str = "") -> str:
        return f"{self.base_url}/{route}/{name}" + (f"?{query}" if query else "")

    async def stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await process.wait()


# --- helpers ------------------------------------------------------------------------------------


async def wait_for(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)


def write_files(root: Path, count: int, size: int) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    block = deterministic_bytes(size, seed=1)
    names = []
    for index in range(count):
        name = f"file{index:03d}.bin"
        # Distinct content per file: stamp the index at the start.
        (root / name).write_bytes(index.to_bytes(8, "big") + block[8:])
        names.append(name)
    return names


def bare_aria2(config: Config, work: Path) -> EmbeddedAria2:
    """An aria2c with exactly the options the service gives its embedded one."""
    options = dict(config.aria2.options)
    options.setdefault("seed-time", "0")
    if not config.aria2.enable_dht:
        options.update({"enable-dht": "false", "enable-dht6": "false"})
    return EmbeddedAria2(
        download_dir=work / "bare-downloads",
        data_dir=work / "bare-data",
        secret=secrets.token_urlsafe(24),
        executable=config.aria2.executable,
        max_concurrent_downloads=config.aria2.max_concurrent_downloads,
        extra_options=options,
    )


# --- the two contestants ------------------------------------------------------------------------


async def run_mistrelay(
    service: Service, http: aiohttp.ClientSession, urls: list[str], sizes: int
) -> float:
    db = service.parts.store
    api = f"http://127.0.0.1:{service.parts.web.port}/api/downloads"
    headers = {"Authorization": f"Bearer {service.parts.secrets.web_token}"}
    started = time.perf_counter()
    async with http.post(api, json={"urls": urls}, headers=headers) as response:
        body = await response.json()
        if response.status != 201:
            raise RuntimeError(f"POST /api/downloads answered {response.status}: {body}")
    ids = {d["id"] for d in body["downloads"]}

    async def all_completed() -> bool:
        rows = await db.fetch_downloads_in_states(("completed", "failed", "cancelled"))
        done = [r for r in rows if r.id in ids]
        failed = [r for r in done if r.status != "completed"]
        if failed:
            raise RuntimeError(f"MistRelay download failed: {failed[0].error_message}")
        return len(done) == len(ids)

    await wait_for(all_completed, "MistRelay to complete every file")
    elapsed = time.perf_counter() - started
    for download_id in ids:
        row = await db.get_download_by_id(download_id)
        assert row is not None and row.local_path is not None
        if await asyncio.to_thread(os.path.getsize, row.local_path) != sizes:
            raise RuntimeError(f"{row.local_path} has the wrong size")
    await service.parts.engine.downloads.delete_all(delete_files=True)
    return elapsed


async def run_bare(aria2: EmbeddedAria2, work: Path, urls: list[str], run: int, size: int) -> float:
    client = aria2p.Client(host="http://127.0.0.1", port=aria2.port, secret=aria2.secret)
    run_dir = work / "bare-downloads" / f"run{run}"

    def add_all() -> list[str]:
        gids = []
        for index, url in enumerate(urls):
            gids.append(client.add_uri([url], {"dir": str(run_dir / str(index))}))
        return gids

    started = time.perf_counter()
    gids = set(await asyncio.to_thread(add_all))

    async def all_completed() -> bool:
        stopped = await asyncio.to_thread(client.tell_stopped, 0, 1000, ["gid", "status"])
        mine = [s for s in stopped if s["gid"] in gids]
        errors = [s for s in mine if s["status"] != "complete"]
        if errors:
            raise RuntimeError(f"bare aria2c download failed: {errors[0]}")
        return len(mine) == len(gids)

    await wait_for(all_completed, "bare aria2c to complete every file")
    elapsed = time.perf_counter() - started
    for path in run_dir.rglob("*.bin"):
        if path.stat().st_size != size:
            raise RuntimeError(f"{path} has the wrong size")
    await asyncio.to_thread(client.purge_download_result)
    await asyncio.to_thread(shutil.rmtree, run_dir)
    return elapsed


# --- main ---------------------------------------------------------------------------------------


async def bench(files: int, size_mb: int, runs: int) -> None:
    size = size_mb * MIB
    with tempfile.TemporaryDirectory(prefix="mistrelay-bench-") as temp:
        work = Path(temp)
        names = write_files(work / "www", files, size)
        server = FileServerProcess(work / "www")
        await server.start()
        urls = [server.url(name) for name in names]
        config = load_config(
            service_config(
                work / "svc",
                {
                    "logging": {"level": "WARNING"},
                    "aria2": {"poll_interval": 1.0, "idle_poll_interval": 5.0},
                },
            ),
            env={},
        )
        service = Service(config)
        bare = bare_aria2(config, work)
        mistrelay_times: list[float] = []
        bare_times: list[float] = []
        logger.remove()
        logger.add(sys.stderr, level="WARNING")
        try:
            await service.start()
            await bare.start()
            async with aiohttp.ClientSession() as http:
                # One untimed round each: page cache, connections, first-use costs.
                await run_mistrelay(service, http, urls, size)
                await run_bare(bare, work, urls, -1, size)
                for run in range(runs):
                    mistrelay_times.append(await run_mistrelay(service, http, urls, size))
                    bare_times.append(await run_bare(bare, work, urls, run, size))
                    print(
                        f"run {run + 1}/{runs}: MistRelay {mistrelay_times[-1]:.2f} s, "
                        f"bare aria2c {bare_times[-1]:.2f} s",
                        flush=True,
                    )
        finally:
            await bare.stop()
            await service.stop()
            await server.stop()

    total_mb = files * size_mb
    a = statistics.median(mistrelay_times)
    b = statistics.median(bare_times)
    print(f"\n{files} files x {size_mb} MB ({total_mb} MB) over loopback HTTP, {runs} runs each")
    print(f"MistRelay (API -> completed in db):  median {a:.2f} s  ({total_mb / a:.0f} MB/s)")
    print(f"bare aria2c (aria2p RPC -> complete): median {b:.2f} s  ({total_mb / b:.0f} MB/s)")
    print(f"ratio MistRelay / bare aria2c: {a / b:.3f}x  (target <= 1.10x)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--size", type=int, default=50, help="MB per file")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        asyncio.run(_serve(args.serve))
        return 0
    if args.files < 1 or args.size < 1 or args.runs < 1:
        parser.error("--files, --size and --runs must be >= 1")
    asyncio.run(bench(args.files, args.size, args.runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
