"""Several MistRelay nodes on one PostgreSQL store, each a real process, and a file server that
knows which node fetched what.

- :class:`Cluster` runs nodes (``python -m tests.support.cluster_node``, see that module) under one
  folder: each its own data folder, web port, embedded aria2c, ``cluster.public_url``; one web
  token for all; the fake Telegram edge of every node reports to one shared file which node runs
  the bot's updates session (:meth:`Cluster.bot_lines`). It reads the store directly (asyncpg) for
  the rows and the status history a test checks.
- :class:`AttributingFileServer` is the test file server that also records, for every ``/slow``
  request, the node whose aria2c sent it: the request's peer port is the local port of one of
  that aria2c's sockets (``/proc/net/tcp`` names the socket's inode, ``/proc/PID/fd`` its owner).
  It keeps how many requests of each node were in flight at once (:attr:`peak`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from tests.support.cluster_node import BOT_LOG_ENV
from tests.support.http_files import FileServer
from tests.support.processes import free_port
from tests.support.service_process import (
    APP_SCRIPT,
    PROJECT_ROOT,
    ServiceProcess,
    ServiceProcessFactory,
    clean_environment,
    service_processes,
    wait_until,
)

NODE_ENTRY = ("-m", "tests.support.cluster_node")
TOKEN = "cluster-test-token-0123456789abcdef"
SLOTS = 4
NODE_TIMEOUT = 3.0
TELEGRAM = {"api_id": 1, "api_hash": "x" * 32, "bot_token": "1:x"}
UNFINISHED = ("pending", "waiting", "downloading", "paused")


def node_overrides(
    name: str, port: int, database_url: str, *, telegram: bool = True
) -> dict[str, Any]:
    """A node's config: the test defaults plus its cluster keys and (for the node runner, whose
    Telegram is a fake) the bot's credentials."""
    overrides: dict[str, Any] = {
        "aria2": {"max_concurrent_downloads": SLOTS, "rpc_port": 0},
        "web": {"port": port, "token": TOKEN},
        "database": {"url": database_url},
        "cluster": {
            "node_name": name,
            "public_url": f"http://127.0.0.1:{port}",
            "node_timeout": NODE_TIMEOUT,
        },
    }
    if telegram:
        overrides["telegram"] = dict(TELEGRAM)
    return overrides


# --- which process owns a socket -----------------------------------------------------------------


def _socket_inodes(local_port: int, remote_port: int) -> set[int]:
    """Inodes of the loopback TCP sockets from `local_port` to `remote_port` (IPv4 and IPv6)."""
    found: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, remote = fields[1], fields[2]
                if (
                    int(local.rsplit(":", 1)[1], 16) == local_port
                    and int(remote.rsplit(":", 1)[1], 16) == remote_port
                ):
                    found.add(int(fields[9]))
    return found


def _owner_of(inodes: set[int], pids: Iterable[int]) -> int | None:
    """Which of `pids` holds a socket with one of `inodes`."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                        return pid
    return None


def node_of_connection(peer_port: int, server_port: int, owners: Mapping[int, str]) -> str | None:
    """The node whose process (a PID of `owners`) opened the connection from `peer_port`."""
    pid = _owner_of(_socket_inodes(peer_port, server_port), owners)
    return owners.get(pid) if pid is not None else None


@dataclass(frozen=True)
class Fetch:
    """One /slow request: the file's name, the node that sent it, its Range header."""

    name: str
    node: str | None
    range_header: str | None


class AttributingFileServer(FileServer):
    """The test file server; every /slow request is attributed to the node that sent it.

    `owners` gives the PIDs of the processes that may fetch (each node's aria2c) and their nodes.
    """

    def __init__(self, root: Path, owners: Callable[[], Mapping[int, str]]) -> None:
        super().__init__(root)
        self.owners = owners
        self.fetches: list[Fetch] = []
        self.in_flight: Counter[str | None] = Counter()
        self.peak: Counter[str | None] = Counter()

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        node = None
        if peer is not None:
            node = await asyncio.to_thread(
                node_of_connection, int(peer[1]), self.port, self.owners()
            )
        self.fetches.append(Fetch(request.match_info["name"], node, request.headers.get("Range")))
        self.in_flight[node] += 1
        self.peak[node] = max(self.peak[node], self.in_flight[node])
        try:
            return await super()._slow(request)
        finally:
            self.in_flight[node] -= 1

    def fetchers(self, name: str) -> set[str | None]:
        """The nodes that requested `name`."""
        return {fetch.node for fetch in self.fetches if fetch.name == name}


@contextlib.asynccontextmanager
async def attributing_file_server(
    root: Path, owners: Callable[[], Mapping[int, str]]
) -> AsyncIterator[AttributingFileServer]:
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    server = AttributingFileServer(root, owners)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


# --- the nodes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredDownload:
    """A `downloads` row as the store holds it (the columns the cluster tests check)."""

    id: int
    status: str
    node: str | None
    local_path: str | None
    total_length: int
    completed_length: int


@dataclass(frozen=True)
class Transition:
    from_status: str | None
    to_status: str
    reason: str | None


CLAIM_REASON = "claimed by node "


def claimers(history: Sequence[Transition]) -> list[str]:
    """The nodes that took the job from the queue, in order (the store records each claim as a
    `pending → pending` step "claimed by node X")."""
    return [
        step.reason.removeprefix(CLAIM_REASON)
        for step in history
        if step.to_status == "pending" and step.reason and step.reason.startswith(CLAIM_REASON)
    ]


def releases(history: Sequence[Transition]) -> list[Transition]:
    """The steps that sent the job back to the queue (into `pending`, neither its creation nor a
    claim)."""
    return [
        step
        for step in history
        if step.to_status == "pending"
        and step.from_status is not None
        and not (step.reason or "").startswith(CLAIM_REASON)
    ]


@dataclass(frozen=True)
class Outcome:
    """A command that ran to its end: exit code and everything it printed."""

    code: int
    output: str

    @property
    def lines(self) -> list[str]:
        return [line for line in self.output.splitlines() if line.strip()]

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.lines if "| ERROR" in line or "| CRITICAL" in line]


async def run_app(config: Path, *args: str, timeout: float = 60.0) -> Outcome:
    """`python app.py --config X ARGS` to its end (killed by PID at the deadline)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(APP_SCRIPT),
        "--config",
        str(config),
        *args,
        cwd=PROJECT_ROOT,
        env=clean_environment(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        out, _ = await process.communicate()
        raise AssertionError(
            f"app.py {' '.join(args)} still ran after {timeout} s:\n{out.decode()}"
        ) from None
    assert process.returncode is not None
    return Outcome(process.returncode, out.decode(errors="replace"))


@dataclass
class Cluster:
    """Nodes named `names` on the store at `database_url`, under `root`."""

    root: Path
    database_url: str
    factory: ServiceProcessFactory
    nodes: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def bot_log(self) -> Path:
        return self.root / "bot-sessions.log"

    def add_node(self, name: str) -> ServiceProcess:
        port = free_port()
        svc = self.factory(
            node_overrides(name, port, self.database_url),
            name=name,
            env={BOT_LOG_ENV: str(self.bot_log)},
            entry=NODE_ENTRY,
        )
        self.nodes[name] = svc
        return svc

    def node(self, name: str) -> ServiceProcess:
        return self.nodes[name]

    def alive(self) -> list[str]:
        return sorted(name for name, svc in self.nodes.items() if svc.running)

    async def start(self, *names: str) -> None:
        """Start the nodes all at once, as a cluster's machines come up."""
        await asyncio.gather(*(self.nodes[name].start(timeout=60) for name in names))

    async def kill(self, name: str) -> list[int]:
        """SIGKILL the node and its aria2c (a crash of the machine); returns the reaped PIDs."""
        svc = self.nodes[name]
        svc.kill()
        await svc.wait_exit(10)
        return svc.reap_children()

    async def revive(self, count: int) -> None:
        """Restart dead nodes until `count` run; each once the others see it dead (a live name
        would be refused)."""
        for name in sorted(self.nodes):
            if len(self.alive()) >= count:
                return
            if self.nodes[name].running:
                continue
            if self.alive():
                await self.wait_state(name, {"dead", "stopped"}, NODE_TIMEOUT + 10)
            await self.nodes[name].start(timeout=60)

    def aria2_owners(self) -> dict[int, str]:
        """PID → node of every running node's aria2c."""
        return {
            pid: name
            for name, svc in self.nodes.items()
            if svc.running
            for pid in svc.child_pids("aria2c")
        }

    # -- the API ------------------------------------------------------------------------------

    async def view(self, via: str) -> dict[str, Any]:
        """GET /api/cluster on node `via`."""
        status, body = await self.nodes[via].api("GET", "/api/cluster", timeout=5)
        assert status == 200, body
        return dict(body)

    async def states(self, via: str | None = None) -> dict[str, str]:
        """Each node's state as a live node sees it."""
        via = via or self.alive()[0]
        return {node["name"]: node["state"] for node in (await self.view(via))["nodes"]}

    async def wait_state(self, name: str, states: set[str], timeout: float) -> None:
        async def reached() -> bool:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, AssertionError):
                return (await self.states()).get(name) in states
            return False

        await wait_until(reached, timeout, interval=0.2, what=f"node {name} to be {states}")

    # -- the store, read directly -------------------------------------------------------------

    async def query(self, sql: str, *args: object) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    async def downloads(self, ids: Sequence[int]) -> dict[int, StoredDownload]:
        rows = await self.query(
            "SELECT id, status, node, local_path, total_length, completed_length"
            " FROM downloads WHERE id = ANY($1::bigint[])",
            list(ids),
        )
        return {int(row["id"]): StoredDownload(**dict(row)) for row in rows}

    async def history(self, ids: Sequence[int]) -> dict[int, list[Transition]]:
        rows = await self.query(
            "SELECT entity_id, from_status, to_status, reason FROM status_history"
            " WHERE entity = 'download' AND entity_id = ANY($1::bigint[]) ORDER BY id",
            list(ids),
        )
        found: dict[int, list[Transition]] = {int(i): [] for i in ids}
        for row in rows:
            found[int(row["entity_id"])].append(
                Transition(row["from_status"], row["to_status"], row["reason"])
            )
        return found

    async def wait_final(self, ids: Sequence[int], timeout: float) -> dict[int, StoredDownload]:
        """Wait until every download is completed, failed or cancelled in the store."""
        last: dict[int, StoredDownload] = {}

        async def done() -> bool:
            nonlocal last
            last = await self.downloads(ids)
            return all(row.status in ("completed", "failed", "cancelled") for row in last.values())

        try:
            await wait_until(done, timeout, interval=0.3, what="every download to end")
        except AssertionError:
            open_rows = [row for row in last.values() if row.status in UNFINISHED]
            raise AssertionError(
                f"{len(open_rows)} downloads never ended: {open_rows[:10]}"
            ) from None
        return last

    def bot_lines(self) -> list[str]:
        """The fake Telegram's reports: ``"<node> updates-session started|stopped"``, in order."""
        with contextlib.suppress(FileNotFoundError):
            return self.bot_log.read_text().splitlines()
        return []

    def bot_sessions(self) -> set[str]:
        """The running nodes whose bot's updates session is open, by the fake's reports (a killed
        node never reports its end)."""
        active: set[str] = set()
        for line in self.bot_lines():
            node, _, what = line.split()
            if what == "started":
                active.add(node)
            else:
                active.discard(node)
        return active & set(self.alive())

    async def settled_leader(self, timeout: float) -> str:
        """Wait until the leader of GET /api/cluster (on every running node) is the one node
        whose bot runs; its name."""

        async def settled() -> str | None:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, AssertionError):
                leaders = {(await self.view(name))["leader"] for name in self.alive()}
                (leader,) = leaders if len(leaders) == 1 else (None,)
                if leader is not None and self.bot_sessions() == {leader}:
                    return str(leader)
            return None

        return str(await wait_until(settled, timeout, interval=0.2, what="one leader with the bot"))


@contextlib.asynccontextmanager
async def running_cluster(
    root: Path, database_url: str, names: Sequence[str]
) -> AsyncIterator[Cluster]:
    """Nodes `names` started (all at once) on `database_url`; all stopped and reaped after."""
    async with service_processes(root) as factory:
        cluster = Cluster(root, database_url, factory)
        for name in names:
            cluster.add_node(name)
        await cluster.start(*names)
        yield cluster
