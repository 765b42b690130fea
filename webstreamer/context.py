"""What every route shares: the application context, JSON errors, request parsing, the link
signature check and the dashboard's HTML shell. Routes import this module, never each other."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import math
import re
import sys
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from loguru import logger

from aria2_client.download_handler import Requester
from aria2_client.sources import SourceError
from configer import Config, ConfigDiff, Secrets
from db import DuplicateDownload, Store
from events import EventHub
from files import DownloadFiles
from metrics import Metrics
from records import ArchiveRequest, DownloadRow, NodeStatus, UploadRow, WebSession
from settings_editor import SettingsEditor
from webstreamer.byteserve import ByteSource
from webstreamer.links import StreamLinks

VERSION = "0.1.0"
STATIC_DIR = Path(__file__).resolve().parent / "static"
INDEX_FILE = STATIC_DIR / "index.html"
LOGIN_STATE_MARKER = 'data-login-state=""'
# The page runs only its own script and style and talks only to its own origin ('self' also
# covers ws:/wss: to the same host in CSP Level 3); nothing may frame it.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; manifest-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)

ByteSourceProvider = Callable[[DownloadRow, int | None], Awaitable[ByteSource | None]]


class DownloadActions(Protocol):
    """What the API asks of the download engine."""

    async def add_links(
        self,
        urls: Sequence[str],
        requester: Requester | None = None,
        *,
        archive: ArchiveRequest | None = None,
        targets: Sequence[str] | None = None,
    ) -> list[DownloadRow | SourceError | DuplicateDownload]: ...
    async def add_torrent(
        self,
        data: bytes,
        requester: Requester | None = None,
        *,
        archive: ArchiveRequest | None = None,
        targets: Sequence[str] | None = None,
    ) -> DownloadRow: ...
    async def pause(self, download_id: int) -> DownloadRow: ...
    async def resume(self, download_id: int) -> DownloadRow: ...
    async def retry(self, download_id: int) -> DownloadRow: ...
    async def cancel(self, download_id: int) -> DownloadRow: ...
    async def delete(self, download_id: int, *, delete_file: bool = False) -> DownloadRow: ...
    async def delete_file_only(self, download_id: int) -> DownloadRow: ...
    async def delete_all(self, *, delete_files: bool = False) -> int: ...
    async def set_download_limit(self, download_id: int, bytes_per_second: int) -> DownloadRow: ...
    async def select_files(self, download_id: int, indexes: Collection[int]) -> DownloadRow: ...


class UploadActions(Protocol):
    """What the API asks of the upload manager."""

    async def retry(self, upload_id: int) -> UploadRow: ...
    async def cancel(self, upload_id: int) -> UploadRow: ...


class ClusterView(Protocol):
    """What the routes ask of the cluster: which node this is, where another node that holds a
    job answers, and how every node stands. A single node (SQLite) is not `enabled`."""

    @property
    def enabled(self) -> bool: ...
    @property
    def node_name(self) -> str: ...
    def origin_of(self, node: str | None) -> str | None: ...
    def leader_origin(self) -> str | None: ...
    async def nodes(self) -> Sequence[NodeStatus]: ...


@dataclass(frozen=True)
class AppContext:
    """Everything the routes need, built complete by app.py (or a test) before the application.

    `live_config` returns the configuration in force: a reload swaps it without touching the
    context. `files` is the download directory that whole files are served from; when a file is
    not whole there, `byte_sources` (the Telegram streamer) are asked in order. `cluster` says
    which other node's public URL answers for a job this node does not hold.
    """

    live_config: Callable[[], Config]
    secrets: Secrets
    store: Store
    hub: EventHub
    downloads: DownloadActions
    uploads: UploadActions
    links: StreamLinks
    files: DownloadFiles
    byte_sources: Sequence[ByteSourceProvider]
    aria2_connected: Callable[[], bool]
    reload_config: Callable[[], Awaitable[ConfigDiff]]
    settings: SettingsEditor
    cluster: ClusterView
    metrics: Metrics
    version: str = VERSION

    @property
    def config(self) -> Config:
        return self.live_config()


CONTEXT: web.AppKey[AppContext] = web.AppKey("context", AppContext)


def context_of(request: web.Request) -> AppContext:
    return request.app[CONTEXT]


# The dashboard session a request was signed in with (absent for a bearer token): set by the
# auth middleware (routes/auth.py).
SESSION: web.RequestKey[WebSession] = web.RequestKey("session", WebSession)
# The Telegram user a request acts for when it may see only that user's jobs; absent for the
# web token and for admins, who see everything.
VIEWER: web.RequestKey[int] = web.RequestKey("viewer", int)
# Whether the credential a request signed in with (a session cookie, a personal API token) still
# signs in and still sees what it saw (same user, same role): set by the auth middleware, asked
# now and then by what outlives the request's sign-in (an open WebSocket).
CredentialCheck = Callable[[], Awaitable[bool]]
CREDENTIAL_CHECK: web.RequestKey[CredentialCheck] = web.RequestKey("credential_check")


def viewer_of(request: web.Request) -> int | None:
    """The user whose jobs alone this request may see, or None (it sees every job)."""
    return request.get(VIEWER)


def may_see(viewer: int | None, owner_id: int | None) -> bool:
    """Whether a job owned by `owner_id` is visible to `viewer` (None sees every job)."""
    return viewer is None or owner_id == viewer


# The Prometheus scrape: credentials as for the API, or web.metrics_token (routes/metrics.py).
METRICS_PATH = "/metrics"


def json_error(status: int, error: str, detail: object = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


# --- request parsing ----------------------------------------------------------------------------


def parse_id(text: str | None) -> int | None:
    """A row id from a path segment: plain ASCII digits that fit SQLite's integer, else None."""
    if text is None or not (text.isascii() and text.isdigit()) or len(text) > 18:
        return None
    return int(text)


def path_id(request: web.Request, kind: str = "download") -> int:
    """The `{id}` in the path, or a 404 that names what was not found."""
    text = request.match_info["id"]
    number = parse_id(text)
    if number is None:
        raise web.HTTPNotFound(text=f"no {kind} {text!r}")
    return number


MAX_JSON_DEPTH = 32  # nesting of arrays and objects a request body may have


def _json_problem(document: object) -> str | None:
    """What makes a parsed body unusable: nesting deeper than MAX_JSON_DEPTH, or a string (a
    value or a key) holding a lone surrogate, which no UTF-8 text (nor the store) can hold."""
    pending: list[tuple[object, int]] = [(document, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list) and depth >= MAX_JSON_DEPTH:
            return f"the body nests deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(item, dict):
            pending += [(key, depth + 1) for key in item]
            pending += [(value, depth + 1) for value in item.values()]
        elif isinstance(item, list):
            pending += [(value, depth + 1) for value in item]
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                lone = ascii(item[exc.start])[1:-1]
                return f"a string in the body holds a lone surrogate ({lone}), which is not text"
    return None


def parse_json(body: bytes) -> object:
    """A request body as JSON, or a 400 naming what is wrong with it: not UTF-8, not JSON,
    nested too deep, a number with too many digits, a lone surrogate in a string."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise web.HTTPBadRequest(text=f"the body is not UTF-8 (byte {exc.start})") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise web.HTTPBadRequest(
            text=f"the body nests deeper than {MAX_JSON_DEPTH} levels"
        ) from None
    except json.JSONDecodeError as exc:
        raise web.HTTPBadRequest(text=f"the body is not valid JSON: {exc.msg}") from None
    except ValueError:  # an integer beyond the digits int() converts
        digits = sys.get_int_max_str_digits()
        raise web.HTTPBadRequest(
            text=f"a number in the body has more than {digits} digits"
        ) from None
    problem = _json_problem(document)
    if problem is not None:
        raise web.HTTPBadRequest(text=problem)
    return document


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object (UTF-8, whatever charset the request names), or a 400 that
    says what is wrong with it."""
    body = parse_json(await request.read())
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return body


MAX_LIST_LIMIT = 1000  # rows one list request may ask for


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise web.HTTPBadRequest(text=f"{name} must be an integer") from None
    if not low <= value <= high:
        raise web.HTTPBadRequest(text=f"{name} must be between {low} and {high}")
    return value


def query_bool(request: web.Request, name: str) -> bool:
    text = request.query.get(name, "false").lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no", ""):
        return False
    raise web.HTTPBadRequest(text=f"{name} must be true or false")


def query_choice(request: web.Request, name: str, choices: Sequence[str]) -> str | None:
    """An optional query value that must be one of `choices` (empty = not given)."""
    text = request.query.get(name) or None
    if text is not None and text not in choices:
        raise web.HTTPBadRequest(text=f"{name} must be one of {', '.join(choices)}")
    return text


_CURSOR = re.compile(r"g1\.([a-z_]*)\.([1-9][0-9]{0,17})")


def list_cursor(status: str | None, before: int) -> str:
    """The opaque `next_cursor` of a grouped list page: the id the next page starts below,
    bound to the list's status filter."""
    text = f"g1.{status or ''}.{before}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _given_cursor(
    request: web.Request, pattern: re.Pattern[str]
) -> tuple[re.Match[str], str] | None:
    """The `cursor` query value decoded and matched against `pattern`, with the text to show
    of it (None: none given, the first page); 400 when it is not one a list of this kind gave."""
    text = request.query.get("cursor") or None
    if text is None:
        return None
    shown = text[:40]
    try:
        if len(text) > 64:
            raise ValueError(text)
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        raise web.HTTPBadRequest(text=f"cursor {shown!r} is not one this list gave") from None
    found = pattern.fullmatch(decoded)
    if found is None:
        raise web.HTTPBadRequest(text=f"cursor {shown!r} is not one this list gave")
    return found, shown


def query_cursor(request: web.Request, status: str | None) -> int | None:
    """The `cursor` a grouped list page gave (None: the first page); 400 naming it otherwise."""
    given = _given_cursor(request, _CURSOR)
    if given is None:
        return None
    found, shown = given
    if (found[1] or None) != status:
        raise web.HTTPBadRequest(
            text=f"cursor {shown!r} belongs to the list of status {found[1] or 'any'}"
        )
    return int(found[2])


_FLAT_CURSOR = re.compile(r"f1\.([0-9a-f]{12})\.([1-9][0-9]{0,17})")


def _filters_digest(filters: Sequence[str | None]) -> str:
    return hashlib.sha256(json.dumps(list(filters)).encode()).hexdigest()[:12]


def flat_cursor(filters: Sequence[str | None], before: int) -> str:
    """The opaque `next_cursor` of a flat list page: the id the next page starts below, bound
    to the list's filters (a cursor of other filters is refused)."""
    text = f"f1.{_filters_digest(filters)}.{before}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def query_flat_cursor(request: web.Request, filters: Sequence[str | None]) -> int | None:
    """The `cursor` a flat list page gave (None: the first page); 400 naming it otherwise."""
    given = _given_cursor(request, _FLAT_CURSOR)
    if given is None:
        return None
    found, shown = given
    if found[1] != _filters_digest(filters):
        raise web.HTTPBadRequest(text=f"cursor {shown!r} belongs to a list of other filters")
    return int(found[2])


@dataclass(frozen=True)
class SignedLink:
    """What a /stream or /watch link names, once its signature held."""

    download_id: int
    index: int | None  # a torrent's file (aria2's 1-based index); None = the whole download
    expires: int  # the link's own expiry (0 = never), for links derived from it


@dataclass(frozen=True)
class SignedRequest:
    """What a /stream or /watch link points at, once its signature held."""

    row: DownloadRow
    index: int | None  # a torrent's file (aria2's 1-based index); None = the whole download
    expires: int  # the link's own expiry (0 = never), for links derived from it


def signed_link(request: web.Request, what: str) -> SignedLink | web.Response:
    """What a signed link names, or the answer that refuses it (404 malformed, 403 forged);
    no store read."""
    download_id = parse_id(request.match_info["id"])
    index_text = request.match_info.get("index")
    index = parse_id(index_text)
    if download_id is None or (index_text is not None and index is None):
        return json_error(404, "not_found", f"no such {what}")
    query = request.query
    exp = query.get("exp")
    problem = context_of(request).links.signer.verify(
        download_id, index or 0, query.get("sig"), exp
    )
    if problem is not None:
        return json_error(403, "forbidden", problem)
    # Well-formed: the signature check has read it.
    return SignedLink(download_id, index, int(exp or 0))


async def signed_request(request: web.Request, what: str) -> SignedRequest | web.Response:
    """The row a signed link names, or the answer that refuses it (404 unknown, 403 forged)."""
    link = signed_link(request, what)
    if isinstance(link, web.Response):
        return link
    row = await context_of(request).store.get_download_by_id(link.download_id)
    if row is None:
        return json_error(404, "not_found", f"no download {link.download_id}")
    return SignedRequest(row, link.index, link.expires)


def redirect_to_node(request: web.Request, origin: str) -> web.Response:
    """A 307 to the same path and query on another node: a signed link holds on every node, and
    307 keeps the method (HEAD stays HEAD) and the headers the client resends (Range)."""
    # The path and query exactly as sent (path_qs would re-encode them); path_qs only for a
    # request target in absolute form.
    target = request.raw_path if request.raw_path.startswith("/") else request.path_qs
    location = origin + target
    return web.Response(status=307, headers={"Location": location}, text=f"see {location}\n")


# --- clients -----------------------------------------------------------------------------------


def client_of(address: str | None) -> str:
    """Who a connection comes from, for limits per client: its address, an IPv6 address by its
    /64 (one host usually holds a whole /64), an IPv4-mapped one as IPv4."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return address or "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class WarningSummary:
    """At most one WARNING per client per `interval` seconds, with how many times `what`
    happened since the last one: a flood costs a log line a minute, not a line an attempt.
    The first time is reported at once, the rest when the interval is over."""

    def __init__(self, what: str, interval: float = 60.0) -> None:
        self.what = what
        self.interval = interval
        self._counts: dict[str, int] = {}
        self._reported: dict[str, float] = {}  # client -> loop time of its last line
        self._timers: dict[str, asyncio.TimerHandle] = {}

    def add(self, client: str) -> None:
        self._counts[client] = self._counts.get(client, 0) + 1
        if client in self._timers:
            return
        loop = asyncio.get_running_loop()
        delay = self._reported.get(client, -math.inf) + self.interval - loop.time()
        if delay <= 0:
            self._report(client)
        else:
            self._timers[client] = loop.call_later(delay, self._report, client)

    def _report(self, client: str) -> None:
        self._timers.pop(client, None)
        count = self._counts.pop(client, 0)
        if not count:
            return
        now = asyncio.get_running_loop().time()
        self._reported[client] = now
        if len(self._reported) > 4096:  # forget clients whose interval is long over
            for name in [c for c, t in self._reported.items() if t < now - self.interval]:
                del self._reported[name]
        logger.bind(peer=client).warning(
            "{} {} for {} within {:g} s", count, self.what, client, self.interval
        )

    def close(self) -> None:
        """Report what is still counted (at a stop) and cancel the timers."""
        for client, timer in list(self._timers.items()):
            timer.cancel()
            self._report(client)


# --- the dashboard's HTML shell (the page and the sign-in form are one document) ------------------


def page_headers(csp: str = PAGE_CSP) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


async def index_response(status: int = 200, login_state: str = "") -> web.Response:
    html = await asyncio.to_thread(INDEX_FILE.read_text, encoding="utf-8")
    if login_state:
        html = html.replace(LOGIN_STATE_MARKER, f'data-login-state="{escape(login_state)}"', 1)
    return web.Response(
        status=status,
        text=html,
        content_type="text/html",
        charset="utf-8",
        headers={**page_headers(), "Cache-Control": "no-store"},
    )
