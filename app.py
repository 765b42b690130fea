"""MistRelay's entry point: `python app.py` runs the service; sub-commands do maintenance.

python app.py [--config PATH]            run the service (default)
python app.py [--config PATH] check      compare the database with aria2 and the disk
python app.py [--config PATH] backup F   consistent online copy of the database
python app.py [--config PATH] restore F  restore a backup (service stopped)
python app.py [--config PATH] migrate-store --to URL [--apply]
                                         copy the SQLite store into an empty PostgreSQL database
python app.py [--config PATH] add URL|MAGNET|FILE.torrent… [--wait]
                                         add jobs to the running service (client_cli.py)
python app.py [--config PATH] list [--status S] [--json]
                                         list the running service's downloads
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import functools
import json
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from datetime import UTC
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

import client_cli
from aria2_client.consistency import ConsistencyChecker, check, repair
from aria2_client.download_handler import Placement
from aria2_client.engine import Engine
from aria2_client.process import running_aria2
from aria2_client.transport import Aria2RpcError, Aria2Unavailable
from cluster import Cluster
from configer import (
    Config,
    ConfigDiff,
    ConfigError,
    LoggingConfig,
    Secrets,
    diff_config,
    ensure_secrets,
    load_config,
    log_secrets,
    masked_settings,
    parse_database_url,
)
from db import (
    ACTIVE_DOWNLOAD_STATUSES,
    DRIVER_ERRORS,
    SCHEMA_VERSION,
    Store,
    StoreError,
    StoreMove,
    StoreUnavailable,
    TableCount,
    backup_database_file,
    inspect_store,
    move_store,
    open_store,
    restore_database_file,
    utc_now,
)
from events import EventHub
from files import DownloadFiles
from importer import FileIndex, UpstreamError, files_root, plan_import, read_upstream
from metrics import Metrics
from settings_editor import SettingsEditor
from uploads.manager import UploadManager
from uploads.media import MediaProber
from webstreamer.context import AppContext
from webstreamer.links import StreamLinks
from webstreamer.server import Listener, WebServer
from webstreamer.signing import LinkSigner

if TYPE_CHECKING:
    from loguru import Record
    from pyrogram import Client

    from bot.runner import TelegramBot
    from bot.session import TelegramSession

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
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
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


def configure_logging(settings: LoggingConfig | str, secrets: list[str] | None = None) -> None:
    """loguru to stderr, and to `logging.file` (rotated) when set, as text or JSON lines (a
    bare level: text on stderr); any known secret that slips into a message or a context value
    is masked."""
    if isinstance(settings, str):
        settings = LoggingConfig(level=settings)
    hidden = [s for s in (secrets or []) if s and len(s) >= 6]

    def redact(record: Record) -> None:
        record["message"] = _masked(record["message"], hidden)
        for key, value in record["extra"].items():
            if isinstance(value, str):
                record["extra"][key] = _masked(value, hidden)

    log_format = _json_line if settings.format == "json" else _log_format
    level = settings.level.upper()
    logger.remove()
    logger.configure(patcher=redact)
    logger.add(sys.stderr, level=level, format=log_format, backtrace=False, diagnose=False)
    if settings.file:
        # Written by a thread of its own (enqueue): a slow disk or a rotation never holds up
        # the event loop.
        logger.add(
            settings.file,
            level=level,
            format=log_format,
            rotation=settings.rotation_value,
            retention=settings.retention_value,
            encoding="utf-8",
            enqueue=True,
            backtrace=False,
            diagnose=False,
        )


def _masked(text: str, hidden: list[str]) -> str:
    for secret in hidden:
        if secret in text:
            text = text.replace(secret, "***")
    return text


def _json_line(record: Record) -> str:
    """One JSON object a line: time (UTC), level, logger, function, line, message, then the
    job's context (job, gid, …) as fields of their own and, when there is one, the traceback."""
    document: dict[str, object] = {
        "time": record["time"].astimezone(UTC).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "logger": record["name"],
        "function": record["function"],
        "line": record["line"],
        "message": record["message"],
    }
    for key, value in record["extra"].items():
        document.setdefault(key, _plain(value))
    error = record["exception"]
    if error is not None and error.type is not None:
        document["exception"] = "".join(
            traceback.format_exception(error.type, error.value, error.traceback)
        )
    line = json.dumps(document, ensure_ascii=False)
    return line.replace("{", "{{").replace("}", "}}") + "\n"


def _plain(value: object) -> object:
    """A context value as JSON holds it: numbers, text, booleans and null as they are, the rest
    as text."""
    return value if value is None or isinstance(value, str | int | float | bool) else str(value)


def _log_format(record: Record) -> str:
    """One line per record; the bound context (job, gid, …) follows the message when present."""
    context = " ".join(f"{key}={value}" for key, value in record["extra"].items())
    suffix = f" [{context}]" if context else ""
    return (
        "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {name}:{line} | {message}"
        + suffix.replace("{", "{{").replace("}", "}}")
        + "\n{exception}"
    )


@dataclass(frozen=True)
class Parts:
    """The running service: every part built complete and started, in the order of this list."""

    secrets: Secrets
    files: DownloadFiles
    links: StreamLinks
    hub: EventHub
    store: Store
    cluster: Cluster
    media: MediaProber
    telegram: TelegramSession | None  # None when no Telegram credentials are configured
    uploads: UploadManager
    engine: Engine
    web: WebServer
    checker: ConsistencyChecker
    bot: TelegramBot | None


class Service:
    """MistRelay assembled from named parts; each registers its own stop on one exit stack, so
    `stop()` (or a failed start) stops exactly what was started, newest first."""

    def __init__(
        self,
        config: Config,
        *,
        telegram_client_factory: Callable[[], Client] | None = None,
        telegram_worker_factory: Callable[[str], Client] | None = None,
    ) -> None:
        self.config = config
        # Build the Pyrogram clients (the worker bots' from a token); tests pass ones wired to
        # an offline Telegram.
        self.telegram_client_factory = telegram_client_factory
        self.telegram_worker_factory = telegram_worker_factory
        self._stack = AsyncExitStack()
        self._parts: Parts | None = None
        self._log_secrets: list[str] = []
        self._bot_start: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def parts(self) -> Parts:
        if self._parts is None:
            raise RuntimeError("the service is not running")
        return self._parts

    async def start(self) -> None:
        try:
            self._parts = await self._assemble(self._stack)
        except BaseException:
            await self._stack.aclose()
            raise

    async def stop(self) -> None:
        """Stop everything started, newest first; safe to call twice."""
        self._stopping = True
        self._parts = None
        await self._stack.aclose()

    async def _assemble(self, stack: AsyncExitStack) -> Parts:
        config = self.config
        lock = InstanceLock(config.data_dir)
        if not lock.acquire():
            raise AlreadyRunning(f"another MistRelay is running on {config.data_dir}")
        stack.callback(lock.release)
        started_at = utc_now()
        secrets = ensure_secrets(config)
        self._log_secrets = log_secrets(config, secrets)
        configure_logging(config.logging, self._log_secrets)
        files = DownloadFiles(config.aria2.download_dir)
        await files.ensure_root()
        # Bound first: aria2's loopback links to Telegram files need the port before the engine.
        listener = await asyncio.to_thread(Listener, config.web.host, config.web.port)
        stack.callback(listener.close)

        metrics = Metrics()
        store = await open_store(
            config.database, hub=(hub := EventHub()), on_write=metrics.db_write
        )
        stack.push_async_callback(_close_store, store)
        stack.push_async_callback(hub.close)
        if store.shared:
            secrets = await _cluster_secrets(store, config, secrets)
            self._log_secrets = log_secrets(config, secrets)
            configure_logging(config.logging, self._log_secrets)
        await store.init_config_from_yaml(masked_settings(config))

        cluster = Cluster(
            store,
            config.cluster,
            public_url=config.web.base_url,
            slots=lambda: self.config.aria2.max_concurrent_downloads,
            download_dir=files.root,
            web_token=secrets.web_token,
        )
        await cluster.start()
        stack.push_async_callback(cluster.stop)
        node = cluster.node_name if cluster.enabled else None
        metrics.start(hub, node=node, since=started_at)
        stack.push_async_callback(metrics.stop)
        links = StreamLinks(
            LinkSigner(secrets.link_key, config.web.link_expiry),
            config.web.base_url,
            listener.loopback_origin,
            origin_of=cluster.origin_of,
        )

        media = MediaProber(store, files=files)
        await media.start()
        stack.push_async_callback(media.stop)

        telegram = self._telegram_session(store, metrics)
        if telegram is not None:
            # Stopped after the uploads, which may still be sending through its client.
            stack.push_async_callback(telegram.stop)
        uploads = UploadManager(
            store,
            config.upload,
            files=files,
            data_dir=config.data_dir,
            telegram_client=(lambda: telegram.client) if telegram is not None else None,
            telegram_part_size=config.telegram.max_upload_size,
            node=node,
            ask_holder=cluster.ask_holder if node is not None else None,
        )
        uploads.set_upload_limit(config.limits.upload)
        await uploads.start()
        stack.push_async_callback(uploads.stop)

        engine = Engine(
            store,
            files,
            config.aria2,
            data_dir=config.data_dir,
            secret=secrets.aria2_secret,
            telegram_link=links.loopback_url,
            on_completed=[media.on_download_completed, uploads.on_download_completed],
            on_removed=[uploads.on_download_removed],
            admins=lambda: self.config.telegram.admins,
            quotas=lambda: self.config.telegram.quotas,
            placement=(
                Placement(
                    cluster.node_name,
                    slots=lambda: self.config.aria2.max_concurrent_downloads,
                    ask_holder=cluster.ask_holder,
                )
                if node is not None
                else None
            ),
            hub=hub,
            metrics=metrics,
            download_limit=config.limits.download,
        )
        settings = SettingsEditor(lambda: self.config, self.reload, store)
        web = WebServer(
            AppContext(
                live_config=lambda: self.config,
                secrets=secrets,
                store=store,
                hub=hub,
                downloads=engine.downloads,
                uploads=uploads,
                links=links,
                files=files,
                byte_sources=[telegram.byte_source] if telegram is not None else [],
                aria2_connected=lambda: engine.connected,
                reload_config=self.reload,
                settings=settings,
                cluster=cluster,
                metrics=metrics,
            ),
            listener,
        )
        await web.start()
        stack.push_async_callback(web.stop)
        if config.web.token:
            logger.info("web token: as configured (web.token)")
        elif cluster.enabled:
            logger.info("web token: shared by the cluster's nodes (kept in the store)")
        else:
            logger.info("web token is kept in {}", config.data_dir / "web_token")

        await engine.start()
        stack.push_async_callback(engine.stop)
        checker = ConsistencyChecker(
            store,
            engine.aria2,
            files.root,
            interval=lambda: self.config.maintenance.check_interval,
            confirm_after=max(2.0, config.aria2.idle_poll_interval + 1),
            node=node,
        )
        checker.start()
        stack.push_async_callback(checker.stop)
        hub.start_statistics(store.get_statistics)

        bot = None
        if telegram is not None:
            from bot.runner import TelegramBot

            bot = TelegramBot(
                telegram,
                store=store,
                downloads=engine.downloads,
                uploads=uploads,
                links=links,
                hub=hub,
                config=lambda: self.config,
                settings=settings,
            )
        # One node of a cluster runs the bot (Telegram gives updates to one consumer): the
        # leader. A lone node leads at once.
        await cluster.start_leading(
            lambda leading: self._leadership_changed(leading, bot, telegram)
        )
        stack.push_async_callback(cluster.stop_leading)
        return Parts(
            secrets,
            files,
            links,
            hub,
            store,
            cluster,
            media,
            telegram,
            uploads,
            engine,
            web,
            checker,
            bot,
        )

    async def _leadership_changed(
        self, leading: bool, bot: TelegramBot | None, telegram: TelegramSession | None
    ) -> None:
        """The leader runs the bot on a session that receives updates; every other node of a
        cluster keeps a session of its own without updates, for Telegram files and uploads.
        Telegram may be unreachable: the service runs (API, page, jobs) while the session keeps
        trying to log in on its own."""
        if bot is None or telegram is None:
            return
        await self._stop_bot(bot)
        if self._stopping:
            return  # the session stops after the uploads, which may still send through it
        if telegram.started:
            await telegram.stop()
        self._bot_start = asyncio.create_task(
            _start_telegram(telegram, bot if leading else None), name="telegram-start"
        )

    def _telegram_session(self, store: Store, metrics: Metrics) -> TelegramSession | None:
        telegram = self.config.telegram
        if not telegram.enabled:
            logger.info("no Telegram credentials (telegram.bot_token): the bot is off")
            return None
        # Imported only when the bot runs: Pyrogram is heavy and unused otherwise.
        from bot.session import TelegramSession

        return TelegramSession(
            telegram,
            workdir=self.config.data_dir,
            store=store,
            client_factory=self.telegram_client_factory,
            on_flood_wait=metrics.flood_wait,
            worker_client_factory=self.telegram_worker_factory,
        )

    async def wait_bot(self) -> None:
        """Wait until the bot's start-up has finished (or failed and was logged)."""
        if self._bot_start is not None:
            await asyncio.shield(self._bot_start)

    async def _stop_bot(self, bot: TelegramBot) -> None:
        if self._bot_start is not None:
            self._bot_start.cancel()
            self._bot_start = None
        await bot.stop()

    async def reload(self) -> ConfigDiff:
        """Re-read config.yaml; each part applies the keys that may change live; the diff names
        those that need a restart."""
        new = load_config(self.config.config_path)
        diff = diff_config(self.config, new)
        live = with_live_changes(self.config, new, diff.applied)
        self.config = live
        parts = self.parts
        parts.links.reconfigure(link_expiry=live.web.link_expiry, base_url=live.web.base_url)
        parts.uploads.apply_config(live.upload)
        await parts.engine.apply_config(live.aria2)
        await parts.engine.set_download_limit(live.limits.download)
        parts.uploads.set_upload_limit(live.limits.upload)
        await parts.store.init_config_from_yaml(masked_settings(live))
        configure_logging(live.logging, self._log_secrets)
        logger.info(
            "configuration reloaded: applied {}; needs a restart: {}",
            ", ".join(diff.applied) or "nothing",
            ", ".join(diff.needs_restart) or "nothing",
        )
        return diff


async def _start_telegram(telegram: TelegramSession, bot: TelegramBot | None) -> None:
    """Start the session: with the bot, receiving updates; without, for files and uploads."""
    try:
        if bot is not None:
            await bot.start()
        await telegram.start(updates=bot is not None)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        logger.error("the Telegram bot could not start ({}); the service runs without it", exc)


async def _cluster_secrets(store: Store, config: Config, own: Secrets) -> Secrets:
    """The secrets every node of a cluster must share: the key that signs stream links (a link
    from any node works on the node holding the file) and, unless configured, the web token."""
    link_key = await store.shared_secret("link_key", own.link_key.hex)
    web_token = config.web.token or await store.shared_secret("web_token", lambda: own.web_token)
    return replace(own, link_key=bytes.fromhex(link_key), web_token=web_token)


async def _close_store(store: Store) -> None:
    await store.close()
    logger.info("MistRelay stopped")


async def run_service(
    config: Config, *, telegram_client_factory: Callable[[], Client] | None = None
) -> None:
    """Run until SIGINT or SIGTERM; SIGHUP reloads the configuration."""
    service = Service(config, telegram_client_factory=telegram_client_factory)
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
    move = sub.add_parser(
        "migrate-store",
        help="copy the SQLite store into an empty PostgreSQL database (the service stopped)",
    )
    move.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="postgresql://user@host[:port]/database (a password in it is never shown; "
        "PGPASSWORD or ~/.pgpass may give it instead)",
    )
    move.add_argument(
        "--apply", action="store_true", help="copy (without it: a dry run that writes nothing)"
    )
    upstream = sub.add_parser(
        "import-upstream",
        help="import the jobs of the relay bot's SQLite database MistRelay grew from",
    )
    upstream.add_argument("path", type=Path, help="that bot's database file (downloads.db)")
    upstream.add_argument(
        "--files",
        type=Path,
        default=None,
        metavar="DIR",
        help="match completed downloads to the files in DIR (the download folder or inside it)",
    )
    mode = upstream.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="report only; write nothing")
    mode.add_argument("--apply", action="store_true", help="import (the service stopped)")
    client_cli.add_parsers(sub)
    return parser.parse_args(argv)


# What makes `check` fail with exit code 2: the store, its database driver, aria2, the disk.
_CHECK_ERRORS: tuple[type[Exception], ...] = (
    StoreError,
    *DRIVER_ERRORS,
    OSError,
    Aria2RpcError,
    Aria2Unavailable,
)


async def check_command(config: Config, *, fix: bool) -> int:
    """`python app.py check [--fix]`: print every mismatch; with `fix`, repair them.

    Exit code: 0 nothing found, 1 mismatches found (also when they were fixed), 2 error.
    """
    try:
        version = await inspect_store(config.database)
    except StoreError as exc:
        print(f"check: {exc}")
        return 2
    if version != SCHEMA_VERSION:
        database = config.database
        where = database.redacted_url if database.backend == "postgresql" else database.path
        print(
            f"check: {where} has schema version {version}; start the service once to "
            f"migrate it to {SCHEMA_VERSION}"
        )
        return 2
    try:
        db = await open_store(config.database)
    except _CHECK_ERRORS as exc:
        print(f"check failed: {exc}")
        return 2
    try:
        async with running_aria2(config.aria2, config.data_dir) as (aria2, where):
            # In a cluster, the jobs this node holds: the others run on other machines.
            node = config.cluster.name if db.shared else None
            result = await check(db, aria2, config.aria2.download_dir, node=node)
            if result.aria2_compared:
                print(f"aria2: compared (at {where})")
            else:
                print(f"aria2: not reachable: {where}; compared with the disk only")
            for mismatch in result.mismatches:
                print(mismatch.line())
            # The statistics' running totals against a count of every row.
            drift = await db.recount_totals(repair=fix)
            for line in drift:
                print(line)
            recounted = ["statistics: replaced by a recount of every row"] if drift else []
            found = result.mismatches
            if not found and not drift:
                print(
                    "No mismatches: the database agrees with the disk"
                    + (" and aria2." if result.aria2_compared else ".")
                )
                return 0
            if not fix:
                count = len(found) + len(drift)
                print(f"{count} mismatch(es). Dry run: nothing was changed. With --fix:")
                for text in [f"{m.subject}: {m.fix}" for m in found] + recounted:
                    print(f"  {text}")
                return 1
            changes = [*await repair(db, aria2, found), *recounted]
        print(f"{len(found) + len(drift)} mismatch(es). Changed:")
        for line in changes:
            print(f"  {line}")
        print("Exit code 1: mismatches were found (and fixed as above).")
        return 1
    except _CHECK_ERRORS as exc:
        print(f"check failed: {exc}")
        return 2
    finally:
        await db.close()


_PASSWORD_NOTE = "the password comes from PGPASSWORD or ~/.pgpass, not from the command line"


def backup_command(config: Config, target: Path) -> int:
    database = config.database
    if database.backend == "postgresql":
        print(f"backup: the store is on PostgreSQL: back it up with pg_dump ({_PASSWORD_NOTE}):")
        url = shlex.quote(database.client_url)
        print(f"  pg_dump --format=custom --file={shlex.quote(str(target))} {url}")
        return 2
    try:
        backup_database_file(config.database.sqlite_path, target)
    except (StoreError, OSError, ValueError) as exc:
        logger.error("backup failed: {}", exc)
        return 2
    logger.info("database copied to {}", target)
    return 0


def restore_command(config: Config, backup: Path) -> int:
    database = config.database
    if database.backend == "postgresql":
        print(
            "restore: the store is on PostgreSQL: stop the service, then restore a pg_dump "
            f"backup with pg_restore ({_PASSWORD_NOTE}):"
        )
        url = shlex.quote(database.client_url)
        options = "--clean --if-exists --no-owner"
        print(f"  pg_restore {options} --dbname={url} {shlex.quote(str(backup))}")
        return 2
    lock = InstanceLock(config.data_dir)
    if not lock.acquire():
        logger.error("MistRelay is running on {}: stop it before restoring", config.data_dir)
        return 2
    try:
        kept = restore_database_file(backup, config.database.sqlite_path)
    except (StoreError, OSError, ValueError) as exc:
        logger.error("restore refused: {}", exc)
        return 2
    finally:
        lock.release()
    if kept is not None:
        logger.info("the replaced database was kept as {}", kept)
    logger.info("database restored from {}", backup)
    return 0


# What makes `migrate-store` fail with exit code 2 beyond the store's refusals.
_MOVE_ERRORS: tuple[type[Exception], ...] = (*DRIVER_ERRORS, OSError)


async def migrate_store_command(config: Config, to: str, *, apply: bool) -> int:
    """`python app.py migrate-store --to URL [--apply]`: copy the configured SQLite store into
    the empty PostgreSQL database `to` names; without `apply`, a dry run that writes nothing.

    Exit code: 0 copied (or, in a dry run, nothing in the way), 2 refused or failed.
    """
    source = config.database
    if source.backend != "sqlite":
        print(
            f"migrate-store: the configured store is already on PostgreSQL "
            f"({source.redacted_url}); it copies a SQLite store"
        )
        return 2
    try:
        target = replace(source, url=parse_database_url(to, key="--to"))
    except ConfigError as exc:
        print(f"migrate-store: {exc}")
        return 2
    if target.backend != "postgresql":
        print("migrate-store: --to: must be postgresql://[user[:password]@]host[:port]/database")
        return 2
    lock = InstanceLock(config.data_dir)
    if not lock.acquire():
        print(f"migrate-store: MistRelay is running on {config.data_dir}: stop it first")
        return 2
    try:
        move = await move_store(source, target, apply=apply)
    except StoreError as exc:
        print(f"migrate-store: {exc}")
        return 2
    except _MOVE_ERRORS as exc:
        problem = " ".join(str(exc).split()) or type(exc).__name__
        print(f"migrate-store failed, nothing was written to the target: {problem}")
        return 2
    finally:
        lock.release()
    _print_move(move, applied=apply)
    if not apply:
        print("Dry run: nothing was written. Run again with --apply.")
        return 0
    print("To run on PostgreSQL from now on, set in the configuration:")
    print(f"  database.url: {target.redacted_url}")
    if target.redacted_url != target.client_url:
        print("Put the password where *** is, or leave ':***' out and give it in PGPASSWORD.")
    print(f"The SQLite database {source.path} is kept; with database.url set, it is not used.")
    return 0


# What makes `import-upstream` fail with exit code 2.
_IMPORT_ERRORS: tuple[type[Exception], ...] = (UpstreamError, StoreError, OSError, *DRIVER_ERRORS)


async def import_upstream_command(
    config: Config, source: Path, files: Path | None, *, apply: bool
) -> int:
    """`python app.py import-upstream PATH [--files DIR] --dry-run|--apply`.

    Exit code: 0 done (or, in a dry run, planned), 2 refused or failed.
    """
    lock = InstanceLock(config.data_dir)
    if apply and not lock.acquire():
        print(f"import-upstream: MistRelay is running on {config.data_dir}: stop it first")
        return 2
    try:
        upstream = await asyncio.to_thread(read_upstream, source)
        index = None
        if files is not None:
            root = files_root(files, config.aria2.download_dir)
            index = await asyncio.to_thread(FileIndex.scan, root)
        store = await _store_for_import(config, apply=apply)
        try:
            imported = await store.imported_origins() if store else {}
            active = (
                await store.fetch_downloads_in_states(ACTIVE_DOWNLOAD_STATUSES) if store else []
            )
            plan = await asyncio.to_thread(
                functools.partial(
                    plan_import,
                    upstream,
                    imported=imported,
                    active_sources=[row.source_key for row in active],
                    uploads=config.upload,
                    files=index,
                )
            )
            result = await store.import_rows(plan.batch) if apply and store else None
        finally:
            if store is not None:
                await store.close()
    except _IMPORT_ERRORS as exc:
        print(f"import-upstream: {exc}; nothing was written")
        return 2
    finally:
        lock.release()
    for line in plan.lines(result):
        print(line)
    if not apply:
        print("Dry run: nothing was written. Run again with --apply.")
    return 0


async def _store_for_import(config: Config, *, apply: bool) -> Store | None:
    """The store to import into: opened (and migrated) for --apply; for a dry run, only if it
    exists at the current schema (None when there is none yet)."""
    if apply:
        return await open_store(config.database)
    try:
        version = await inspect_store(config.database)
    except StoreUnavailable:
        raise
    except StoreError:
        return None  # no database yet: everything would be new
    if version != SCHEMA_VERSION:
        raise StoreError(
            f"the database has schema version {version}; --apply migrates it to "
            f"{SCHEMA_VERSION} first (or start the service once)"
        )
    return await open_store(config.database)


def _print_move(move: StoreMove, *, applied: bool) -> None:
    version = move.source_version
    if version == SCHEMA_VERSION:
        print(f"Source: {move.source} (schema version {version})")
    else:
        done = "migrated" if applied else "--apply migrates it"
        print(f"Source: {move.source} (schema version {version}; {done} to {SCHEMA_VERSION} first)")
    state = (
        "empty" if move.target_version == 0 else f"schema version {move.target_version}, no rows"
    )
    print(f"Target: {move.target} ({state})")
    print("Copied in one transaction; rows and ids verified:" if applied else "Would copy:")
    width = max(len(count.table) for count in move.tables)
    for count in move.tables:
        print(f"  {count.table:<{width}}  {_rows_text(count)}")


def _rows_text(count: TableCount) -> str:
    text = f"{count.rows} row" + ("" if count.rows == 1 else "s")
    if count.max_id:
        text += f", ids up to {count.max_id}"
    if count.last_id:
        text += f"; new ids from {count.last_id + 1}"
    return text


def main(argv: list[str] | None = None) -> int:
    # What the service writes (database, secrets, aria2's session, downloads, backups) and what
    # the programs it runs write (aria2c, rclone, ffprobe) is readable by its own user only.
    os.umask(0o077)
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
    configure_logging(config.logging)
    command = args.command or "run"
    if command == "check":
        configure_logging(replace(config.logging, level="WARNING"))
        return asyncio.run(check_command(config, fix=args.fix))
    if command == "backup":
        return backup_command(config, args.path)
    if command == "restore":
        return restore_command(config, args.path)
    if command == "import-upstream":
        configure_logging(replace(config.logging, level="WARNING"))
        return asyncio.run(import_upstream_command(config, args.path, args.files, apply=args.apply))
    if command in ("add", "list"):
        configure_logging(replace(config.logging, level="WARNING"))
        return client_cli.run_command(config, args)
    if command == "migrate-store":
        configure_logging(replace(config.logging, level="WARNING"))
        return asyncio.run(migrate_store_command(config, args.to, apply=args.apply))
    try:
        asyncio.run(run_service(config))
    except (AlreadyRunning, StoreError) as exc:
        logger.error("{}", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
