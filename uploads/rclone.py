"""The rclone edge of the upload pipeline: transfers, cancel, read-back verification.

How rclone is driven, and why
-----------------------------
Transfers run as one ``rclone copyto`` (a file) or ``rclone copy`` (a folder's contents) child
process per job, started with ``asyncio.create_subprocess_exec`` in its own session (so its own
process group), with ``--use-json-log --stats 1s --stats-log-level NOTICE``. Every second rclone
writes one JSON line to stderr whose ``stats`` object holds ``bytes``, ``totalBytes``, ``speed``
and ``eta`` as numbers; errors arrive as JSON lines with ``level: error``. Nothing is parsed from
human-formatted text except the few plain lines rclone prints before its logger is set up (such
as an unknown remote), which only feed the error classification.

- Cancel is a signal to the process group (SIGTERM, SIGKILL after 1 s): rclone exits within
  milliseconds, the group takes any helper process with it, and nothing else is disturbed.
- A process per transfer isolates jobs: a backend that hangs stalls only its own job, and a
  crash of this service leaves at worst a stray rclone, which the pid files let the next start-up
  find and kill (:meth:`Rclone.kill_leftovers`).
- Throughput is that of a plain ``rclone copyto``: the only extra work is one stats line a second.

The alternative, one long-lived ``rclone rcd`` driven over its HTTP API (``job/stop`` to
cancel), was not chosen: it adds a port and its authentication, a daemon whose own failure takes
every transfer with it, and state (job ids) that does not survive a restart of either side,
while cancelling a subprocess is already instant.

rclone-python (``rclone_python``) runs rclone synchronously through ``subprocess.run(..., shell=
True)`` with paths pasted into a shell string, keeps the config path in a process-wide singleton,
has no time-out and cannot cancel. File names here come from Telegram users and torrents, so
passing them through a shell string is not acceptable, and a listing that hangs must be killable.
rclone-python is therefore used only where no user data is involved and nothing can hang:
listing the configured remotes (it reads only the config file), in a thread, under a lock that
pins its singleton to this instance's executable and config. Listings with sizes and hashes
(``lsjson``) run as argument-vector subprocesses with a time-out, like transfers.

Every child gets the environment of this process without ``AWS_CA_BUNDLE`` (rclone's S3 backend
fails when it is set) and, when a config path is given, with ``RCLONE_CONFIG`` and ``--config``
pointing at it, and with ``proxy`` (``upload.proxy``) as ``HTTP_PROXY`` and ``HTTPS_PROXY``,
which rclone's HTTP-based backends follow; ``--ask-password=false`` and a closed stdin keep an
encrypted config from waiting for a password that never comes. rclone output can name URLs,
so every message kept in an error or a log line passes through :func:`redact` first; command
lines are never logged with ``extra_args`` (they may carry secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import shlex
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from loguru import logger

from configer import child_environment
from files import discard

if TYPE_CHECKING:
    from loguru import Logger

RcloneReason = str

REMOTE_NOT_FOUND: Final = "remote_not_found"
AUTH_FAILED: Final = "auth_failed"
NETWORK: Final = "network"
REMOTE_FULL: Final = "remote_full"
LOCAL_FILE_MISSING: Final = "local_file_missing"
VERIFY_SIZE_MISMATCH: Final = "verify_size_mismatch"
VERIFY_HASH_MISMATCH: Final = "verify_hash_mismatch"
CANCELLED: Final = "cancelled"
RCLONE_ERROR: Final = "rclone_error"

# Whether trying the same upload again later, unchanged, can succeed:
# - network, rclone_error: transient by nature or unknown; bounded retries are cheap.
# - verify_*: the remote copy is incomplete or corrupt; uploading again replaces it.
# - remote_full: False. Space rarely frees itself within a retry back-off; the user must act, and
#   then retries by hand (failed → pending).
# - auth_failed: False. Wrong or expired credentials need the config fixed first.
# - remote_not_found, local_file_missing: nothing to upload or nowhere to put it.
# - cancelled: a person asked for it to stop.
RETRYABLE_REASONS: Final[frozenset[str]] = frozenset(
    {NETWORK, RCLONE_ERROR, VERIFY_SIZE_MISMATCH, VERIFY_HASH_MISMATCH}
)
ALL_REASONS: Final[frozenset[str]] = RETRYABLE_REASONS | {
    REMOTE_NOT_FOUND,
    AUTH_FAILED,
    REMOTE_FULL,
    LOCAL_FILE_MISSING,
    CANCELLED,
}

# rclone exit codes (rclone docs, "Exit Code"): 7 = fatal error (more retries won't fix it),
# 8 = transfer limit (--max-transfer) reached.
_EXIT_FATAL: Final = 7
_EXIT_TRANSFER_LIMIT: Final = 8
_EXIT_TEMPORARY: Final = 5
_EXIT_DIRECTORY_NOT_FOUND: Final = 3
_EXIT_FILE_NOT_FOUND: Final = 4

_TERMINATE_GRACE_SECONDS: Final = 1.0
_MAX_KEPT_ERROR_LINES: Final = 20
_MAX_LINE_BYTES: Final = 1024 * 1024
_MAX_MESSAGE_CHARS: Final = 600
# Remote hashing reads the whole file on the server side: allow for it on top of the base time-out.
_HASH_BYTES_PER_SECOND_FLOOR: Final = 20 * 1024 * 1024
_LINK_TIMEOUT_SECONDS: Final = 30.0  # `rclone link`: one API call to the remote
_MAX_LINK_CHARS: Final = 2048
# Hash types in order of preference when the remote offers several; rclone computes any of them
# for local files too.
_PREFERRED_HASHES: Final = ("md5", "sha1", "sha256", "crc32", "quickxor", "dropbox", "whirlpool")
_JOB_KEY_PATTERN: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class RcloneError(Exception):
    """A failed rclone operation, classified.

    ``reason`` is one of :data:`ALL_REASONS`; ``message`` is for people and holds no secrets;
    ``exit_code`` is rclone's, when a process ran to its end; ``retryable`` tells whether trying
    again unchanged can succeed (see :data:`RETRYABLE_REASONS`; rclone's exit code 7, fatal, and 8,
    transfer limit, are never retryable).
    """

    def __init__(
        self,
        reason: RcloneReason,
        message: str,
        *,
        exit_code: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        if reason not in ALL_REASONS:
            raise ValueError(f"unknown rclone failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.exit_code = exit_code
        if retryable is None:
            retryable = reason in RETRYABLE_REASONS and exit_code not in (
                _EXIT_FATAL,
                _EXIT_TRANSFER_LIMIT,
            )
        self.retryable = retryable

    def __repr__(self) -> str:
        return (
            f"RcloneError(reason={self.reason!r}, message={self.message!r}, "
            f"exit_code={self.exit_code!r}, retryable={self.retryable!r})"
        )


@dataclass(frozen=True)
class TransferProgress:
    """One progress report of a running transfer (bytes of the whole job, speed in bytes/s)."""

    bytes_done: int
    total: int
    speed: float
    eta: float | None


@dataclass(frozen=True)
class VerifyResult:
    """What the read-back found: total bytes, and the hash compared (a single file's value).

    ``hash_type`` is None when no hash was compared (the remote offers none that rclone can also
    compute locally, or offers none for these objects). For a folder ``hash_type`` names the hash
    every file was compared with, and ``hash`` is None.
    """

    size: int
    hash_type: str | None
    hash: str | None


ProgressCallback = Callable[[TransferProgress], Awaitable[None] | None]


# --------------------------------------------------------------------------- redaction


_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://)[^\s/@\"']+@")
_URL_QUERY = re.compile(r"(?i)(\b[a-z][a-z0-9+.\-]*://[^\s\"'?#]+)\?[^\s\"']*")
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)\b([\w-]*(?:pass(?:word)?|token|secret|api[_-]?key|access[_-]?key|signature|credential)"
    r"[\w-]*)(\"?\s*[:=]\s*\"?)[^\s\"',&}]+"
)
_BEARER = re.compile(r"(?i)\b(bearer|basic)\s+[A-Za-z0-9._~+/=\-]+")


def redact(text: str) -> str:
    """``text`` without URL credentials, query strings, bearer tokens and ``secret=value`` pairs."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    text = _URL_QUERY.sub(r"\1?***", text)
    text = _BEARER.sub(r"\1 ***", text)
    text = _SECRET_ASSIGNMENT.sub(r"\1\2***", text)
    if len(text) > _MAX_MESSAGE_CHARS:
        text = text[: _MAX_MESSAGE_CHARS - 1] + "…"
    return text


# --------------------------------------------------------------------------- classification

_REMOTE_MISSING_MARKERS = ("didn't find section in config file",)
_FULL_MARKERS = (
    "insufficient storage",
    "insufficient_storage",
    "insufficientstorage",
    "no space left on device",
    "storagequotaexceeded",
    "quotalimitreached",
    "quota exceeded for storage",
    "not enough space",
    "disk quota exceeded",
    "over quota",
)
_STRONG_AUTH_MARKERS = (
    "unable to authenticate",
    "authentication failed",
    "401 unauthorized",
    "unauthorized: 401",
    "status code 401",
    "invalid_grant",
    "invalid_client",
    "invalidauthenticationtoken",
    "invalidaccesskeyid",
    "signaturedoesnotmatch",
    "token has been expired or revoked",
)
_WEAK_AUTH_MARKERS = (
    "couldn't fetch token",
    "cannot fetch token",
    "403 forbidden",
    "forbidden: 403",
    "accessdenied",
    "access denied",
)
_NETWORK_MARKERS = (
    "connection refused",
    "connection reset",
    "broken pipe",
    "use of closed network connection",
    "i/o timeout",
    "timeout awaiting",
    "context deadline exceeded",
    "tls handshake",
    "no such host",
    "server misbehaving",
    "temporary failure in name resolution",
    "network is unreachable",
    "no route to host",
    "host is down",
    "unexpected eof",
    ": eof",
    "dial tcp",
    "dial udp",
    "connection timed out",
    "502 bad gateway",
    "503 service unavailable",
    "504 gateway timeout",
    "429 too many requests",
    "too many requests",
    "timed out",
)


_LOG_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d(?:\.\d+)?\s+(?:[A-Z]+\s*:\s+)?")


def _strip_log_prefix(line: str) -> str:
    """``"2024/01/02 03:04:05 ERROR : msg"`` → ``"msg"``."""
    return _LOG_PREFIX.sub("", line)


def _first_match(text: str, markers: Sequence[str]) -> bool:
    return any(marker in text for marker in markers)


def _error_summary(messages: Sequence[str]) -> str:
    """The most telling line: rclone's final "Failed to …" line, else the last error."""
    for line in reversed(messages):
        if line.startswith("Failed to") or "Failed to create file system" in line:
            return line
    return messages[-1] if messages else "rclone failed without a message"


def classify_failure(
    exit_code: int | None, messages: Sequence[str], *, remote: str | None = None
) -> RcloneError:
    """The :class:`RcloneError` for a finished rclone run, from its exit code and error lines.

    Markers are matched case-insensitively against all error lines: an unknown remote, a full
    remote, authentication, then network trouble (tried before the weaker authentication markers
    because a token fetch that cannot reach its server is a network problem). Exit code 5 (rclone's
    "temporary error") counts as network when nothing more specific matched.
    """
    text = "\n".join(messages).lower()
    summary = redact(_error_summary(messages))
    if _first_match(text, _REMOTE_MISSING_MARKERS):
        name = f" {remote!r}" if remote else ""
        return RcloneError(
            REMOTE_NOT_FOUND,
            f"rclone remote{name} is not configured",
            exit_code=exit_code,
        )
    if _first_match(text, _FULL_MARKERS):
        return RcloneError(
            REMOTE_FULL, f"the remote is out of space: {summary}", exit_code=exit_code
        )
    if _first_match(text, _STRONG_AUTH_MARKERS):
        return RcloneError(
            AUTH_FAILED, f"the remote refused the credentials: {summary}", exit_code=exit_code
        )
    if _first_match(text, _NETWORK_MARKERS):
        return RcloneError(NETWORK, f"network error: {summary}", exit_code=exit_code)
    if _first_match(text, _WEAK_AUTH_MARKERS):
        return RcloneError(
            AUTH_FAILED, f"the remote refused access: {summary}", exit_code=exit_code
        )
    if exit_code == _EXIT_TEMPORARY:
        return RcloneError(NETWORK, f"temporary error: {summary}", exit_code=exit_code)
    return RcloneError(
        RCLONE_ERROR, f"rclone failed (exit code {exit_code}): {summary}", exit_code=exit_code
    )


# --------------------------------------------------------------------------- helpers


def parse_link_output(stdout: str) -> str | None:
    """The link `rclone link` printed: its first line when that is one http(s) URL, else None."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        return None
    link = lines[0]
    if not link.startswith(("https://", "http://")) or len(link) > _MAX_LINK_CHARS:
        return None
    if any(char.isspace() or not char.isprintable() for char in link):
        return None
    return link


def _remote_name(remote_path: str) -> str:
    """``"name"`` of ``"name:path"``; refuses anything rclone would take for a local path."""
    name, colon, _ = remote_path.partition(":")
    if not colon or not name or "/" in name or "\\" in name or name.startswith("-"):
        raise ValueError(f"not a remote path of the form 'remote:path': {remote_path!r}")
    return name


def _child_env(config_path: Path | None, proxy: str = "") -> dict[str, str]:
    env = child_environment()
    env.pop("AWS_CA_BUNDLE", None)
    if config_path is not None:
        env["RCLONE_CONFIG"] = str(config_path)
    if proxy:
        # The upper-case names win over lower-case ones left in this process's environment.
        env.update({"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy})
    return env


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by ``pid`` (or just ``pid`` when it leads none)."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pid_runs(pid: int, executable: str) -> bool:
    """Whether process `pid` runs the program `executable` (its argv[0] names it), not merely
    a command line that mentions it (a reused pid of an editor or a test run)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    program = cmdline.split(b"\0", 1)[0].decode(errors="replace")
    return bool(program) and Path(program).name == Path(executable).name


@dataclass(frozen=True)
class _LocalSource:
    path: Path
    exists: bool
    is_folder: bool


def _inspect_local(path: Path) -> _LocalSource:
    """Absolute path (rclone takes "a:b" for a remote; "/…/a:b" is local) and what is there."""
    absolute = Path(os.path.abspath(path))
    return _LocalSource(absolute, absolute.exists(), absolute.is_dir())


def local_total_size(path: Path) -> int:
    """Bytes rclone will send for ``path`` (symlinks are skipped, as rclone skips them)."""
    if path.is_file():
        return path.stat().st_size
    total = 0
    for directory, _dirs, files in os.walk(path):
        for name in files:
            file_path = Path(directory, name)
            with contextlib.suppress(OSError):
                if not file_path.is_symlink():
                    total += file_path.stat().st_size
    return total


async def _terminate_process(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, SIGKILL it if it is still there after the grace period."""
    if process.returncode is None:
        _signal_group(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout=_TERMINATE_GRACE_SECONDS)
        except TimeoutError:
            _signal_group(process.pid, signal.SIGKILL)
            await process.wait()


class _LineCollector:
    """Reads a child's stderr as lines without ever stalling the child on a long line."""

    def __init__(self, on_line: Callable[[str], None]) -> None:
        self._on_line = on_line

    async def run(self, stream: asyncio.StreamReader) -> None:
        pending = b""
        while True:
            chunk = await stream.read(65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._on_line(line.decode("utf-8", errors="replace"))
            if len(pending) > _MAX_LINE_BYTES:
                pending = b""
        if pending:
            self._on_line(pending.decode("utf-8", errors="replace"))


@dataclass
class _RunningJob:
    job_key: str
    process: asyncio.subprocess.Process | None = None
    cancel_requested: bool = False


@dataclass
class _TransferState:
    """What the stderr reader learnt; read by the progress deliverer and the error classifier."""

    total_hint: int
    latest: TransferProgress | None = None
    delivered: TransferProgress | None = None
    finished: bool = False

    def __post_init__(self) -> None:
        self.errors: deque[str] = deque(maxlen=_MAX_KEPT_ERROR_LINES)
        self.changed = asyncio.Event()


@dataclass(frozen=True)
class _FileEntry:
    size: int
    hash: str | None


_rclone_python_lock = threading.Lock()


# --------------------------------------------------------------------------- the client


class Rclone:
    """Runs rclone for uploads: remotes, transfers with progress and cancel, verification.

    ``config_path`` is the rclone config to use (None: rclone's own default or ``RCLONE_CONFIG``);
    ``pid_dir`` holds one ``<job_key>.pid`` file per running transfer; ``extra_args`` are added to
    every rclone command this instance runs (rclone's flags are global, e.g. ``--bwlimit 2M`` or
    ``--low-level-retries 2``); ``command_timeout`` bounds listings (plus time for hashing).
    """

    def __init__(
        self,
        *,
        executable: str = "rclone",
        config_path: Path | None = None,
        pid_dir: Path,
        extra_args: Sequence[str] = (),
        command_timeout: float = 120.0,
        proxy: str = "",
    ) -> None:
        self.executable = executable
        self.config_path = config_path
        self.pid_dir = pid_dir
        self.extra_args = tuple(extra_args)
        self.command_timeout = command_timeout
        self.bwlimit = 0  # bytes a second of each command started from now on; 0 = no limit
        self._env = _child_env(config_path, proxy)
        self._jobs: dict[str, _RunningJob] = {}
        self._hash_types: dict[str, tuple[str, ...]] = {}
        pid_dir.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ command building

    def _base_command(self) -> list[str]:
        command = [self.executable]
        if self.config_path is not None:
            command += ["--config", str(self.config_path)]
        return [*command, "--ask-password=false"]

    def _command(self, *args: str) -> list[str]:
        limit = ["--bwlimit", f"{self.bwlimit}B"] if self.bwlimit else []
        return [*self._base_command(), *args, *self.extra_args, *limit]

    async def _spawn(self, command: Sequence[str]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self._env,
            start_new_session=True,
        )

    async def _run(
        self, *args: str, timeout: float | None = None, remote: str | None = None
    ) -> tuple[int, str, list[str]]:
        """Run one short rclone command; returns (exit code, stdout, stderr lines)."""
        try:
            process = await self._spawn(self._command(*args))
        except OSError as exc:
            raise RcloneError(RCLONE_ERROR, f"cannot run rclone: {exc.strerror}") from exc
        try:
            stdout, stderr = await asyncio.wait_for(
                process.communicate(), timeout=timeout or self.command_timeout
            )
        except TimeoutError:
            await _terminate_process(process)
            raise RcloneError(
                NETWORK,
                f"rclone {args[0]} on {remote or 'the remote'} did not finish in time",
            ) from None
        finally:
            # Cancelled or timed out: never leave the child behind.
            if process.returncode is None:
                await _terminate_process(process)
        assert process.returncode is not None
        lines = [
            _strip_log_prefix(line)
            for line in stderr.decode("utf-8", errors="replace").splitlines()
            if line.strip()
        ]
        return process.returncode, stdout.decode("utf-8", errors="replace"), lines

    # ------------------------------------------------------------------ remotes

    def _list_remotes_blocking(self) -> list[str]:
        from rclone_python import rclone as rclone_python
        from rclone_python import utils as rclone_python_utils

        # rclone-python keeps executable and config in a process-wide singleton and pastes both
        # into a shell command line: pin them for the duration of this call, shell-quoted.
        # `listremotes` builds no backend, so the inherited AWS_CA_BUNDLE cannot disturb it.
        with _rclone_python_lock:
            settings = rclone_python_utils.Config()
            saved = (settings.executable_path, settings.config_path)
            settings.executable_path = shlex.join([self.executable, "--ask-password=false"])
            settings.config_path = (
                shlex.quote(str(self.config_path)) if self.config_path is not None else None
            )
            try:
                names = rclone_python.get_remotes()
            finally:
                settings.executable_path, settings.config_path = saved
        return [name.removesuffix(":") for name in names]

    async def list_remotes(self) -> list[str]:
        """Names of the configured remotes, without the trailing colon."""
        try:
            return await asyncio.to_thread(self._list_remotes_blocking)
        except Exception as exc:  # rclone-python raises RcloneException or a plain Exception
            raise RcloneError(
                RCLONE_ERROR, f"cannot list rclone remotes: {redact(str(exc))}"
            ) from exc

    async def check_remote(self, remote: str) -> None:
        """Raise ``RcloneError(remote_not_found)`` naming ``remote`` unless it is configured."""
        name = remote.removesuffix(":")
        if name not in await self.list_remotes():
            where = f" in {self.config_path}" if self.config_path is not None else ""
            raise RcloneError(REMOTE_NOT_FOUND, f"rclone remote {name!r} is not configured{where}")

    # ------------------------------------------------------------------ transfers

    async def transfer(
        self,
        local: Path,
        remote_path: str,
        *,
        on_progress: ProgressCallback,
        job_key: str,
    ) -> None:
        """Upload ``local`` (a file, or a folder's contents as a folder) to ``remote_path``.

        ``on_progress`` is called about once a second with the latest stats, from its own task
        so a slow callback never holds rclone up (intermediate reports may then be skipped; the
        last one is always delivered on success). Raises :class:`RcloneError`; cancelling the
        calling task kills the rclone process group too.
        """
        if not _JOB_KEY_PATTERN.fullmatch(job_key):
            raise ValueError(f"job_key must be a plain file name, got {job_key!r}")
        remote = _remote_name(remote_path)
        if job_key in self._jobs:
            raise ValueError(f"a transfer with job_key {job_key!r} is already running")
        job = _RunningJob(job_key)
        self._jobs[job_key] = job
        log = logger.bind(job=job_key, remote=remote)
        try:
            await self._transfer(job, local, remote_path, remote, on_progress, log)
        finally:
            self._jobs.pop(job_key, None)

    async def _transfer(
        self,
        job: _RunningJob,
        local: Path,
        remote_path: str,
        remote: str,
        on_progress: ProgressCallback,
        log: Logger,
    ) -> None:
        source = await asyncio.to_thread(_inspect_local, local)
        local, is_folder = source.path, source.is_folder
        if not source.exists:
            raise RcloneError(LOCAL_FILE_MISSING, f"nothing to upload at {local}")
        total_hint = await asyncio.to_thread(local_total_size, local)
        if job.cancel_requested:
            raise RcloneError(CANCELLED, "the upload was cancelled")

        command = self._command(
            "copy" if is_folder else "copyto",
            str(local),
            remote_path,
            "--use-json-log",
            "--stats",
            "1s",
            "--stats-log-level",
            "NOTICE",
        )
        state = _TransferState(total_hint=total_hint)
        started = time.monotonic()
        log.info("upload of {} ({} bytes) to {} starts", local.name, total_hint, remote_path)
        try:
            process = await self._spawn(command)
        except OSError as exc:
            raise RcloneError(RCLONE_ERROR, f"cannot run rclone: {exc.strerror}") from exc
        job.process = process
        pid_file = self.pid_dir / f"{job.job_key}.pid"
        deliverer: asyncio.Task[None] | None = None
        try:
            pid_file.write_text(f"{process.pid}\n")
            if job.cancel_requested:
                await _terminate_process(process)
            deliverer = asyncio.create_task(self._deliver_progress(state, on_progress, log))
            assert process.stderr is not None
            reader = _LineCollector(lambda line: self._on_stderr_line(state, line))
            await asyncio.gather(reader.run(process.stderr), self._drain(process.stdout))
            exit_code = await process.wait()
        finally:
            if process.returncode is None:
                # Shielded: a second cancellation of this task must not leave rclone running.
                await asyncio.shield(_terminate_process(process))
            discard(pid_file)
            state.finished = True
            state.changed.set()
            if deliverer is not None:
                succeeded = process.returncode == 0 and not job.cancel_requested
                await self._stop_deliverer(deliverer, wait=succeeded)

        elapsed = time.monotonic() - started
        if job.cancel_requested:
            log.info("upload to {} cancelled after {:.1f} s", remote_path, elapsed)
            raise RcloneError(CANCELLED, "the upload was cancelled")
        if exit_code == 0:
            log.info("upload to {} done in {:.1f} s", remote_path, elapsed)
            return
        messages = list(state.errors)
        if (
            exit_code in (_EXIT_DIRECTORY_NOT_FOUND, _EXIT_FILE_NOT_FOUND)
            and not (await asyncio.to_thread(_inspect_local, local)).exists
        ):
            error = RcloneError(
                LOCAL_FILE_MISSING,
                f"the local file went away during the upload: {local}",
                exit_code=exit_code,
            )
        else:
            error = classify_failure(exit_code, messages, remote=remote)
        log.warning(
            "upload to {} failed: {} (exit code {}, {})",
            remote_path,
            error.reason,
            exit_code,
            error.message,
        )
        raise error

    @staticmethod
    async def _drain(stream: asyncio.StreamReader | None) -> None:
        if stream is not None:
            while await stream.read(65536):
                pass

    def _on_stderr_line(self, state: _TransferState, line: str) -> None:
        line = line.strip()
        if not line:
            return
        record: Any = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                record = json.loads(line)
        if not isinstance(record, dict):
            # Plain lines: rclone's final "Failed to …" and errors from before its logger started.
            state.errors.append(_strip_log_prefix(line))
            return
        stats = record.get("stats")
        if isinstance(stats, dict):
            progress = self._progress_from_stats(stats, state.total_hint)
            if progress is not None:
                state.latest = progress
                state.changed.set()
            last_error = stats.get("lastError")
            if isinstance(last_error, str) and last_error:
                state.errors.append(last_error)
            return
        if record.get("level") in ("error", "critical", "fatal"):
            message = str(record.get("msg", "")).strip()
            if message:
                state.errors.append(message)

    @staticmethod
    def _progress_from_stats(stats: Mapping[str, Any], total_hint: int) -> TransferProgress | None:
        try:
            done = int(stats.get("bytes") or 0)
            reported_total = int(stats.get("totalBytes") or 0)
            speed = float(stats.get("speed") or 0.0)
            eta_value = stats.get("eta")
            eta = float(eta_value) if eta_value is not None else None
        except (TypeError, ValueError):
            return None
        total = total_hint if total_hint > 0 else reported_total
        if total > 0:
            done = min(done, total)
        return TransferProgress(bytes_done=done, total=total, speed=speed, eta=eta)

    @staticmethod
    async def _deliver_progress(
        state: _TransferState, on_progress: ProgressCallback, log: Logger
    ) -> None:
        while True:
            await state.changed.wait()
            state.changed.clear()
            snapshot = state.latest
            if snapshot is not None and snapshot != state.delivered:
                state.delivered = snapshot
                try:
                    result = on_progress(snapshot)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    # A failing display must not fail the upload itself.
                    log.opt(exception=True).warning("upload progress callback failed")
            if state.finished and state.latest == state.delivered:
                return

    @staticmethod
    async def _stop_deliverer(deliverer: asyncio.Task[None], *, wait: bool) -> None:
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(deliverer), timeout=5.0)
        if not deliverer.done():
            deliverer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await deliverer

    async def cancel(self, job_key: str) -> bool:
        """Stop the running transfer ``job_key``; its :meth:`transfer` raises ``cancelled``.

        Returns False when no transfer with that key is running. Returns once rclone has exited.
        """
        job = self._jobs.get(job_key)
        if job is None:
            return False
        job.cancel_requested = True
        logger.bind(job=job_key).info("cancelling upload")
        if job.process is not None:
            await _terminate_process(job.process)
        return True

    def running_jobs(self) -> list[str]:
        """Keys of the transfers running now."""
        return list(self._jobs)

    # ------------------------------------------------------------------ start-up

    def kill_leftovers(self) -> list[int]:
        """Kill rclone transfers left by an earlier run (from ``pid_dir``); returns their pids.

        Synchronous, for start-up before any transfer of this instance starts: it reads every pid
        file, kills the process group when the pid is alive and still an rclone (a reused pid of
        something else is left alone), waits up to about a second for it to go, and removes the
        pid files.
        """
        killed: list[int] = []
        for pid_file in sorted(self.pid_dir.glob("*.pid")):
            if pid_file.stem in self._jobs:
                continue
            try:
                pid = int(pid_file.read_text().strip())
            except (OSError, ValueError):
                pid = 0
            if pid > 1 and _pid_alive(pid) and _pid_runs(pid, self.executable):
                _signal_group(pid, signal.SIGTERM)
                deadline = time.monotonic() + _TERMINATE_GRACE_SECONDS
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                if _pid_alive(pid):
                    _signal_group(pid, signal.SIGKILL)
                killed.append(pid)
                logger.warning("killed leftover rclone pid {} ({})", pid, pid_file.stem)
            discard(pid_file)
        return killed

    # ------------------------------------------------------------------ listings and verify

    async def _lsjson(
        self, target: str, *flags: str, timeout: float | None, remote: str | None
    ) -> Any | None:
        """``rclone lsjson`` parsed, or None when the path does not exist (exit code 3)."""
        code, stdout, lines = await self._run(
            "lsjson", *flags, target, timeout=timeout, remote=remote
        )
        if code == _EXIT_DIRECTORY_NOT_FOUND:
            return None
        if code != 0:
            raise classify_failure(code, lines, remote=remote)
        try:
            return json.loads(stdout)
        except ValueError as exc:
            raise RcloneError(RCLONE_ERROR, f"rclone lsjson gave no JSON for {target}") from exc

    async def _list_files(
        self,
        target: str,
        *,
        hash_type: str | None = None,
        timeout: float | None = None,
        remote: str | None = None,
    ) -> dict[str, _FileEntry] | None:
        """Files under ``target`` keyed by relative path ("" when ``target`` is one file)."""
        hash_flags = ("--hash-type", hash_type) if hash_type else ()
        item = await self._lsjson(target, "--stat", *hash_flags, timeout=timeout, remote=remote)
        if item is None:
            return None
        if not isinstance(item, dict):
            raise RcloneError(RCLONE_ERROR, f"unexpected lsjson answer for {target}")
        if not item.get("IsDir"):
            return {"": self._entry(item, hash_type)}
        items = await self._lsjson(
            target, "-R", "--files-only", *hash_flags, timeout=timeout, remote=remote
        )
        if items is None:
            return None
        return {
            str(entry["Path"]): self._entry(entry, hash_type)
            for entry in items
            if isinstance(entry, dict) and not entry.get("IsDir")
        }

    @staticmethod
    def _entry(item: Mapping[str, Any], hash_type: str | None) -> _FileEntry:
        hashes = item.get("Hashes") or {}
        value = hashes.get(hash_type) if hash_type and isinstance(hashes, dict) else None
        return _FileEntry(size=int(item.get("Size", -1)), hash=(value or None))

    async def remote_size(self, remote_path: str) -> int | None:
        """Bytes at ``remote_path`` (a folder: all its files), or None when nothing is there."""
        remote = _remote_name(remote_path)
        files = await self._list_files(remote_path, remote=remote)
        if files is None:
            return None
        return sum(entry.size for entry in files.values() if entry.size > 0)

    async def public_link(self, remote_path: str) -> str | None:
        """A link anyone can open to the uploaded file (`rclone link`), or None when the remote
        cannot make one (most cannot: WebDAV, SFTP, a local folder) or does not answer in time."""
        remote = _remote_name(remote_path)
        try:
            code, stdout, lines = await self._run(
                "link", remote_path, timeout=_LINK_TIMEOUT_SECONDS, remote=remote
            )
        except RcloneError as exc:
            logger.bind(remote=remote).info("no link for an upload to {}: {}", remote, exc)
            return None
        if code != 0:
            logger.bind(remote=remote).debug(
                "{} makes no links: {}", remote, redact(_error_summary(lines))
            )
            return None
        return parse_link_output(stdout)

    async def _common_hash_type(self, remote: str) -> str | None:
        """A hash the remote stores that rclone can compute for local files, or None."""
        if remote not in self._hash_types:
            code, stdout, lines = await self._run(
                "backend", "features", f"{remote}:", remote=remote
            )
            if code != 0:
                raise classify_failure(code, lines, remote=remote)
            try:
                features = json.loads(stdout)
                offered = tuple(str(name) for name in features.get("Hashes") or ())
            except (ValueError, AttributeError) as exc:
                raise RcloneError(RCLONE_ERROR, f"unreadable features of {remote}") from exc
            self._hash_types[remote] = offered
        offered = self._hash_types[remote]
        for preferred in _PREFERRED_HASHES:
            if preferred in offered:
                return preferred
        return offered[0] if offered else None

    async def verify(self, local: Path, remote_path: str) -> VerifyResult:
        """Read ``remote_path`` back and compare it with ``local``: sizes, then hashes if any.

        Every local file must be on the remote with the same size (extra remote files are not
        an error). Then, when the remote offers a hash rclone can also compute locally (WebDAV
        with ``vendor = other`` offers none; SFTP with shell access offers md5/sha1), both sides
        are hashed concurrently (the local side by an rclone subprocess, off the event loop) and
        compared wherever both have a value.
        """
        remote = _remote_name(remote_path)
        source = await asyncio.to_thread(_inspect_local, local)
        local = source.path
        if not source.exists:
            raise RcloneError(LOCAL_FILE_MISSING, f"nothing to verify at {local}")
        local_files, remote_files = await asyncio.gather(
            self._list_files(str(local)), self._list_files(remote_path, remote=remote)
        )
        if local_files is None:
            raise RcloneError(LOCAL_FILE_MISSING, f"nothing to verify at {local}")
        if remote_files is None:
            raise RcloneError(VERIFY_SIZE_MISMATCH, f"nothing found at {remote_path}")
        self._compare_sizes(local_files, remote_files, remote_path)
        total = sum(entry.size for entry in local_files.values())

        hash_type = await self._common_hash_type(remote)
        if hash_type is None:
            return VerifyResult(size=total, hash_type=None, hash=None)
        timeout = self.command_timeout + total / _HASH_BYTES_PER_SECOND_FLOOR
        local_hashes, remote_hashes = await asyncio.gather(
            self._list_files(str(local), hash_type=hash_type, timeout=timeout),
            self._list_files(remote_path, hash_type=hash_type, timeout=timeout, remote=remote),
        )
        if local_hashes is None or remote_hashes is None:
            raise RcloneError(VERIFY_SIZE_MISMATCH, f"{remote_path} vanished during verification")
        compared = 0
        for relative, entry in local_hashes.items():
            remote_entry = remote_hashes.get(relative)
            if entry.hash is None or remote_entry is None or remote_entry.hash is None:
                continue
            compared += 1
            if entry.hash.lower() != remote_entry.hash.lower():
                shown = relative or local.name
                raise RcloneError(
                    VERIFY_HASH_MISMATCH,
                    f"{hash_type} of {shown} differs on {remote_path}: "
                    f"local {entry.hash}, remote {remote_entry.hash}",
                )
        if compared == 0:
            return VerifyResult(size=total, hash_type=None, hash=None)
        single = local_hashes.get("") if len(local_hashes) == 1 else None
        return VerifyResult(
            size=total, hash_type=hash_type, hash=single.hash if single is not None else None
        )

    @staticmethod
    def _compare_sizes(
        local_files: Mapping[str, _FileEntry],
        remote_files: Mapping[str, _FileEntry],
        remote_path: str,
    ) -> None:
        missing = [path for path in local_files if path not in remote_files]
        differing = [
            path
            for path, entry in local_files.items()
            if path in remote_files and remote_files[path].size != entry.size
        ]
        if not missing and not differing:
            return
        parts: list[str] = []
        if differing:
            path = differing[0]
            shown = path or "the file"
            parts.append(
                f"{len(differing)} file(s) differ in size (e.g. {shown}: local "
                f"{local_files[path].size}, remote {remote_files[path].size})"
            )
        if missing:
            parts.append(f"{len(missing)} file(s) missing (e.g. {missing[0] or 'the file'})")
        raise RcloneError(VERIFY_SIZE_MISMATCH, f"{remote_path}: " + "; ".join(parts))
