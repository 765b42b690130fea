"""The cluster end to end: real node processes (each its own aria2c, data folder and web port) on
one real PostgreSQL, a loopback file server that knows which node fetched what, and the fake
Telegram edge reporting which node runs the bot.

One set of three nodes (n1, n2, n3) serves the module: a test that kills a node leaves the others
running, and a later test that needs more nodes restarts the dead ones under their names (so the
leader's death comes first and the queue test brings the crashed node back). The PostgreSQL
restart runs its own server and its own two nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.support.cluster import (
    NODE_TIMEOUT,
    SLOTS,
    UNFINISHED,
    AttributingFileServer,
    Cluster,
    StoredDownload,
    attributing_file_server,
    claimers,
    node_overrides,
    releases,
    run_app,
    running_cluster,
)
from tests.support.postgres import PostgresServer, running_postgres
from tests.support.processes import free_port
from tests.support.service import service_config
from tests.support.service_process import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

NAMES = ("n1", "n2", "n3")
KIB = 1024


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_database(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh database of the session's server for this module's nodes, dropped after them."""
    postgres_server.start()
    name = postgres_server.create_database()
    yield postgres_server.dsn(name)
    postgres_server.start()
    postgres_server.drop_database(name)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, cluster_database: str
) -> AsyncIterator[Cluster]:
    async with running_cluster(
        tmp_path_factory.mktemp("cluster"), cluster_database, NAMES
    ) as running:
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def files(
    tmp_path_factory: pytest.TempPathFactory, cluster: Cluster
) -> AsyncIterator[AttributingFileServer]:
    async with attributing_file_server(
        tmp_path_factory.mktemp("www"), cluster.aria2_owners
    ) as server:
        yield server


@dataclass(frozen=True)
class Job:
    name: str
    data: bytes
    url: str


def make_jobs(files: AttributingFileServer, prefix: str, count: int, seconds: float) -> list[Job]:
    """`count` distinct files of 64-200 KiB, each served at a rate that takes about `seconds`."""
    jobs = []
    for index in range(count):
        size = 64 * KIB + (index * 136 * KIB) // max(1, count - 1) + index
        name = f"{prefix}-{index:03d}.bin"
        data = files.add_file(name, size=size, seed=zlib.crc32(name.encode()))
        jobs.append(Job(name, data, files.url(name, route="slow", rate=int(size / seconds))))
    return jobs


async def add_jobs(cluster: Cluster, via: str, jobs: list[Job]) -> dict[int, Job]:
    ids = await cluster.node(via).add(*(job.url for job in jobs))
    assert len(ids) == len(jobs)
    return dict(zip(ids, jobs, strict=True))


def check_on_holder(
    cluster: Cluster, row: StoredDownload, job: Job, *, leftovers_on: str | None = None
) -> None:
    """The file lies byte-exact on its holder's disk, and in no other node's download folder
    (but `leftovers_on`'s, a node that died while it held the job)."""
    assert row.status == "completed", row
    assert row.node in cluster.nodes, row
    holder = cluster.node(row.node)
    assert row.local_path is not None, row
    path = Path(row.local_path)
    assert path.is_relative_to(holder.download_dir), (row, holder.download_dir)
    assert path.read_bytes() == job.data, f"download {row.id}: bytes differ on {row.node}"
    for name, other in cluster.nodes.items():
        if name not in (row.node, leftovers_on):
            assert not (other.download_dir / str(row.id)).exists(), (row, name)


async def held_unfinished(cluster: Cluster, ids: list[int]) -> Counter[str]:
    """How many of `ids` each node holds unfinished (from the store)."""
    rows = await cluster.downloads(ids)
    return Counter(r.node for r in rows.values() if r.status in UNFINISHED and r.node)


@dataclass
class SlotSampler:
    """Samples every node's jobs in hand while a test runs: `running` of GET /api/cluster on
    `via`, and the store's count of each node's pending, waiting and downloading rows."""

    cluster: Cluster
    via: str
    api_peak: Counter[str]
    store_peak: Counter[str]
    samples: int = 0

    async def run(self) -> None:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                view = await self.cluster.view(self.via)
                for node in view["nodes"]:
                    assert node["slots"] == SLOTS, node
                    self.api_peak[node["name"]] = max(self.api_peak[node["name"]], node["running"])
                rows = await self.cluster.query(
                    "SELECT node, count(*) AS held FROM downloads WHERE node IS NOT NULL"
                    " AND status IN ('pending', 'waiting', 'downloading') GROUP BY node"
                )
                for row in rows:
                    name = str(row["node"])
                    self.store_peak[name] = max(self.store_peak[name], int(row["held"]))
                self.samples += 1
            await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def sampling(cluster: Cluster, via: str) -> AsyncIterator[SlotSampler]:
    sampler = SlotSampler(cluster, via, Counter(), Counter())
    task = asyncio.create_task(sampler.run())
    try:
        yield sampler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the leader dies -------------------------------------------------------------------------


async def test_the_bot_moves_to_another_node_when_the_leader_dies(cluster: Cluster) -> None:
    await cluster.revive(2)
    leader = await cluster.settled_leader(20)
    assert leader in cluster.alive()
    seen = len(cluster.bot_lines())
    await cluster.kill(leader)
    survivors = cluster.alive()

    def new_session() -> list[str]:
        return [line for line in cluster.bot_lines()[seen:] if line.endswith(" started")]

    started = await wait_until(
        new_session, NODE_TIMEOUT + 5, interval=0.1, what="another node to start the bot"
    )
    successor = started[0].split()[0]
    assert successor in survivors
    # Every survivor's GET /api/cluster names it, and its bot is the only one running.
    assert await cluster.settled_leader(NODE_TIMEOUT + 5) == successor
    await asyncio.sleep(1)  # no other node starts a bot of its own afterwards
    assert cluster.bot_sessions() == {successor}
    # Once the old leader is seen dead, the one live node flagged as leader is the new one.
    await cluster.wait_state(leader, {"dead"}, NODE_TIMEOUT + 5)
    view = await cluster.view(successor)
    flags = {node["name"]: node["leader"] for node in view["nodes"] if node["state"] == "alive"}
    assert flags.get(successor) is True and sum(flags.values()) == 1, view


# --- sharing the queue -------------------------------------------------------------------------


async def test_sixty_downloads_are_shared_each_fetched_by_one_node(
    cluster: Cluster, files: AttributingFileServer
) -> None:
    await cluster.revive(len(NAMES))
    entry = cluster.alive()[0]
    jobs = make_jobs(files, "share", 60, seconds=1.5)
    async with sampling(cluster, entry) as sampler:
        added = await add_jobs(cluster, entry, jobs)
        rows = await cluster.wait_final(list(added), 120)
    history = await cluster.history(list(added))

    holders = Counter(row.node for row in rows.values())
    assert set(holders) == set(NAMES), f"not every node took jobs: {holders}"
    # Each node's metrics count the downloads it held, none of the others'.
    for name in NAMES:
        status, body = await cluster.node(name).api("GET", "/metrics")
        assert status == 200, body
        finished = sum(
            sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
            if sample.name == "mistrelay_downloads_finished_total"
            and sample.labels["status"] == "completed"
        )
        assert finished == holders[name], (name, finished, holders)
    for download_id, job in added.items():
        row = rows[download_id]
        check_on_holder(cluster, row, job)
        assert files.fetchers(job.name) == {row.node}, (row, files.fetchers(job.name))
        steps = history[download_id]
        assert claimers(steps) == [row.node] and not releases(steps), (download_id, steps)
        assert [s.to_status for s in steps].count("completed") == 1, (download_id, steps)
    # Never more than its slots in hand, by the API, by the store, and on the wire.
    assert sampler.samples > 5
    peak = {node: files.peak[node] for node in NAMES}
    seen = f"running (API) {sampler.api_peak}, held (store) {sampler.store_peak}, wire {peak}"
    assert max(sampler.api_peak.values()) <= SLOTS, seen
    assert max(sampler.store_peak.values()) <= SLOTS, seen
    assert max(peak.values()) <= SLOTS, seen
    assert files.peak[None] == 0, "a request no node's aria2c sent"
    # The work ran on several nodes at once.
    assert sum(1 for count in peak.values() if count > 0) == len(NAMES), peak


# --- events and streams across nodes -----------------------------------------------------------


async def test_a_websocket_sees_other_nodes_and_streams_redirect_to_the_holder(
    cluster: Cluster, files: AttributingFileServer
) -> None:
    await cluster.revive(len(NAMES))
    a = cluster.alive()[0]
    node_a = cluster.node(a)
    jobs = make_jobs(files, "cross", 16, seconds=1.0)
    pushed: dict[int, dict[str, Any]] = {}
    ws = await node_a.http().ws_connect(node_a.base_url + "/api/ws", headers=node_a.auth)
    try:
        hello = json.loads((await ws.receive(timeout=10)).data)
        assert hello["type"] == "hello"
        added = await add_jobs(cluster, a, jobs)
        deadline = time.monotonic() + 60
        while len(pushed) < len(added):
            assert time.monotonic() < deadline, f"completed pushes for {sorted(pushed)} only"
            message = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            assert message.type == aiohttp.WSMsgType.TEXT, message
            event = json.loads(message.data)
            data = event["data"]
            if (
                event["type"] == "download_update"
                and data.get("id") in added
                and data["status"] == "completed"
            ):
                pushed[data["id"]] = data
    finally:
        await ws.close()
    rows = await cluster.wait_final(list(added), 30)
    for download_id, data in pushed.items():
        assert data["node"] == rows[download_id].node, (data, rows[download_id])
    elsewhere = {i: row for i, row in rows.items() if row.node != a}
    assert elsewhere, "node A took every job"
    # The WebSocket on A got the completion of a job another node (C) completed: shown above
    # for every job; one of them is named for the record.
    c = elsewhere[min(elsewhere)].node
    assert c != a and pushed[min(elsewhere)]["node"] == c

    # A stream link fetched from A's API for a file held by B: B's origin, and A redirects.
    others = sorted({row.node for row in elsewhere.values() if row.node})
    b = next((name for name in others if name != c), c)
    assert b is not None
    download_id = min(i for i, row in elsewhere.items() if row.node == b)
    job, origin_b = added[download_id], cluster.node(b).base_url
    status, detail = await node_a.api("GET", f"/api/downloads/{download_id}")
    assert status == 200, detail
    stream_url = detail["stream_url"]
    assert stream_url.startswith(origin_b + "/stream/"), (stream_url, origin_b)
    path = stream_url[len(origin_b) :]
    async with aiohttp.ClientSession() as http:
        async with http.get(node_a.base_url + path) as response:
            body = await response.read()
            assert response.status == 200, response
            assert [r.status for r in response.history] == [307], response.history
            assert response.history[0].headers["Location"] == origin_b + path
            assert body == job.data
        async with http.get(node_a.base_url + path, headers={"Range": "bytes=1000-4999"}) as part:
            body = await part.read()
            assert part.status == 206, part
            assert [r.status for r in part.history] == [307], part.history
            assert part.headers["Content-Range"] == f"bytes 1000-4999/{len(job.data)}"
            assert body == job.data[1000:5000]


# --- a node dies with jobs in hand -------------------------------------------------------------


async def test_a_killed_nodes_jobs_complete_on_the_others(
    cluster: Cluster, files: AttributingFileServer
) -> None:
    await cluster.revive(len(NAMES))
    entry = cluster.alive()[0]
    jobs = make_jobs(files, "crash", 30, seconds=3.0)
    added = await add_jobs(cluster, entry, jobs)
    ids = list(added)

    async def every_node_busy() -> Counter[str] | None:
        held = await held_unfinished(cluster, ids)
        return held if len(held) == len(NAMES) and min(held.values()) >= 2 else None

    held = await wait_until(every_node_busy, 30, interval=0.2, what="every node to hold jobs")
    victim = held.most_common(1)[0][0]
    reaped = await cluster.kill(victim)
    killed_at = time.monotonic()
    assert reaped, "the victim's aria2c was not found"
    survivors = cluster.alive()
    orphans = sorted(
        i
        for i, row in (await cluster.downloads(ids)).items()
        if row.node == victim and row.status in UNFINISHED
    )
    assert orphans, "the victim finished everything before it was killed"

    async def orphans_taken() -> bool:
        rows = await cluster.downloads(orphans)
        return all(row.node != victim for row in rows.values())

    await wait_until(
        orphans_taken, NODE_TIMEOUT + 5, interval=0.2, what=f"{victim}'s jobs to be released"
    )
    released_after = time.monotonic() - killed_at
    rows = await cluster.wait_final(ids, 90)
    history = await cluster.history(ids)

    for download_id, job in added.items():
        row = rows[download_id]
        orphan = download_id in orphans
        check_on_holder(cluster, row, job, leftovers_on=victim if orphan else None)
        steps = history[download_id]
        assert [s.to_status for s in steps].count("completed") == 1, (download_id, steps)
        assert len(claimers(steps)) == len(releases(steps)) + 1, (download_id, steps)
        assert claimers(steps)[-1] == row.node, (download_id, steps)
        fetchers = files.fetchers(job.name)
        if orphan:
            assert row.node in survivors, row
            assert victim in claimers(steps), steps
            back = releases(steps)
            assert back and all(victim in (s.reason or "") for s in back), back
            assert row.node in fetchers and fetchers <= {victim, row.node}, (row, fetchers)
        else:
            # Done before the kill (kept on the victim's disk) or never the victim's.
            assert not releases(steps), steps
            assert fetchers == {row.node}, (row, fetchers)
    assert released_after <= NODE_TIMEOUT + 5
    for name in survivors:
        assert cluster.node(name).running, cluster.node(name).log_tail()
        outcome = await run_app(cluster.node(name).config_path, "check")
        assert outcome.code == 0, f"check on {name}:\n{outcome.output}"


# --- PostgreSQL goes away for a while -------------------------------------------------------


async def test_a_postgres_restart_loses_and_doubles_nothing(tmp_path: Path) -> None:
    """Its own server (the session's is shared): stopped for 5 s while two nodes download."""
    stack = contextlib.ExitStack()
    try:
        server = await asyncio.to_thread(stack.enter_context, running_postgres())
        url = server.dsn(await asyncio.to_thread(server.create_database))
        async with (
            running_cluster(tmp_path / "nodes", url, ("p1", "p2")) as cluster,
            attributing_file_server(tmp_path / "www", cluster.aria2_owners) as files,
        ):
            added = await add_jobs(cluster, "p1", make_jobs(files, "outage", 16, seconds=4.0))
            ids = list(added)

            async def downloading() -> bool:
                rows = await cluster.downloads(ids)
                return sum(1 for r in rows.values() if r.status == "downloading") >= 4

            await wait_until(downloading, 30, interval=0.2, what="downloads to run")
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(5)
            await asyncio.to_thread(server.start)
            rows = await cluster.wait_final(ids, 120)
            history = await cluster.history(ids)
            for download_id, job in added.items():
                row = rows[download_id]
                check_on_holder(cluster, row, job)
                steps = history[download_id]
                assert [s.to_status for s in steps].count("completed") == 1, steps
                assert claimers(steps) == [row.node] and not releases(steps), (download_id, steps)
                assert files.fetchers(job.name) == {row.node}, (row, files.fetchers(job.name))
            assert cluster.alive() == ["p1", "p2"], [
                cluster.node(n).log_tail() for n in ("p1", "p2")
            ]
            for name in ("p1", "p2"):
                await cluster.node(name).wait_healthy(10)
                await cluster.wait_state(name, {"alive"}, NODE_TIMEOUT + 5)
            # The bot runs again, on one node only (its lock went with the server).
            assert await cluster.settled_leader(NODE_TIMEOUT + 5) in ("p1", "p2")
    finally:
        await asyncio.to_thread(stack.close)


# --- hostile input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["mysql://user@127.0.0.1/relay", "postgresql://user@127.0.0.1:notaport/relay"]
)
async def test_a_bad_database_url_is_one_line(tmp_path: Path, url: str) -> None:
    config = service_config(tmp_path, node_overrides("bad", free_port(), url, telegram=False))
    outcome = await run_app(config)
    assert outcome.code == 2, outcome.output
    assert len(outcome.lines) == 1 and "database.url" in outcome.lines[0], outcome.output


async def test_postgres_unreachable_at_start_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    url = f"postgresql://postgres@127.0.0.1:{port}/relay"
    config = service_config(tmp_path, node_overrides("lonely", free_port(), url, telegram=False))
    outcome = await run_app(config)
    assert outcome.code == 2, outcome.output
    assert "Traceback" not in outcome.output, outcome.output
    assert len(outcome.error_lines) == 1, outcome.output
    assert str(port) in outcome.error_lines[0], outcome.output


async def test_a_second_node_with_a_taken_name_is_refused(
    cluster: Cluster, cluster_database: str, tmp_path: Path
) -> None:
    await cluster.revive(1)
    name = cluster.alive()[0]
    config = service_config(
        tmp_path, node_overrides(name, free_port(), cluster_database, telegram=False)
    )
    outcome = await run_app(config)
    assert outcome.code == 2, outcome.output
    assert "Traceback" not in outcome.output, outcome.output
    refusals = [line for line in outcome.error_lines if name in line and "taken" in line.lower()]
    assert len(outcome.error_lines) == 1 and refusals, outcome.output
    assert cluster.node(name).running
    await cluster.node(name).wait_healthy(5)
    states = await cluster.states(name)
    assert states[name] == "alive", states
