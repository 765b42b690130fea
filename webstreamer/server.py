"""The aiohttp application (routes, JSON errors, security headers), the listener it is served
on, and the limits on connections. Only app.py imports this module; the routes share
webstreamer.context instead.

Slow and greedy clients: a connection must send a whole request head within
`web.header_timeout` seconds of opening, or of its previous answer (an idle keep-alive
connection is closed after as long), so connections that trickle their headers (slowloris) are
closed; and one client (an address, an IPv6 /64) may hold at most
`web.max_connections_per_client` connections: a further one is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from loguru import logger

from aria2_client.download_handler import QuotaExceeded
from aria2_client.sources import SourceError
from cluster import HolderError
from db import DRIVER_ERRORS, DuplicateDownload, NotFound, StoreError, TransitionError
from webstreamer import openapi
from webstreamer.context import CONTEXT, AppContext, WarningSummary, client_of, json_error
from webstreamer.routes import api, auth, cluster, metrics, page, stream, uploads, ws


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure answers JSON with a fitting status — never an HTML page or a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason.lower().replace(" ", "_")
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
        response = json_error(exc.status, reason, detail)
        for name in ("Allow", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except DuplicateDownload as exc:
        return json_error(409, "duplicate", {"existing_id": exc.existing_id, "message": str(exc)})
    except TransitionError as exc:
        return json_error(
            409,
            "forbidden_transition",
            {"status": exc.current, "requested": exc.target, "message": str(exc)},
        )
    except NotFound as exc:
        return json_error(404, "not_found", str(exc))
    except QuotaExceeded as exc:
        return json_error(429, "quota_exceeded", str(exc))
    except SourceError as exc:
        return json_error(400, "bad_source", str(exc))
    except StoreError as exc:
        return json_error(409, "conflict", str(exc))
    except HolderError as exc:  # the node holding the job refused the action or is away
        return json_error(exc.status, exc.code, exc.message)
    except DRIVER_ERRORS as exc:  # the database is away (a server restarting)
        logger.warning("{} {}: the store did not answer: {}", request.method, request.path, exc)
        return json_error(503, "store_unavailable", "the database did not answer; try again")
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unhandled error in {} {}", request.method, request.path)
        return json_error(500, "internal_error", "the server failed; see its log")


@web.middleware
async def security_headers_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response


def create_app(ctx: AppContext) -> web.Application:
    app = web.Application(
        middlewares=[security_headers_middleware, error_middleware, auth.auth_middleware],
        client_max_size=ctx.config.web.max_body_size,
    )
    app[CONTEXT] = ctx
    api.setup(app)
    uploads.setup(app)
    cluster.setup(app)
    stream.setup(app)
    ws.setup(app)
    metrics.setup(app)
    auth.setup(app)
    page.setup(app)
    openapi.setup(app)
    return app


# What getaddrinfo gives for IPv4, and for IPv6 (with flow info and scope id).
SocketAddress = tuple[str, int] | tuple[str, int, int, int]


def _passive_addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, SocketAddress]]:
    """Where to listen for `host` (every address it resolves to, once each), as asyncio would."""
    found: list[tuple[socket.AddressFamily, SocketAddress]] = []
    for family, _, _, _, address in socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        if family == socket.AF_INET6 and len(address) == 4:
            entry: tuple[socket.AddressFamily, SocketAddress] = (
                family,
                (str(address[0]), int(address[1]), int(address[2]), int(address[3])),
            )
        elif family == socket.AF_INET:
            entry = (family, (str(address[0]), int(address[1])))
        else:
            continue
        if entry not in found:
            found.append(entry)
    return found


def _bound_socket(
    family: socket.AddressFamily, address: SocketAddress, backlog: int
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # An IPv6 address serves IPv6 only, as asyncio's own servers do.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Listener:
    """The web server's listening sockets, bound at construction: the port is known (and early
    connections wait in the backlog) before the application that answers them exists.

    Binding resolves `host`: construct it in a thread when the host may need a DNS lookup.
    """

    def __init__(self, host: str, port: int, *, backlog: int = 128) -> None:
        self.backlog = backlog
        self.sockets: list[socket.socket] = []
        try:
            for family, address in _passive_addresses(host, port):
                if self.sockets and port == 0:
                    # Every address listens on the port the first one was given.
                    address = (address[0], self.sockets[0].getsockname()[1], *address[2:])
                self.sockets.append(_bound_socket(family, address, backlog))
        except BaseException:
            self.close()
            raise
        if not self.sockets:
            raise OSError(f"{host!r} resolves to no IPv4 or IPv6 address to listen on")
        self.port: int = self.sockets[0].getsockname()[1]

    @property
    def loopback_origin(self) -> str:
        """``http://address:port`` at which a process on this machine (aria2) reaches us: an
        IPv4 listener when there is one, and a wildcard address as its family's loopback."""
        sock = next((s for s in self.sockets if s.family == socket.AF_INET), self.sockets[0])
        address = ipaddress.ip_address(sock.getsockname()[0])
        if address.is_unspecified:
            address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"http://{host}:{self.port}"

    def close(self) -> None:
        """Close the sockets (a served listener is closed by its server already)."""
        for sock in self.sockets:
            sock.close()


def _refusal(limit: int) -> bytes:
    body = json.dumps(
        {
            "error": "too_many_connections",
            "detail": f"at most {limit} open connections from one address",
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class ConnectionGate:
    """Open connections per client; `limit()` (read at each connection) caps them."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}
        self.refused = WarningSummary(
            "connection(s) refused as over web.max_connections_per_client"
        )

    def admit(self, client: str) -> bool:
        count = self.open.get(client, 0)
        if count >= self.limit():
            self.refused.add(client)
            return False
        self.open[client] = count + 1
        return True

    def release(self, client: str) -> None:
        count = self.open.pop(client, 0) - 1
        if count > 0:
            self.open[client] = count


class _Connection(web.RequestHandler):
    """The handler of one connection, counted by the gate; over the cap it answers 503 at once
    and never reads a request."""

    def __init__(self, server: web.Server, gate: ConnectionGate, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._gate = gate
        self._client: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = client_of(str(peer[0]) if isinstance(peer, tuple) and peer else None)
        if not self._gate.admit(client):
            assert isinstance(transport, asyncio.WriteTransport)
            transport.write(_refusal(self._gate.limit()))
            transport.close()
            return
        self._client = client
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._client is None:  # refused: the handler never started
            return
        self._gate.release(self._client)
        self._client = None
        super().connection_lost(exc)


class WebServer:
    """Serves the application on a bound listener until stopped."""

    def __init__(self, ctx: AppContext, listener: Listener) -> None:
        self.ctx = ctx
        self.listener = listener
        self.app = create_app(ctx)
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, handler_cancellation=True
        )
        self.gate = ConnectionGate(lambda: ctx.config.web.max_connections_per_client)
        self._servers: list[asyncio.AbstractServer] = []

    @property
    def port(self) -> int:
        return self.listener.port

    def _connection(self) -> _Connection:
        """A new connection's handler, with the limits in force now. aiohttp closes a
        connection that waits for a request head longer than its keep-alive timeout, from the
        moment it opens as after each answer: that timeout is the header timeout."""
        server = self._runner.server
        assert server is not None
        return _Connection(
            server,
            self.gate,
            loop=asyncio.get_running_loop(),
            keepalive_timeout=self.ctx.config.web.header_timeout,
            access_log=None,
        )

    async def start(self) -> None:
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        for sock in self.listener.sockets:
            self._servers.append(
                await loop.create_server(self._connection, sock=sock, backlog=self.listener.backlog)
            )
        logger.info("web server listening on {}", self.ctx.links.base_url)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        self._servers.clear()
        self.gate.refused.close()
        if self._runner.server is not None:
            await self._runner.cleanup()
