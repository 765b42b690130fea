"""Real clouds on 127.0.0.1 for tests and benchmarks: rclone serving a local folder.

- :class:`RcloneCloud` runs ``rclone serve webdav`` or ``rclone serve sftp`` on a folder
  (``root``, the server side: tests read uploaded bytes there or plant damage) as a child process
  known by its PID, with :meth:`RcloneCloud.stop` / :meth:`RcloneCloud.start` to make the cloud go
  away and come back on the same port and folder.
- Fixtures: ``rclone_config`` (an rclone config file in ``tmp_path``), ``webdav_cloud``
  (remote ``testdav``), ``sftp_cloud`` (remote ``testsftp``; md5/sha1 available),
  ``sftp_bad_password_remote`` (remote ``testsftp-badpass``: the same server, a wrong password)
  and ``full_webdav_cloud`` (remote ``testfull``: a small WebDAV endpoint that answers every
  upload with ``507 Insufficient Storage``, as a full WebDAV cloud does; ``rclone serve webdav``
  itself on a full disk answers ``405 Method Not Allowed``, which tells a client nothing).
- Outside pytest (benchmarks): :func:`start_webdav` and :func:`start_sftp`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

_READY_TIMEOUT_SECONDS = 20.0
_STOP_GRACE_SECONDS = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def add_remote(config_path: Path, name: str, options: Mapping[str, str]) -> None:
    """Append the section ``[name]`` with ``options`` to the rclone config file."""
    lines = [f"\n[{name}]"] + [f"{key} = {value}" for key, value in options.items()]
    with config_path.open("a", encoding="utf-8") as config:
        config.write("\n".join(lines) + "\n")


async def obscure(password: str, executable: str = "rclone") -> str:
    """``rclone obscure``: the form rclone config files keep passwords in."""
    process = await asyncio.create_subprocess_exec(
        executable,
        "obscure",
        "--",  # a password may start with "-"
        password,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=10)
    if process.returncode != 0:
        raise RuntimeError(f"rclone obscure failed: {stderr.decode(errors='replace')}")
    return stdout.decode().strip()


@dataclass
class RcloneCloud:
    """One ``rclone serve webdav|sftp`` on 127.0.0.1, serving ``root`` as remote ``remote``."""

    kind: str  # "webdav" or "sftp"
    root: Path
    remote: str
    port: int
    log_path: Path
    user: str | None = None
    password: str | None = None
    executable: str = "rclone"
    process: asyncio.subprocess.Process | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def _command(self) -> list[str]:
        # The server needs no remotes: a config path that does not exist keeps it off the user's.
        command = [
            self.executable,
            "--config",
            str(self.log_path.with_suffix(".no-config")),
            "serve",
            self.kind,
            str(self.root),
            "--addr",
            f"127.0.0.1:{self.port}",
            # Show changes made to `root` behind the server's back (planted damage) at once.
            "--dir-cache-time",
            "0s",
        ]
        if self.user is not None and self.password is not None:
            command += ["--user", self.user, "--pass", self.password]
        return command

    async def start(self) -> None:
        """Start serving (again, on the same port and folder); returns once the port answers."""
        if self.running:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *self._command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
        while not await asyncio.to_thread(_port_open, "127.0.0.1", self.port):
            if self.process.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"rclone serve {self.kind} did not start:\n{tail}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        """Stop the server by its PID (SIGTERM, then SIGKILL); open connections drop."""
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=_STOP_GRACE_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await process.wait()


async def start_webdav(
    root: Path, config_path: Path, name: str, *, executable: str = "rclone"
) -> RcloneCloud:
    """Serve ``root`` over WebDAV on a free loopback port and add remote ``name`` for it.

    The server's log goes next to ``config_path``. Stop it with ``await cloud.stop()``.
    """
    port = free_port()
    cloud = RcloneCloud(
        kind="webdav",
        root=root,
        remote=name,
        port=port,
        log_path=config_path.parent / f"{name}-server.log",
        executable=executable,
    )
    await cloud.start()
    add_remote(
        config_path,
        name,
        {"type": "webdav", "url": f"http://127.0.0.1:{port}", "vendor": "other"},
    )
    return cloud


async def start_sftp(
    root: Path, config_path: Path, name: str, *, executable: str = "rclone"
) -> RcloneCloud:
    """Serve ``root`` over SFTP (random password) on a free loopback port; add remote ``name``."""
    port = free_port()
    password = secrets.token_hex(12)  # never starts with "-", which rclone would read as a flag
    cloud = RcloneCloud(
        kind="sftp",
        root=root,
        remote=name,
        port=port,
        log_path=config_path.parent / f"{name}-server.log",
        user="relay",
        password=password,
        executable=executable,
    )
    await cloud.start()
    add_remote(
        config_path,
        name,
        {
            "type": "sftp",
            "host": "127.0.0.1",
            "port": str(port),
            "user": "relay",
            "pass": await obscure(password, executable),
        },
    )
    return cloud


# --------------------------------------------------------------------------- a full cloud

_DIRECTORY_PROPFIND = """<?xml version="1.0" encoding="utf-8"?>
<D:multistatus xmlns:D="DAV:"><D:response><D:href>{href}</D:href><D:propstat><D:prop>
<D:resourcetype><D:collection/></D:resourcetype>
<D:getlastmodified>Mon, 01 Jan 2024 00:00:00 GMT</D:getlastmodified>
</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat></D:response></D:multistatus>"""


@dataclass
class FullWebdavCloud:
    """A WebDAV endpoint with no space left: folders can be made, every PUT gets 507."""

    remote: str
    port: int
    runner: web.AppRunner
    rejected_uploads: list[str] = field(default_factory=list)

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_full_webdav(config_path: Path, name: str) -> FullWebdavCloud:
    directories = {"/"}
    rejected: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path if request.path.endswith("/") else request.path + "/"
        if request.method == "PROPFIND":
            if path in directories:
                return web.Response(
                    status=207,
                    text=_DIRECTORY_PROPFIND.format(href=path),
                    content_type="application/xml",
                )
            return web.Response(status=404)
        if request.method == "MKCOL":
            directories.add(path)
            return web.Response(status=201)
        if request.method == "PUT":
            # Read the body as a real server would before deciding, then refuse it.
            while await request.content.read(65536):
                pass
            rejected.append(request.path)
            return web.Response(status=507, reason="Insufficient Storage")
        return web.Response(status=405)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    add_remote(
        config_path,
        name,
        {"type": "webdav", "url": f"http://127.0.0.1:{port}", "vendor": "other"},
    )
    return FullWebdavCloud(remote=name, port=port, runner=runner, rejected_uploads=rejected)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def rclone_config(tmp_path: Path) -> Path:
    """An rclone config file in ``tmp_path`` (empty until cloud fixtures add their remotes)."""
    config_path = tmp_path / "rclone.conf"
    config_path.write_text("# rclone remotes for this test\n", encoding="utf-8")
    return config_path


@pytest_asyncio.fixture
async def webdav_cloud(rclone_config: Path, tmp_path: Path) -> AsyncIterator[RcloneCloud]:
    """``rclone serve webdav`` as remote ``testdav`` (no hashes: verification by size)."""
    cloud = await start_webdav(tmp_path / "webdav-root", rclone_config, "testdav")
    try:
        yield cloud
    finally:
        await cloud.stop()


@pytest_asyncio.fixture
async def sftp_cloud(rclone_config: Path, tmp_path: Path) -> AsyncIterator[RcloneCloud]:
    """``rclone serve sftp`` as remote ``testsftp`` (md5 and sha1 available)."""
    cloud = await start_sftp(tmp_path / "sftp-root", rclone_config, "testsftp")
    try:
        yield cloud
    finally:
        await cloud.stop()


@pytest_asyncio.fixture
async def sftp_bad_password_remote(sftp_cloud: RcloneCloud, rclone_config: Path) -> str:
    """Remote ``testsftp-badpass``: the ``sftp_cloud`` server with a wrong password."""
    name = "testsftp-badpass"
    add_remote(
        rclone_config,
        name,
        {
            "type": "sftp",
            "host": "127.0.0.1",
            "port": str(sftp_cloud.port),
            "user": sftp_cloud.user or "relay",
            "pass": await obscure("not-the-password"),
        },
    )
    return name


@pytest_asyncio.fixture
async def full_webdav_cloud(rclone_config: Path) -> AsyncIterator[FullWebdavCloud]:
    """Remote ``testfull``: a WebDAV cloud out of space (every upload gets 507)."""
    cloud = await start_full_webdav(rclone_config, "testfull")
    try:
        yield cloud
    finally:
        await cloud.stop()
