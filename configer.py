"""MistRelay's typed configuration.

Precedence: built-in defaults < ``config.yaml`` < environment (``MISTRELAY_<SECTION>_<KEY>``).
Every problem is a :class:`ConfigError` whose text is one line naming where the value came from,
the dotted key and what is wrong — never a secret's value.

Also here: the generated secrets kept in the data folder (:func:`ensure_secrets`), the masked view
of the effective settings (:func:`masked_settings`), the secret values logs must hide
(:func:`log_secrets`), what a reload may apply live (:func:`diff_config`) and writing a runtime
change back to the file (:func:`set_value_in_file`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
import secrets
import socket
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import yaml
from loguru import logger

from files import discard

__all__ = [
    "CONFIG_ENV_VAR",
    "DB_PATH_ALIAS",
    "DEFAULT_CONFIG_FILE",
    "ENV_PREFIX",
    "ENV_VARS",
    "KNOWN_KEYS",
    "LIVE_KEYS",
    "SECRET_KEYS",
    "SOURCE_TYPES",
    "Aria2Config",
    "Config",
    "ConfigDiff",
    "ConfigError",
    "DatabaseBackend",
    "DatabaseConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MaintenanceConfig",
    "ProxyParts",
    "Secrets",
    "TelegramConfig",
    "UploadConfig",
    "UploadMatch",
    "UploadTarget",
    "WebConfig",
    "child_environment",
    "default_config",
    "diff_config",
    "ensure_secrets",
    "load_config",
    "log_secrets",
    "mask_url_passwords",
    "masked_settings",
    "parse_database_url",
    "parse_setting",
    "parse_size",
    "proxy_parts",
    "set_value_in_file",
    "set_values_in_file",
    "shown_values",
]

ENV_PREFIX = "MISTRELAY_"
CONFIG_ENV_VAR = "MISTRELAY_CONFIG"
DB_PATH_ALIAS = "MISTRELAY_DB_PATH"
DEFAULT_CONFIG_FILE = "config.yaml"

SECRET_KEYS: frozenset[str] = frozenset(
    {
        "telegram.api_hash",
        "telegram.bot_token",
        "telegram.worker_bot_tokens",
        "aria2.rpc_secret",
        "web.token",
        "web.metrics_token",
    }
)
# Keys whose values may hold a password: an error names the problem, never the value.
_UNSHOWN_KEYS: frozenset[str] = SECRET_KEYS | {
    "aria2.options",
    "database.url",
    "telegram.proxy",
    "aria2.proxy",
    "upload.proxy",
}

# Keys a running service can take over without a restart (SIGHUP / POST /api/config/reload).
LIVE_KEYS: frozenset[str] = frozenset(
    {
        "telegram.admins",
        "telegram.allowed_users",
        "telegram.quotas",
        "aria2.poll_interval",
        "telegram.progress_interval",
        "telegram.language",
        "aria2.idle_poll_interval",
        "aria2.max_download_size",
        "aria2.max_torrent_files",
        "aria2.ask_file_selection",
        "aria2.file_selection_timeout",
        "aria2.allow_private_addresses",
        "aria2.blocked_networks",
        "aria2.max_concurrent_downloads",  # via aria2.changeGlobalOption
        "upload.auto_delete",
        "upload.max_retries",
        "upload.max_concurrent",
        "upload.retry_backoff",
        "upload.targets",
        "upload.extract_max_size",
        "upload.extract_max_ratio",
        "web.link_expiry",
        "web.header_timeout",
        "web.max_connections_per_client",
        "web.login_attempts",
        "maintenance.check_interval",
        "logging.level",
        "logging.format",
        "logging.file",
        "logging.rotation",
        "logging.retention",
        "limits.download",  # via aria2.changeGlobalOption
        "limits.upload",  # rclone's --bwlimit of the uploads that start after the change
    }
)

TargetType = Literal["rclone", "telegram"]
TARGET_TYPES: tuple[str, ...] = get_args(TargetType)
SOURCE_TYPES: tuple[str, ...] = ("telegram", "http", "ftp", "magnet", "torrent")
LOG_LEVELS: tuple[str, ...] = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS: tuple[str, ...] = ("text", "json")
BOT_LANGUAGES: tuple[str, ...] = ("auto", "en", "zh")  # auto: each user's Telegram language

WEB_TOKEN_FILE = "web_token"
LINK_KEY_FILE = "link_key"
ARIA2_SECRET_FILE = "aria2_secret"

_MAX_INT64 = 2**63 - 1
_YEAR = 365 * 24 * 3600

# What a job of a user who is not an admin may not reach: loopback, private, link-local, CGNAT,
# IETF protocol assignments, benchmarking, multicast, unspecified and reserved, IPv6 unique and
# site local. IPv6 forms that carry an IPv4 address are also judged by that address.
DEFAULT_BLOCKED_NETWORKS: tuple[str, ...] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
)


# --- the typed configuration --------------------------------------------------------------------


@dataclass(frozen=True)
class Quotas:
    """What one allowed user (not an admin) may have at once: jobs not yet finished, and bytes
    of jobs added in the last 24 hours. 0 = no cap."""

    active_jobs: int = 0
    bytes_per_day: int = 0


@dataclass(frozen=True)
class TelegramConfig:
    api_id: int = 0
    api_hash: str = field(default="", repr=False)  # secrets: never in a repr or a traceback
    bot_token: str = field(default="", repr=False)
    admins: tuple[int, ...] = ()
    allowed_users: tuple[int, ...] = ()
    quotas: Quotas = Quotas()  # per allowed user, in chat, on the page and the API alike
    parts_in_flight: int = 4  # upload.GetFile parts fetched ahead while streaming
    # More bots whose sessions share the parts of Telegram streams; secrets, like bot_token.
    worker_bot_tokens: tuple[str, ...] = field(default=(), repr=False)
    storage_channel: int = 0  # the channel where the main bot forwards files for the workers
    progress_interval: float = 3.0  # seconds between edits of one chat's progress messages
    proxy: str = field(default="", repr=False)  # socks5/socks4/http URL; may carry a password
    language: str = "auto"  # the bot's replies: auto (each user's Telegram language) | en | zh
    max_upload_size: int = 2000 * 1024 * 1024  # bytes one message carries (4000 MiB: premium)

    @property
    def enabled(self) -> bool:
        """The bot runs only with all three credentials."""
        return bool(self.api_id and self.api_hash and self.bot_token)


@dataclass(frozen=True)
class Aria2Config:
    rpc_url: str = ""  # empty = MistRelay runs its own aria2c on loopback
    rpc_secret: str = field(default="", repr=False)
    download_dir: Path = Path("data/downloads")
    max_concurrent_downloads: int = 5
    poll_interval: float = 1.0
    idle_poll_interval: float = 5.0
    max_download_size: int = 0  # bytes; 0 = no cap
    max_torrent_files: int = 10_000  # files in one .torrent
    ask_file_selection: str = "chats"  # one of FILE_SELECTION_ASKS
    file_selection_timeout: int = 300  # seconds a job waits for its choice of files
    allow_private_addresses: bool = False
    blocked_networks: tuple[str, ...] = DEFAULT_BLOCKED_NETWORKS
    executable: str = "aria2c"
    rpc_port: int = 0  # 0 = a free port
    options: dict[str, str] = field(default_factory=dict)
    enable_dht: bool = True
    proxy: str = field(default="", repr=False)  # http URL (aria2's all-proxy); may carry a password

    @property
    def embedded(self) -> bool:
        return not self.rpc_url


@dataclass(frozen=True)
class UploadMatch:
    """Which downloads a target takes; an empty filter accepts everything."""

    source_types: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    min_size: int | None = None
    max_size: int | None = None

    def accepts(self, source_type: str, file_name: str, size: int | None) -> bool:
        """Whether a download fits. An unknown size never fits a size bound."""
        if self.source_types and source_type not in self.source_types:
            return False
        if self.extensions:
            lowered = file_name.lower()
            if not any(lowered.endswith("." + ext) for ext in self.extensions):
                return False
        if self.min_size is not None and (size is None or size < self.min_size):
            return False
        return not (self.max_size is not None and (size is None or size > self.max_size))


@dataclass(frozen=True)
class UploadTarget:
    name: str
    type: TargetType
    remote: str = ""  # rclone remote name, without the trailing ":"
    path: str = "/"
    chat_id: int | None = None
    max_retries: int | None = None  # None = upload.max_retries
    match: UploadMatch | None = None

    def accepts(self, source_type: str, file_name: str, size: int | None) -> bool:
        return self.match is None or self.match.accepts(source_type, file_name, size)


@dataclass(frozen=True)
class UploadConfig:
    targets: tuple[UploadTarget, ...] = ()
    auto_delete: bool = False
    max_retries: int = 3
    max_concurrent: int = 2
    retry_backoff: float = 5.0  # seconds; base of the exponential backoff
    rclone_config: str = ""  # empty = rclone's own default config file
    rclone_executable: str = "rclone"
    proxy: str = field(default="", repr=False)  # http/https/socks5 URL for rclone's connections
    extract_max_size: int = 100 * 1024**3  # bytes one extracted archive may unpack to
    extract_max_ratio: float = 200.0  # bytes out per byte of archive

    def target(self, name: str) -> UploadTarget | None:
        return next((t for t in self.targets if t.name == name), None)

    def retries_for(self, target: UploadTarget) -> int:
        return self.max_retries if target.max_retries is None else target.max_retries


@dataclass(frozen=True)
class WebConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str = ""  # empty = http://host:port
    token: str = field(default="", repr=False)  # empty = generated on first start
    link_expiry: int = 0  # seconds; 0 = stream links never expire
    max_body_size: int = 20 * 1024 * 1024
    header_timeout: float = 20.0  # seconds a connection may take to send a request's head
    max_connections_per_client: int = 256  # open connections from one address (IPv6: a /64)
    login_attempts: int = 10  # failed sign-ins one client may make a minute
    metrics_token: str = field(default="", repr=False)  # opens GET /metrics only; empty = none

    @property
    def base_url(self) -> str:
        """The base of links: public_url, else this server's address (a wildcard → loopback)."""
        if self.public_url:
            return self.public_url
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


DatabaseBackend = Literal["sqlite", "postgresql"]
_SQLITE_PREFIX = "sqlite:///"
_POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class DatabaseConfig:
    """Where the store lives.

    ``url`` empty or ``sqlite:///…`` = SQLite in the file ``path`` (a SQLite URL wins: the loader
    sets ``path`` to its file); ``postgresql://…`` = PostgreSQL, and ``path`` only locates the
    data folder.
    The loader keeps ``url`` canonical: a SQLite URL with an absolute path, a PostgreSQL URL
    rebuilt from its checked parts.
    """

    path: Path = Path("data/mistrelay.db")
    url: str = ""

    def __repr__(self) -> str:  # keep the password out of logs and tracebacks
        return f"DatabaseConfig(path={self.path!r}, url={self.redacted_url!r})"

    @property
    def backend(self) -> DatabaseBackend:
        scheme = self.url.partition(":")[0].lower()
        return "postgresql" if scheme in _POSTGRES_SCHEMES else "sqlite"

    @property
    def sqlite_path(self) -> Path:
        """The SQLite file; ValueError with PostgreSQL."""
        if self.backend != "sqlite":
            raise ValueError("database.url names a PostgreSQL server, not a SQLite file")
        return self.path

    @property
    def postgres_dsn(self) -> str:
        """The connection URL for the PostgreSQL client, password included; ValueError with
        SQLite. ``connect_timeout`` is left out: see :attr:`postgres_connect_timeout`."""
        server = self._postgres()
        return server.text(quote(server.password, safe=""), with_timeout=False)

    @property
    def postgres_connect_timeout(self) -> float | None:
        """Seconds from the URL's ``connect_timeout``; None = the client's default."""
        timeout = dict(self._postgres().params).get("connect_timeout")
        return None if timeout is None else float(timeout)

    @property
    def redacted_url(self) -> str:
        """The URL with the password shown as ``***``."""
        return self._postgres().text("***") if self.backend == "postgresql" else self.url

    @property
    def client_url(self) -> str:
        """The PostgreSQL URL without its password, for a command line of PostgreSQL's own
        tools (they take the password from PGPASSWORD or ~/.pgpass); ValueError with SQLite."""
        return self._postgres().text(None)

    def _postgres(self) -> _PostgresURL:
        if self.backend != "postgresql":
            raise ValueError("database.url does not name a PostgreSQL server")
        return _postgres_url(self.url)


@dataclass(frozen=True)
class ClusterConfig:
    """Several nodes on one PostgreSQL store. A single node (and any SQLite store) needs none of
    these: the node name defaults to the host name, the public URL to `web.public_url`."""

    node_name: str = ""  # empty = this machine's host name
    public_url: str = ""  # empty = web.base_url
    node_timeout: float = 15.0  # seconds without a heartbeat after which a node counts as dead
    upload_wait: float = 600.0  # seconds a dead node's uploads wait for it before they fail

    @property
    def name(self) -> str:
        return self.node_name or _host_node_name()


def _host_node_name() -> str:
    """The host name as a node name: its first label, cut to the allowed characters."""
    label = socket.gethostname().split(".", 1)[0]
    return _NODE_NAME_FORBIDDEN.sub("-", label)[:63].strip("-.") or "node"


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", re.ASCII)
_NODE_NAME_FORBIDDEN = re.compile(r"[^A-Za-z0-9._-]", re.ASCII)


@dataclass(frozen=True)
class MaintenanceConfig:
    check_interval: float = 600.0  # seconds; 0 = off


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "text"  # text (one line for people) | json (one JSON object a line)
    file: str = ""  # a log file besides stderr; empty = none
    rotation: str = "50 MB"  # a new file past this size or age; empty = never
    retention: str = "10"  # rotated files kept: a count or an age; empty = all

    @property
    def rotation_value(self) -> int | timedelta | None:
        return log_rotation(self.rotation)

    @property
    def retention_value(self) -> int | timedelta | None:
        return log_retention(self.retention)


@dataclass(frozen=True)
class LimitsConfig:
    download: int = 0  # bytes a second over all downloads; 0 = no limit
    upload: int = 0  # bytes a second of each rclone upload; 0 = no limit


@dataclass(frozen=True)
class Config:
    telegram: TelegramConfig = field(default_factory=TelegramConfig)
    aria2: Aria2Config = field(default_factory=Aria2Config)
    upload: UploadConfig = field(default_factory=UploadConfig)
    web: WebConfig = field(default_factory=WebConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    maintenance: MaintenanceConfig = field(default_factory=MaintenanceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    config_path: Path | None = None

    @property
    def data_dir(self) -> Path:
        """The folder of database.path (with PostgreSQL too); generated secrets live here."""
        return self.database.path.parent


_SECTIONS: dict[str, type] = {
    "telegram": TelegramConfig,
    "aria2": Aria2Config,
    "upload": UploadConfig,
    "web": WebConfig,
    "database": DatabaseConfig,
    "cluster": ClusterConfig,
    "maintenance": MaintenanceConfig,
    "logging": LoggingConfig,
    "limits": LimitsConfig,
}
_SECTION_KEYS: dict[str, tuple[str, ...]] = {
    name: tuple(f.name for f in dataclasses.fields(cls)) for name, cls in _SECTIONS.items()
}
KNOWN_KEYS: tuple[str, ...] = tuple(
    f"{section}.{key}" for section, keys in _SECTION_KEYS.items() for key in keys
)
ENV_VARS: dict[str, str] = {
    f"{ENV_PREFIX}{dotted.replace('.', '_').upper()}": dotted for dotted in KNOWN_KEYS
}
_PATH_KEYS = ("aria2.download_dir", "database.path")


# --- errors -------------------------------------------------------------------------------------


class ConfigError(Exception):
    """A configuration problem; ``str()`` is one line: ``source: key: problem``."""

    def __init__(self, problem: str, *, key: str | None = None, source: str | None = None):
        self.problem = problem
        self.key = key
        self.source = source
        text = ": ".join(part for part in (source, key, problem) if part)
        super().__init__(_one_line(text))


def _one_line(text: str) -> str:
    return " ".join(text.replace("\r", "\n").split("\n")).strip()


_NO_VALUE: Any = object()


class _Invalid(Exception):
    """Raised by parsers; turned into a ConfigError by the caller, who knows key and source."""

    def __init__(self, problem: str, value: object = _NO_VALUE, *, subkey: str = "") -> None:
        super().__init__(problem)
        self.problem = problem
        self.value = value
        self.subkey = subkey

    def under(self, prefix: str) -> _Invalid:
        return _Invalid(self.problem, self.value, subkey=prefix + self.subkey)


def _show(value: object) -> str:
    try:
        text = repr(value)
    except (ValueError, RecursionError):  # an int of thousands of digits, a deep structure
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."


def _to_error(exc: _Invalid, dotted: str, source: str) -> ConfigError:
    key = dotted + exc.subkey
    if dotted in _UNSHOWN_KEYS:
        problem = f"invalid value ({exc.problem})" if dotted in SECRET_KEYS else exc.problem
        return ConfigError(problem, key=key, source=source)
    problem = exc.problem if exc.value is _NO_VALUE else f"{exc.problem}, got {_show(exc.value)}"
    return ConfigError(problem, key=key, source=source)


def _suggest(word: str, choices: list[str], wrap: Callable[[str], str] = str) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {wrap(close[0])}?" if close else ""


# --- value parsers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    base_dir: Path  # relative paths are resolved against this
    from_env: bool  # env values are text to convert; YAML values are already typed


_Parser = Callable[[Any, _Context], Any]
_INT_TEXT = re.compile(r"[+-]?[0-9]{1,30}", re.ASCII)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _int_value(value: object, ctx: _Context) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if ctx.from_env and isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return None


def _range_text(lo: float, hi: float, noun: str, lo_open: bool = False) -> str:
    low = f"> {lo}" if lo_open else f">= {lo}"
    if hi >= _MAX_INT64:
        return f"must be {noun} {low}"
    if lo_open:
        return f"must be {noun} {low} and <= {hi}"
    return f"must be {noun} between {lo} and {hi}"


def _integer(lo: int, hi: int = _MAX_INT64, note: str = "") -> _Parser:
    problem = _range_text(lo, hi, "an integer") + note

    def parse(value: Any, ctx: _Context) -> int:
        number = _int_value(value, ctx)
        if number is None or not lo <= number <= hi:
            raise _Invalid(problem, value)
        return number

    return parse


def _number(lo: float, hi: float, *, lo_open: bool = False, note: str = "") -> _Parser:
    problem = _range_text(lo, hi, "a number", lo_open) + note

    def parse(value: Any, ctx: _Context) -> float:
        number: float | None = None
        if isinstance(value, int | float) and not isinstance(value, bool):
            with contextlib.suppress(OverflowError):
                number = float(value)
        elif ctx.from_env and isinstance(value, str):
            with contextlib.suppress(ValueError):
                number = float(value.strip())
        if number is None or not math.isfinite(number):
            raise _Invalid(problem, value)
        if not (lo < number if lo_open else lo <= number) or number > hi:
            raise _Invalid(problem, value)
        return number

    return parse


_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "off", "0"})


def _boolean(value: Any, ctx: _Context) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise _Invalid("must be true or false", value)


def _text(value: Any, ctx: _Context) -> str:
    if not isinstance(value, str):
        raise _Invalid("must be a string (quote it in YAML)", value)
    if _CONTROL_CHARS.search(value.strip()):
        raise _Invalid("must not contain control characters", value)
    return value.strip()


def _non_empty_text(value: Any, ctx: _Context) -> str:
    text = _text(value, ctx)
    if not text:
        raise _Invalid("must not be empty", value)
    return text


def _single_token(value: Any, ctx: _Context) -> str:
    text = _text(value, ctx)
    if any(ch.isspace() for ch in text):
        raise _Invalid("must not contain spaces")
    return text


def _path(value: Any, ctx: _Context) -> Path:
    text = _non_empty_text(value, ctx)
    path = Path(os.path.expanduser(text))
    if not path.is_absolute():
        path = ctx.base_dir / path
    return Path(os.path.normpath(path))


def _optional_path_text(value: Any, ctx: _Context) -> str:
    return str(_path(value, ctx)) if _text(value, ctx) else ""


def _executable(value: Any, ctx: _Context) -> str:
    """A program name looked up in PATH, or a path (a relative one is resolved)."""
    text = _non_empty_text(value, ctx)
    return str(_path(text, ctx)) if "/" in text else text


def _host(value: Any, ctx: _Context) -> str:
    text = _non_empty_text(value, ctx)
    if any(ch.isspace() or ch in "/@?#" for ch in text):
        raise _Invalid("must be a host name or an IP address", value)
    return text


def _url(schemes: tuple[str, ...]) -> Callable[[Any, _Context], str]:
    problem = "must be empty or a URL starting with " + " or ".join(f"{s}://" for s in schemes)

    def parse(value: Any, ctx: _Context) -> str:
        text = _text(value, ctx)
        if not text:
            return ""
        try:
            parts = urlsplit(text)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            raise _Invalid(problem, value) from None
        if parts.scheme.lower() not in schemes or not parts.hostname or parts.fragment:
            raise _Invalid(problem, value)
        return text

    return parse


_http_url = _url(("http", "https"))

# The proxy schemes each consumer dials itself: Pyrogram (through python-socks), aria2 (an HTTP
# proxy only) and rclone (Go's HTTP client: http, https and socks5 proxies).
TELEGRAM_PROXY_SCHEMES = ("socks5", "socks4", "http")
ARIA2_PROXY_SCHEMES = ("http",)
UPLOAD_PROXY_SCHEMES = ("http", "https", "socks5")


@dataclass(frozen=True)
class ProxyParts:
    """A proxy URL taken apart; user and password unquoted (empty when absent)."""

    scheme: str
    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)


def proxy_parts(url: str) -> ProxyParts:
    """The parts of a proxy URL the loader has checked (see `_proxy_url`)."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, "a checked proxy URL"
    return ProxyParts(
        scheme=parts.scheme.lower(),
        host=parts.hostname,
        port=parts.port,
        username=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
    )


def _proxy_url(schemes: tuple[str, ...]) -> _Parser:
    """Empty, or scheme://[user[:password]@]host:port with one of `schemes`, and nothing after
    the port. Errors never show the value: it may hold a password."""
    shape = "must be empty or " + " or ".join(f"{s}://" for s in schemes)
    shape += "[user[:password]@]host:port"

    def parse(value: Any, ctx: _Context) -> str:
        text = _text(value, ctx)
        if not text:
            return ""
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as exc:
            raise _Invalid(f"{shape} ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in schemes:
            raise _Invalid(f"{shape}; no other scheme is supported here")
        if not parts.hostname or any(ch.isspace() for ch in text):
            raise _Invalid(f"{shape}; no host name")
        if port is None or port == 0:
            raise _Invalid(f"{shape}; the port is missing")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise _Invalid(f"{shape}; nothing may follow the port")
        if parts.password is not None and not parts.username:
            raise _Invalid(f"{shape}; a password needs a user")
        return text

    return parse


def _public_url(value: Any, ctx: _Context) -> str:
    text = _http_url(value, ctx)
    if "?" in text:
        raise _Invalid("must not contain a query string", value)
    return text.rstrip("/")


_DATABASE_URL_SHAPE = (
    "must be empty, sqlite:///PATH or postgresql://[user[:password]@]host[:port]/database"
)
_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_POSTGRES_PARAMS = ("sslmode", "application_name", "connect_timeout")
_HOST_NAME = re.compile(r"[a-z0-9_.-]{1,253}", re.ASCII)


@dataclass(frozen=True)
class _PostgresURL:
    host: str
    port: int | None
    database: str
    user: str
    password: str = field(repr=False)
    params: tuple[tuple[str, str], ...]  # the allowed query parameters, in the given order

    def text(self, password: str | None, *, with_timeout: bool = True) -> str:
        """The canonical URL with `password` (already URL-encoded) in the password's place;
        None leaves the password out."""
        shown = bool(self.password) and password is not None
        auth = quote(self.user, safe="") + (f":{password}" if shown else "")
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        params = [(k, v) for k, v in self.params if with_timeout or k != "connect_timeout"]
        query = f"?{urlencode(params)}" if params else ""
        at = "@" if auth else ""
        return f"postgresql://{auth}{at}{host}{port}/{quote(self.database, safe='')}{query}"


def _postgres_url(text: str) -> _PostgresURL:
    """The checked parts of a PostgreSQL URL. Problems never quote the URL: it holds a password."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise _Invalid(
            "has an invalid host or port (the port must be 1-65535; write / ? # @ in the user "
            "name or password as %2F %3F %23 %40)"
        ) from None
    if parts.fragment or text.endswith("#"):
        raise _Invalid("must not contain # (write it as %23 in a password)")
    host = parts.hostname or ""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _Invalid("must name a host: a name or an IP address") from None
    elif not _HOST_NAME.fullmatch(host):
        raise _Invalid("must name a host: a name or an IP address")
    if port == 0:
        raise _Invalid("port must be between 1 and 65535")
    name = parts.path.removeprefix("/")
    if not parts.path.startswith("/") or not name or "/" in name:
        raise _Invalid("must name one database after the host (…/database)")
    user, password, database = (
        unquote(part or "") for part in (parts.username, parts.password, name)
    )
    if any(_CONTROL_CHARS.search(part) for part in (user, password, database)):
        raise _Invalid("user name, password and database must not contain control characters")
    return _PostgresURL(host, port, database, user, password, _postgres_params(parts.query))


def _postgres_params(query: str) -> tuple[tuple[str, str], ...]:
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _Invalid("query string must be name=value pairs joined by &") from None
    seen: set[str] = set()
    for name, value in pairs:
        if name not in _POSTGRES_PARAMS:
            allowed = ", ".join(_POSTGRES_PARAMS)
            raise _Invalid(f"unknown query parameter {_show(name)} (allowed: {allowed})")
        if name in seen:
            raise _Invalid(f"query parameter {name} is given twice")
        seen.add(name)
        if name == "sslmode" and value not in _SSL_MODES:
            raise _Invalid("sslmode must be one of " + ", ".join(_SSL_MODES))
        if name == "connect_timeout" and not (value.isdigit() and 1 <= int(value) <= 3600):
            raise _Invalid("connect_timeout must be a whole number of seconds between 1 and 3600")
        if name == "application_name" and not (
            0 < len(value) <= 63 and not _CONTROL_CHARS.search(value)
        ):
            raise _Invalid("application_name must be 1-63 characters without control characters")
    return tuple(pairs)


def _sqlite_file(text: str, ctx: _Context) -> Path:
    rest = text[len("sqlite:") :]
    if not rest.startswith("///") or len(rest) == 3:
        raise _Invalid(
            "must be sqlite:///PATH: three slashes, then a relative path (resolved like "
            "database.path) or /absolute/path"
        )
    name = rest[3:]
    if "?" in name or "#" in name:
        raise _Invalid("a SQLite URL takes no query string or fragment")
    if name == ":memory:":
        raise _Invalid("must name a file (an in-memory database would lose everything)")
    return _path(name, ctx)


def _database_url(value: Any, ctx: _Context) -> str:
    """Empty, ``sqlite:///`` + an absolute path, or a canonical ``postgresql://`` URL."""
    text = _text(value, ctx)
    if not text:
        return ""
    scheme, colon, _ = text.partition(":")
    if colon and scheme.lower() == "sqlite":
        return _SQLITE_PREFIX + str(_sqlite_file(text, ctx))
    if colon and scheme.lower() in _POSTGRES_SCHEMES:
        server = _postgres_url(text)
        return server.text(quote(server.password, safe=""))
    raise _Invalid(_DATABASE_URL_SHAPE)


def parse_database_url(text: str, *, key: str = "database.url") -> str:
    """`text` checked as ``database.url`` is, in its canonical form (a relative SQLite path taken
    from the working directory, as in the environment). ConfigError, one line naming `key` and
    never quoting the text (it may hold a password), when it is not a database URL."""
    try:
        return _database_url(text, _Context(Path.cwd(), from_env=True))
    except _Invalid as exc:
        raise ConfigError(exc.problem, key=key) from None


def _node_name(value: Any, ctx: _Context) -> str:
    text = _text(value, ctx)
    if text and not _NODE_NAME.fullmatch(text):
        raise _Invalid(
            "must be empty (the host name) or 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            value,
        )
    return text


def _log_level(value: Any, ctx: _Context) -> str:
    level = _text(value, ctx).upper()
    if level not in LOG_LEVELS:
        raise _Invalid("must be one of " + ", ".join(LOG_LEVELS), value)
    return level


def _bot_language(value: Any, ctx: _Context) -> str:
    text = _text(value, ctx).strip().lower()
    if text not in BOT_LANGUAGES:
        raise _Invalid(f"must be one of {', '.join(BOT_LANGUAGES)}", value)
    return text


# When a torrent of more than one file waits, paused, for its files to be chosen: never, for
# jobs sent in a chat, or for every job.
FILE_SELECTION_ASKS = ("never", "chats", "always")


def _file_selection_ask(value: Any, ctx: _Context) -> str:
    text = _text(value, ctx).strip().lower()
    if text not in FILE_SELECTION_ASKS:
        raise _Invalid(f"must be one of {', '.join(FILE_SELECTION_ASKS)}", value)
    return text


def _log_format(value: Any, ctx: _Context) -> str:
    text = _text(value, ctx).lower()
    if text not in LOG_FORMATS:
        raise _Invalid("must be one of " + ", ".join(LOG_FORMATS), value)
    return text


_AGE_TEXT = re.compile(r"([0-9]{1,6})\s*(second|minute|hour|day|week)s?", re.ASCII)
_AGE_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400}


def _age(text: str) -> timedelta | None:
    """``"12 hours"``, ``"1 day"``, ``"2 weeks"`` → a timedelta; None if it is not an age."""
    match = _AGE_TEXT.fullmatch(text.strip().lower())
    return timedelta(seconds=int(match[1]) * _AGE_SECONDS[match[2]]) if match else None


def log_rotation(text: str) -> int | timedelta | None:
    """`logging.rotation` as the log file takes it: a size in bytes, an age, or None (never);
    ValueError if it is neither."""
    if not text:
        return None
    age = _age(text)
    return age if age is not None else parse_size(text)


def log_retention(text: str) -> int | timedelta | None:
    """`logging.retention`: how many rotated files to keep, how old they may get, or None (all);
    ValueError if it is neither."""
    if not text:
        return None
    age = _age(text)
    return age if age is not None else int(text.strip())


def _log_limit(convert: Callable[[str], int | timedelta | None], problem: str) -> _Parser:
    def parse(value: Any, ctx: _Context) -> str:
        plain_int = isinstance(value, int) and not isinstance(value, bool)
        text = str(value) if plain_int else _text(value, ctx)
        try:
            limit = convert(text)
        except ValueError:
            raise _Invalid(problem, value) from None
        if isinstance(limit, timedelta):
            limit = int(limit.total_seconds())
        if limit is not None and limit <= 0:
            raise _Invalid(problem, value)
        return text

    return parse


_SIZE_TEXT = re.compile(r"([0-9]{1,20}(?:\.[0-9]{1,9})?)\s*([a-z]{0,3})", re.ASCII)
_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_letter] = 1024**_power  # aria2's habit: a bare K/M/G is binary
    _SIZE_UNITS[_letter + "b"] = 1000**_power
    _SIZE_UNITS[_letter + "ib"] = 1024**_power


def parse_size(text: str) -> int:
    """``"2GiB"`` → 2147483648, ``"500MB"`` → 500000000, ``"1.5K"`` → 1536; ValueError if not."""
    match = _SIZE_TEXT.fullmatch(text.strip().lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"not a size: {text!r}")
    try:
        return int(Decimal(match.group(1)) * _SIZE_UNITS[match.group(2)])
    except InvalidOperation:  # pragma: no cover - the pattern admits only plain decimals
        raise ValueError(f"not a size: {text!r}") from None


def _size(lo: int = 0, note: str = "", hi: int = _MAX_INT64) -> _Parser:
    bounds = f">= {lo}" if hi == _MAX_INT64 else f"between {lo} and {hi}"
    problem = f"must be a size in bytes {bounds} (a number, or text like 500MB or 2GiB){note}"

    def parse(value: Any, ctx: _Context) -> int:
        size = _int_value(value, _Context(ctx.base_dir, from_env=True))
        if size is None and isinstance(value, str):
            with contextlib.suppress(ValueError):
                size = parse_size(value)
        if size is None or not lo <= size <= hi:
            raise _Invalid(problem, value)
        return size

    return parse


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _Invalid(f"must be {what} in JSON ({exc})") from None


_BOT_TOKEN = re.compile(r"[1-9][0-9]{0,19}:[A-Za-z0-9_-]+")


def _bot_tokens(value: Any, ctx: _Context) -> tuple[str, ...]:
    """A list of bot tokens (``<bot id>:<secret>``); from the environment, JSON or commas."""
    items: Any = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            items = _json(text, "a list of bot tokens")
        else:
            items = [part.strip() for part in text.split(",") if part.strip()]
    if not isinstance(items, list):
        raise _Invalid("must be a list of bot tokens")
    tokens: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, str) or not _BOT_TOKEN.fullmatch(item.strip()):
            raise _Invalid("must be a bot token (<bot id>:<secret>)", subkey=f"[{index}]")
        if item.strip() in tokens:
            raise _Invalid("is listed twice", subkey=f"[{index}]")
        tokens.append(item.strip())
    return tuple(tokens)


def _channel_id(value: Any, ctx: _Context) -> int:
    """A channel's chat id as the Bot API writes it (-100…), or 0 for none."""
    number = _int_value(value, ctx)
    if number is None or not (number == 0 or -(10**15) < number < -(10**12)):
        raise _Invalid("must be a channel's chat id (-100…), or 0 for none", value)
    return number


def _id_list(value: Any, ctx: _Context) -> tuple[int, ...]:
    problem = "must be a list of Telegram user ids (positive integers)"
    items: Any = value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            items = _json(text, "a list of user ids")
        else:
            items = [part for part in text.replace(";", ",").split(",") if part.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        items = [value]
    if not isinstance(items, list):
        raise _Invalid(problem, value)
    ids: list[int] = []
    for item in items:
        number = _int_value(item, _Context(ctx.base_dir, from_env=isinstance(item, str)))
        if number is None or not 1 <= number <= _MAX_INT64:
            raise _Invalid(problem, item)
        if number not in ids:
            ids.append(number)
    return tuple(ids)


def _networks(value: Any, ctx: _Context) -> tuple[str, ...]:
    problem = "must be a list of networks like 10.0.0.0/8 or fc00::/7"
    items: Any = value
    if isinstance(value, str):
        text = value.strip()
        items = (
            _json(text, "a list of networks")
            if text.startswith("[")
            else [part for part in text.split(",") if part.strip()]
        )
    if not isinstance(items, list):
        raise _Invalid(problem, value)
    networks: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise _Invalid(problem, item)
        try:
            network = str(ipaddress.ip_network(item.strip()))
        except ValueError as exc:
            raise _Invalid(f"{problem} ({exc})", item) from None
        if network not in networks:
            networks.append(network)
    if not networks:
        raise _Invalid("must list at least one network (aria2.allow_private_addresses allows all)")
    return tuple(networks)


_OPTION_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,63}", re.ASCII)
# Options MistRelay sets itself: the RPC stays on loopback with our secret, under our control.
_RESERVED_OPTIONS: dict[str, str] = {
    "dir": "set aria2.download_dir instead",
    "max-concurrent-downloads": "set aria2.max_concurrent_downloads instead",
    "enable-dht": "set aria2.enable_dht instead",
    **dict.fromkeys(
        (
            "enable-rpc",
            "rpc-listen-all",
            "rpc-listen-port",
            "rpc-secret",
            "rpc-user",
            "rpc-passwd",
            "rpc-allow-origin-all",
            "rpc-secure",
            "rpc-certificate",
            "rpc-private-key",
            "daemon",
        ),
        "MistRelay manages this option",
    ),
}


def _aria2_options(value: Any, ctx: _Context) -> dict[str, str]:
    if ctx.from_env and isinstance(value, str):
        value = _json(value, "an object of aria2 options") if value.strip() else {}
    if not isinstance(value, dict):
        raise _Invalid("must be a mapping of aria2 option names to values")
    options: dict[str, str] = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not _OPTION_NAME.fullmatch(name):
            raise _Invalid(f"{_show(name)} is not an aria2 option name (like max-tries)")
        if name in _RESERVED_OPTIONS:
            raise _Invalid(f"cannot be set here: {_RESERVED_OPTIONS[name]}", subkey=f".{name}")
        if isinstance(raw, bool):
            options[name] = "true" if raw else "false"
        elif isinstance(raw, int) and abs(raw) <= _MAX_INT64:
            options[name] = str(raw)
        elif isinstance(raw, float) and math.isfinite(raw):
            options[name] = repr(raw)
        elif isinstance(raw, str) and not _CONTROL_CHARS.search(raw):
            options[name] = raw
        else:
            raise _Invalid("must be a string, number or true/false", subkey=f".{name}")
    return options


_QUOTA_PARSERS: dict[str, _Parser] = {
    "active_jobs": _integer(0, 1_000_000, " (0 = no cap)"),
    "bytes_per_day": _size(0, " (0 = no cap)"),
}


def _quotas(value: Any, ctx: _Context) -> Quotas:
    if ctx.from_env and isinstance(value, str):
        value = _json(value, "an object of quotas") if value.strip() else {}
    if not isinstance(value, dict):
        raise _Invalid(f"must be a mapping with {' and/or '.join(_QUOTA_PARSERS)}", value)
    found: dict[str, int] = {}
    for name, raw in value.items():
        parser = _QUOTA_PARSERS.get(name) if isinstance(name, str) else None
        if parser is None:
            known = ", ".join(_QUOTA_PARSERS)
            raise _Invalid(f"{_show(name)} is no quota (known: {known})", subkey=f".{name}")
        try:
            found[name] = parser(raw, ctx)
        except _Invalid as exc:
            raise exc.under(f".{name}") from None
    return Quotas(**found)


_TARGET_NAME = re.compile(r"[A-Za-z0-9_-]{1,32}", re.ASCII)
_TARGET_KEYS = tuple(f.name for f in dataclasses.fields(UploadTarget))
_MATCH_KEYS = tuple(f.name for f in dataclasses.fields(UploadMatch))
_EXTENSION = re.compile(r"[a-z0-9][a-z0-9._+-]{0,31}", re.ASCII)
_chat_id = _integer(-_MAX_INT64, _MAX_INT64)
_target_retries = _integer(0, 100)


def _check_keys(item: dict[Any, Any], allowed: tuple[str, ...]) -> None:
    for key in item:
        if not isinstance(key, str) or key not in allowed:
            hint = _suggest(str(key), list(allowed))
            raise _Invalid(f"unknown key{hint}", subkey=f".{key}")


def _word_list(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        return [part for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise _Invalid(f"must be a list of {what}", value)


def _match(value: Any, ctx: _Context) -> UploadMatch:
    if not isinstance(value, dict):
        raise _Invalid("must be a mapping (source_types, extensions, min_size, max_size)", value)
    _check_keys(value, _MATCH_KEYS)
    source_types: list[str] = []
    for word in _word_list(value.get("source_types") or [], "source types"):
        kind = word.strip().lower()
        if kind not in SOURCE_TYPES:
            raise _Invalid("must be among " + ", ".join(SOURCE_TYPES), word, subkey=".source_types")
        if kind not in source_types:
            source_types.append(kind)
    extensions: list[str] = []
    for word in _word_list(value.get("extensions") or [], "file extensions"):
        ext = word.strip().lower().lstrip(".")
        if not _EXTENSION.fullmatch(ext):
            raise _Invalid("must be file extensions like mkv or tar.gz", word, subkey=".extensions")
        if ext not in extensions:
            extensions.append(ext)
    bounds: dict[str, int | None] = {}
    for key in ("min_size", "max_size"):
        raw = value.get(key)
        try:
            bounds[key] = None if raw is None else _size()(raw, ctx)
        except _Invalid as exc:
            raise exc.under(f".{key}") from None
    low, high = bounds["min_size"], bounds["max_size"]
    if low is not None and high is not None and low > high:
        raise _Invalid(f"must not be below min_size ({low})", high, subkey=".max_size")
    return UploadMatch(tuple(source_types), tuple(extensions), low, high)


def _target(item: Any, ctx: _Context) -> UploadTarget:
    if not isinstance(item, dict):
        raise _Invalid("must be a mapping with at least name and type", item)
    _check_keys(item, _TARGET_KEYS)

    def field_value(key: str, parse: _Parser) -> Any:
        try:
            return None if item.get(key) is None else parse(item[key], ctx)
        except _Invalid as exc:
            raise exc.under(f".{key}") from None

    name = item.get("name")
    if not isinstance(name, str) or not _TARGET_NAME.fullmatch(name):
        problem = "is required" if name is None else "must be 1-32 letters, digits, _ or -"
        raise _Invalid(problem, _NO_VALUE if name is None else name, subkey=".name")
    kind = item.get("type")
    if kind not in TARGET_TYPES:
        shown = _NO_VALUE if kind is None else kind
        raise _Invalid("must be rclone or telegram", shown, subkey=".type")
    remote = field_value("remote", _text) or ""
    path = field_value("path", _non_empty_text)
    chat_id = field_value("chat_id", _chat_id)
    max_retries = field_value("max_retries", _target_retries)
    match = field_value("match", _match)
    if kind == "rclone":
        remote = remote.removesuffix(":")
        if not remote:
            raise _Invalid("is required for an rclone target", subkey=".remote")
        if chat_id is not None:
            raise _Invalid("applies only to telegram targets", subkey=".chat_id")
    else:
        if chat_id is None or chat_id == 0:
            raise _Invalid(
                "is required for a telegram target (a non-zero chat id)", subkey=".chat_id"
            )
        if remote or (path or "/") != "/":
            key = "remote" if remote else "path"
            raise _Invalid("applies only to rclone targets", subkey=f".{key}")
    return UploadTarget(
        name=name,
        type=kind,
        remote=remote,
        path=path or "/",
        chat_id=chat_id,
        max_retries=max_retries,
        match=match,
    )


def _targets(value: Any, ctx: _Context) -> tuple[UploadTarget, ...]:
    if ctx.from_env and isinstance(value, str):
        value = _json(value, "a list of targets") if value.strip() else []
        ctx = _Context(ctx.base_dir, from_env=False)  # JSON values carry their own types
    if not isinstance(value, list):
        raise _Invalid("must be a list of targets", value)
    targets: list[UploadTarget] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(value):
        try:
            target = _target(item, ctx)
        except _Invalid as exc:
            raise exc.under(f"[{index}]") from None
        folded = target.name.lower()
        if folded in seen:
            raise _Invalid(
                f"duplicate target name (targets[{seen[folded]}] is already called so)",
                target.name,
                subkey=f"[{index}].name",
            )
        seen[folded] = index
        targets.append(target)
    return tuple(targets)


_PARSERS: dict[str, _Parser] = {
    "telegram.api_id": _integer(0, 2**31 - 1),
    "telegram.api_hash": _single_token,
    "telegram.bot_token": _single_token,
    "telegram.admins": _id_list,
    "telegram.allowed_users": _id_list,
    "telegram.quotas": _quotas,
    "telegram.parts_in_flight": _integer(1, 64),
    "telegram.worker_bot_tokens": _bot_tokens,
    "telegram.storage_channel": _channel_id,
    "telegram.progress_interval": _number(0, 3600, lo_open=True),
    "telegram.proxy": _proxy_url(TELEGRAM_PROXY_SCHEMES),
    "telegram.language": _bot_language,
    "telegram.max_upload_size": _size(64 * 1024, " (4000MiB at most)", hi=4000 * 1024 * 1024),
    "aria2.rpc_url": _url(("http", "https", "ws", "wss")),
    "aria2.rpc_secret": _single_token,
    "aria2.download_dir": _path,
    "aria2.max_concurrent_downloads": _integer(1, 1000),
    "aria2.poll_interval": _number(0, 3600, lo_open=True),
    "aria2.idle_poll_interval": _number(0, 3600, lo_open=True),
    "aria2.max_download_size": _size(0, " (0 = no cap)"),
    "aria2.max_torrent_files": _integer(1, 1_000_000),
    "aria2.ask_file_selection": _file_selection_ask,
    "aria2.file_selection_timeout": _integer(1, 86_400),
    "aria2.allow_private_addresses": _boolean,
    "aria2.blocked_networks": _networks,
    "aria2.executable": _executable,
    "aria2.rpc_port": _integer(0, 65535, " (0 = a free port)"),
    "aria2.options": _aria2_options,
    "aria2.enable_dht": _boolean,
    "aria2.proxy": _proxy_url(ARIA2_PROXY_SCHEMES),
    "upload.targets": _targets,
    "upload.auto_delete": _boolean,
    "upload.max_retries": _integer(0, 100),
    "upload.max_concurrent": _integer(1, 64),
    "upload.retry_backoff": _number(0, 86400),
    "upload.rclone_config": _optional_path_text,
    "upload.rclone_executable": _executable,
    "upload.proxy": _proxy_url(UPLOAD_PROXY_SCHEMES),
    "upload.extract_max_size": _size(1),
    "upload.extract_max_ratio": _number(1, 1_000_000),
    "web.host": _host,
    "web.port": _integer(1, 65535),
    "web.public_url": _public_url,
    "web.token": _single_token,
    "web.link_expiry": _integer(0, 10 * _YEAR, " (0 = links never expire)"),
    "web.max_body_size": _size(1),
    "web.header_timeout": _number(0, 3600, lo_open=True),
    "web.max_connections_per_client": _integer(1, 1_000_000),
    "web.login_attempts": _integer(1, 1_000_000),
    "web.metrics_token": _single_token,
    "database.path": _path,
    "database.url": _database_url,
    "cluster.node_name": _node_name,
    "cluster.public_url": _public_url,
    "cluster.node_timeout": _number(2, 3600),
    "cluster.upload_wait": _number(0, 7 * 24 * 3600),
    "maintenance.check_interval": _number(0, _YEAR, note=" (0 = off)"),
    "logging.level": _log_level,
    "logging.format": _log_format,
    "logging.file": _optional_path_text,
    "logging.rotation": _log_limit(
        log_rotation,
        "must be a size like 50 MB or an age like 1 day (second, minute, hour, day, week); "
        "empty = never",
    ),
    "logging.retention": _log_limit(
        log_retention,
        "must be a number of files like 10 or an age like 14 days; empty = keep all",
    ),
    "limits.download": _size(0, " a second (0 = no limit)"),
    "limits.upload": _size(0, " a second (0 = no limit)"),
}
assert set(_PARSERS) == set(KNOWN_KEYS), "every configuration key needs exactly one parser"


# --- loading ------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (plain PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<" merges may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            with contextlib.suppress(TypeError):
                if key in seen:
                    mark = key_node.start_mark
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {_show(key)} (line {mark.line + 1})", mark
                    )
                seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = exc.problem or exc.context or "unreadable"
        raise ConfigError(f"{where}invalid YAML: {problem}", source=source) from None
    except Exception as exc:  # PyYAML raises ValueError etc. for e.g. a date like 2020-02-30
        raise ConfigError(f"invalid YAML: {exc}", source=source) from None


def default_config(base_dir: Path | None = None) -> Config:
    """The built-in defaults, relative paths resolved against base_dir (default: cwd)."""
    return _build(None, "defaults", base_dir or Path.cwd(), {}, None)


def _locate(path: Path | str | None, env: Mapping[str, str]) -> tuple[Path | None, str]:
    if path is not None:
        return Path(path), str(path)
    named = env.get(CONFIG_ENV_VAR, "").strip()
    if named:
        return Path(named), f"{named} (from {CONFIG_ENV_VAR})"
    try:
        found = Path.cwd() / DEFAULT_CONFIG_FILE
    except OSError:
        return None, "defaults"
    return (found, DEFAULT_CONFIG_FILE) if found.is_file() else (None, "defaults")


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Defaults < the YAML file < environment.

    ``path`` None: the file named by ``MISTRELAY_CONFIG``, else ``./config.yaml`` if present,
    else pure defaults. A named file that does not exist is an error.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    file_path, source = _locate(path, environ)
    if file_path is None:
        return _build(None, source, Path.cwd(), environ, None)
    try:
        text = file_path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", source=source) from None
    except UnicodeDecodeError:
        raise ConfigError("config file is not UTF-8 text", source=source) from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=source) from None
    resolved = file_path.resolve()
    return _build(text, source, resolved.parent, environ, resolved)


def _build(
    text: str | None,
    source: str,
    base_dir: Path,
    env: Mapping[str, str],
    config_path: Path | None,
) -> Config:
    values: dict[str, dict[str, Any]] = {
        section: {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
        for section, cls in _SECTIONS.items()
    }
    file_ctx = _Context(base_dir, from_env=False)
    for dotted in _PATH_KEYS:
        section, key = dotted.split(".")
        values[section][key] = _path(str(values[section][key]), file_ctx)
    sources: dict[str, str] = {}
    if text is not None:
        _apply_file(_parse_yaml(text, source), source, file_ctx, values, sources)
    _apply_env(env, values, sources)
    _check_telegram(values["telegram"], sources, source)
    _follow_sqlite_url(values["database"])
    sections = {name: cls(**values[name]) for name, cls in _SECTIONS.items()}
    return Config(**sections, config_path=config_path)


def _set(
    dotted: str, raw: Any, source: str, ctx: _Context, values: dict[str, dict[str, Any]]
) -> Any:
    section, key = dotted.split(".", 1)
    try:
        parsed = _PARSERS[dotted](raw, ctx)
    except _Invalid as exc:
        raise _to_error(exc, dotted, source) from None
    values[section][key] = parsed
    return parsed


def _unknown_key_hint(section: str, key: str) -> str:
    hint = _suggest(key, list(_SECTION_KEYS[section]), lambda k: f"{section}.{k}")
    if hint:
        return hint
    elsewhere = [s for s, keys in _SECTION_KEYS.items() if key in keys]
    return f"; did you mean {elsewhere[0]}.{key}?" if elsewhere else ""


def _apply_file(
    data: Any,
    source: str,
    ctx: _Context,
    values: dict[str, dict[str, Any]],
    sources: dict[str, str],
) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(
            f"the top level must be a mapping of sections, got {type(data).__name__}",
            source=source,
        )
    for section, body in data.items():
        if not isinstance(section, str) or section not in _SECTIONS:
            hint = _suggest(str(section), list(_SECTIONS))
            raise ConfigError(f"unknown section{hint}", key=str(section), source=source)
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(
                f"must be a mapping of keys, got {_show(body)}", key=section, source=source
            )
        for key, raw in body.items():
            if not isinstance(key, str) or key not in _SECTION_KEYS[section]:
                hint = _unknown_key_hint(section, str(key))
                raise ConfigError(f"unknown key{hint}", key=f"{section}.{key}", source=source)
            if raw is None:  # an empty value keeps the built-in default
                continue
            _set(f"{section}.{key}", raw, source, ctx, values)
            sources[f"{section}.{key}"] = source


def _apply_env(
    env: Mapping[str, str], values: dict[str, dict[str, Any]], sources: dict[str, str]
) -> None:
    try:
        cwd = Path.cwd()
    except OSError:
        cwd = Path("/")
    ctx = _Context(cwd, from_env=True)
    known_names = [*ENV_VARS, DB_PATH_ALIAS, CONFIG_ENV_VAR]
    db_paths: dict[str, Path] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV_VAR:
            continue
        source = f"env {name}"
        dotted = "database.path" if name == DB_PATH_ALIAS else ENV_VARS.get(name)
        if dotted is None:
            hint = _suggest(name, known_names)
            raise ConfigError(f"unknown MistRelay setting{hint}", source=source)
        parsed = _set(dotted, env[name], source, ctx, values)
        sources[dotted] = source
        if dotted == "database.path":
            db_paths[name] = parsed
    if len(set(db_paths.values())) > 1:
        raise ConfigError(
            f"{DB_PATH_ALIAS} and {ENV_PREFIX}DATABASE_PATH differ; set only one",
            key="database.path",
            source=f"env {DB_PATH_ALIAS}",
        )


def _check_telegram(values: dict[str, Any], sources: dict[str, str], default_source: str) -> None:
    credentials = ("api_id", "api_hash", "bot_token")
    present = [key for key in credentials if values[key]]
    if present and len(present) < len(credentials):
        missing = next(key for key in credentials if key not in present)
        source = sources.get(f"telegram.{present[0]}", default_source)
        raise ConfigError(
            f"must be set too when telegram.{present[0]} is set "
            "(leave api_id, api_hash and bot_token all empty to run without the bot)",
            key=f"telegram.{missing}",
            source=source,
        )
    if values["worker_bot_tokens"]:
        source = sources.get("telegram.worker_bot_tokens", default_source)
        if not present:
            raise ConfigError(
                "needs the main bot (telegram.api_id, telegram.api_hash, telegram.bot_token)",
                key="telegram.worker_bot_tokens",
                source=source,
            )
        if values["bot_token"] in values["worker_bot_tokens"]:
            raise ConfigError(
                "must not list the main bot's token (telegram.bot_token)",
                key="telegram.worker_bot_tokens",
                source=source,
            )
        if not values["storage_channel"]:
            raise ConfigError(
                "must be set when telegram.worker_bot_tokens is set: the channel (-100…) where "
                "the main bot forwards files and every worker bot is a member",
                key="telegram.storage_channel",
                source=sources.get("telegram.storage_channel", source),
            )


def _follow_sqlite_url(values: dict[str, Any]) -> None:
    """A sqlite:/// URL names the database file: it wins over database.path, whatever set that
    (the shipped config.yaml and the container image both do)."""
    url: str = values["url"]
    if url.startswith(_SQLITE_PREFIX):
        values["path"] = Path(url.removeprefix(_SQLITE_PREFIX))


# --- the flat view, live reload -----------------------------------------------------------------


def _plain(value: Any, *, compact: bool = True) -> Any:
    """Config values as JSON/YAML data: paths as text, tuples as lists, records as dicts.

    ``compact`` leaves out a record's fields that hold their default (for writing YAML).
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: _plain(getattr(value, f.name), compact=compact)
            for f in dataclasses.fields(value)
            if not compact or getattr(value, f.name) not in (f.default, None)
        }
    if isinstance(value, tuple | list):
        return [_plain(item, compact=compact) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, compact=compact) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def _flatten(config: Config) -> dict[str, Any]:
    return {
        dotted: getattr(getattr(config, dotted.split(".")[0]), dotted.split(".")[1])
        for dotted in KNOWN_KEYS
    }


_SENSITIVE_OPTION = re.compile(r"passwd|password|secret|token|cookie|header", re.IGNORECASE)
# The password of a URL's user info: scheme://user:PASSWORD@host (the host follows the last @).
_URL_PASSWORD = re.compile(r'(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^/?#@\s:"<>]*:)[^/?#\s"<>]*@')


def mask_url_passwords(text: str) -> str:
    """`text` with the password of every URL in it shown as ``***``: ``http://user:***@host``."""
    return _URL_PASSWORD.sub(r"\g<head>***@", text)


def _as_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list | dict) or dataclasses.is_dataclass(value):
        return json.dumps(_plain(value, compact=False), ensure_ascii=False)
    return str(value)


def masked_settings(config: Config) -> dict[str, str]:
    """Every effective setting as ``{"web.port": "8080", ...}``; secrets as ``***`` when set,
    and so is the password of any URL in a value (a proxy's, for one)."""
    settings: dict[str, str] = {}
    for dotted, value in _flatten(config).items():
        if dotted in SECRET_KEYS:
            settings[dotted] = "***" if value else ""
        elif dotted == "database.url":
            settings[dotted] = config.database.redacted_url
        elif dotted == "aria2.options":
            shown = {k: "***" if _SENSITIVE_OPTION.search(k) else v for k, v in value.items()}
            settings[dotted] = mask_url_passwords(_as_text(shown))
        else:
            settings[dotted] = mask_url_passwords(_as_text(value))
    return settings


def shown_values(config: Config, keys: Iterable[str]) -> dict[str, Any]:
    """The dotted `keys` with their values as JSON data (a secret as ``***`` when set); URL
    passwords in text masked as in :func:`masked_settings`."""
    shown: dict[str, Any] = {}
    flat = _flatten(config)
    for dotted in keys:
        value = flat[dotted]
        if dotted in SECRET_KEYS:
            shown[dotted] = "***" if value else ""
        elif isinstance(value, str):
            shown[dotted] = mask_url_passwords(value)
        else:
            shown[dotted] = _plain(value, compact=False)
    return shown


@dataclass(frozen=True)
class ConfigDiff:
    applied: list[str]  # changed keys a running service takes over
    needs_restart: list[str]  # changed keys that take effect only after a restart

    @property
    def changed(self) -> bool:
        return bool(self.applied or self.needs_restart)


def diff_config(old: Config, new: Config) -> ConfigDiff:
    before, after = _flatten(old), _flatten(new)
    changed = [dotted for dotted in KNOWN_KEYS if before[dotted] != after[dotted]]
    return ConfigDiff(
        applied=[k for k in changed if k in LIVE_KEYS],
        needs_restart=[k for k in changed if k not in LIVE_KEYS],
    )


def log_secrets(config: Config, secrets: Secrets) -> list[str]:
    """Every secret value a log line must never show, each once (empty ones left out)."""
    values = [
        secrets.web_token,
        config.web.metrics_token,
        secrets.aria2_secret,
        secrets.link_key.hex(),
        config.telegram.bot_token,
        *config.telegram.worker_bot_tokens,
        config.telegram.api_hash,
    ]
    if config.database.backend == "postgresql":
        password = _postgres_url(config.database.url).password
        values += [password, quote(password, safe="")]  # as it is and as it stands in the URL
    for proxy in (config.telegram.proxy, config.aria2.proxy, config.upload.proxy):
        if proxy:
            values += [proxy_parts(proxy).password, urlsplit(proxy).password or ""]
    return [value for value in dict.fromkeys(values) if value]


def child_environment() -> dict[str, str]:
    """This process's environment for the programs MistRelay runs (aria2c, rclone, ffprobe):
    without the `MISTRELAY_*` settings, which may carry secrets (a bot token, the database
    password) that those programs have no use for."""
    return {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}


# --- secrets in the data folder -----------------------------------------------------------------


@dataclass(frozen=True)
class Secrets:
    web_token: str
    link_key: bytes
    aria2_secret: str

    def __repr__(self) -> str:  # keep values out of logs and tracebacks
        return "Secrets(web_token=***, link_key=***, aria2_secret=***)"


_TOKEN_TEXT = re.compile(r"[A-Za-z0-9_\-.~+/=]+", re.ASCII)


def ensure_secrets(config: Config) -> Secrets:
    """Configured secrets, else those stored in the data folder, else new ones stored there."""
    data_dir = config.data_dir
    _ensure_private_dir(data_dir)
    web_token = config.web.token or _stored_secret(
        data_dir / WEB_TOKEN_FILE,
        "web token",
        lambda: secrets.token_urlsafe(32),
        lambda text: bool(_TOKEN_TEXT.fullmatch(text)),
    )
    link_key = _stored_secret(
        data_dir / LINK_KEY_FILE,
        "link signing key",
        lambda: secrets.token_hex(32),
        lambda text: bool(re.fullmatch(r"[0-9a-f]{64}", text)),
    )
    aria2_secret = config.aria2.rpc_secret or _stored_secret(
        data_dir / ARIA2_SECRET_FILE,
        "aria2 RPC secret",
        lambda: secrets.token_hex(32),
        lambda text: len(text) >= 32 and bool(_TOKEN_TEXT.fullmatch(text)),
    )
    if config.web.token and len(config.web.token) < 16:
        logger.warning("web.token is shorter than 16 characters; a longer one is safer")
    return Secrets(web_token=web_token, link_key=bytes.fromhex(link_key), aria2_secret=aria2_secret)


def _ensure_private_dir(path: Path) -> None:
    """The data folder (database, secrets, aria2's session with its stream links) is its owner's
    only: created 0700, and an existing one that others may enter is set to 0700."""
    try:
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)
    except FileExistsError:
        if not path.is_dir():
            raise ConfigError("exists and is not a folder", source=str(path)) from None
        _tighten_dir(path)
        return
    except OSError as exc:
        raise ConfigError(
            f"cannot create the data folder: {exc.strerror}", source=str(path)
        ) from None
    logger.bind(path=str(path)).info("Created data folder {} (mode 0700)", path)


def _tighten_dir(path: Path) -> None:
    """Set an existing data folder that others may enter to 0700 (a warning if that fails)."""
    log = logger.bind(path=str(path))
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if not mode & 0o077:
            return
        os.chmod(path, 0o700)
    except OSError as exc:
        log.warning("Data folder {} is open to other users and stays so: {}", path, exc.strerror)
        return
    log.warning("Data folder {} was open to other users (mode {:04o}); set to 0700", path, mode)


def _read_secret_file(path: Path) -> str | None:
    """The file's text (permissions tightened to 0600), or None if there is no file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot open secret file: {exc.strerror}", source=str(path)) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError("secret file is not a regular file", source=str(path))
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o600)
            logger.bind(path=str(path)).warning(
                "Secret file {} was readable by others; permissions set to 0600", path
            )
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(4096)
    except OSError as exc:
        raise ConfigError(f"cannot read secret file: {exc.strerror}", source=str(path)) from None
    finally:
        os.close(fd)
    return data.decode("utf-8", errors="replace").strip()


def _write_atomically(path: Path, text: str, *, mode: int, replace: bool = True) -> bool:
    """Write text with `mode` atomically. Without replace, an existing file wins (→ False)."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp_name, path)
            return True
        try:
            os.link(tmp_name, path)  # fails if another process stored its secret first
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links
            if path.exists():
                return False
            os.replace(tmp_name, path)
        return True
    finally:
        discard(Path(tmp_name))


def _stored_secret(
    path: Path, what: str, generate: Callable[[], str], valid: Callable[[str], bool]
) -> str:
    log = logger.bind(secret_file=str(path))
    for _attempt in range(3):
        existing = _read_secret_file(path)
        if existing is not None and valid(existing):
            return existing
        value = generate()
        try:
            stored = _write_atomically(path, value + "\n", mode=0o600, replace=existing is not None)
        except OSError as exc:
            raise ConfigError(
                f"cannot write secret file: {exc.strerror}", source=str(path)
            ) from None
        if stored:
            if existing is not None:
                log.warning("The {} in {} was unusable; generated a new one", what, path)
            else:
                log.info("Generated a new {} and stored it in {} (mode 0600)", what, path)
            return value
    raise ConfigError(f"could not store the {what}", source=str(path))


# --- writing a runtime change back to the file --------------------------------------------------


_PLAIN_SCALAR = re.compile(r"[A-Za-z0-9_/.~][A-Za-z0-9_./:@+~-]*", re.ASCII)


def _render(value: Any) -> tuple[str, list[str]]:
    """(inline YAML text, block lines): block lines are used for a list of mappings."""
    data = _plain(value)
    if isinstance(data, list) and any(isinstance(item, dict) for item in data):
        block = yaml.safe_dump(data, default_flow_style=False, sort_keys=False, allow_unicode=True)
        return "", block.splitlines()
    if isinstance(data, str):
        if _PLAIN_SCALAR.fullmatch(data) and yaml.safe_load(data) == data:
            return data, []
        return json.dumps(data, ensure_ascii=False), []  # a JSON string is a YAML scalar
    inline = yaml.safe_dump(data, default_flow_style=True, width=1_000_000, allow_unicode=True)
    inline = inline.removesuffix("\n").removesuffix("\n...")
    if "\n" in inline:
        raise ConfigError("cannot be written on one line", source=_show(value))
    return inline, []


def _comment_part(line: str) -> str:
    """The trailing ``# comment`` of a ``key: value`` line, outside quotes."""
    quote = ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[index:].rstrip()
    return ""


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _is_content(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _edit_lines(lines: list[str], section: str, key: str, value: Any, newline: str) -> list[str]:
    inline, block = _render(value)
    bare = [line.rstrip("\r\n") for line in lines]
    header = re.compile(rf"{re.escape(section)}\s*:\s*(#.*)?")
    start = next((i for i, line in enumerate(bare) if header.fullmatch(line.rstrip())), None)
    if start is None:
        if any(re.match(rf"{re.escape(section)}\s*:", line) for line in bare):
            raise ConfigError(
                "section is not written one key per line; edit it by hand", key=section
            )
        out = list(lines)
        if out and not out[-1].endswith("\n"):
            out[-1] += newline
        if out and bare[-1].strip():
            out.append(newline)
        added = [f"{section}:", *_key_lines("  ", key, inline, block, "")]
        return out + [line + newline for line in added]
    end = next(
        (i for i in range(start + 1, len(bare)) if bare[i][:1] not in ("", " ", "#", "\t")),
        len(bare),
    )
    content = [i for i in range(start + 1, end) if _is_content(bare[i])]
    indent = " " * (min(_indent(bare[i]) for i in content) if content else 2)
    key_pattern = re.compile(rf"{re.escape(indent)}{re.escape(key)}\s*:(\s.*)?")
    found = next((i for i in content if key_pattern.fullmatch(bare[i])), None)
    if found is None:
        at = (content[-1] + 1) if content else start + 1
        while at < end and _indent(bare[at]) > len(indent) and bare[at].strip():
            at += 1
        new = _key_lines(indent, key, inline, block, "")
        return [*lines[:at], *(line + newline for line in new), *lines[at:]]
    # The old value spans the key line and every deeper-indented content line after it.
    last = found
    for i in range(found + 1, end):
        if _is_content(bare[i]):
            if _indent(bare[i]) <= len(indent):
                break
            last = i
    comment = _comment_part(bare[found][len(indent) + len(key) :])
    new = _key_lines(indent, key, inline, block, comment)
    return [*lines[:found], *(line + newline for line in new), *lines[last + 1 :]]


def _key_lines(indent: str, key: str, inline: str, block: list[str], comment: str) -> list[str]:
    suffix = f"  {comment}" if comment else ""
    if block:
        return [f"{indent}{key}:{suffix}", *(f"{indent}  {line}" for line in block)]
    return [f"{indent}{key}: {inline}{suffix}"]


def parse_setting(dotted_key: str, value: Any, base_dir: Path) -> Any:
    """`value` (as YAML would hold it) checked and converted as the file's `dotted_key` is;
    ConfigError naming the key if it is unknown or the value is not valid."""
    if dotted_key not in KNOWN_KEYS:
        hint = _suggest(dotted_key, list(KNOWN_KEYS))
        raise ConfigError(f"unknown key{hint}", key=dotted_key)
    try:
        return _PARSERS[dotted_key](value, _Context(base_dir, from_env=False))
    except _Invalid as exc:
        raise _to_error(exc, dotted_key, "") from None


def set_value_in_file(path: Path | str, dotted_key: str, value: Any) -> None:
    """Write one setting into the YAML file, keeping its comments and other lines.

    The edited text must load (with no environment applied) and yield the value, or the old file
    stays as it was. The replacement is atomic. Synchronous: call it in a thread from async code.
    """
    set_values_in_file(path, {dotted_key: value})


def set_values_in_file(path: Path | str, values: Mapping[str, Any]) -> None:
    """Write several settings into the YAML file in one atomic replacement: all or none, as
    :func:`set_value_in_file` writes one."""
    path = Path(path)
    for dotted_key in values:
        if dotted_key not in KNOWN_KEYS:
            hint = _suggest(dotted_key, list(KNOWN_KEYS))
            raise ConfigError(f"unknown key{hint}", key=dotted_key, source=str(path))
    try:
        old_text = path.read_bytes().decode("utf-8") if path.exists() else ""
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file: {exc}", source=str(path)) from None
    lines = old_text.splitlines(keepends=True)
    newline = "\r\n" if lines and lines[0].endswith("\r\n") else "\n"
    for dotted_key, value in values.items():
        section, key = dotted_key.split(".")
        try:
            lines = _edit_lines(lines, section, key, value, newline)
        except ConfigError as exc:
            raise ConfigError(exc.problem, key=exc.key or dotted_key, source=str(path)) from None
        except yaml.YAMLError:
            raise ConfigError(
                "cannot be written as YAML", key=dotted_key, source=str(path)
            ) from None
    new_text = "".join(lines)
    source = f"{path} (after setting {', '.join(values)})"
    base_dir = path.resolve().parent
    _build(new_text, source, base_dir, {}, None)  # raises ConfigError: the old file stays
    document = _parse_yaml(new_text, source) or {}
    for dotted_key, value in values.items():
        section, key = dotted_key.split(".")
        written = document.get(section) or {}
        if key not in written or written[key] != yaml.safe_load(yaml.safe_dump(_plain(value))):
            raise ConfigError(
                "the edit did not land where expected; edit it by hand",
                key=dotted_key,
                source=str(path),
            )
    _write_atomically(path, new_text, mode=mode)
    keys = ", ".join(values)
    logger.bind(keys=keys, path=str(path)).info("Wrote {} to {}", keys, path)
