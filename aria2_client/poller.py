"""The poller: aria2 sends no progress events, so progress (and what notifications missed) is read
in one batched call per cycle, fast while anything is active and slowly when idle."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from loguru import logger

from aria2_client.download_handler import DownloadManager
from aria2_client.transport import Aria2RpcError, Aria2Unavailable
from db import STORE_ERRORS


class Poller:
    def __init__(
        self,
        manager: DownloadManager,
        *,
        interval: Callable[[], float],
        idle_interval: Callable[[], float],
        on_cycle: Callable[[float], None] | None = None,
    ) -> None:
        self.manager = manager
        self._on_cycle = on_cycle  # told each cycle's seconds
        self._interval = interval
        self._idle_interval = idle_interval
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self.cycles = 0
        self.last_cycle_seconds = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="aria2-poller")

    def wake(self) -> None:
        """Run the next cycle now (e.g. a job was added, or aria2 came back)."""
        self._wake.set()

    async def stop(self) -> None:
        """Stop the loop; bounded even if a cycle swallowed a cancellation."""
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        task.cancel()
        _, pending = await asyncio.wait({task}, timeout=5)
        if pending:
            logger.warning("poller did not stop within 5 s")

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            started = time.perf_counter()
            active = 0
            try:
                active = await self.manager.poll_once()
            except Aria2Unavailable:
                logger.debug("poller: aria2 unavailable")
            except Aria2RpcError as exc:
                logger.warning("poller: aria2 answered an error: {}", exc.message)
            except STORE_ERRORS as exc:
                # The database is away (a server restarting): aria2 keeps running; catch up later.
                logger.warning("poller: the store did not answer: {}", _one_line(exc))
            except Exception:
                logger.exception("poller cycle failed")
            self.cycles += 1
            self.last_cycle_seconds = time.perf_counter() - started
            if self._on_cycle is not None:
                self._on_cycle(self.last_cycle_seconds)
            delay = self._interval() if active else self._idle_interval()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
