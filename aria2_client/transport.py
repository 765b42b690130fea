"""aria2 JSON-RPC over one WebSocket: calls, batched calls and notifications, with reconnection.

One background task owns the connection: it connects, reads until the socket drops, fails the calls
still waiting, then reconnects with capped exponential backoff, forever, until `close()`. Reading
happens inside that task, so a new reader can never start before the old one is gone.

Notifications and connection changes go through one queue consumed in order by a second task, so a
slow or failing handler never stalls the reader, and a handler may itself make RPC calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from loguru import logger

from aria2_client.models import Aria2Notification

NotificationHandler = Callable[[Aria2Notification], Awaitable[None]]
ConnectionHandler = Callable[[bool], Awaitable[None]]

# A poll over thousands of downloads can exceed aiohttp's default 4 MiB frame limit.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class Aria2RpcError(Exception):
    """aria2 answered a call with an error (bad gid, unauthorized, ...)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"aria2 error {code}: {message}")
        self.code = code
        self.message = message

    @property
    def is_not_found(self) -> bool:
        """aria2 does not know the gid (never had it, or its result was already removed)."""
        text = self.message.lower()
        return "not found" in text or "invalid gid" in text


class Aria2Unavailable(Exception):
    """aria2 cannot be reached: not connected, the socket dropped mid-call, or no reply in time."""


class Aria2Timeout(Aria2Unavailable):
    """aria2 did not answer a call within its timeout."""


def websocket_url(url: str) -> str:
    """The WebSocket address for an aria2 JSON-RPC url: http -> ws, https -> wss, path kept."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None:
        raise ValueError(f"unsupported aria2 RPC url scheme: {parts.scheme!r}")
    path = parts.path or "/jsonrpc"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _rpc_error(payload: Any) -> Aria2RpcError:
    if isinstance(payload, dict):
        return Aria2RpcError(int(payload.get("code", -1)), str(payload.get("message", "")))
    return Aria2RpcError(-1, str(payload))


class Aria2Transport:
    """The connection to one aria2 instance. Never logs or raises with the secret in the text."""

    def __init__(
        self,
        url: str,
        secret: str | None,
        *,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        connect_timeout: float = 5.0,
        heartbeat: float | None = 30.0,
        on_reply: Callable[[str, float], None] | None = None,
    ) -> None:
        self.url = url
        self._on_reply = on_reply  # told each answered call's method and seconds
        self.ws_url = websocket_url(url)
        self._token = f"token:{secret}" if secret else None
        self._on_notification: NotificationHandler | None = None
        self._on_connection_change: ConnectionHandler | None = None
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        self._heartbeat = heartbeat

        self.rpc_calls = 0
        self.connected = False
        self._connected_event = asyncio.Event()
        self._ids = itertools.count(1)
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._connection_task: asyncio.Task[None] | None = None
        self._dispatch_task: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[Aria2Notification | bool] = asyncio.Queue()
        self._closing = False
        self._log = logger.bind(aria2=self.ws_url)

    def __repr__(self) -> str:
        return f"Aria2Transport({self.ws_url!r}, connected={self.connected})"

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(
        self,
        *,
        on_notification: NotificationHandler | None = None,
        on_connection_change: ConnectionHandler | None = None,
    ) -> None:
        """Start connecting in the background; returns at once (see `wait_connected`).

        From now on aria2's notifications, and each connection change (True: connected, False:
        lost), are handed in order to the handlers given here.
        """
        if self._connection_task is not None:
            return
        self._on_notification = on_notification
        self._on_connection_change = on_connection_change
        self._closing = False
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self._connect_timeout, sock_connect=self._connect_timeout
        )
        self._session = aiohttp.ClientSession(timeout=timeout)
        self._dispatch_task = asyncio.create_task(self._dispatch_events(), name="aria2-events")
        self._connection_task = asyncio.create_task(self._run(), name="aria2-connection")

    async def close(self) -> None:
        """Stop reconnecting, fail pending calls, and release the socket, session and tasks."""
        self._closing = True
        tasks = [t for t in (self._connection_task, self._dispatch_task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded: a handler that swallowed its cancellation must not hang the shutdown.
            _, stuck = await asyncio.wait(tasks, timeout=5)
            for task in stuck:
                self._log.warning("aria2 task {} did not stop when cancelled", task.get_name())
        self._connection_task = None
        self._dispatch_task = None
        if self._ws is not None:
            await self._ws.close()
            self._ws = None
        self._set_disconnected(notify=False)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Aria2Transport:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def wait_connected(self, timeout: float) -> bool:
        """True once connected; False if not connected within `timeout` seconds."""
        if self.connected:
            return True
        try:
            await asyncio.wait_for(self._connected_event.wait(), timeout)
        except TimeoutError:
            return False
        return self.connected

    # -- calls ---------------------------------------------------------------------------------

    async def call(self, method: str, *params: Any, timeout: float = 15) -> Any:
        """Call one aria2 method (the token is added); returns its result."""
        full_params = [self._token, *params] if self._token else list(params)
        return await self._request(method, full_params, timeout)

    async def multicall(
        self, calls: Sequence[tuple[str, Sequence[Any]]], timeout: float = 15
    ) -> list[Any | Aria2RpcError]:
        """Run several methods in one `system.multicall`; a failed one gives its Aria2RpcError."""
        if not calls:
            return []
        batch = []
        for method, params in calls:
            full_params = [self._token, *params] if self._token else list(params)
            batch.append({"methodName": method, "params": full_params})
        results = await self._request("system.multicall", [batch], timeout)
        if not isinstance(results, list) or len(results) != len(calls):
            raise Aria2RpcError(-1, "malformed system.multicall reply")
        out: list[Any | Aria2RpcError] = []
        for item in results:
            if isinstance(item, list) and len(item) == 1:
                out.append(item[0])
            else:
                out.append(_rpc_error(item))
        return out

    async def _request(self, method: str, params: list[Any], timeout: float) -> Any:
        ws = self._ws
        if not self.connected or ws is None or ws.closed:
            raise Aria2Unavailable(f"not connected to aria2 ({method})")
        request_id = f"mr{next(self._ids)}"
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            payload = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
            try:
                self.rpc_calls += 1
                await ws.send_str(json.dumps(payload))
            except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
                raise Aria2Unavailable(f"lost aria2 while sending {method}: {exc}") from None
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that arrives together with the reply, and the caller then never stops.
                async with asyncio.timeout(timeout):
                    sent = time.perf_counter()
                    result = await future
                    if self._on_reply is not None:
                        self._on_reply(method, time.perf_counter() - sent)
                    return result
            except TimeoutError:
                raise Aria2Timeout(f"aria2 did not answer {method} within {timeout} s") from None
        finally:
            self._pending.pop(request_id, None)

    # -- connection loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._session is not None
        delay = self._initial_backoff
        while not self._closing:
            try:
                ws = await self._session.ws_connect(
                    self.ws_url,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                    heartbeat=self._heartbeat,
                    max_msg_size=MAX_MESSAGE_BYTES,
                    autoping=True,
                )
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._log.debug(
                    "aria2 WebSocket connect failed ({}); retry in {:.1f} s", exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff)
                continue
            delay = self._initial_backoff
            self._ws = ws
            self.connected = True
            self._connected_event.set()
            self._events.put_nowait(True)
            self._log.info("connected to aria2")
            try:
                await self._read(ws)
            except Exception:  # whatever broke this connection, the loop must go on
                self._log.opt(exception=True).error("aria2 WebSocket reader failed")
            finally:
                self._ws = None
                self._set_disconnected(notify=not self._closing)
                if not ws.closed:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(ws.close())
            if not self._closing:
                self._log.warning("aria2 WebSocket closed; reconnecting")

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                if message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                    break
                continue
            try:
                data = json.loads(message.data)
            except ValueError:
                self._log.warning("aria2 sent a frame that is not JSON; ignored")
                continue
            if isinstance(data, dict):
                self._handle_message(data)

    def _handle_message(self, data: dict[str, Any]) -> None:
        request_id = data.get("id")
        if request_id is not None:
            future = self._pending.get(str(request_id))
            if future is None or future.done():
                return
            if "error" in data:
                future.set_exception(_rpc_error(data["error"]))
            else:
                future.set_result(data.get("result"))
            return
        if "method" in data:
            for notification in Aria2Notification.from_message(data):
                self._events.put_nowait(notification)
        # Anything else (aria2 answers WebSocket pings with an id-less "Invalid Request") is noise.

    def _set_disconnected(self, *, notify: bool) -> None:
        was_connected = self.connected
        self.connected = False
        self._connected_event.clear()
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(Aria2Unavailable("aria2 connection lost before the reply"))
        if was_connected and notify:
            self._events.put_nowait(False)

    # -- notification dispatch -----------------------------------------------------------------

    async def _dispatch_events(self) -> None:
        while True:
            item = await self._events.get()
            try:
                if isinstance(item, bool):
                    if self._on_connection_change is not None:
                        await self._on_connection_change(item)
                elif self._on_notification is not None:
                    await self._on_notification(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.opt(exception=True).error("aria2 event handler failed on {!r}", item)
