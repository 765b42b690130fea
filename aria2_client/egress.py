"""The filtering forward proxy aria2 uses for the jobs of Telegram users who are not admins.

aria2 is told per job (`all-proxy`) to fetch through this proxy on 127.0.0.1, with the job's
credentials. For every request, redirects and tracker announces included (each is a request of
its own), the proxy resolves the host once itself, refuses it if any address is in
`aria2.blocked_networks`, and connects only to an address it checked: a DNS answer that changes
between a check and the connection cannot lead anywhere else. Plain HTTP arrives as an
absolute-form request and goes on as one request with `Connection: close`; https (and anything
aria2 tunnels) arrives as CONNECT. A refusal answers 403 with the reason and is reported to
`on_refused` with the job's id.

With `aria2.proxy` set, the proxy is this one's upstream: after the check, each connection is a
CONNECT to the checked address (never the name, which the upstream would resolve again) through
the upstream proxy, so the jobs of users who are not admins reach the network the way every
other job does.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from loguru import logger

from aria2_client.sources import (
    AddressPolicy,
    BlockedAddress,
    Resolver,
    SourceError,
    allowed_addresses,
    resolve_host,
)
from configer import ProxyParts

RefusalListener = Callable[[int, str], Awaitable[None]]

HEAD_LIMIT = 64 * 1024  # bytes of a request's or response's head
_CHUNK = 64 * 1024
# Hop-by-hop headers (RFC 9110, 7.6.1) and the proxy's own: never passed on.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
    }
)


class _Refusal(Exception):
    """A request the proxy answers itself: status, reason (and whether the job hears of it)."""

    def __init__(self, status: int, reason: str, *, blocked: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.blocked = blocked


_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: list[tuple[str, str]]

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name), None)


def _parse_head(head: bytes) -> _Request:
    try:
        text = head.decode("latin-1")
        line, *lines = text.split("\r\n")
        method, target, version = line.split(" ")
    except ValueError:
        raise _Refusal(400, "malformed request line") from None
    if not version.startswith("HTTP/1."):
        raise _Refusal(400, f"unsupported protocol {version[:20]!r}")
    headers: list[tuple[str, str]] = []
    for header in lines:
        if not header:
            continue
        name, colon, value = header.partition(":")
        if not colon or not name or name != name.strip():
            raise _Refusal(400, "malformed header line")
        headers.append((name, value.strip()))
    return _Request(method.upper(), target, headers)


def _authority(text: str, default_port: int) -> tuple[str, int]:
    """Host and port of `host:port`, `[v6]:port` or a URL's netloc."""
    try:
        parts = urlsplit(f"//{text}")
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host:
        raise _Refusal(400, f"no host in {text[:100]!r}")
    return host, port or default_port


class EgressProxy:
    """An HTTP forward proxy on loopback that reaches only addresses outside the blocked
    networks; see the module's doc. `policy` is read for every request, so a reload applies."""

    def __init__(
        self,
        policy: Callable[[], AddressPolicy],
        key: bytes,
        *,
        on_refused: RefusalListener,
        resolve: Resolver = resolve_host,
        head_timeout: float = 30.0,
        connect_timeout: float = 30.0,
        server_first_delay: float = 0.25,
        upstream: ProxyParts | None = None,
    ) -> None:
        self._policy = policy
        self._upstream = upstream
        self._key = key
        self._on_refused = on_refused
        self._resolve = resolve
        self.head_timeout = head_timeout
        self.connect_timeout = connect_timeout
        self.server_first_delay = server_first_delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    # --- what aria2 is told ---------------------------------------------------------------------

    def _token(self, download_id: int) -> str:
        return hmac.new(self._key, f"job-{download_id}".encode(), hashlib.sha256).hexdigest()[:32]

    def options(self, download_id: int, *, tunnel: bool = False) -> dict[str, str]:
        """aria2's per-job options that send every connection of the job through this proxy.
        `no-proxy` is emptied for the job, so that no global exception lets a host bypass it.
        `tunnel` (for FTP, which the proxy does not speak) sends every connection as CONNECT;
        otherwise plain HTTP comes as absolute-form requests."""
        return {
            "all-proxy": f"http://127.0.0.1:{self.port}",
            "all-proxy-user": f"job-{download_id}",
            "all-proxy-passwd": self._token(download_id),
            "no-proxy": "",
            "proxy-method": "tunnel" if tunnel else "get",
        }

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1: on `port` if it is free (jobs aria2 kept from an earlier run name
        it), else on any free port."""
        try:
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", port, limit=HEAD_LIMIT
            )
        except OSError as exc:
            if not port:
                raise
            logger.warning(
                "egress proxy port {} is taken ({}); jobs queued before now through it will fail",
                port,
                exc.strerror,
            )
            self._server = await asyncio.start_server(
                self._accept, "127.0.0.1", 0, limit=HEAD_LIMIT
            )
        self.port = int(self._server.sockets[0].getsockname()[1])
        logger.info("egress proxy listening on 127.0.0.1:{}", self.port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    # --- one connection -------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            logger.exception("egress proxy connection failed")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        download_id: int | None = None
        try:
            try:
                async with asyncio.timeout(self.head_timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                raise _Refusal(408, "no complete request head in time") from None
            except asyncio.LimitOverrunError:
                raise _Refusal(400, f"request head larger than {HEAD_LIMIT} bytes") from None
            request = _parse_head(head)
            download_id = self._job_of(request)
            if request.method == "CONNECT":
                host, port = _authority(request.target, 443)
                upstream = await self._connect(host, port)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                await self._client_first(reader, upstream[1])
                await self._relay(reader, writer, upstream, both_ways=True)
            else:
                host, port, upstream_head = self._origin_request(request)
                upstream = await self._connect(host, port)
                upstream[1].write(upstream_head)
                await self._relay(reader, writer, upstream, both_ways=False)
        except _Refusal as refusal:
            await self._refuse(writer, refusal, download_id)

    def _job_of(self, request: _Request) -> int:
        """The job whose credentials the request carries (else a 407)."""
        scheme, _, encoded = (request.header("proxy-authorization") or "").partition(" ")
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
            download_id = int(user.removeprefix("job-")) if user.startswith("job-") else None
        except (binascii.Error, UnicodeDecodeError, ValueError):
            download_id = None
        if (
            scheme.lower() != "basic"
            or download_id is None
            or not hmac.compare_digest(password, self._token(download_id))
        ):
            raise _Refusal(407, "job credentials required")
        return download_id

    def _origin_request(self, request: _Request) -> tuple[str, int, bytes]:
        """Host, port and the head to send there for an absolute-form http request."""
        if request.method not in ("GET", "HEAD"):
            raise _Refusal(405, f"method {request.method[:20]} is not proxied")
        try:
            url = urlsplit(request.target)
        except ValueError:
            raise _Refusal(400, "malformed request target") from None
        if url.scheme.lower() != "http":
            raise _Refusal(
                400, f"only http:// requests and CONNECT are proxied, not {url.scheme!r}"
            )
        if request.header("content-length") not in (None, "0") or request.header(
            "transfer-encoding"
        ):
            raise _Refusal(400, "requests with a body are not proxied")
        authority = url.netloc.rpartition("@")[2]
        host, port = _authority(authority, 80)
        # Headers the client named in Connection are hop-by-hop too.
        named = {
            token.strip().lower()
            for name, value in request.headers
            if name.lower() == "connection"
            for token in value.split(",")
        }
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        lines = [f"{request.method} {target} HTTP/1.1", f"Host: {authority}"]
        for name, value in request.headers:
            lowered = name.lower()
            if lowered not in _HOP_HEADERS and lowered != "host" and lowered not in named:
                lines.append(f"{name}: {value}")
        lines.append("Connection: close")
        return host, port, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _connect(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Resolve `host` once, check every address, connect to one of those same addresses."""
        try:
            addresses = await allowed_addresses(host, self._policy(), self._resolve)
        except BlockedAddress as exc:
            raise _Refusal(403, str(exc), blocked=True) from None
        except SourceError as exc:
            raise _Refusal(502, str(exc)) from None
        failure = "no address"
        for address in addresses:
            try:
                async with asyncio.timeout(self.connect_timeout):
                    if self._upstream is not None:
                        return await self._tunnel(self._upstream, address, port)
                    return await asyncio.open_connection(address, port, limit=HEAD_LIMIT)
            except (OSError, TimeoutError) as exc:
                failure = getattr(exc, "strerror", None) or type(exc).__name__
        raise _Refusal(502, f"cannot connect to {host} port {port}: {failure}")

    @staticmethod
    async def _tunnel(
        upstream: ProxyParts, address: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to `address` through the upstream HTTP proxy (a CONNECT tunnel)."""
        try:
            reader, writer = await asyncio.open_connection(
                upstream.host, upstream.port, limit=HEAD_LIMIT
            )
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise _Refusal(
                502,
                f"cannot reach the upstream proxy {upstream.host} port {upstream.port}: {reason}",
            ) from None
        try:
            authority = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
            lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
            if upstream.username:
                pair = f"{upstream.username}:{upstream.password}".encode()
                lines.append(f"Proxy-Authorization: Basic {base64.b64encode(pair).decode()}")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            await writer.drain()
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                raise _Refusal(502, "the upstream proxy gave no answer to CONNECT") from None
            status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
            parts = status_line.split(" ", 2)
            if len(parts) < 2 or not parts[1].startswith("2"):
                raise _Refusal(502, f"the upstream proxy refused the tunnel: {status_line[:100]}")
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _client_first(
        self, reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter
    ) -> None:
        """Hold a tunnel's server bytes until the client has spoken (TLS does at once), or for
        `server_first_delay` (FTP's server greets first): aria2 reads our 200 answer and drops
        whatever came in the same read, so the greeting must not arrive with it."""
        try:
            first = await asyncio.wait_for(reader.read(_CHUNK), self.server_first_delay)
        except TimeoutError:
            return
        up_writer.write(first)

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        *,
        both_ways: bool,
    ) -> None:
        """Pass bytes until either side ends. One plain request per connection: its answer goes
        back with `Connection: close`, and what aria2 sends after it is not passed on."""
        up_reader, up_writer = upstream
        try:
            if not both_ways:
                await self._answer_head(up_reader, writer)
            sending = asyncio.create_task(_pipe(reader, up_writer if both_ways else None))
            receiving = asyncio.create_task(_pipe(up_reader, writer))
            try:
                await asyncio.wait((sending, receiving), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sending, receiving):
                    task.cancel()
                await asyncio.gather(sending, receiving, return_exceptions=True)
        finally:
            up_writer.close()
            with contextlib.suppress(OSError):
                await up_writer.wait_closed()

    @staticmethod
    async def _answer_head(up_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await up_reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise _Refusal(502, f"response head larger than {HEAD_LIMIT} bytes") from None
        except asyncio.IncompleteReadError:
            raise _Refusal(502, "the server closed the connection without an answer") from None
        lines = head.decode("latin-1").split("\r\n")
        kept = [lines[0]] + [
            line
            for line in lines[1:]
            if line and line.partition(":")[0].strip().lower() not in _HOP_HEADERS
        ]
        writer.write(("\r\n".join([*kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1"))

    async def _refuse(
        self, writer: asyncio.StreamWriter, refusal: _Refusal, download_id: int | None
    ) -> None:
        log = logger.bind(job=download_id) if download_id is not None else logger
        if refusal.blocked and download_id is not None:
            log.warning("egress refused for download {}: {}", download_id, refusal.reason)
            try:
                await self._on_refused(download_id, refusal.reason)
            except Exception:  # the answer is still a refusal
                log.exception("recording the refusal of download {} failed", download_id)
        else:
            log.info("egress proxy answered {}: {}", refusal.status, refusal.reason)
        body = (refusal.reason + "\n").encode()
        head = [
            f"HTTP/1.1 {refusal.status} {_REASONS[refusal.status]}",
            "Content-Type: text/plain; charset=utf-8",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        if refusal.status == 407:
            head.append('Proxy-Authenticate: Basic realm="mistrelay"')
        with contextlib.suppress(ConnectionError):
            writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
            await writer.drain()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None) -> None:
    """Copy until end of stream; with no writer, read and drop (the client's side of a plain
    request, watched only for its end)."""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(_CHUNK):
            if writer is not None:
                writer.write(chunk)
                await writer.drain()
