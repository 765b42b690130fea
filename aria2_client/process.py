"""The aria2c process MistRelay runs for itself: configuration, start, stop, and supervision.

The RPC secret and every option live in a configuration file (mode 0600) in the data folder, so the
secret never appears on aria2c's command line (which any local user can read in /proc). aria2c is
told to exit when this process dies (`stop-with-process`), so a crash of MistRelay leaves no orphan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from loguru import logger

from aria2_client.client import Aria2Client
from aria2_client.transport import Aria2RpcError, Aria2Transport, Aria2Unavailable
from configer import ARIA2_SECRET_FILE, Aria2Config, child_environment

CONF_NAME = "aria2.conf"
SESSION_NAME = "aria2.session"
LOG_NAME = "aria2.log"
CONSOLE_LOG_NAME = "aria2.console.log"
CONSOLE_LOG_MAX_BYTES = 1024 * 1024

# Options MistRelay must control itself: a caller's extra_options may not replace these.
PROTECTED_OPTIONS = frozenset(
    {
        "enable-rpc",
        "rpc-secret",
        "rpc-listen-port",
        "rpc-listen-all",
        "conf-path",
        "input-file",
        "save-session",
        "stop-with-process",
        "daemon",
    }
)


class Aria2StartError(RuntimeError):
    """aria2c exited, or did not answer RPC in time, while starting."""


def new_secret() -> str:
    """A fresh random RPC secret (URL-safe, no characters a configuration file would mangle)."""
    return secrets.token_urlsafe(32)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _check_conf_text(label: str, text: str) -> None:
    if any(ch in text for ch in "\r\n\x00") or text != text.strip():
        raise ValueError(f"aria2 {label} must be one line without surrounding spaces")


class EmbeddedAria2:
    """One aria2c child process listening for JSON-RPC on 127.0.0.1 only."""

    def __init__(
        self,
        *,
        download_dir: Path,
        data_dir: Path,
        secret: str,
        executable: str = "aria2c",
        port: int = 0,
        max_concurrent_downloads: int = 5,
        extra_options: Mapping[str, str] | None = None,
        start_timeout: float = 10.0,
        restart_backoff_initial: float = 0.2,
        restart_backoff_max: float = 10.0,
        stable_after: float = 60.0,
    ) -> None:
        if not secret:
            raise ValueError("aria2 RPC secret must not be empty")
        _check_conf_text("secret", secret)
        for key, value in (extra_options or {}).items():
            _check_conf_text("option name", key)
            _check_conf_text(f"option {key}", str(value))
            if key in PROTECTED_OPTIONS:
                raise ValueError(f"aria2 option {key} is managed by MistRelay")
        self.download_dir = Path(download_dir)
        self.data_dir = Path(data_dir)
        self.secret = secret
        self.executable = executable
        self.port = port or free_port()
        self.max_concurrent_downloads = max_concurrent_downloads
        self.extra_options = dict(extra_options or {})
        self.start_timeout = start_timeout
        self.restart_backoff_initial = restart_backoff_initial
        self.restart_backoff_max = restart_backoff_max
        self.stable_after = stable_after

        self.conf_path = self.data_dir / CONF_NAME
        self.session_path = self.data_dir / SESSION_NAME
        self.log_path = self.data_dir / LOG_NAME
        self.console_log_path = self.data_dir / CONSOLE_LOG_NAME

        self.restarts = 0
        self._process: asyncio.subprocess.Process | None = None
        self._started_at = 0.0
        # True until start() and after stop(): an exit then is expected, not a crash.
        self._closed = True
        self._closed_event = asyncio.Event()
        self._lifecycle = asyncio.Lock()
        self._log = logger.bind(aria2_port=self.port)

    def __repr__(self) -> str:
        return f"EmbeddedAria2(port={self.port}, pid={self.pid}, running={self.running})"

    # -- facts ---------------------------------------------------------------------------------

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jsonrpc"

    @property
    def pid(self) -> int | None:
        """PID of the running aria2c; None when it is not running."""
        return self._process.pid if self.running and self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def options(self) -> dict[str, str]:
        """The options written to the configuration file for the next start."""
        options: dict[str, str] = {
            "enable-rpc": "true",
            "rpc-listen-all": "false",
            "rpc-listen-port": str(self.port),
            "rpc-allow-origin-all": "false",
            "rpc-secret": self.secret,
            # Without it, torrents added by addTorrent are missing from the session file.
            "rpc-save-upload-metadata": "true",
            # Large multi-file torrents arrive base64-encoded in one request; 2 MiB is too small.
            "rpc-max-request-size": "64M",
            "stop-with-process": str(os.getpid()),
            "save-session": str(self.session_path),
            # A killed aria2c resumes from what these saves recorded: the session brings a job
            # back under its gid, and each download's control file (name.aria2, written at its
            # start) says which of its bytes are on disk. aria2 rewrites control files only
            # every 60 s by default, so a job killed in its first minute started again from
            # byte 0; saved every second, at most about a second's worth is fetched again.
            "save-session-interval": "1",
            "auto-save-interval": "1",
            "force-save": "false",
            "max-download-result": "10000",
            "keep-unfinished-download-result": "true",
            "continue": "true",
            "dir": str(self.download_dir),
            "max-concurrent-downloads": str(self.max_concurrent_downloads),
            # Two jobs with the same file name must not share one file: keep aria2's renaming
            # ("name.1.ext") and never overwrite.
            "auto-file-renaming": "true",
            "allow-overwrite": "false",
            # aria2's default (prealloc) writes every byte once before downloading: minutes of
            # delay for big files. falloc fails outright on filesystems without fallocate
            # (several network and FUSE mounts). none starts at once everywhere; a full disk is
            # then reported when it happens, as the download's error.
            "file-allocation": "none",
            "disable-ipv6": "false",
            "dht-file-path": str(self.data_dir / "dht.dat"),
            "dht-file-path6": str(self.data_dir / "dht6.dat"),
            "summary-interval": "0",
            "show-console-readout": "false",
            "enable-color": "false",
            "console-log-level": "warn",
            "log": str(self.log_path),
            "log-level": "warn",
        }
        if self.session_path.exists():
            options["input-file"] = str(self.session_path)
        options.update({k: str(v) for k, v in self.extra_options.items()})
        return options

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn aria2c and return once it answers `aria2.getVersion` (else Aria2StartError)."""
        async with self._lifecycle:
            self._closed = False
            self._closed_event.clear()
            await self._start_locked()

    async def stop(self, timeout: float = 10) -> None:
        """Save the session, then SIGTERM aria2c; SIGKILL it if it has not exited in `timeout`."""
        async with self._lifecycle:
            self._closed = True
            self._closed_event.set()
            await self._stop_locked(timeout)

    async def restart(self, timeout: float = 10) -> None:
        """Stop and start again on the same port; the session file brings the jobs back."""
        async with self._lifecycle:
            await self._stop_locked(timeout)
            self._closed = False
            self._closed_event.clear()
            await self._start_locked()

    async def wait_exit(self) -> int:
        """Wait for the current aria2c to exit; returns its exit code."""
        if self._process is None:
            raise RuntimeError("aria2c was never started")
        return await self._process.wait()

    async def __aenter__(self) -> EmbeddedAria2:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def write_conf(self) -> None:
        """Write the configuration file, readable by its owner only."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = [f"{key}={value}" for key, value in self.options().items()]
        fd = os.open(self.conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, ("\n".join(lines) + "\n").encode())
        finally:
            os.close(fd)

    async def _start_locked(self) -> None:
        if self.running:
            return
        self.download_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.write_conf()
        console_offset = self._prepare_console_log()
        console = os.open(self.console_log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            process = await asyncio.create_subprocess_exec(
                self.executable,
                f"--conf-path={self.conf_path}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=console,
                stderr=asyncio.subprocess.STDOUT,
                env=child_environment(),
                # Its session (stream links with their signatures), control files, log and the
                # downloads themselves are for the service's user only.
                umask=0o077,
                # Ctrl-C in a terminal signals the whole foreground group: keep aria2c out of it
                # so that MistRelay saves the session and stops it in order
                # (--stop-with-process still ends it if MistRelay dies).
                start_new_session=True,
            )
        except OSError as exc:
            raise Aria2StartError(f"cannot run {self.executable}: {exc}") from None
        finally:
            os.close(console)
        self._process = process
        self._started_at = time.monotonic()
        self._log = logger.bind(aria2_port=self.port, aria2_pid=process.pid)
        try:
            await self._wait_ready(process, console_offset)
        except BaseException:
            await self._terminate(process, timeout=2)
            raise
        self._log.info("aria2c {} answering on 127.0.0.1:{}", process.pid, self.port)

    def _prepare_console_log(self) -> int:
        try:
            size = self.console_log_path.stat().st_size
        except FileNotFoundError:
            return 0
        if size > CONSOLE_LOG_MAX_BYTES:
            self.console_log_path.write_bytes(b"")
            return 0
        return size

    def console_tail(self, offset: int = 0, limit: int = 2000) -> str:
        """The end of what aria2c printed since `offset` (its console never holds the secret)."""
        try:
            with open(self.console_log_path, "rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except OSError:
            return ""
        text = data.decode("utf-8", "replace").strip()
        text = "\n".join(line for line in text.splitlines() if line.strip())
        return text[-limit:]

    async def _wait_ready(self, process: asyncio.subprocess.Process, console_offset: int) -> None:
        deadline = time.monotonic() + self.start_timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
            while True:
                if process.returncode is not None:
                    tail = self.console_tail(console_offset)
                    raise Aria2StartError(
                        f"aria2c exited with code {process.returncode} while starting"
                        + (f":\n{tail}" if tail else "")
                    )
                if await self._rpc_answers(session, "aria2.getVersion"):
                    return
                if time.monotonic() >= deadline:
                    tail = self.console_tail(console_offset)
                    raise Aria2StartError(
                        f"aria2c did not answer RPC on 127.0.0.1:{self.port} within "
                        f"{self.start_timeout} s" + (f":\n{tail}" if tail else "")
                    )
                await asyncio.sleep(0.05)

    async def _rpc_answers(self, session: aiohttp.ClientSession, method: str) -> bool:
        payload = {
            "jsonrpc": "2.0",
            "id": "mistrelay",
            "method": method,
            "params": [f"token:{self.secret}"],
        }
        try:
            async with session.post(self.rpc_url, json=payload) as response:
                body: Any = await response.json(content_type=None)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return False
        return isinstance(body, dict) and "result" in body

    async def _stop_locked(self, timeout: float) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        try:
            async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=min(3.0, timeout))
            ) as session:
                if not await self._rpc_answers(session, "aria2.saveSession"):
                    self._log.warning("aria2c did not save its session before stopping")
        except Exception as exc:  # the stop must go on whatever the save did
            self._log.warning("aria2c session save failed: {}", type(exc).__name__)
        await self._terminate(process, timeout)

    async def _terminate(self, process: asyncio.subprocess.Process, timeout: float) -> None:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            if not await _exited_within(process, timeout):
                self._log.warning(
                    "aria2c {} ignored SIGTERM for {} s; killing it", process.pid, timeout
                )
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                if not await _exited_within(process, 5):
                    self._log.error("aria2c {} did not exit after SIGKILL", process.pid)
                    return
        self._log.info("aria2c {} exited with code {}", process.pid, process.returncode)

    # -- supervision ---------------------------------------------------------------------------

    async def supervise(self, on_restart: Callable[[], Awaitable[None]]) -> None:
        """Restart aria2c whenever it dies unexpectedly, then await `on_restart`.

        Returns when `stop()` is called. Restarts back off (doubling, capped) while aria2c keeps
        dying soon after each start.
        """
        delay = self.restart_backoff_initial
        while True:
            process = self._process
            if self._closed or process is None:
                return
            await process.wait()
            async with self._lifecycle:
                if self._closed:
                    return
                if self._process is not process:
                    continue  # replaced by restart(): watch the new one
                ran_for = time.monotonic() - self._started_at
                self._log.warning(
                    "aria2c {} died unexpectedly (code {}) after {:.1f} s",
                    process.pid,
                    process.returncode,
                    ran_for,
                )
            if ran_for >= self.stable_after:
                delay = self.restart_backoff_initial
            while True:
                if await self._closed_within(delay):
                    return
                delay = min(delay * 2, self.restart_backoff_max)
                async with self._lifecycle:
                    if self._closed:
                        return
                    if self._process is not process and self.running:
                        break  # someone else already started a new one
                    try:
                        await self._start_locked()
                    except Aria2StartError as exc:
                        self._log.error("aria2c restart failed: {}", exc)
                        continue
                    self.restarts += 1
                break
            try:
                await on_restart()
            except Exception:
                self._log.opt(exception=True).error("aria2c restart callback failed")

    async def _closed_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._closed_event.wait()
        except TimeoutError:
            return False
        return True


async def _exited_within(process: asyncio.subprocess.Process, seconds: float) -> bool:
    """Bounded wait for a child's exit (asyncio.timeout: wait_for may swallow a cancel on 3.11)."""
    try:
        async with asyncio.timeout(seconds):
            await asyncio.shield(process.wait())
    except TimeoutError:
        return False
    return True


# --- the aria2 of a service running elsewhere --------------------------------------------------


def _read_conf(path: Path) -> dict[str, str] | None:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    options: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.lstrip().startswith("#"):
            options[key.strip()] = value.strip()
    return options


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


async def _where_running(config: Aria2Config, data_dir: Path) -> tuple[str, str | None] | str:
    """The RPC url and secret of the service's aria2, or why there is none to look for."""
    if config.rpc_url:
        secret: str | None = config.rpc_secret or (
            await asyncio.to_thread(_read_secret, data_dir / ARIA2_SECRET_FILE)
        )
        return config.rpc_url, secret
    options = await asyncio.to_thread(_read_conf, data_dir / CONF_NAME)
    if options is None or not options.get("rpc-listen-port"):
        return "the service has not run with this data folder"
    return f"http://127.0.0.1:{options['rpc-listen-port']}/jsonrpc", options.get("rpc-secret")


@contextlib.asynccontextmanager
async def running_aria2(
    config: Aria2Config, data_dir: Path
) -> AsyncIterator[tuple[Aria2Client | None, str]]:
    """The aria2 of a service using `data_dir` (its own aria2c, or `aria2.rpc_url`), if it answers.

    Yields a connected client and where it is, or None and why not; the connection is closed on
    the way out. For maintenance commands run beside (or without) the service.
    """
    found = await _where_running(config, data_dir)
    if isinstance(found, str):
        yield None, found
        return
    url, secret = found
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
    except (OSError, TimeoutError):
        yield None, f"nothing answers on {host}:{port} (is the service running?)"
        return
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    transport = Aria2Transport(url, secret, connect_timeout=2, max_backoff=0.5, heartbeat=None)
    client = Aria2Client(transport)
    await transport.start()
    try:
        problem: str | None = None
        try:
            if await transport.wait_connected(3):
                await client.version()
            else:
                problem = f"no WebSocket connection to {host}:{port}"
        except (Aria2Unavailable, Aria2RpcError) as exc:
            problem = str(exc)
        if problem is None:
            yield client, f"{host}:{port}"
        else:
            await transport.close()  # not kept reconnecting while the caller goes on without it
            yield None, problem
    finally:
        await transport.close()
