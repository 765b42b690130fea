"""Fixtures for external processes: free ports, a PID reaper, and a real aria2c per test."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from aria2_client.client import Aria2Client
from aria2_client.process import EmbeddedAria2
from aria2_client.transport import Aria2Transport

# Keep a test aria2c on loopback: no DHT, no local peer discovery (multicast), no peer exchange.
TEST_ARIA2_OPTIONS: dict[str, str] = {
    "enable-dht": "false",
    "enable-dht6": "false",
    "bt-enable-lpd": "false",
    "enable-peer-exchange": "false",
    "disable-ipv6": "true",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now (bind to port 0 and read it back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks (/proc/PID/stat field 22): tells a reused PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its closing ")".
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class ProcessReaper:
    """Remembers the PIDs a test started and kills the ones still alive when the test ends."""

    def __init__(self) -> None:
        self._tracked: dict[int, str | None] = {}

    def track(self, pid: int | None) -> None:
        if pid is not None and pid not in self._tracked:
            self._tracked[pid] = _start_time(pid)

    @property
    def pids(self) -> list[int]:
        return list(self._tracked)

    def reap(self) -> list[int]:
        """SIGKILL every tracked process still alive (and still the same process); returns them."""
        killed: list[int] = []
        for pid, started in self._tracked.items():
            if pid_alive(pid) and _start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        return killed


@pytest.fixture
def process_reaper() -> Iterator[ProcessReaper]:
    reaper = ProcessReaper()
    try:
        yield reaper
    finally:
        reaper.reap()


def make_test_aria2(
    tmp_path: Path,
    *,
    extra_options: Mapping[str, str] | None = None,
    secret: str | None = None,
    **kwargs: Any,
) -> EmbeddedAria2:
    """An EmbeddedAria2 under `tmp_path` with loopback-only test options (not started)."""
    options = {**TEST_ARIA2_OPTIONS, **(extra_options or {})}
    kwargs.setdefault("download_dir", tmp_path / "downloads")
    kwargs.setdefault("data_dir", tmp_path / "aria2")
    return EmbeddedAria2(
        secret=secret or secrets.token_urlsafe(16), extra_options=options, **kwargs
    )


@pytest_asyncio.fixture
async def aria2(tmp_path: Path, process_reaper: ProcessReaper) -> AsyncIterator[EmbeddedAria2]:
    """A started aria2c in tmp_path (downloads in tmp_path/downloads), stopped afterwards."""
    embedded = make_test_aria2(tmp_path)
    await embedded.start()
    process_reaper.track(embedded.pid)
    try:
        yield embedded
    finally:
        process_reaper.track(embedded.pid)
        await embedded.stop(timeout=5)


@pytest_asyncio.fixture
async def aria2_transport(aria2: EmbeddedAria2) -> AsyncIterator[Aria2Transport]:
    """A transport connected to the `aria2` fixture's process."""
    transport = Aria2Transport(aria2.rpc_url, aria2.secret)
    await transport.start()
    try:
        if not await transport.wait_connected(10):
            raise RuntimeError("could not connect to the test aria2c")
        yield transport
    finally:
        await transport.close()


@pytest_asyncio.fixture
async def aria2_client(aria2_transport: Aria2Transport) -> Aria2Client:
    return Aria2Client(aria2_transport)
