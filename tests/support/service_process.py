"""MistRelay as a real separate process: `python app.py --config X`, killed by its PID.

In-process services (``tests/support/service.py``) cannot be SIGKILLed; fault tests that must
crash the whole service, or run it inside another mount namespace, use :class:`ServiceProcess`:

- :meth:`ServiceProcess.start` spawns the service in its own process group (its stdout and stderr
  go to ``<root>/service.log``; every run appends), waits until ``GET /api/health`` answers and
  reads the web token from ``data_dir/web_token`` (or takes the config's ``web.token``).
- :meth:`ServiceProcess.kill` sends a signal to the service's PID only (SIGKILL by default: a
  crash); :meth:`ServiceProcess.stop` asks it to stop (SIGTERM) and waits, SIGKILL after a grace.
- :meth:`ServiceProcess.children` lists the processes whose command line mentions the data folder
  (aria2c, rclone transfers); :meth:`ServiceProcess.reap_children` SIGKILLs them, so a test leaves
  nothing behind even when the product would.

:func:`service_processes` builds them under a folder and stops and reaps every one on the way
out, also when the test fails; the ``service_process`` fixture wraps it for a test.
Also here: :class:`HealthProbe` (times ``/api/health`` from its own thread), read-only database
access (:func:`read_only_db`, :func:`integrity_check`), :func:`bytes_lost` and :func:`wait_until`.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.processes import pid_alive
from tests.support.service import service_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]
APP_SCRIPT = PROJECT_ROOT / "app.py"
FINAL_DOWNLOAD_STATUSES = frozenset({"completed", "failed", "cancelled"})
FINAL_UPLOAD_STATUSES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class ProcInfo:
    """A process seen in /proc: its PID and command line (arguments split on NUL)."""

    pid: int
    argv: tuple[str, ...]

    @property
    def program(self) -> str:
        return Path(self.argv[0]).name if self.argv else ""


def read_argv(pid: int) -> tuple[str, ...] | None:
    """The command line of `pid`, or None when it is gone (or a zombie with an empty one)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None
    return tuple(part.decode("utf-8", "replace") for part in raw.rstrip(b"\0").split(b"\0"))


def processes_mentioning(text: str, *, exclude: Iterable[int] = ()) -> list[ProcInfo]:
    """Live (non-zombie) processes whose command line contains `text`."""
    skip = {os.getpid(), *exclude}
    found: list[ProcInfo] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        if pid in skip:
            continue
        argv = read_argv(pid)
        if argv is None or not any(text in part for part in argv):
            continue
        if pid_alive(pid):
            found.append(ProcInfo(pid, argv))
    return found


def clean_environment(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without MISTRELAY_* (the test's config file must rule)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MISTRELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def read_only_db(path: Path) -> sqlite3.Connection:
    """A read-only connection to the service's database (never writes, never creates)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def integrity_check(path: Path) -> str:
    """`PRAGMA integrity_check` through a read-only connection ("ok" when the file is sound)."""
    conn = read_only_db(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


@dataclass
class ServiceProcess:
    """One MistRelay service process under `root` (config.yaml, data/, service.log)."""

    root: Path
    config_path: Path
    port: int
    env: dict[str, str] = field(default_factory=clean_environment)
    # Put in front of the service's command line, e.g. a mount-namespace wrapper: it must end by
    # exec-ing the command so that the PID stays the service's.
    wrapper: Callable[[list[str]], list[str]] | None = None
    # What the interpreter runs before `--config X`: app.py, or e.g. ("-m", "some.module").
    entry: tuple[str, ...] = (str(APP_SCRIPT),)
    # The config's `web.token`, when it sets one (then no web_token file is written).
    web_token: str = field(default="", repr=False)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    token: str = ""
    runs: int = 0
    _http: aiohttp.ClientSession | None = field(default=None, repr=False)

    # -- facts ------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "mistrelay.db"

    @property
    def download_dir(self) -> Path:
        return self.data_dir / "downloads"

    @property
    def log_path(self) -> Path:
        return self.root / "service.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def command(self, *args: str) -> list[str]:
        return [sys.executable, *self.entry, "--config", str(self.config_path), *args]

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, limit: int = 4000) -> str:
        return self.log_text()[-limit:]

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self, timeout: float = 30.0) -> None:
        """Spawn the service and return once /api/health answers and the token is known."""
        if self.running:
            raise RuntimeError("the service process is already running")
        command = self.command()
        if self.wrapper is not None:
            command = self.wrapper(command)
        self.root.mkdir(parents=True, exist_ok=True)
        self.runs += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n===== run {self.runs}: {' '.join(command)}\n".encode())
            log.flush()
            self.popen = await asyncio.to_thread(
                subprocess.Popen,
                command,
                cwd=PROJECT_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        await self.wait_healthy(timeout)
        self.token = self.web_token or (self.data_dir / "web_token").read_text().strip()

    async def wait_healthy(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise RuntimeError(
                    f"the service exited with code {self.popen.returncode if self.popen else None}"
                    f" while starting:\n{self.log_tail()}"
                )
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                status, body = await self.api("GET", "/api/health", auth=False, timeout=2)
                if status == 200 and isinstance(body, dict):
                    return body
            if time.monotonic() > deadline:
                raise RuntimeError(f"the service did not answer within {timeout} s")
            await asyncio.sleep(0.1)

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send `sig` to the service's PID only (not its group: children must fend for
        themselves, as after a real crash)."""
        if self.popen is not None and self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, sig)

    async def wait_exit(self, timeout: float = 20.0) -> int:
        assert self.popen is not None
        deadline = time.monotonic() + timeout
        while self.popen.poll() is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"service pid {self.popen.pid} still running after {timeout} s")
            await asyncio.sleep(0.05)
        return int(self.popen.returncode)

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to `timeout`, then SIGKILL. Returns the exit code (None if never
        started)."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                return await self.wait_exit(timeout)
            except TimeoutError:
                self.kill(signal.SIGKILL)
                return await self.wait_exit(10)
        return int(self.popen.returncode)

    def children(self) -> list[ProcInfo]:
        """Processes (other than the service) whose command line mentions the data folder."""
        return processes_mentioning(str(self.data_dir), exclude=[self.pid] if self.pid else [])

    def child_pids(self, program: str) -> list[int]:
        return [p.pid for p in self.children() if p.program == program]

    def reap_children(self) -> list[int]:
        """SIGKILL every child process still alive; returns their PIDs."""
        killed: list[int] = []
        for proc in self.children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
                killed.append(proc.pid)
        return killed

    async def wait_children_gone(self, program: str, timeout: float) -> list[int]:
        """Wait until no `program` child is left; returns those still alive at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.child_pids(program)
            if not left or time.monotonic() > deadline:
                return left
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- HTTP -------------------------------------------------------------------------------

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=64, force_close=False)
            )
        return self._http

    async def api(
        self,
        method: str,
        path: str,
        *,
        auth: bool = True,
        timeout: float = 30.0,
        **kwargs: Any,
    ) -> tuple[int, Any]:
        headers = {**(self.auth if auth else {}), **kwargs.pop("headers", {})}
        async with self.http().request(
            method,
            self.base_url + path,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout),
            **kwargs,
        ) as response:
            body = await response.read()
            try:
                return response.status, await response.json(content_type=None)
            except ValueError:
                return response.status, body

    async def add(self, *urls: str) -> list[int]:
        """POST the links; returns the new download ids (asserts a 201)."""
        body: dict[str, Any] = {"url": urls[0]} if len(urls) == 1 else {"urls": list(urls)}
        status, answer = await self.api("POST", "/api/downloads", json=body)
        assert status == 201, answer
        return [int(d["id"]) for d in answer["downloads"]]

    async def download(self, download_id: int) -> dict[str, Any]:
        status, body = await self.api("GET", f"/api/downloads/{download_id}")
        assert status == 200, body
        return dict(body)

    async def wait_download(
        self, download_id: int, statuses: Iterable[str], timeout: float = 60
    ) -> dict[str, Any]:
        wanted = set(statuses)
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                status, last = await self.api("GET", f"/api/downloads/{download_id}", timeout=5)
                if status == 200 and last["status"] in wanted:
                    return dict(last)
            await asyncio.sleep(0.1)
        raise AssertionError(f"download {download_id} never reached {wanted}; last: {last}")

    async def wait_all_final(
        self, download_ids: Sequence[int], timeout: float = 60
    ) -> dict[int, dict[str, Any]]:
        """Wait until every download is in a final status (uploads not included)."""
        deadline = time.monotonic() + timeout
        pending = set(download_ids)
        rows: dict[int, dict[str, Any]] = {}
        while pending and time.monotonic() < deadline:
            for download_id in sorted(pending):
                row = await self.download(download_id)
                rows[download_id] = row
                if row["status"] in FINAL_DOWNLOAD_STATUSES:
                    pending.discard(download_id)
            if pending:
                await asyncio.sleep(0.2)
        if pending:
            raise AssertionError(
                f"downloads {sorted(pending)} never ended: "
                f"{[rows.get(i, {}).get('status') for i in sorted(pending)]}"
            )
        return rows

    # -- the database, read-only ------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        conn = read_only_db(self.db_path)
        try:
            return list(conn.execute(sql, params).fetchall())
        finally:
            conn.close()


ServiceProcessFactory = Callable[..., ServiceProcess]


def make_service_process(
    root: Path,
    overrides: dict[str, Any] | None = None,
    *,
    env: dict[str, str] | None = None,
    wrapper: Callable[[list[str]], list[str]] | None = None,
    entry: tuple[str, ...] = (str(APP_SCRIPT),),
) -> ServiceProcess:
    """Write root/config.yaml (the in-process fixture's test defaults plus `overrides`)."""
    config_path = service_config(root, overrides)
    import yaml

    web = yaml.safe_load(config_path.read_text())["web"]
    return ServiceProcess(
        root=root,
        config_path=config_path,
        port=int(web["port"]),
        env=clean_environment(env),
        wrapper=wrapper,
        entry=entry,
        web_token=str(web.get("token") or ""),
    )


@contextlib.asynccontextmanager
async def service_processes(root: Path) -> AsyncIterator[ServiceProcessFactory]:
    """Build service processes under `root`: ``svc = factory(overrides={...}, name="a")``, then
    ``await svc.start()``. Every one is stopped, and its children reaped, on the way out (also
    when the body raised).
    """
    made: list[ServiceProcess] = []

    def factory(
        overrides: dict[str, Any] | None = None,
        *,
        name: str = "svc",
        env: dict[str, str] | None = None,
        wrapper: Callable[[list[str]], list[str]] | None = None,
        entry: tuple[str, ...] = (str(APP_SCRIPT),),
    ) -> ServiceProcess:
        svc = make_service_process(root / name, overrides, env=env, wrapper=wrapper, entry=entry)
        made.append(svc)
        return svc

    try:
        yield factory
    finally:
        for svc in reversed(made):
            with contextlib.suppress(Exception):
                await svc.stop(timeout=15)
            svc.reap_children()
            await svc.close()


__all__ = [
    "FINAL_DOWNLOAD_STATUSES",
    "FINAL_UPLOAD_STATUSES",
    "HealthProbe",
    "ProcInfo",
    "ServiceProcess",
    "ServiceProcessFactory",
    "bytes_lost",
    "clean_environment",
    "integrity_check",
    "make_service_process",
    "processes_mentioning",
    "read_argv",
    "read_only_db",
    "service_processes",
    "wait_until",
]


def bytes_lost(path: Path, expected: bytes) -> int:
    """How many of `expected`'s bytes are not at `path` as they should be (0 = byte-exact)."""
    try:
        actual = path.read_bytes()
    except OSError:
        return len(expected)
    if actual == expected:
        return 0
    same = sum(1 for a, b in zip(actual, expected, strict=False) if a == b)
    return len(expected) - same


async def wait_until(
    predicate: Callable[[], Any], timeout: float, *, interval: float = 0.1, what: str = ""
) -> Any:
    """Poll `predicate` (sync or async) until it returns something truthy; that value is
    returned. Raises AssertionError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        await asyncio.sleep(interval)


@dataclass
class HealthProbe:
    """GET /api/health every `interval` from its own thread (its own HTTP client), timing each."""

    port: int
    interval: float = 0.05
    latencies: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop probing. The join waits in a thread: the service under test may share this event
        loop, and a probe still waiting for its answer would never get it from a blocked loop."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/api/health")
                response = conn.getresponse()
                response.read()
                conn.close()
                if response.status != 200:
                    self.failures.append(f"status {response.status}")
            except OSError as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            self.latencies.append(time.monotonic() - started)
            self._stop.wait(self.interval)


@pytest.fixture
async def service_process(tmp_path: Path) -> AsyncIterator[ServiceProcessFactory]:
    """Service subprocesses for one test, all stopped and reaped at its end."""
    async with service_processes(tmp_path) as factory:
        yield factory
