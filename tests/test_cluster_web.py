"""The web side of a cluster, on real services: `GET /api/cluster`, the `node` of every download
JSON, links on the node that holds a job, the 307 of /stream and /watch to that node, and the
dashboard's nodes panel in a headless Chromium.

On PostgreSQL a second node is written into the store by hand (registered, beating, holding a
completed job) with the loopback file server as its public URL: that server's request log shows
what a redirected client asks the other node.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from yarl import URL

from configer import load_config
from db import Store, open_store
from records import NewDownload, NodeHeartbeat
from tests.support.http_files import FileServer
from tests.support.service import RunningService, ServiceFactory, service_config
from tests.support.service_process import wait_until
from tests.test_browser import CHROMIUM, chromium, sign_in
from tests.test_engine_api import add_link, fetch, settled
from tests.test_service_postgres import pushed_for, receive

pytestmark = pytest.mark.slow

WAIT = 30.0
THIS_NODE = "web-a"
OTHER_NODE = "node-b"
# Spaces, parentheses and non-ASCII: the redirect keeps the path's encoding as it was sent.
FAR_FILE = "far away (2020) – é.mkv"
FAR_SIZE = 123_456


# --- a cluster of this service and a node written by hand ----------------------------------------


@dataclass
class TwoNodes:
    svc: RunningService
    other: NodeHeartbeat
    store: Store  # the other node's own connection to the store
    far_id: int  # a completed download the other node holds
    tg_id: int  # a cancelled Telegram download no node holds (its bytes come from Telegram)


async def keep_beating(store: Store, beat: NodeHeartbeat) -> None:
    while True:
        assert await store.heartbeat_node(beat)
        await asyncio.sleep(1.0)


async def completed_by(store: Store, node: str, name: str, size: int) -> int:
    """A download claimed by `node` and driven to completed as its engine would."""
    url = f"http://127.0.0.1:9/{name}"
    download_id = await store.create_download(
        NewDownload(source_type="http", source_key=url, source_url=url, file_name=name)
    )
    assert await store.claim_downloads(node, 1, ids=[download_id]) == [download_id]
    gid = secrets.token_hex(8)
    await store.mark_download_queued_by_id(download_id, gid)
    assert await store.mark_download_started(gid) == download_id
    assert await store.mark_download_completed(gid, f"/srv/{node}/{name}", size) == download_id
    return download_id


async def cancelled_telegram_file(store: Store, name: str) -> int:
    download_id = await store.create_download(
        NewDownload(source_type="telegram", source_key=f"telegram:{name}", file_name=name)
    )
    await store.mark_download_cancelled_by_id(download_id)
    return download_id


@contextlib.asynccontextmanager
async def two_nodes(
    service_factory: ServiceFactory,
    postgres_url: str,
    file_server: FileServer,
    root: Path,
    *,
    other_leads: bool = False,
) -> AsyncIterator[TwoNodes]:
    """This service (node web-a) and node-b, which beats and holds one completed job; the jobs
    are made before the service starts, so that it claims none of them. With `other_leads`
    node-b holds the leader's lock (through its own connection) and runs the bot."""
    overrides = {"database": {"url": postgres_url}, "cluster": {"node_name": THIS_NODE}}
    config_path = service_config(root / THIS_NODE, overrides)
    config = load_config(config_path, env={})
    store = await open_store(config.database)
    beating: asyncio.Task[None] | None = None
    try:
        other = NodeHeartbeat(
            name=OTHER_NODE,
            instance=secrets.token_hex(8),
            public_url=file_server.base_url,
            slots=3,
            disk_free=5 * 1024**3,
            leader=other_leads,
        )
        assert await store.register_node(other, timeout=config.cluster.node_timeout)
        beating = asyncio.create_task(keep_beating(store, other))
        if other_leads:
            assert await store.try_lead()
        far_id = await completed_by(store, OTHER_NODE, FAR_FILE, FAR_SIZE)
        tg_id = await cancelled_telegram_file(store, "from telegram.mp4")
        svc = await settled(await service_factory(config_path=config_path))

        leader = OTHER_NODE if other_leads else THIS_NODE

        async def both_alive() -> dict[str, Any] | None:
            status, cluster = await svc.api("GET", "/api/cluster")
            assert status == 200, cluster
            states = {node["name"]: node["state"] for node in cluster["nodes"]}
            alive = states == {THIS_NODE: "alive", OTHER_NODE: "alive"}
            return dict(cluster) if alive and cluster["leader"] == leader else None

        await wait_until(both_alive, WAIT, what=f"both nodes alive and {leader} leading")
        yield TwoNodes(svc, other, store, far_id, tg_id)
    finally:
        if beating is not None:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        await store.close()


def path_of(url: str, origin: str) -> str:
    assert url.startswith(origin + "/"), (url, origin)
    return url.removeprefix(origin)


# --- one node ------------------------------------------------------------------------------------


async def test_a_single_node_is_no_cluster_and_its_jobs_name_no_node(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    svc = await settled(await service_factory())
    status, cluster = await svc.api("GET", "/api/cluster")
    assert status == 200, cluster
    node = svc.service.parts.cluster.node_name
    assert cluster == {"enabled": False, "node": node, "leader": None, "nodes": []}
    status, _ = await svc.api("GET", "/api/cluster", auth=False)
    assert status == 401

    ws = await svc.http.ws_connect(
        svc.base_url.replace("http://", "ws://", 1) + "/api/ws", headers=svc.auth
    )
    try:
        assert (await receive(ws))["type"] == "hello"
        data = file_server.add_file("here.bin", size=70_000, seed=5)
        added = await add_link(svc, file_server.url("here.bin"))
        assert "node" in added and added["node"] is None
        pushed = await pushed_for(ws, added["id"], {"status": "completed"})
    finally:
        await ws.close()
    assert "node" in pushed and pushed["node"] is None
    status, listed = await svc.api("GET", "/api/downloads")
    assert status == 200
    assert [row for row in listed["downloads"] if row["id"] == added["id"]] == [pushed]
    detail = await svc.wait_download(added["id"], ["completed"], timeout=5)
    assert "node" in detail and detail["node"] is None
    # Served here: the links are on this node and answer with the bytes, not a redirect.
    assert detail["stream_url"].startswith(svc.config.web.base_url + "/stream/")
    status, _, body = await fetch(svc, detail["stream_url"])
    assert status == 200 and body == data


# --- two nodes on PostgreSQL ---------------------------------------------------------------------


async def test_a_job_of_another_node_links_and_redirects_there(
    postgres_url: str, service_factory: ServiceFactory, file_server: FileServer, tmp_path: Path
) -> None:
    async with two_nodes(service_factory, postgres_url, file_server, tmp_path) as nodes:
        svc, other = nodes.svc, nodes.other
        origin = other.public_url
        status, cluster = await svc.api("GET", "/api/cluster")
        assert status == 200, cluster
        assert cluster["enabled"] is True
        assert cluster["node"] == THIS_NODE and cluster["leader"] == THIS_NODE
        assert [node["name"] for node in cluster["nodes"]] == [OTHER_NODE, THIS_NODE]  # by name
        far, this = cluster["nodes"]
        assert this["name"] == THIS_NODE and this["self"] is True and this["leader"] is True
        assert this["public_url"] == svc.config.web.base_url
        assert this["slots"] == svc.config.aria2.max_concurrent_downloads
        assert far == {
            **far,
            "name": OTHER_NODE,
            "public_url": origin,
            "state": "alive",
            "slots": 3,
            "running": 0,
            "disk_free": 5 * 1024**3,
            "leader": False,
            "self": False,
        }
        assert 0 <= far["heartbeat_age"] < svc.config.cluster.node_timeout
        assert far["started_at"] and far["heartbeat_at"]

        # Its links are on the other node, in the detail, the list and a pushed change alike.
        status, detail = await svc.api("GET", f"/api/downloads/{nodes.far_id}")
        assert status == 200, detail
        assert detail["node"] == OTHER_NODE and detail["status"] == "completed"
        stream_path = path_of(detail["stream_url"], origin)
        watch_path = path_of(detail["watch_url"], origin)
        assert stream_path.startswith(
            f"/stream/{nodes.far_id}/far%20away%20%282020%29%20%E2%80%93%20%C3%A9.mkv?"
        )
        status, listed = await svc.api("GET", "/api/downloads")
        assert status == 200
        (row,) = [row for row in listed["downloads"] if row["id"] == nodes.far_id]
        assert row == {k: v for k, v in detail.items() if k != "history"}
        ws = await svc.http.ws_connect(
            svc.base_url.replace("http://", "ws://", 1) + "/api/ws", headers=svc.auth
        )
        try:
            assert (await receive(ws))["type"] == "hello"
            await nodes.store.set_media_info(nodes.far_id, {"duration": 1.5})
            pushed = await pushed_for(ws, nodes.far_id, {"media_info": {"duration": 1.5}})
        finally:
            await ws.close()
        assert pushed["node"] == OTHER_NODE
        assert pushed["stream_url"] == detail["stream_url"]
        assert pushed["watch_url"] == detail["watch_url"]

        # This node has no file: /stream and /watch answer 307 to the same path on node-b, byte
        # for byte as sent (`encoded`: the client sends the link as given, %28 and all).
        here = URL(svc.base_url + stream_path, encoded=True)
        for method, headers in (("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=100-199"})):
            async with svc.http.request(
                method, here, headers=headers, allow_redirects=False
            ) as response:
                assert response.status == 307, (method, headers, await response.text())
                assert response.headers["Location"] == origin + stream_path
        async with svc.http.get(svc.base_url + watch_path, allow_redirects=False) as response:
            assert response.status == 307
            assert response.headers["Location"] == origin + watch_path

        # A client that follows it asks node-b for the same method, path, query and range.
        file_server.requests.clear()
        for method, headers in (("HEAD", {}), ("GET", {"Range": "bytes=100-199"})):
            async with svc.http.request(method, here, headers=headers):
                pass
        query = stream_path.partition("?")[2]
        asked = [(r.method, r.path, r.query, r.range_header) for r in file_server.requests]
        decoded = f"/stream/{nodes.far_id}/{FAR_FILE}"
        assert asked == [("HEAD", decoded, query, None), ("GET", decoded, query, "bytes=100-199")]

        # A forged link is refused here, before any redirect.
        forged = stream_path.replace("sig=", "sig=x", 1)
        async with svc.http.get(svc.base_url + forged, allow_redirects=False) as response:
            assert response.status == 403

        # A Telegram file no node holds: this node leads but reads no Telegram, so nobody can.
        status, tg = await svc.api("GET", f"/api/downloads/{nodes.tg_id}")
        assert status == 200 and tg["node"] is None, tg
        status, _, _ = await fetch(svc, tg["stream_url"])
        assert status == 409


async def test_a_telegram_file_is_redirected_to_the_node_running_the_bot(
    postgres_url: str, service_factory: ServiceFactory, file_server: FileServer, tmp_path: Path
) -> None:
    async with two_nodes(
        service_factory, postgres_url, file_server, tmp_path, other_leads=True
    ) as nodes:
        svc, origin = nodes.svc, nodes.other.public_url
        status, cluster = await svc.api("GET", "/api/cluster")
        assert status == 200, cluster
        assert cluster["leader"] == OTHER_NODE
        assert [(n["name"], n["leader"]) for n in cluster["nodes"]] == [
            (OTHER_NODE, True),
            (THIS_NODE, False),
        ]
        # No node holds the job, so its link is on this node, which sends it to node-b.
        status, tg = await svc.api("GET", f"/api/downloads/{nodes.tg_id}")
        assert status == 200, tg
        assert tg["node"] is None and tg["status"] == "cancelled"
        stream_path = path_of(tg["stream_url"], svc.config.web.base_url)
        for method, headers in (("GET", {}), ("HEAD", {}), ("GET", {"Range": "bytes=0-99"})):
            async with svc.http.request(
                method, svc.base_url + stream_path, headers=headers, allow_redirects=False
            ) as response:
                assert response.status == 307, (method, headers, await response.text())
                assert response.headers["Location"] == origin + stream_path


@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)
async def test_the_dashboard_shows_the_nodes_and_who_holds_each_job(
    postgres_url: str, service_factory: ServiceFactory, file_server: FileServer, tmp_path: Path
) -> None:
    console_errors: list[str] = []
    async with (
        two_nodes(service_factory, postgres_url, file_server, tmp_path) as nodes,
        chromium(tmp_path / "profile", tmp_path / "chromium.log") as page,
    ):

        def on_event(method: str, params: dict[str, Any]) -> None:
            if method == "Runtime.exceptionThrown":
                console_errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                console_errors.append(f"{params['entry'].get('url', '')} {params['entry']['text']}")

        page.on_event(on_event)
        await page.send("Runtime.enable")
        await page.send("Log.enable")
        await sign_in(page, nodes.svc.base_url, nodes.svc.token)

        rows = await page.wait_for(
            "(() => { const rows = document.querySelectorAll('#nodes-body tr');"
            " return !document.getElementById('nodes').hidden && rows.length === 2"
            " && Array.from(rows, (r) => [r.dataset.node, r.dataset.state, r.dataset.leader,"
            " r.querySelector('.badge.self') !== null, r.cells[2].textContent]); })()",
            WAIT,
            "the nodes panel",
        )
        slots = nodes.svc.config.aria2.max_concurrent_downloads
        assert rows == [  # in the answer's order: by name
            [OTHER_NODE, "alive", "false", False, "0 / 3"],
            [THIS_NODE, "alive", "true", True, f"0 / {slots}"],
        ]
        other_row = "document.querySelector('#nodes-body tr[data-node=\"node-b\"]')"
        assert await page.evaluate(f"{other_row}.cells[3].textContent") == "5.0 GiB"
        label = await page.wait_for(
            "(() => { const el = document.querySelector("
            f"'article.item[data-download-id=\"{nodes.far_id}\"] .badge.node');"
            " return el && !el.hidden && el.textContent; })()",
            WAIT,
            "the job's node label",
        )
        assert label == OTHER_NODE

    # Expected: the signed-out session probe (/api/me) before the sign-in.
    assert [e for e in console_errors if "/api/me " not in e] == []
