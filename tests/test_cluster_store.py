"""The store's side of a cluster, on real databases: claiming jobs, the nodes table, a dead node's
jobs back to the queue, its uploads failed, commits of one process published on another's hub,
and the leader's lock."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from db import Database, PostgresLocation
from events import EventHub, Subscription
from records import DownloadSnapshot, NewDownload, NodeHeartbeat
from tests.support.stores import Peek, StoreBackend


def job(number: int) -> NewDownload:
    url = f"http://127.0.0.1:9/file-{number}"
    return NewDownload("http", url, url)


def beat(name: str, instance: str = "i1", *, leader: bool = False) -> NodeHeartbeat:
    return NodeHeartbeat(name, instance, f"http://{name}.test:8080", 4, 10**9, leader)


@contextlib.asynccontextmanager
async def postgres_store(url: str, hub: EventHub | None = None) -> AsyncIterator[Database]:
    database = await Database(PostgresLocation(url, url), hub=hub).open()
    try:
        yield database
    finally:
        await database.close()


async def next_snapshot(subscription: Subscription, download_id: int) -> DownloadSnapshot:
    async with asyncio.timeout(10):
        while True:
            event = await subscription.get()
            if isinstance(event.data, DownloadSnapshot) and event.data.row.id == download_id:
                return event.data


async def test_claims_take_only_unheld_pending_jobs_oldest_first(
    store_backend: StoreBackend, peek: Peek
) -> None:
    async with store_backend.database() as db:
        ids = [await db.create_download(job(n)) for n in range(5)]
        assert await db.claim_downloads("a", 2) == ids[:2]
        assert await db.claim_downloads("b", 10, ids=[ids[0], ids[3]]) == [ids[3]]
        assert await db.claim_downloads("b", 0) == []
        assert await db.count_node_jobs("a") == 2 and await db.count_node_jobs("b") == 1
        held = await db.fetch_downloads_in_states(("pending",), node="a")
        assert [row.id for row in held] == ids[:2]
        claimed = await db.get_download_by_id(ids[3])
        assert claimed is not None and (claimed.node, claimed.status) == ("b", "pending")
        history = await db.get_status_history("download", ids[3])
        assert [h.reason for h in history] == ["created", "claimed by node b"]
        # A job in the queue again (a retry) is free for any node.
        await db.mark_download_failed_by_id(ids[0], "boom")
        retried = await db.reset_download_for_retry(ids[0])
        assert retried.node is None
    assert peek.fetch("SELECT COUNT(*) FROM downloads WHERE node IS NULL")[0][0] == 3


@pytest.mark.slow
async def test_nodes_racing_claim_each_job_once(postgres_url: str) -> None:
    async with postgres_store(postgres_url) as db:
        ids = [await db.create_download(job(n)) for n in range(300)]
    stores = [await Database(PostgresLocation(postgres_url, postgres_url)).open() for _ in "abc"]

    async def drain(store: Database, node: str) -> list[int]:
        taken: list[int] = []
        while claimed := await store.claim_downloads(node, 3):
            taken += claimed
        return taken

    try:
        lists = await asyncio.gather(*(drain(s, n) for s, n in zip(stores, "abc", strict=True)))
    finally:
        for store in stores:
            await store.close()
    every = [i for taken in lists for i in taken]
    assert sorted(every) == ids  # each job once, none left
    assert all(lists), "every node claimed some"


async def test_a_node_name_is_refused_while_its_node_lives(store_backend: StoreBackend) -> None:
    async with store_backend.database() as db:
        first = await db.register_node(beat("n1", "first"), timeout=30)
        assert first is not None and (first.name, first.instance, first.running) == (
            "n1",
            "first",
            0,
        )
        assert await db.register_node(beat("n1", "second"), timeout=30) is None
        assert await db.heartbeat_node(beat("n1", "first", leader=True))
        assert not await db.heartbeat_node(beat("n1", "second"))
        # Stopped (or silent longer than the timeout): the name is free again.
        await db.stop_node("n1", "first")
        again = await db.register_node(beat("n1", "second"), timeout=30)
        assert again is not None and again.instance == "second" and again.stopped_at is None
        await asyncio.sleep(0.01)  # older than a timeout of 0 s
        assert await db.register_node(beat("n1", "third"), timeout=0) is not None
        [node] = await db.list_nodes()
        assert (node.instance, node.leader, node.slots) == ("third", False, 4)


async def test_a_dead_nodes_jobs_go_back_to_the_queue_and_its_uploads_fail(
    store_backend: StoreBackend,
) -> None:
    async with store_backend.database() as db:
        running, waiting, done = [await db.create_download(job(n)) for n in range(3)]
        assert await db.claim_downloads("dead", 3) == [running, waiting, done]
        await db.mark_download_queued_by_id(running, "gid-run", status="waiting")
        await db.mark_download_started("gid-run")
        await db.mark_download_queued_by_id(waiting, "gid-wait", status="waiting")
        await db.mark_download_queued_by_id(done, "gid-done", status="waiting")
        await db.mark_download_started("gid-done")
        await db.mark_download_completed("gid-done", "/downloads/3/f", 10)
        upload = await db.create_upload(done, "cloud", None, 3)
        await db.release_waiting_uploads(done)

        requeued = await db.requeue_downloads_of_node("dead", "node dead stopped answering")
        assert requeued == [running, waiting]
        for download_id in requeued:
            row = await db.get_download_by_id(download_id)
            assert row is not None
            assert (row.status, row.node, row.gid, row.completed_length) == (
                "pending",
                None,
                None,
                0,
            )
            history = await db.get_status_history("download", download_id)
            assert history[-1].reason == "node dead stopped answering"
        # The completed file stays on the dead node: its row stays there; its upload fails.
        kept = await db.get_download_by_id(done)
        assert kept is not None and (kept.status, kept.node) == ("completed", "dead")
        assert await db.fail_uploads_of_node("dead", "gone for good") == [upload]
        failed = await db.get_upload_by_id(upload)
        assert failed is not None
        assert (failed.status, failed.failure_reason) == ("failed", "gone for good")
        assert await db.requeue_downloads_of_node("dead", "again") == []


async def test_another_process_commits_reach_this_hub(postgres_url: str) -> None:
    hub = EventHub()
    subscription = hub.subscribe("test")
    async with postgres_store(postgres_url, hub) as here, postgres_store(postgres_url) as there:
        await here.follow_peers()
        await asyncio.sleep(0.5)  # the listening connection is up
        download_id = await there.create_download(job(1))
        created = await next_snapshot(subscription, download_id)
        assert (created.row.status, created.row.node) == ("pending", None)
        # A batch of several rows arrives as one notification, each row as it is now.
        await there.claim_downloads("c", 5)
        claimed = await next_snapshot(subscription, download_id)
        assert claimed.row.node == "c"
        upload = await there.create_upload(download_id, "cloud", None, 3)
        async with asyncio.timeout(10):
            while (event := await subscription.get()).kind != "upload":
                pass
        assert event.item_id == upload
    await hub.close()


async def test_one_leader_at_a_time_and_the_lock_goes_with_its_connection(
    postgres_url: str,
) -> None:
    async with postgres_store(postgres_url) as first, postgres_store(postgres_url) as second:
        assert await first.try_lead()
        assert not await second.try_lead()
        assert await first.still_leading()
        await first.resign()
        assert not await first.still_leading()
        assert await second.try_lead()
        assert not await first.try_lead()
    async with postgres_store(postgres_url) as third:
        # The leader's store closed: its connection, and so its lock, are gone.
        assert await third.try_lead()


async def test_a_single_sqlite_node_always_leads(tmp_path: Path) -> None:
    async with Database(tmp_path / "one.db") as db:
        assert not db.shared
        assert await db.try_lead() and await db.still_leading()
