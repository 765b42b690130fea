"""GET /api/ws against a real service: auth before the upgrade, hello, seq, coalescing, a stuck
client cut off while another keeps receiving, and nothing pushed before its commit."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from records import DownloadRemoved
from tests.support.http_files import MIB, FileServer
from tests.support.processes import free_port
from tests.support.service import ServiceFactory
from tests.test_events import snapshot, upload
from tests.test_web_page import Site, login_cookie, serve_site
from webstreamer.routes import ws as ws_routes
from webstreamer.server import create_app
from webstreamer.signing import SESSION_COOKIE


@pytest.fixture
async def site(service_factory: ServiceFactory) -> AsyncIterator[Site]:
    running = await service_factory()
    async with serve_site(running) as served:
        yield served


def hub_of(site: Site) -> Any:
    return site.running.service.parts.hub


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return dict(json.loads(message.data))


async def connect(site: Site, **kwargs: Any) -> aiohttp.ClientWebSocketResponse:
    kwargs.setdefault("headers", site.auth)
    ws: aiohttp.ClientWebSocketResponse = await site.http.ws_connect(site.ws_url, **kwargs)
    return ws


async def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- authentication -----------------------------------------------------------------------------


async def test_upgrade_refused_with_401_before_it_happens(site: Site) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Cookie": f"{SESSION_COOKIE}=1.forged"},
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await site.http.ws_connect(site.ws_url, headers=headers)
        assert refused.value.status == 401
    # The raw handshake: a JSON 401, no 101 and no Upgrade header.
    key = base64.b64encode(os.urandom(16)).decode()
    async with site.http.get(
        site.base_url + "/api/ws",
        headers={
            "Connection": "Upgrade",
            "Upgrade": "websocket",
            "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": key,
        },
    ) as response:
        assert response.status == 401
        assert response.content_type == "application/json"
        assert "Sec-WebSocket-Accept" not in response.headers
        assert (await response.json())["error"] == "unauthorized"
    assert hub_of(site).subscriber_count == 0


async def test_plain_get_without_upgrade_is_a_json_400(site: Site) -> None:
    status, body, _ = await site.request("GET", "/api/ws")
    assert status == 400 and body["error"] == "bad_request"


@pytest.mark.parametrize("credential", ["bearer", "cookie"])
async def test_hello_carries_the_statistics(site: Site, credential: str) -> None:
    if credential == "bearer":
        headers = site.auth
    else:
        cookie = await login_cookie(site)
        headers = {"Cookie": f"{SESSION_COOKIE}={cookie}", "Origin": site.base_url}
    ws = await site.http.ws_connect(site.ws_url, headers=headers)
    try:
        hello = await receive(ws)
        assert hello["type"] == "hello" and hello["seq"] == 1
        statistics = hello["data"]["statistics"]
        assert statistics["downloads"]["total"] == 0
        assert "by_status" in statistics["uploads"]
        assert hub_of(site).subscriber_count == 1
    finally:
        await ws.close()
    await wait_until(lambda: hub_of(site).subscriber_count == 0, 5, "the subscription to end")


# --- what is pushed -----------------------------------------------------------------------------


async def test_a_real_download_is_pushed_in_order(site: Site, file_server: FileServer) -> None:
    file_server.add_file("slow.bin", size=2 * MIB)
    ws = await connect(site)
    try:
        assert (await receive(ws))["type"] == "hello"
        status, body, _ = await site.request(
            "POST",
            "/api/downloads",
            json={"url": file_server.url("slow.bin", route="slow", rate=MIB)},
        )
        assert status == 201
        download_id = body["downloads"][0]["id"]
        messages: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            message = await receive(ws)
            messages.append(message)
            data = message["data"]
            if (
                message["type"] == "download_update"
                and data["id"] == download_id
                and data["status"] == "completed"
            ):
                break
        seqs = [m["seq"] for m in messages]
        assert seqs == list(range(2, 2 + len(messages)))
        updates = [m["data"] for m in messages if m["type"] == "download_update"]
        assert updates[-1]["status"] == "completed"
        assert updates[-1]["completed_length"] == 2 * MIB
        partial = [u for u in updates if 0 < u["completed_length"] < 2 * MIB]
        assert partial, "no progress was pushed"
        for update in updates:
            assert {"id", "gid", "status", "completed_length", "total_length"} <= set(update)
            assert {"download_speed", "uploads", "stream_url", "actions"} <= set(update)
        assert [u["actions"] for u in partial][:1] == [["pause", "cancel"]]
        assert updates[-1]["actions"] == [] and updates[-1]["stream_url"]
        # The statistics follow the change.
        deadline = time.monotonic() + 10
        completed = 0
        while completed != 1 and time.monotonic() < deadline:
            message = await receive(ws)
            if message["type"] == "statistics_update":
                completed = message["data"]["downloads"]["by_status"]["completed"]
        assert completed == 1
    finally:
        await ws.close()


async def test_a_download_event_is_the_list_row(site: Site, file_server: FileServer) -> None:
    """The pushed `download_update` of a completed download is exactly its row in
    GET /api/downloads: same keys, same values, the signed `stream_url` and `actions` included
    (links never expire by default, so both signings give the same link)."""
    file_server.add_file("same.bin", size=64 * 1024)
    ws = await connect(site)
    try:
        assert (await receive(ws))["type"] == "hello"
        status, body, _ = await site.request(
            "POST", "/api/downloads", json={"url": file_server.url("same.bin")}
        )
        assert status == 201
        download_id = body["downloads"][0]["id"]
        pushed: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while pushed.get("status") != "completed" and time.monotonic() < deadline:
            message = await receive(ws)
            if message["type"] == "download_update" and message["data"]["id"] == download_id:
                pushed = message["data"]
        # Anything that still changes the row after completion is pushed too: keep the last.
        with contextlib.suppress(TimeoutError):
            while True:
                message = await receive(ws, timeout=1.0)
                if message["type"] == "download_update" and message["data"]["id"] == download_id:
                    pushed = message["data"]
        status, listed, _ = await site.request("GET", "/api/downloads")
        assert status == 200
        (row,) = [d for d in listed["downloads"] if d["id"] == download_id]
        assert pushed["status"] == "completed"
        assert pushed["stream_url"] and "/stream/" in pushed["stream_url"]
        assert pushed["watch_url"] and pushed["actions"] == []
        assert pushed == row
        status, detail, _ = await site.request("GET", f"/api/downloads/{download_id}")
        assert status == 200
        assert {k: v for k, v in detail.items() if k != "history"} == row
    finally:
        await ws.close()


async def test_each_record_is_pushed_in_its_json_shape(site: Site) -> None:
    ws = await connect(site)
    try:
        await receive(ws)
        hub = hub_of(site)
        hub.publish("download", snapshot(41, completed=10, file_name="a.bin"), 41)
        hub.publish("upload", upload(7, uploaded=1), 7)
        hub.publish("cleanup", upload(7, uploaded=2, cleaned_at="2026-01-01T00:00:00+00:00"), 7)
        hub.publish("download", DownloadRemoved(42), 42)  # not 41: that would coalesce
        hub.publish("download", DownloadRemoved(None), None)
        received: list[dict[str, Any]] = []
        while sum(m["type"] != "statistics_update" for m in received) < 5:
            received.append(await receive(ws))
        assert [m["seq"] for m in received] == list(range(2, 2 + len(received)))
        messages = [m for m in received if m["type"] != "statistics_update"]
        assert [m["type"] for m in messages] == [
            "download_update",
            "upload_update",
            "cleanup_update",
            "download_update",
            "download_update",
        ]
        download = messages[0]["data"]
        row = snapshot(41, completed=10, file_name="a.bin").row
        expected_row = {**row._asdict(), "files": [], "files_total": 0}
        del expected_row["has_torrent_data"]
        assert download == {
            **expected_row,
            "uploads": [],
            "stream_url": None,  # an http download is streamable once completed
            "watch_url": None,
            "thumbnail_url": None,
            "actions": ["pause", "cancel"],
        }
        assert messages[1]["data"] == {**upload(7, uploaded=1)._asdict(), "actions": ["cancel"]}
        cleaned = messages[2]["data"]
        assert cleaned["cleaned_at"] == "2026-01-01T00:00:00+00:00" and cleaned["id"] == 7
        assert messages[3]["data"] == {"id": 42, "deleted": True}
        assert messages[4]["data"] == {"deleted_all": True}
    finally:
        await ws.close()


async def test_updates_for_one_item_are_coalesced(site: Site) -> None:
    ws = await connect(site)
    try:
        await receive(ws)
        hub = hub_of(site)
        # One burst without yielding: the client's queue keeps only the newest per item.
        for step in range(200):
            hub.publish("download", snapshot(5, step), 5)
            hub.publish("download", snapshot(6, step * 2), 6)
        hub.publish("download", snapshot(99, 1), 99)
        received: list[dict[str, Any]] = []
        while not received or received[-1]["data"]["id"] != 99:
            received.append(await receive(ws))
        five = [m["data"]["completed_length"] for m in received if m["data"]["id"] == 5]
        six = [m["data"]["completed_length"] for m in received if m["data"]["id"] == 6]
        assert five == [199] and six == [398]
        assert [m["seq"] for m in received] == [2, 3, 4]
    finally:
        await ws.close()


async def test_seq_counts_per_connection(site: Site) -> None:
    first = await connect(site)
    await receive(first)
    hub = hub_of(site)
    for item in range(5):
        hub.publish("download", snapshot(item), item)
    await asyncio.sleep(0.1)
    second = await connect(site)
    try:
        assert (await receive(second))["seq"] == 1
        hub.publish("download", snapshot(100), 100)
        seen_first = [(await receive(first))["seq"] for _ in range(6)]
        assert seen_first == [2, 3, 4, 5, 6, 7]
        assert (await receive(second))["seq"] == 2
    finally:
        await first.close()
        await second.close()


# --- slow clients -------------------------------------------------------------------------------


def _drained_to_the_end(sock: socket.socket) -> bool:
    sock.setblocking(True)
    sock.settimeout(15)
    try:
        while sock.recv(1 << 20):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


async def _raw_websocket_that_never_reads(site: Site) -> socket.socket:
    """A client that completes the handshake and then reads nothing, with a tiny window."""
    port = int(site.base_url.rsplit(":", 1)[1])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        "GET /api/ws HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{port}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: {key}\r\n"
        f"Authorization: Bearer {site.token}\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 5)
        assert chunk, "the server closed the handshake"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


async def test_a_stuck_client_is_dropped_while_another_keeps_receiving(site: Site) -> None:
    hub = hub_of(site)
    stuck = await _raw_websocket_that_never_reads(site)
    good = await connect(site, max_msg_size=0)
    received: list[dict[str, Any]] = []
    try:
        await receive(good)
        await wait_until(lambda: hub.subscriber_count == 2, 5, "two subscribers")
        total = 3000
        padding = "x" * 4096

        async def read_all() -> None:
            items = 0
            while items < total:
                received.append(await receive(good))
                items += received[-1]["type"] == "download_update"

        reader = asyncio.create_task(read_all())
        for first in range(0, total, 50):
            for item in range(first, first + 50):
                hub.publish("download", snapshot(item, file_name=padding), item)
            await asyncio.sleep(0.01)
        await asyncio.wait_for(reader, 60)
        # The good client got every item, numbered without a gap, while the stuck one was cut off.
        items = [m["data"]["id"] for m in received if m["type"] == "download_update"]
        assert sorted(items) == list(range(total))
        assert [m["seq"] for m in received] == list(range(2, len(received) + 2))
        await wait_until(lambda: hub.subscriber_count == 1, 15, "the stuck client to be dropped")
        assert not good.closed
        metrics = site.running.service.parts.web.ctx.metrics.registry
        assert metrics.get_sample_value("mistrelay_websocket_clients_dropped_total") == 1
        assert metrics.get_sample_value("mistrelay_websocket_clients") == 1
        # The server closed the stuck socket: draining it ends in EOF or a reset, not a timeout.
        assert await asyncio.to_thread(_drained_to_the_end, stuck)
        hub.publish("download", snapshot(-5), -5)
        assert (await receive(good))["data"]["id"] == -5
    finally:
        stuck.close()
        await good.close()


async def test_events_are_pushed_only_after_commit(site: Site, file_server: FileServer) -> None:
    file_server.add_file("done.bin", size=1000)
    download = await site.add_and_complete(file_server.url("done.bin"))
    download_id = download["id"]
    db = site.running.service.parts.store
    assert db is not None
    ws = await connect(site)
    try:
        await receive(ws)
        await asyncio.sleep(0.8)  # let statistics from the download settle
        while True:
            try:
                await ws.receive(timeout=0.3)
            except TimeoutError:
                break
        # A rolled-back change is never pushed.
        with contextlib.suppress(RuntimeError):
            async with db._write() as tx:
                await tx.update_columns("downloads", download_id, {"file_name": "rolled-back"})
                await tx.emit_download(download_id)
                raise RuntimeError("roll back")
        with pytest.raises(TimeoutError):
            await ws.receive(timeout=0.5)
        # A committed one is pushed, and not a moment before the commit.
        async with db._write() as tx:
            await tx.update_columns("downloads", download_id, {"file_name": "renamed"})
            await tx.emit_download(download_id)
            with pytest.raises(TimeoutError):
                await ws.receive(timeout=0.5)
        message = await receive(ws)
        assert message["type"] == "download_update"
        assert message["data"]["file_name"] == "renamed"
        row = await db.get_download_by_id(download_id)
        assert row is not None and row.file_name == "renamed"
    finally:
        await ws.close()


async def test_shutdown_closes_open_sockets_promptly(service_factory: ServiceFactory) -> None:
    running = await service_factory()
    app = create_app(running.service.parts.web.ctx)
    ws_routes.setup(app)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    headers = {"Authorization": f"Bearer {running.token}"}
    async with aiohttp.ClientSession() as http:
        sockets = [
            await http.ws_connect(f"ws://127.0.0.1:{port}/api/ws", headers=headers)
            for _ in range(3)
        ]
        for ws in sockets:
            assert (await receive(ws))["type"] == "hello"
        assert running.service.parts.hub.subscriber_count == 3
        started = time.monotonic()
        await runner.cleanup()
        assert time.monotonic() - started < 10  # the server's own grace period is 60 s
        for ws in sockets:
            message = await ws.receive(timeout=5)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            await ws.close()
        assert running.service.parts.hub.subscriber_count == 0


async def test_a_foreign_page_cannot_open_the_socket_with_the_cookie(site: Site) -> None:
    cookie = {"Cookie": f"{SESSION_COOKIE}={await login_cookie(site)}"}
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await site.http.ws_connect(site.ws_url, headers={**cookie, "Origin": "http://evil.test"})
    assert refused.value.status == 403
    host = site.base_url.split("://", 1)[1]
    ws = await site.http.ws_connect(site.ws_url, headers={**cookie, "Origin": f"http://{host}"})
    try:
        assert (await receive(ws))["type"] == "hello"
    finally:
        await ws.close()
    # A token client is not a browser page: its Origin does not matter.
    ws = await site.http.ws_connect(site.ws_url, headers={**site.auth, "Origin": "null"})
    await ws.close()
