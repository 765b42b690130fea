"""A throwaway PostgreSQL server for the test session (the programs of Debian's `postgresql`).

`initdb` into a temporary folder, `pg_ctl` on a free port on 127.0.0.1 with durability off (a
test cluster need not survive a power cut), stopped and removed when the session ends. As root
the folder belongs to the `postgres` user and the server programs run as that user (`initdb`
refuses root). Authentication is `trust`: the user `postgres` connects without a password.

The methods block (they run subprocesses): async code calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.processes import free_port, pid_alive

HOST = "127.0.0.1"
SUPERUSER = "postgres"
INSTALL_HINT = "run the README's test command (make test), which installs PostgreSQL"
# Durability off: a test cluster never needs to survive a crash, and each commit gets faster.
_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
_TIMEOUT = 120.0  # seconds for one server program or psql call


def find_server_programs() -> tuple[Path, Path]:
    """(the folder holding initdb and pg_ctl, psql). Debian keeps the server programs in
    /usr/lib/postgresql/<version>/bin, off PATH: the newest version there wins, then PATH."""
    folders = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version, reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        folders.append(Path(initdb).parent)
    for folder in folders:
        if all(os.access(folder / name, os.X_OK) for name in ("initdb", "pg_ctl")):
            psql = folder / "psql" if os.access(folder / "psql", os.X_OK) else shutil.which("psql")
            if psql:
                return folder, Path(psql)
    pytest.fail(f"PostgreSQL's initdb, pg_ctl and psql are missing: {INSTALL_HINT}", pytrace=False)


def _version(folder: Path) -> tuple[int, ...]:
    parts = folder.parent.name.split(".")
    return tuple(int(part) for part in parts) if all(p.isdigit() for p in parts) else ()


def child_pids(pid: int) -> list[int]:
    """The PIDs whose parent is `pid` (from /proc)."""
    found: list[int] = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


class PostgresServer:
    """One cluster in `root`; `stop()` and `start()` keep its data and its port."""

    def __init__(self, root: Path, programs: Path, psql: Path) -> None:
        self.host = HOST
        self.port = free_port(HOST)
        self.root = root
        self.data = root / "data"
        self._programs = programs
        self._psql = psql
        self._names = itertools.count(1)
        self._owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._owner = pwd.getpwnam(SUPERUSER)
            except KeyError:
                pytest.fail(f"no user {SUPERUSER} to run the server as: {INSTALL_HINT}")
            os.chown(root, self._owner.pw_uid, self._owner.pw_gid)
        self._server(
            "initdb",
            *("-D", str(self.data), "-A", "trust", "-U", SUPERUSER),
            *("-E", "UTF8", "--locale=C", "--no-sync"),  # no fsync: a throwaway cluster
        )
        self._server_major = int((self.data / "PG_VERSION").read_text().split(".")[0])

    def dsn(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int | None:
        """The postmaster's PID while the server runs."""
        try:
            first_line = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return None
        pid = int(first_line)
        return pid if pid_alive(pid) else None

    def start(self) -> None:
        """Start the server unless it runs; returns once it accepts connections."""
        if self.pid is not None:
            return
        options = [f"-p {self.port}", f"-k {self.root}", f"-c listen_addresses={self.host}"]
        options += [f"-c {setting}" for setting in _SETTINGS]
        log = str(self.root / "log")
        self._server(
            "pg_ctl", "-D", str(self.data), "-o", " ".join(options), "-l", log, "-w", "start"
        )

    def stop(self) -> None:
        """Fast shutdown (open sessions are cut); SIGKILL by PID if pg_ctl cannot stop it."""
        pid = self.pid
        if pid is None:
            return
        try:
            self._server("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        except (RuntimeError, subprocess.TimeoutExpired):
            for each in [pid, *child_pids(pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(each, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while pid_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def create_database(self) -> str:
        """A fresh, empty database (a copy of template0) with a name unique in this server."""
        name = f"test_{next(self._names)}"
        strategy = " STRATEGY FILE_COPY" if self._server_major >= 15 else ""  # faster here
        self.execute(f'CREATE DATABASE "{name}" TEMPLATE template0{strategy}')
        return name

    def drop_database(self, name: str) -> None:
        """Drop it, ending the sessions still connected to it."""
        quoted = name.replace('"', '""')
        self.execute(f'DROP DATABASE IF EXISTS "{quoted}" WITH (FORCE)')

    def execute(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql as the superuser; returns what it prints (unaligned, no headers)."""
        args = ["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]
        target = ["-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", database]
        return self._run([str(self._psql), *target, *args])

    def _server(self, program: str, *args: str) -> None:
        command = [str(self._programs / program), *args]
        if self._owner is not None:
            command = ["runuser", "-u", SUPERUSER, "--", *command]
        self._run(command)

    def _run(self, command: list[str]) -> str:
        done = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
        if done.returncode != 0:
            log = self.root / "log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(
                f"{Path(command[0]).name} {' '.join(command[1:3])} failed ({done.returncode}): "
                f"{done.stderr.strip()}\nserver log:\n{tail}"
            )
        return done.stdout


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started server in a new temporary folder, stopped and removed afterwards."""
    programs, psql = find_server_programs()
    # Not under pytest's tmp folders: those are private to the user running the tests.
    root = Path(tempfile.mkdtemp(prefix="mistrelay-pg-"))
    try:
        server = PostgresServer(root, programs, psql)
        try:
            server.start()
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server. A test that stops it starts it again (or the next
    `postgres_url` does)."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh, empty database, dropped after the test."""
    postgres_server.start()  # a no-op unless an earlier test left the server stopped
    name = postgres_server.create_database()
    yield postgres_server.dsn(name)
    postgres_server.start()
    postgres_server.drop_database(name)
