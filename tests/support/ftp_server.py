"""A minimal passive-mode FTP server on 127.0.0.1 serving one file, for download tests.

It speaks what a download client needs (USER, PASS, TYPE, PWD, CWD, SIZE, MDTM, PASV, EPSV,
REST, RETR, QUIT) and records the commands it received.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class FtpServer:
    """Serves `data` under any path; `commands` lists what clients sent, in order."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.commands: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._data_servers: list[asyncio.Server] = []

    def url(self, path: str) -> str:
        return f"ftp://127.0.0.1:{self.port}/{path.lstrip('/')}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._control, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        for server in [*self._data_servers, self._server]:
            if server is not None:
                server.close()
                with contextlib.suppress(Exception):
                    await server.wait_closed()

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

        async def accept(_: asyncio.StreamReader, data_writer: asyncio.StreamWriter) -> None:
            await connections.put(data_writer)

        async def send(line: str) -> None:
            writer.write(f"{line}\r\n".encode())
            await writer.drain()

        offset = 0
        try:
            await send("220 ready")
            while line := (await asyncio.wait_for(reader.readline(), 30)).decode().strip():
                self.commands.append(line)
                command, _, argument = line.partition(" ")
                command = command.upper()
                if command == "USER":
                    await send("331 password please")
                elif command in ("PASS", "TYPE"):
                    await send("230 ok" if command == "PASS" else "200 ok")
                elif command == "PWD":
                    await send('257 "/"')
                elif command == "CWD":
                    await send("250 ok")
                elif command == "SIZE":
                    await send(f"213 {len(self.data)}")
                elif command == "MDTM":
                    await send("213 20200101000000")
                elif command == "REST":
                    offset = int(argument)
                    await send("350 ok")
                elif command in ("PASV", "EPSV"):
                    data_server = await asyncio.start_server(accept, "127.0.0.1", 0)
                    self._data_servers.append(data_server)
                    port = int(data_server.sockets[0].getsockname()[1])
                    await send(
                        f"229 Entering Extended Passive Mode (|||{port}|)"
                        if command == "EPSV"
                        else f"227 Entering Passive Mode (127,0,0,1,{port >> 8},{port & 255})"
                    )
                elif command == "RETR":
                    await send("150 sending")
                    data_writer = await asyncio.wait_for(connections.get(), 10)
                    data_writer.write(self.data[offset:])
                    await data_writer.drain()
                    data_writer.close()
                    await send("226 done")
                elif command == "QUIT":
                    await send("221 bye")
                    break
                else:
                    await send("502 not implemented")
        except (ConnectionError, TimeoutError, ValueError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def running_ftp_server(data: bytes) -> AsyncIterator[FtpServer]:
    """An FTP server serving `data`, stopped on the way out."""
    server = FtpServer(data)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


__all__ = ["FtpServer", "running_ftp_server"]
