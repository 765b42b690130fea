"""A small counting proxy on 127.0.0.1 for tests: HTTP (absolute-form requests and CONNECT) and
SOCKS5 on one port, told apart by the first byte a client sends.

With `user` set, every request must carry that user and `password` (HTTP Basic in
`Proxy-Authorization`, or SOCKS5's user/password method); others are refused (407, or SOCKS5's
failed authentication) and counted in `refused`. Every request let through is recorded in
`passed` as `(kind, host, port)` and the bytes it carried back in `bytes_down`. Host names ending
in `.test` stand for 127.0.0.1, so that a client which never proxies loopback names (Go's HTTP
client) sends its requests here; other names and addresses are used as they are.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_CHUNK = 64 * 1024


@dataclass
class CountingProxy:
    user: str = ""
    password: str = ""
    passed: list[tuple[str, str, int]] = field(default_factory=list)
    refused: int = 0
    bytes_down: int = 0
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def url(self, scheme: str = "http", *, password: str | None = None) -> str:
        """This proxy's URL with its credentials (`password` replaces the right one)."""
        secret = self.password if password is None else password
        credentials = f"{self.user}:{secret}@" if self.user else ""
        return f"{scheme}://{credentials}127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            first = await reader.readexactly(1)
            if first == b"\x05":
                await self._socks5(reader, writer)
            else:
                await self._http(first, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    @staticmethod
    def _address(host: str) -> str:
        return "127.0.0.1" if host.endswith(".test") else host

    def _authorized(self, user: str, password: str) -> bool:
        if not self.user or (user, password) == (self.user, self.password):
            return True
        self.refused += 1
        return False

    # --- HTTP -------------------------------------------------------------------------------

    async def _http(
        self, first: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        head = first + await reader.readuntil(b"\r\n\r\n")
        line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = line.split(" ")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (h.partition(":") for h in lines if h)
        }
        scheme, _, encoded = headers.get("proxy-authorization", "").partition(" ")
        user, _, password = (
            base64.b64decode(encoded).decode().partition(":")
            if scheme.lower() == "basic"
            else ("", "", "")
        )
        if not self._authorized(user, password):
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n'
                b"Connection: close\r\n\r\n"
            )
            await writer.drain()
            return
        if method == "CONNECT":
            host, _, port_text = target.rpartition(":")
            host = host.strip("[]")
            up_reader, up_writer = await asyncio.open_connection(
                self._address(host), int(port_text)
            )
            self.passed.append(("connect", host, int(port_text)))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await self._client_first(reader, up_writer)
            await self._relay(reader, writer, up_reader, up_writer)
            return
        url = urlsplit(target)
        assert url.hostname is not None, target
        port = url.port or 80
        up_reader, up_writer = await asyncio.open_connection(self._address(url.hostname), port)
        self.passed.append(("http", url.hostname, port))
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        kept = [
            f"{name}: {value}"
            for name, value in headers.items()
            if name not in ("proxy-authorization", "proxy-connection", "connection")
        ]
        request = "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close"])
        up_writer.write((request + "\r\n\r\n").encode("latin-1"))
        # A request with a body (a WebDAV upload) sends it after the head: pass it on too.
        await self._relay(reader, writer, up_reader, up_writer)

    @staticmethod
    async def _client_first(reader: asyncio.StreamReader, up_writer: asyncio.StreamWriter) -> None:
        """Hold the server's first bytes until the client spoke, or 0.25 s: aria2 drops what
        arrives in the same read as the 200 (an FTP server's greeting), as a proxy across a
        network seldom sends it that soon."""
        with contextlib.suppress(TimeoutError):
            up_writer.write(await asyncio.wait_for(reader.read(_CHUNK), 0.25))

    # --- SOCKS5 (RFC 1928, user/password: RFC 1929) -------------------------------------------

    async def _socks5(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count = (await reader.readexactly(1))[0]
        methods = await reader.readexactly(count)
        wanted = 0x02 if self.user else 0x00
        if wanted not in methods:
            self.refused += 1
            writer.write(b"\x05\xff")
            return
        writer.write(bytes([5, wanted]))
        if wanted == 0x02:
            _version, user_length = await reader.readexactly(2)
            user = (await reader.readexactly(user_length)).decode()
            password_length = (await reader.readexactly(1))[0]
            password = (await reader.readexactly(password_length)).decode()
            ok = self._authorized(user, password)
            writer.write(b"\x01\x00" if ok else b"\x01\x01")
            if not ok:
                return
        _version, command, _reserved, kind = await reader.readexactly(4)
        if kind == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif kind == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        else:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        (port,) = struct.unpack("!H", await reader.readexactly(2))
        if command != 1:  # CONNECT only
            writer.write(b"\x05\x07\x00\x01" + bytes(6))
            return
        up_reader, up_writer = await asyncio.open_connection(self._address(host), port)
        self.passed.append(("socks5", host, port))
        writer.write(b"\x05\x00\x00\x01" + bytes(6))
        await writer.drain()
        await self._relay(reader, writer, up_reader, up_writer)

    # --- both ---------------------------------------------------------------------------------

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        up_reader: asyncio.StreamReader,
        up_writer: asyncio.StreamWriter,
    ) -> None:
        async def pipe(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, down: bool
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while chunk := await source.read(_CHUNK):
                    if down:
                        self.bytes_down += len(chunk)
                    sink.write(chunk)
                    await sink.drain()
            with contextlib.suppress(OSError):
                if sink.can_write_eof():
                    sink.write_eof()

        # The exchange ends when the server's side does (it answers with Connection: close).
        sending = asyncio.create_task(pipe(reader, up_writer, down=False))
        try:
            await pipe(up_reader, writer, down=True)
        finally:
            sending.cancel()
            await asyncio.gather(sending, return_exceptions=True)
            up_writer.close()
            with contextlib.suppress(OSError):
                await up_writer.wait_closed()


@contextlib.asynccontextmanager
async def running_proxy(user: str = "", password: str = "") -> AsyncIterator[CountingProxy]:
    proxy = CountingProxy(user, password)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
