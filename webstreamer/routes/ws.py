"""GET /api/ws: committed changes pushed to the dashboard as JSON messages.

Each connection owns one bounded, coalescing subscription on the event hub, so publishing never
waits for a browser. A client that stops reading is cut off on its own: when the hub drops its
subscription for falling behind, or when one send stays blocked longer than `send_timeout`, its
socket is closed and nobody else notices. The auth middleware refuses the upgrade before this
handler runs, because the path is under /api: 401 without credentials, 403 when the session
cookie comes from another site's page (cross-site WebSocket hijacking). A socket opened with a
session cookie or a personal API token is closed (1008) once that credential no longer holds as
it did: the session signed out (here or on another node) or expired, the token revoked, or its
user struck off or made or unmade an admin; it is checked every `session_check_interval` seconds.

A user's socket (not an admin's) carries only that user's jobs and their uploads, and for
totals that user's own, sent after a `statistics` event when one of their jobs changed since.

Messages: ``{"type": "hello" | "download_update" | "upload_update" | "cleanup_update" |
"statistics_update", "seq": n, "data": {...}}`` with `seq` counting 1, 2, 3 … per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import WSCloseCode, WSMsgType, web
from loguru import logger

from db import DRIVER_ERRORS
from events import Event, Subscription, SubscriptionClosed
from records import DownloadRemoved, DownloadSnapshot, Statistics, UploadRow
from webstreamer.context import (
    CONTEXT,
    CREDENTIAL_CHECK,
    CredentialCheck,
    context_of,
    json_error,
    viewer_of,
)
from webstreamer.links import StreamLinks
from webstreamer.views import event_json

MESSAGE_TYPES = {
    "download": "download_update",
    "upload": "upload_update",
    "cleanup": "cleanup_update",
    "statistics": "statistics_update",
}
# Close codes (RFC 6455): 1001 going away (shutdown).
CLOSE_GOING_AWAY = 1001
WATCHDOG_INTERVAL = 0.25  # seconds between checks on a connection's send


@dataclass(frozen=True)
class WsSettings:
    queue_size: int = 1000  # distinct pending items before a client counts as stuck
    send_timeout: float = 10.0  # seconds one send may stay blocked on a client that reads nothing
    max_clients: int = 500
    heartbeat: float = 30.0
    max_message_size: int = 4096  # what a client may send us (only pings)
    # Kernel send buffer per connection (0 = the kernel's autotuning, up to megabytes): keeps
    # what a stuck client can pin small and lets the send timeout notice it within seconds.
    socket_send_buffer: int = 128 * 1024
    session_check_interval: float = 15.0  # seconds between checks that a credential holds


WS_SETTINGS: web.AppKey[WsSettings] = web.AppKey("ws_settings", WsSettings)
WS_CLIENTS: web.AppKey[weakref.WeakSet[web.WebSocketResponse]] = web.AppKey("ws_clients")
_connection_numbers = itertools.count(1)

# One event goes to every client: its JSON is shaped and encoded once, not once per connection.
_ENCODED_CACHE_SIZE = 4096
_encoded: OrderedDict[int, tuple[Event, StreamLinks, str]] = OrderedDict()


def encode_json(data: object) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str)


def encoded_data(event: Event, links: StreamLinks) -> str:
    cached = _encoded.get(id(event))
    if cached is not None and cached[0] is event and cached[1] is links:
        return cached[2]
    text = encode_json(event_json(links, event.data))
    _encoded[id(event)] = (event, links, text)
    if len(_encoded) > _ENCODED_CACHE_SIZE:
        _encoded.popitem(last=False)
    return text


def message_type(kind: str) -> str:
    return MESSAGE_TYPES.get(kind) or encode_json(f"{kind}_update")[1:-1]


class ClientConnection:
    """One browser: numbers its messages and sends them without ever holding up the hub."""

    def __init__(
        self,
        request: web.Request,
        ws: web.WebSocketResponse,
        subscription: Subscription,
        settings: WsSettings,
        number: int,
        links: StreamLinks,
        on_dropped: Callable[[], None],
    ) -> None:
        self.ws = ws
        self.on_dropped = on_dropped
        self.subscription = subscription
        self.links = links
        self.settings = settings
        self.seq = 0
        self.sent = 0
        self.sending_since: float | None = None
        self._transport = request.transport
        self.log = logger.bind(ws=number, peer=request.remote)
        self.viewer = viewer_of(request)  # None: every event; else only this user's jobs
        self.store = context_of(request).store
        self.owned: set[int] = set()  # this user's jobs seen so far (for uploads and removals)
        self.changed = False  # one of this user's jobs changed since their totals were sent

    async def visible(self, event: Event) -> bool:
        """Whether this client's user may see `event`: a user sees their own jobs, their
        uploads and removals, never another's and never the totals of everyone's."""
        viewer = self.viewer
        if viewer is None:
            return True
        shown = await self._is_own(viewer, event.data)
        self.changed |= shown
        return shown

    async def _is_own(self, viewer: int, data: object) -> bool:
        if isinstance(data, DownloadSnapshot):
            if data.row.owner_id == viewer:
                self.owned.add(data.row.id)
                return True
            return False
        if isinstance(data, DownloadRemoved):
            if data.download_id is None:
                return True
            if data.download_id in self.owned:
                self.owned.discard(data.download_id)
                return True
            return False
        if isinstance(data, UploadRow):
            if data.download_id in self.owned:
                return True
            row = await self.store.get_download_by_id(data.download_id)
            if row is not None and row.owner_id == viewer:
                self.owned.add(row.id)
                return True
            return False
        return False

    async def own_statistics(self) -> str | None:
        """A user's own totals, encoded, when one of their jobs changed since they were last
        sent (the hub's `statistics` event is everyone's); None when nothing of theirs did."""
        if self.viewer is None or not self.changed:
            return None
        self.changed = False
        return encode_json(await self.store.get_statistics(self.viewer))

    async def send(self, kind: str, data_json: str) -> bool:
        """Send one message (`data_json` already encoded); False once the socket is gone."""
        self.seq += 1
        text = f'{{"type":"{kind}","seq":{self.seq},"data":{data_json}}}'
        # send_str returns at once unless the client's buffers are full; the watchdog cuts a
        # send that stays blocked.
        self.sending_since = time.monotonic()
        try:
            await self.ws.send_str(text)
        except (ConnectionError, RuntimeError) as exc:
            self.log.debug("WebSocket send failed: {}", exc)
            return False
        finally:
            self.sending_since = None
        self.sent += 1
        return True

    def cut_off(self, why: str) -> None:
        """Drop a client that cannot take messages: no close handshake, it would block too."""
        if self.subscription.closed and self._transport is None:
            return
        self.log.warning("WebSocket client dropped: {}", why)
        self.on_dropped()
        self.subscription.close()
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    async def watchdog(self) -> None:
        """Cut the client off once the hub dropped it or one send stays blocked too long."""
        while not self.ws.closed:
            await asyncio.sleep(WATCHDOG_INTERVAL)
            if self.subscription.dropped:
                self.cut_off(f"more than {self.settings.queue_size} updates behind")
                return
            since = self.sending_since
            if since is not None and time.monotonic() - since > self.settings.send_timeout:
                self.cut_off(f"a send blocked for over {self.settings.send_timeout:g} s")
                return

    async def watch_credential(self, holds: CredentialCheck) -> None:
        """Close the socket once the session or token it was opened with no longer holds as it
        did (ended, revoked, or its user's role changed: what it may see changed too, so it
        ends; the page connects again if it still may)."""
        while not self.ws.closed:
            await asyncio.sleep(self.settings.session_check_interval)
            try:
                still = await holds()
            except DRIVER_ERRORS as exc:  # the store is away for now: look again later
                self.log.debug("credential check failed: {}", exc)
                continue
            if not still:
                self.log.info(
                    "WebSocket closed: its session or token has ended or its user's role changed"
                )
                self.subscription.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"signed out"),
                        2.0,
                    )
                return

    async def pump(self) -> None:
        """Forward hub events until the subscription or the socket ends."""
        while not self.ws.closed:
            try:
                event: Event = await self.subscription.get()
            except SubscriptionClosed:
                break
            if self.subscription.dropped:
                self.cut_off(f"more than {self.settings.queue_size} updates behind")
                return
            try:
                if event.kind == "statistics" and self.viewer is not None:
                    own = await self.own_statistics()
                    if own is not None and not await self.send(message_type(event.kind), own):
                        return
                    continue
                shown = await self.visible(event)
            except DRIVER_ERRORS as exc:  # cannot tell whose it is, or their totals: not sent
                self.log.debug("owner of an update unknown: {}", exc)
                shown = False
            if not shown:
                continue
            if not await self.send(message_type(event.kind), encoded_data(event, self.links)):
                return
        if self.subscription.dropped:
            self.cut_off(f"more than {self.settings.queue_size} updates behind")
        elif not self.ws.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(code=CLOSE_GOING_AWAY), 2.0)


def _limit_send_buffer(request: web.Request, size: int) -> None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if size > 0 and sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


async def websocket(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    settings = request.app[WS_SETTINGS]
    clients = request.app[WS_CLIENTS]
    ws = web.WebSocketResponse(
        heartbeat=settings.heartbeat,
        max_msg_size=settings.max_message_size,
        compress=False,
    )
    if not ws.can_prepare(request).ok:
        return json_error(400, "bad_request", "a WebSocket upgrade is required")
    if len(clients) >= settings.max_clients:
        return json_error(503, "too_many_clients", f"at most {settings.max_clients} connections")
    number = next(_connection_numbers)
    # Subscribe before reading the statistics: nothing committed in between can be missed.
    subscription = ctx.hub.subscribe(f"ws-{number}", maxsize=settings.queue_size)
    try:
        try:  # a user's own totals; everyone's are for admins
            statistics: Statistics | None = await ctx.store.get_statistics(viewer_of(request))
        except Exception as exc:
            logger.warning("statistics for a new WebSocket client failed: {}", exc)
            statistics = None
        await ws.prepare(request)
        clients.add(ws)
        _limit_send_buffer(request, settings.socket_send_buffer)
        connection = ClientConnection(
            request,
            ws,
            subscription,
            settings,
            number,
            ctx.links,
            ctx.metrics.websocket_client_dropped,
        )
        connection.log.debug("WebSocket client connected")
        hello = {"statistics": statistics, "version": ctx.version, "server_time": time.time()}
        if not await connection.send("hello", encode_json(hello)):
            return ws
        tasks = [
            asyncio.create_task(connection.pump(), name=f"ws-{number}-pump"),
            asyncio.create_task(connection.watchdog(), name=f"ws-{number}-watchdog"),
        ]
        holds = request.get(CREDENTIAL_CHECK)
        if holds is not None:
            tasks.append(
                asyncio.create_task(
                    connection.watch_credential(holds), name=f"ws-{number}-credential"
                )
            )
        try:
            async for message in ws:
                if message.type == WSMsgType.TEXT and message.data == "ping":
                    await connection.send("pong", encode_json({"server_time": time.time()}))
                elif message.type == WSMsgType.ERROR:
                    break
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            connection.log.debug("WebSocket client gone after {} messages", connection.sent)
    finally:
        subscription.close()
        clients.discard(ws)
    return ws


async def _close_all(app: web.Application) -> None:
    """On shutdown: say goodbye so the server need not wait for open sockets."""
    clients: weakref.WeakSet[web.WebSocketResponse] = app[WS_CLIENTS]
    for ws in list(clients):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(ws.close(code=CLOSE_GOING_AWAY, message=b"shutting down"), 1.0)


def setup(app: web.Application, settings: WsSettings | None = None) -> None:
    app[WS_SETTINGS] = settings or WsSettings()
    clients: weakref.WeakSet[web.WebSocketResponse] = weakref.WeakSet()
    app[WS_CLIENTS] = clients
    app[CONTEXT].metrics.websocket_clients.set_function(lambda: len(clients))
    app.router.add_get("/api/ws", websocket)
    app.on_shutdown.append(_close_all)


__all__ = ["MESSAGE_TYPES", "WS_CLIENTS", "WS_SETTINGS", "WsSettings", "setup", "websocket"]
