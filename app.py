"""MistRelay's entry point: `python app.py` runs the service; sub-commands do maintenance.

python app.py [--config PATH]            run the service (default)
python app.py [--config PATH] check      compare the database with aria2 and the disk
python app.py [--config PATH] backup F   consistent online copy of the database
python app.py [--config PATH] restore F  restore a backup (service stopped)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from aria2_client.client import Aria2Client
from aria2_client.consistency import ConsistencyChecker, run_check
from aria2_client.download_handler import DownloadManager
from aria2_client.models import Aria2Notification
from aria2_client.poller import Poller
from aria2_client.process import EmbeddedAria2
from aria2_client.transport import Aria2Transport
from configer import (
    Config,
    ConfigDiff,
    ConfigError,
    Secrets,
    diff_config,
    ensure_secrets,
    load_config,
    masked_settings,
)
from db import (
    Database,
    DownloadRow,
    StoreError,
    backup_database_file,
    restore_database_file,
)
from events import EventHub
from uploads.manager import UploadManager
from uploads.media import MediaProber
from webstreamer.server import AppContext, WebServer
from webstreamer.signing import LinkSigner

if TYPE_CHECKING:
    from loguru import Record

DEFAULT_CONFIG = Path(__file__).resolve().parent / "config.yaml"


def with_live_changes(old: Config, new: Config, keys: list[str]) -> Config:
    """`old` with the dotted `keys` (those that may change live) taken from `new`."""
    sections: dict[str, dict[str, Any]] = {}
    for key in keys:
        section, name = key.split(".", 1)
        sections.setdefault(section, {})[name] = getattr(getattr(new, section), name)
    return replace(
        old, **{section: replace(getattr(old, section), **v) for section, v in sections.items()}
    )


class InstanceLock:
    """An exclusive lock on data_dir/mistrelay.lock held while the service runs.

    The kernel drops it when the process dies (even by SIGKILL), so a stale file never blocks a
    start; `restore` uses it to refuse replacing the database under a running service.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / "mistrelay.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class AlreadyRunning(RuntimeError):
    pass


def configure_logging(level: str, secrets: list[str] | None = None) -> None:
    """loguru to stderr; any known secret that slips into a message is masked."""
    hidden = [s for s in (secrets or []) if s and len(s) >= 6]

    def redact(record: Record) -> None:
        for secret in hidden:
            if secret in record["message"]:
                record["message"] = record["message"].replace(secret, "***")

    logger.remove()
    logger.configure(patcher=redact)
    logger.add(sys.stderr, level=level.upper(), format=_log_format, backtrace=False, diagnose=False)


def _log_format(record: Record) -> str:
    """One line per record; the bound context (job, gid, …) follows the message when present."""
    context = " ".join(f"{key}={value}" for key, value in record["extra"].items())
    suffix = f" [{context}]" if context else ""
    return (
        "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {name}:{line} | {message}"
        + suffix.replace("{", "{{").replace("}", "}}")
        + "\n{exception}"
    )


class Service:
    """Starts and stops every part of MistRelay in order."""

    def __init__(
        self,
        config: Config,
        *,
        telegram_client_factory: Callable[[], Any] | None = None,
    ) -> None:
        self.config = config
        # Builds the Pyrogram client; tests pass one wired to an offline Telegram.
        self.telegram_client_factory = telegram_client_factory
        self.uploads: UploadManager | None = None
        self.bot: Any = None
        self.media: MediaProber | None = None
        self.checker: ConsistencyChecker | None = None
        self.hub = EventHub()
        self.secrets: Secrets | None = None
        self.db: Database | None = None
        self.embedded: EmbeddedAria2 | None = None
        self.transport: Aria2Transport | None = None
        self.downloads: DownloadManager | None = None
        self.poller: Poller | None = None
        self.web: WebServer | None = None
        self.ctx: AppContext | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._supervisor: asyncio.Task[None] | None = None
        self._lock = InstanceLock(config.data_dir)
        self._log_secrets: list[str] = []
        self._bot_start: asyncio.Task[None] | None = None

    def _spawn(self, coroutine: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def start(self) -> None:
        config = self.config
        if not self._lock.acquire():
            raise AlreadyRunning(f"another MistRelay is running on {config.data_dir}")
        self.secrets = secrets = ensure_secrets(config)
        self._log_secrets = [
            secrets.web_token,
            secrets.aria2_secret,
            secrets.link_key.hex(),
            config.telegram.bot_token,
            config.telegram.api_hash,
        ]
        configure_logging(config.logging.level, self._log_secrets)
        download_dir = config.aria2.download_dir
        await asyncio.to_thread(download_dir.mkdir, parents=True, exist_ok=True)

        self.db = db = Database(config.database.path, hub=self.hub, download_dir=download_dir)
        await db.open()
        await db.init_config_from_yaml(masked_settings(config))

        if config.aria2.rpc_url:
            rpc_url, aria2_secret = config.aria2.rpc_url, secrets.aria2_secret
            logger.info("using the external aria2 at {}", rpc_url)
        else:
            options = dict(config.aria2.options)
            # A relay downloads, uploads and cleans up: stop seeding once a torrent is complete.
            options.setdefault("seed-time", "0")
            if not config.aria2.enable_dht:
                options.update({"enable-dht": "false", "enable-dht6": "false"})
            self.embedded = EmbeddedAria2(
                download_dir=download_dir,
                data_dir=config.data_dir,
                secret=secrets.aria2_secret,
                executable=config.aria2.executable,
                port=config.aria2.rpc_port,
                max_concurrent_downloads=config.aria2.max_concurrent_downloads,
                extra_options=options,
            )
            await self.embedded.start()
            rpc_url, aria2_secret = self.embedded.rpc_url, secrets.aria2_secret
            logger.info("embedded aria2c started (pid {})", self.embedded.pid)

        self.transport = Aria2Transport(
            rpc_url,
            aria2_secret,
            on_notification=self._on_notification,
            on_connection_change=self._on_connection_change,
        )
        signer = LinkSigner(secrets.link_key, config.web.link_expiry)
        self.downloads = DownloadManager(
            db,
            Aria2Client(self.transport),
            download_dir=download_dir,
            max_download_size=config.aria2.max_download_size,
            allow_private_addresses=config.aria2.allow_private_addresses,
            telegram_link=self._loopback_stream_link,
        )
        self.media = MediaProber(db, download_dir=download_dir)
        self.downloads.completion_listeners.append(self.media.on_download_completed)
        self.poller = Poller(
            self.downloads,
            interval=lambda: self.config.aria2.poll_interval,
            idle_interval=lambda: self.config.aria2.idle_poll_interval,
        )
        self.ctx = AppContext(
            config=config,
            secrets=secrets,
            db=db,
            hub=self.hub,
            downloads=self.downloads,
            signer=signer,
            aria2_connected=lambda: bool(self.transport and self.transport.connected),
            reload_config=self.reload,
        )
        self.web = WebServer(self.ctx)
        await self.web.start()
        logger.info("web token is kept in {}", config.data_dir / "web_token")

        if config.telegram.enabled:
            # Imported only when the bot runs: Pyrogram is heavy and unused otherwise.
            from bot.runner import TelegramBot

            self.bot = TelegramBot(
                config,
                db=db,
                downloads=self.downloads,
                hub=self.hub,
                signer=signer,
                client_factory=self.telegram_client_factory,
            )
            self.ctx.byte_sources.append(self.bot.byte_source)
        else:
            logger.info("no Telegram credentials (telegram.bot_token): the bot is off")
        self.uploads = UploadManager(
            db,
            config.upload,
            download_dir=download_dir,
            data_dir=config.data_dir,
            telegram=self.bot,
        )
        self.ctx.uploads = self.uploads
        self.downloads.completion_listeners.append(self.uploads.on_download_completed)
        self.downloads.removal_listeners.append(self.uploads.on_download_removed)
        await self.uploads.start()
        if self.bot is not None:
            self.bot.uploads = self.uploads

        await self.transport.start()
        if not await self.transport.wait_connected(10):
            logger.warning("aria2 is not reachable yet; jobs wait until it is")
        self.poller.start()
        self.checker = ConsistencyChecker(
            db,
            self.downloads.aria2,
            download_dir,
            interval=lambda: self.config.maintenance.check_interval,
            confirm_after=max(2.0, config.aria2.idle_poll_interval + 1),
        )
        self.checker.start()
        if self.embedded is not None:
            self._supervisor = asyncio.create_task(self.embedded.supervise(self._aria2_restarted))
        self.hub.start_statistics(db.get_statistics)
        if self.bot is not None:
            # Telegram may be unreachable: the service runs (API, page, jobs) while the bot
            # keeps trying to log in on its own.
            self._bot_start = asyncio.create_task(self._start_bot(), name="telegram-bot-start")

    async def wait_bot(self) -> None:
        """Wait until the bot's start-up has finished (or failed and was logged)."""
        if self._bot_start is not None:
            await asyncio.shield(self._bot_start)

    async def _start_bot(self) -> None:
        assert self.bot is not None
        try:
            await self.bot.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.error("the Telegram bot could not start ({}); the service runs without it", exc)

    def _loopback_stream_link(self, row: DownloadRow) -> str:
        """aria2 fetches Telegram media from our own /stream route over loopback."""
        assert self.ctx is not None and self.web is not None
        host = self.config.web.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        path = self.ctx.signer.stream_path(row.id, row.file_name or "file", lifetime=0)
        return f"http://{host}:{self.web.port}{path}"

    async def _on_notification(self, notification: Aria2Notification) -> None:
        if self.downloads is not None:
            await self.downloads.on_notification(notification)

    async def _on_connection_change(self, connected: bool) -> None:
        if connected:
            logger.info("connected to aria2")
            self._spawn(self._after_reconnect(), "aria2-reconnected")
        else:
            logger.warning("lost the connection to aria2; reconnecting")

    async def _after_reconnect(self) -> None:
        if self.downloads is None or self.poller is None:
            return
        await self.downloads.reconcile_pending()
        self.poller.wake()

    async def _aria2_restarted(self) -> None:
        logger.warning("embedded aria2c died and was restarted from its session")
        if self.poller is not None:
            self.poller.wake()

    async def reload(self) -> ConfigDiff:
        """Re-read config.yaml; apply what can change live and name what needs a restart."""
        new = load_config(self.config.config_path)
        diff = diff_config(self.config, new)
        live = with_live_changes(self.config, new, diff.applied)
        self.config = live
        if self.ctx is not None:
            self.ctx.config = live
            self.ctx.signer = LinkSigner(self.ctx.secrets.link_key, live.web.link_expiry)
            if self.bot is not None:
                self.bot.config = live
                self.bot.signer = self.ctx.signer
        if self.uploads is not None:
            self.uploads.apply_config(live.upload)
        if self.downloads is not None:
            self.downloads.max_download_size = live.aria2.max_download_size
            self.downloads.allow_private_addresses = live.aria2.allow_private_addresses
            if "aria2.max_concurrent_downloads" in diff.applied:
                await self.downloads.aria2.change_global_option(
                    {"max-concurrent-downloads": str(live.aria2.max_concurrent_downloads)}
                )
        if self.db is not None:
            await self.db.init_config_from_yaml(masked_settings(live))
        configure_logging(live.logging.level, self._log_secrets)
        logger.info(
            "configuration reloaded: applied {}; needs a restart: {}",
            ", ".join(diff.applied) or "nothing",
            ", ".join(diff.needs_restart) or "nothing",
        )
        return diff

    async def stop(self) -> None:
        """Stop everything started, newest first; safe to call twice."""
        if self.checker is not None:
            await self.checker.stop()
            self.checker = None
        if self.poller is not None:
            await self.poller.stop()
            self.poller = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
            self._supervisor = None
        for task in [*self._background, self._bot_start]:
            if task is not None:
                task.cancel()
        if self.bot is not None:
            await self.bot.stop()
            self.bot = None
        if self.uploads is not None:
            await self.uploads.stop()
            self.uploads = None
        if self.media is not None:
            await self.media.stop()
            self.media = None
        if self.web is not None:
            await self.web.stop()
            self.web = None
        if self.transport is not None:
            await self.transport.close()
            self.transport = None
        if self.embedded is not None:
            await self.embedded.stop()
            self.embedded = None
        await self.hub.close()
        if self.db is not None:
            await self.db.close()
            self.db = None
            logger.info("MistRelay stopped")
        self._lock.release()


async def run_service(config: Config) -> None:
    service = Service(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(_reload_logged(service)))
    try:
        await service.start()
        await stop.wait()
        logger.info("stopping")
    finally:
        await service.stop()


async def _reload_logged(service: Service) -> None:
    try:
        await service.reload()
    except ConfigError as exc:
        logger.error("configuration not reloaded: {}", exc)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="app.py", description="MistRelay download relay")
    parser.add_argument("--config", type=Path, default=None, help="config file (config.yaml)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the service (default)")
    check = sub.add_parser("check", help="compare the database with aria2 and the disk")
    check.add_argument("--fix", action="store_true", help="repair what was found")
    backup = sub.add_parser("backup", help="consistent online copy of the database")
    backup.add_argument("path", type=Path)
    restore = sub.add_parser("restore", help="restore a backup (the service must be stopped)")
    restore.add_argument("path", type=Path)
    return parser.parse_args(argv)


def backup_command(config: Config, target: Path) -> int:
    try:
        backup_database_file(config.database.path, target)
    except (StoreError, OSError) as exc:
        logger.error("backup failed: {}", exc)
        return 2
    logger.info("database copied to {}", target)
    return 0


def restore_command(config: Config, backup: Path) -> int:
    lock = InstanceLock(config.data_dir)
    if not lock.acquire():
        logger.error("MistRelay is running on {}: stop it before restoring", config.data_dir)
        return 2
    try:
        kept = restore_database_file(backup, config.database.path)
    except (StoreError, OSError) as exc:
        logger.error("restore refused: {}", exc)
        return 2
    finally:
        lock.release()
    if kept is not None:
        logger.info("the replaced database was kept as {}", kept)
    logger.info("database restored from {}", backup)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    configure_logging("INFO")
    path = args.config
    if path is None and "MISTRELAY_CONFIG" not in os.environ and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    try:
        config = load_config(path)
    except ConfigError as exc:
        logger.error("{}", exc)
        return 2
    configure_logging(config.logging.level)
    command = args.command or "run"
    if command == "check":
        configure_logging("WARNING")
        return asyncio.run(run_check(config, fix=args.fix))
    if command == "backup":
        return backup_command(config, args.path)
    if command == "restore":
        return restore_command(config, args.path)
    try:
        asyncio.run(run_service(config))
    except AlreadyRunning as exc:
        logger.error("{}", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
