"""The download engine as one part: aria2c (our own, or the external one at `aria2.rpc_url`), the
connection to it, the egress proxy the jobs of users who are not admins go through, the download
manager, the poller, and keeping them going when aria2 restarts or the connection drops."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Collection, Coroutine, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

from aria2_client.client import Aria2Client
from aria2_client.download_handler import (
    DownloadListener,
    DownloadManager,
    Placement,
    TelegramLinkMaker,
)
from aria2_client.egress import EgressProxy
from aria2_client.poller import Poller
from aria2_client.process import EmbeddedAria2
from aria2_client.sources import AddressPolicy
from aria2_client.transport import Aria2RpcError, Aria2Transport, Aria2Unavailable
from configer import Aria2Config, Quotas, proxy_parts
from db import Store
from events import EventHub, Subscription
from files import DownloadFiles
from metrics import Metrics
from records import DownloadSnapshot

# The egress proxy's port, kept for the next start: the jobs aria2 keeps in its session name it.
EGRESS_PORT_FILE = "egress_port"


def embedded_options(config: Aria2Config) -> dict[str, str]:
    """The configured aria2c options, with what a relay needs where the user said nothing."""
    options = dict(config.options)
    # A relay downloads, uploads and cleans up: stop seeding once a torrent is complete.
    options.setdefault("seed-time", "0")
    if not config.enable_dht:
        options.update({"enable-dht": "false", "enable-dht6": "false"})
    return options


class Engine:
    """Everything aria2: built complete here, run by :meth:`start`, ended by :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        files: DownloadFiles,
        config: Aria2Config,
        *,
        data_dir: Path,
        secret: str,
        telegram_link: TelegramLinkMaker | None,
        on_completed: Sequence[DownloadListener],
        on_removed: Sequence[DownloadListener],
        placement: Placement | None = None,
        hub: EventHub | None = None,
        admins: Callable[[], Collection[int]] = tuple,
        quotas: Callable[[], Quotas] = Quotas,
        metrics: Metrics | None = None,
        download_limit: int = 0,
    ) -> None:
        self._config = config
        self._download_limit = download_limit  # bytes a second over all downloads; 0 = none
        self._metrics = metrics
        self._egress_port_file = data_dir / EGRESS_PORT_FILE
        # In a cluster, a job queued on any node wakes the poller, which claims it if it can.
        self._queue_watch = hub.subscribe("engine-queue") if hub and placement else None
        self.embedded: EmbeddedAria2 | None = None
        if not config.rpc_url:
            self.embedded = EmbeddedAria2(
                download_dir=files.root,
                data_dir=data_dir,
                secret=secret,
                executable=config.executable,
                port=config.rpc_port,
                max_concurrent_downloads=config.max_concurrent_downloads,
                extra_options=embedded_options(config),
            )
        self.rpc_url = self.embedded.rpc_url if self.embedded is not None else config.rpc_url
        self.transport = Aria2Transport(
            self.rpc_url, secret, on_reply=metrics.rpc_call if metrics is not None else None
        )
        self.aria2 = Aria2Client(self.transport)
        # aria2.proxy: the way out of admin jobs, and the egress proxy's upstream.
        proxy = proxy_parts(config.proxy) if config.proxy else None
        self.egress = EgressProxy(
            lambda: self.downloads.policy,
            # Job credentials that stay valid across restarts, as the jobs aria2 keeps do.
            hashlib.sha256(b"mistrelay egress\0" + secret.encode()).digest(),
            on_refused=lambda download_id, reason: self.downloads.egress_refused(
                download_id, reason
            ),
            upstream=proxy,
        )
        self.downloads = DownloadManager(
            store,
            self.aria2,
            files,
            max_download_size=config.max_download_size,
            max_torrent_files=config.max_torrent_files,
            ask_file_selection=config.ask_file_selection,
            file_selection_timeout=config.file_selection_timeout,
            allow_private_addresses=config.allow_private_addresses,
            blocked_networks=config.blocked_networks,
            admins=admins,
            quotas=quotas,
            egress=self.egress,
            proxy=proxy,
            telegram_link=telegram_link,
            on_completed=on_completed,
            on_removed=on_removed,
            placement=placement,
        )
        self.poller = Poller(
            self.downloads,
            interval=lambda: self._config.poll_interval,
            idle_interval=lambda: self._config.idle_poll_interval,
            on_cycle=metrics.poll_cycle if metrics is not None else None,
        )
        self._supervisor: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        return self.transport.connected

    @property
    def pid(self) -> int | None:
        """The embedded aria2c's PID; None when it is not running or aria2 is external."""
        return self.embedded.pid if self.embedded is not None else None

    async def start(self) -> None:
        """Start the egress proxy (on its last port) and aria2c if it is ours, then connect; jobs
        wait while aria2 is not reachable."""
        port = await asyncio.to_thread(_read_port, self._egress_port_file)
        await self.egress.start(port)
        if self.egress.port != port:
            await asyncio.to_thread(_write_port, self._egress_port_file, self.egress.port)
        if self.embedded is not None:
            try:
                await self.embedded.start()
            except BaseException:
                await self.egress.stop()  # a start that fails leaves nothing running
                raise
            logger.info("embedded aria2c started (pid {})", self.embedded.pid)
        else:
            logger.info("using the external aria2 at {}", self.rpc_url)
        await self.transport.start(
            on_notification=self.downloads.on_notification,
            on_connection_change=self._connection_changed,
        )
        if not await self.transport.wait_connected(10):
            logger.warning("aria2 is not reachable yet; jobs wait until it is")
        else:
            await self.downloads.release_others_jobs()
        self.poller.start()
        if self._queue_watch is not None:
            self._spawn(self._watch_queue(self._queue_watch), "engine-queue-watch")
        if self.embedded is not None:
            self._supervisor = asyncio.create_task(
                self.embedded.supervise(self._aria2_restarted), name="aria2c-supervisor"
            )

    async def stop(self) -> None:
        """Stop polling and supervising, close the connection, then stop our aria2c."""
        await self.poller.stop()
        await self.downloads.stop()
        if self._queue_watch is not None:
            self._queue_watch.close()
        tasks = [t for t in (self._supervisor, *self._background) if t is not None]
        self._supervisor = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.transport.close()
        if self.embedded is not None:
            await self.embedded.stop()
        await self.egress.stop()

    async def apply_config(self, config: Aria2Config) -> None:
        """Apply the keys that change live: size limit, private addresses, blocked networks,
        parallel downloads, poll intervals."""
        old, self._config = self._config, config
        self.downloads.max_download_size = config.max_download_size
        self.downloads.max_torrent_files = config.max_torrent_files
        self.downloads.ask_file_selection = config.ask_file_selection
        self.downloads.file_selection_timeout = config.file_selection_timeout
        self.downloads.allow_private_addresses = config.allow_private_addresses
        self.downloads.policy = AddressPolicy(config.blocked_networks)
        if config.max_concurrent_downloads != old.max_concurrent_downloads:
            if self.embedded is not None:
                self.embedded.max_concurrent_downloads = config.max_concurrent_downloads
            await self.aria2.change_global_option(
                {"max-concurrent-downloads": str(config.max_concurrent_downloads)}
            )

    async def set_download_limit(self, bytes_per_second: int) -> None:
        """Limit all downloads together (0 = no limit); kept across reconnects and restarts."""
        self._download_limit = bytes_per_second
        if not self.connected:
            return  # set when aria2 is back
        try:
            await self._apply_download_limit()
        except (Aria2Unavailable, Aria2RpcError) as exc:  # set again when aria2 reconnects
            logger.bind(limit=bytes_per_second).warning("download limit not set yet: {}", exc)

    async def _apply_download_limit(self) -> None:
        await self.aria2.change_global_option(
            {"max-overall-download-limit": str(self._download_limit)}
        )
        logger.bind(limit=self._download_limit).info(
            "download limit: {}", f"{self._download_limit} B/s" if self._download_limit else "none"
        )

    async def _watch_queue(self, events: Subscription) -> None:
        async for event in events:
            row = event.data.row if isinstance(event.data, DownloadSnapshot) else None
            if row is not None and row.status == "pending" and row.node is None:
                self.poller.wake()

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _connection_changed(self, connected: bool) -> None:
        if connected:
            logger.info("connected to aria2")
            # Not inline: the transport hands over notifications in order, one at a time.
            self._spawn(self._after_reconnect(), "aria2-reconnected")
        else:
            logger.warning("lost the connection to aria2; reconnecting")

    async def _after_reconnect(self) -> None:
        try:
            await self._apply_download_limit()
        except Exception:  # the jobs must still be submitted
            logger.exception("setting the download limit failed")
        try:
            await self.downloads.reconcile_pending()
        except Exception:  # the poller must still be woken, whatever one job did
            logger.exception("submitting the pending downloads failed")
        self.poller.wake()

    async def _aria2_restarted(self) -> None:
        logger.warning("embedded aria2c died and was restarted from its session")
        if self._metrics is not None:
            self._metrics.aria2_restarted()
        self.poller.wake()


def _read_port(path: Path) -> int:
    try:
        port = int(path.read_text().strip())
    except (OSError, ValueError):
        return 0
    return port if 0 < port < 65536 else 0


def _write_port(path: Path, port: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{port}\n".encode())
    finally:
        os.close(fd)
