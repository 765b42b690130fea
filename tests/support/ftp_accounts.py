"""A real FTP server with a user and a password, for end-to-end FTP downloads: pyftpdlib run as a
child process (known by its PID, stopped by it) on 127.0.0.1, serving a folder read-only.

The minimal hand-written server in `ftp_server.py` accepts any login and serves one file under
every path; this one refuses a wrong password (530) and a missing file (550), as FTP servers do.

Its `226 Transfer complete` comes 0.1 s after the data connection closes. aria2 1.36 sits at
100 % until its `timeout` (60 s by default), then completes, when that reply reaches it in the
same read as the `125` that opened the transfer: on loopback, with a file sent in a millisecond,
that happens in about a third of the downloads. Servers across a real network answer later than
the data's last byte; the delay gives loopback the same order.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tests.support.processes import free_port

_READY_SECONDS = 15.0
_PASSWORD_VARIABLE = "TEST_FTP_PASSWORD"  # not on the command line
_WORKTREE = Path(__file__).resolve().parents[2]  # where `python -m tests.support...` runs


@dataclass
class FtpAccountServer:
    root: Path  # the served folder: tests put files here
    user: str
    password: str
    port: int = 0
    pid: int | None = None
    _process: asyncio.subprocess.Process | None = None

    def url(self, path: str, *, password: str | None = None, host: str = "127.0.0.1") -> str:
        """An ftp:// link to `path` with the user and `password` (the right one by default)."""
        secret = self.password if password is None else password
        credentials = f"{quote(self.user, safe='')}:{quote(secret, safe='')}@"
        return f"ftp://{credentials}{host}:{self.port}/{path.lstrip('/')}"

    async def start(self) -> None:
        self.port = free_port()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            __name__,
            str(self.root),
            str(self.port),
            self.user,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, _PASSWORD_VARIABLE: self.password},
            cwd=_WORKTREE,
        )
        self.pid = self._process.pid
        deadline = time.monotonic() + _READY_SECONDS
        while not await asyncio.to_thread(_port_open, self.port):
            if self._process.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"the FTP server did not listen on port {self.port}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self._process is None or self.pid is None:
            return
        if self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self._process.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                await self._process.wait()
        self._process = None


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextlib.asynccontextmanager
async def running_ftp_account_server(
    root: Path, user: str = "relay", password: str = "s3cret:/@pass"
) -> AsyncIterator[FtpAccountServer]:
    await asyncio.to_thread(root.mkdir, parents=True, exist_ok=True)
    server = FtpAccountServer(root, user, password)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def main(root: str, port: str, user: str) -> None:
    """The server process (imported here only: pyftpdlib's modules warn on import)."""
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    class _LateCompletionHandler(FTPHandler):
        def respond(self, resp: str, *args: Any, **kwargs: Any) -> None:
            if resp.startswith("226"):
                time.sleep(0.1)  # see the module's doc
            super().respond(resp, *args, **kwargs)

    authorizer = DummyAuthorizer()
    authorizer.add_user(user, os.environ[_PASSWORD_VARIABLE], root, perm="elr")
    _LateCompletionHandler.authorizer = authorizer
    FTPServer(("127.0.0.1", int(port)), _LateCompletionHandler).serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:4])
