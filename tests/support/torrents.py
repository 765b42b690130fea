"""BitTorrent test peers on 127.0.0.1: .torrent/magnet creation, an HTTP tracker, a seeding aria2c.

Nothing here reaches beyond loopback: the tracker hands out 127.0.0.1 peers only, and the seeder
runs with DHT, local peer discovery and peer exchange off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import torf
from aiohttp import web
from loguru import logger

LOOPBACK = "127.0.0.1"
ANNOUNCE_INTERVAL_S = 5

# Flags that keep a test aria2c on loopback and away from any user configuration.
ARIA2_LOOPBACK_FLAGS: tuple[str, ...] = (
    "--no-conf=true",
    "--enable-rpc=false",
    "--enable-dht=false",
    "--enable-dht6=false",
    "--bt-enable-lpd=false",
    "--enable-peer-exchange=false",
    "--disable-ipv6=true",
    "--bt-save-metadata=false",
    "--summary-interval=0",
    "--console-log-level=warn",
)


def _private_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


# ---- bencode ---------------------------------------------------------------------------------

BencodeValue = int | bytes | str | list["BencodeValue"] | dict[bytes | str, "BencodeValue"]


def bencode(value: BencodeValue) -> bytes:
    """Minimal bencoder (dict keys sorted as raw bytes, as the format requires)."""
    if isinstance(value, bool):
        raise TypeError("bool is not bencodable")
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, str):
        value = value.encode()
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(item) for item in value) + b"e"
    if isinstance(value, dict):
        items = sorted((k.encode() if isinstance(k, str) else k, v) for k, v in value.items())
        return b"d" + b"".join(bencode(k) + bencode(v) for k, v in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


# ---- torrent files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TorrentInfo:
    """A torrent made by ``make_torrent``.

    ``files`` maps paths relative to a download directory to their bytes: for a single-file
    torrent ``{name: data}``, for a multi-file one ``{f"{name}/{relative}": data}``. So after a
    download into D, ``(D / path).read_bytes() == data`` holds for every entry, and the seeder's
    copy lives at ``content_dir / path``.
    """

    torrent_bytes: bytes
    torrent_path: Path
    magnet: str
    info_hash: str  # 40 lowercase hex digits (v1)
    name: str
    files: dict[str, bytes]
    content_dir: Path
    announce: str

    @property
    def info_hash_bytes(self) -> bytes:
        return bytes.fromhex(self.info_hash)

    @property
    def total_size(self) -> int:
        return sum(len(data) for data in self.files.values())

    @property
    def is_multi_file(self) -> bool:
        return any("/" in path for path in self.files)


def make_torrent(
    files: Mapping[str, bytes] | bytes, out_dir: Path, announce: str, name: str
) -> TorrentInfo:
    """Write the content under OUT_DIR and a .torrent next to it; return what a test needs.

    Bytes make a single-file torrent ``OUT_DIR/NAME``; a mapping of relative paths makes a
    multi-file torrent in the folder ``OUT_DIR/NAME``. The .torrent is ``OUT_DIR/NAME.torrent``.
    Hashing is synchronous: fine for test-sized content.
    """
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad torrent name: {name!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    content_path = out_dir / name
    torrent_path = out_dir / f"{name}.torrent"
    if torrent_path == content_path:
        raise ValueError("torrent name must not end with .torrent")

    written: dict[str, bytes] = {}
    if isinstance(files, bytes):
        content_path.write_bytes(files)
        written[name] = files
    else:
        if not files:
            raise ValueError("a multi-file torrent needs at least one file")
        for relative, data in files.items():
            target = (content_path / relative).resolve()
            if not target.is_relative_to(content_path.resolve()):
                raise ValueError(f"file path escapes the torrent folder: {relative!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            written[f"{name}/{Path(relative).as_posix()}"] = data

    torrent = torf.Torrent(
        path=content_path, name=name, trackers=[announce], created_by=None, private=None
    )
    torrent.generate()
    torrent_bytes = torrent.dump()
    torrent_path.write_bytes(torrent_bytes)
    return TorrentInfo(
        torrent_bytes=torrent_bytes,
        torrent_path=torrent_path,
        magnet=str(torrent.magnet(name=True, size=True, trackers=True)),
        info_hash=str(torrent.infohash).lower(),
        name=name,
        files=written,
        content_dir=out_dir,
        announce=announce,
    )


def corrupt_torrent_cases() -> dict[str, bytes]:
    """Malformed .torrent payloads by label, for fuzz and rejection tests."""
    pieces = b"\x00" * 20
    good_info: dict[bytes | str, BencodeValue] = {
        "length": 1024,
        "name": "file.bin",
        "piece length": 16384,
        "pieces": pieces,
    }
    valid = bencode({"announce": "http://127.0.0.1:1/announce", "info": good_info})
    return {
        "empty": b"",
        "html_page": b"<!DOCTYPE html><html><body><h1>404 Not Found</h1></body></html>",
        "truncated_bencode": valid[: len(valid) // 2],
        "unterminated_string": b"d8:announce999:http://127.0.0.1/e",
        "no_info_dict": bencode({"announce": "http://127.0.0.1:1/announce", "comment": "x"}),
        "info_not_a_dict": bencode({"announce": "http://127.0.0.1:1/announce", "info": 42}),
        "negative_length": bencode({"info": {**good_info, "length": -5}}),
        "zero_piece_length": bencode({"info": {**good_info, "piece length": 0}}),
        "pieces_not_multiple_of_20": bencode({"info": {**good_info, "pieces": b"\x00" * 19}}),
        "huge_name": bencode({"info": {**good_info, "name": "A" * 70_000}}),
        "path_traversal_name": bencode({"info": {**good_info, "name": "../../escape.bin"}}),
        "path_traversal_file": bencode(
            {
                "info": {
                    "name": "folder",
                    "piece length": 16384,
                    "pieces": pieces,
                    "files": [{"length": 1024, "path": ["..", "..", "escape.bin"]}],
                }
            }
        ),
        "deeply_nested": b"l" * 10_000 + b"e" * 10_000,
    }


def corrupt_torrent_samples() -> list[bytes]:
    """Malformed .torrent payloads (see ``corrupt_torrent_cases`` for labels)."""
    return list(corrupt_torrent_cases().values())


# ---- tracker ---------------------------------------------------------------------------------


@dataclass
class _Peer:
    ip: str
    port: int
    left: int
    seen: float


@dataclass
class Tracker:
    """HTTP tracker on 127.0.0.1 answering /announce with compact IPv4 peers."""

    announce_url: str = ""
    port: int = 0
    announces: int = 0
    swarms: dict[bytes, dict[bytes, _Peer]] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    def peer_count(self, info_hash: str | bytes) -> int:
        key = bytes.fromhex(info_hash) if isinstance(info_hash, str) else info_hash
        return len(self.swarms.get(key, {}))

    async def wait_for_peers(
        self, info_hash: str | bytes, count: int = 1, within_s: float = 10.0
    ) -> None:
        """Wait until COUNT peers have announced INFO_HASH."""
        deadline = time.monotonic() + within_s
        while self.peer_count(info_hash) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"tracker saw {self.peer_count(info_hash)} of {count} peers")
            await asyncio.sleep(0.05)

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/announce", self._announce)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((LOOPBACK, port))
        sock.listen(128)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self.announce_url = f"http://{LOOPBACK}:{self.port}/announce"
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _announce(self, request: web.Request) -> web.Response:
        self.announces += 1
        # info_hash and peer_id are raw bytes, percent-encoded: decode them as latin-1.
        query = parse_qs(request.rel_url.raw_query_string, encoding="latin-1")

        def first(key: str, default: str = "") -> str:
            return query.get(key, [default])[0]

        info_hash = first("info_hash").encode("latin-1")
        peer_id = first("peer_id").encode("latin-1")
        if len(info_hash) != 20 or not peer_id:
            return web.Response(body=bencode({"failure reason": "bad info_hash or peer_id"}))
        try:
            port = int(first("port"))
            left = int(first("left", "0"))
        except ValueError:
            return web.Response(body=bencode({"failure reason": "bad port or left"}))
        swarm = self.swarms.setdefault(info_hash, {})
        if first("event") == "stopped":
            swarm.pop(peer_id, None)
        elif request.remote == LOOPBACK and 0 < port < 65536:
            swarm[peer_id] = _Peer(LOOPBACK, port, left, time.monotonic())

        others = [p for pid, p in swarm.items() if pid != peer_id and p.ip == LOOPBACK]
        compact = b"".join(socket.inet_aton(p.ip) + p.port.to_bytes(2, "big") for p in others)
        seeders = sum(1 for p in swarm.values() if p.left == 0)
        body = bencode(
            {
                "interval": ANNOUNCE_INTERVAL_S,
                "min interval": 1,
                "complete": seeders,
                "incomplete": len(swarm) - seeders,
                "peers": compact,
            }
        )
        return web.Response(body=body, content_type="text/plain")


async def start_tracker(port: int = 0) -> Tracker:
    tracker = Tracker()
    await tracker.start(port)
    return tracker


@pytest.fixture
async def tracker() -> AsyncIterator[Tracker]:
    running = await start_tracker()
    try:
        yield running
    finally:
        await running.stop()


# ---- seeding aria2c --------------------------------------------------------------------------


async def stop_pid(process: asyncio.subprocess.Process, grace_s: float = 5.0) -> int | None:
    """SIGTERM the process by PID, then SIGKILL after GRACE_S; return its exit code."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGKILL)
            await asyncio.wait_for(process.wait(), grace_s)
    return process.returncode


class Seeder:
    """A separate aria2c seeding one torrent from its content dir until stopped."""

    def __init__(self, torrent: TorrentInfo, log_path: Path | None = None) -> None:
        self.torrent = torrent
        self.listen_port = 0
        self.log_path = log_path or torrent.content_dir / f".seeder-{torrent.info_hash[:8]}.log"
        self._process: asyncio.subprocess.Process | None = None
        self._log = logger.bind(component="test-seeder", torrent=torrent.name)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def command(self) -> list[str]:
        return [
            "aria2c",
            *ARIA2_LOOPBACK_FLAGS,
            f"--dir={self.torrent.content_dir}",
            # 0.0 seeds forever; --seed-time=0 would make aria2c quit at once.
            "--seed-ratio=0.0",
            "--bt-seed-unverified=true",
            "--check-integrity=false",
            "--allow-overwrite=false",
            "--file-allocation=none",
            f"--listen-port={self.listen_port}",
            f"--stop-with-process={os.getpid()}",
            str(self.torrent.torrent_path),
        ]

    async def start(self, within_s: float = 10.0) -> None:
        """Spawn aria2c and wait until its BitTorrent port accepts connections."""
        if self.running:
            return
        self.listen_port = _private_free_port()
        log_file = await asyncio.to_thread(self.log_path.open, "ab")
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.command(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            log_file.close()
        self._log.debug("seeder pid {} on port {}", self._process.pid, self.listen_port)
        deadline = time.monotonic() + within_s
        while True:
            if self._process.returncode is not None:
                raise RuntimeError(
                    f"seeder exited with {self._process.returncode}: {self.output()}"
                )
            try:
                _, writer = await asyncio.open_connection(LOOPBACK, self.listen_port)
            except OSError:
                if time.monotonic() > deadline:
                    await self.stop()
                    raise TimeoutError("seeder did not open its port") from None
                await asyncio.sleep(0.05)
            else:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
                return

    async def stop(self) -> int | None:
        """Stop aria2c by PID (SIGTERM, then SIGKILL); return its exit code."""
        if self._process is None:
            return None
        return await stop_pid(self._process)

    def output(self) -> str:
        """aria2c's console output so far, for failure messages."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""


SeederFactory = Callable[[TorrentInfo], Awaitable[Seeder]]


@pytest.fixture
async def seeder_factory() -> AsyncIterator[SeederFactory]:
    """``seeder = await seeder_factory(torrent_info)``: started seeders are stopped at teardown."""
    started: list[Seeder] = []

    async def start_seeder(torrent: TorrentInfo) -> Seeder:
        seeder = Seeder(torrent)
        started.append(seeder)
        await seeder.start()
        return seeder

    try:
        yield start_seeder
    finally:
        for seeder in started:
            with contextlib.suppress(Exception):
                await seeder.stop()


__all__ = [
    "ARIA2_LOOPBACK_FLAGS",
    "Seeder",
    "SeederFactory",
    "TorrentInfo",
    "Tracker",
    "bencode",
    "corrupt_torrent_cases",
    "corrupt_torrent_samples",
    "make_torrent",
    "seeder_factory",
    "start_tracker",
    "stop_pid",
    "tracker",
]
