"""Who may use the API, and from which page.

Credentials: a bearer token (`web.token`), or the dashboard's session cookie, given by signing in
with that token (`POST /login`). The cookie holds only a random secret; the store keeps its key
(`signing.session_key`) with the session's expiry (30 days), last use, address and browser, so
every node of a cluster accepts it, `POST /logout` ends it, `POST /api/sessions/revoke-all` ends
every session and `GET /api/sessions` lists the live ones (never a secret).

Users: the bot's `/web` gives a Telegram user a one-time sign-in link (`/signin`, HMAC-signed
with the link key, ten minutes, its nonce recorded once used). Its session, and a personal API
token (`/api/tokens`: made by whoever is signed in, acting as them, kept as a SHA-256, shown
once), act for that user: an admin (telegram.admins) sees everything, an allowed user only their
own jobs (others' answer 404) and only the routes in `USER_ROUTES` (others 403); a user no
longer listed is refused. The web token, its sessions and its tokens see everything. `GET
/api/me` tells the page which it is. What outlives one request (an open WebSocket) asks the
request's `CREDENTIAL_CHECK` now and then whether its session or token still holds as it did.

Forgery: a browser sends the cookie with a request that another site's page makes too. So a
request signed in by the cookie that may change something (POST, PUT, PATCH, DELETE) must have a
JSON body type (multipart only for the torrent upload), which no plain form or no-cors fetch can
send, and it and the WebSocket upgrade must come from this server's own origin (`Origin`, or
`Sec-Fetch-Site: same-origin` without one). A bearer token proves itself and needs neither.

Guessing: failed sign-ins are counted per client (an address; an IPv6 /64); at
`web.login_attempts` within a minute the client gets 429 until the oldest is a minute old. Every
refused sign-in is logged as a summary, one line per client a minute.

Every `/api` path but the health check and the API's description (`/api/openapi.json`,
`/api/docs`) needs credentials, and so does `/metrics` (where `web.metrics_token` is accepted
too); the page and the sign-in form are public, and `/stream` and `/watch` links carry their own
signature instead.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import math
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from aiohttp import web
from loguru import logger

from configer import TelegramConfig
from db import Store
from records import ApiToken, WebSession
from webstreamer.context import (
    CREDENTIAL_CHECK,
    METRICS_PATH,
    SESSION,
    VIEWER,
    WarningSummary,
    client_of,
    context_of,
    index_response,
    json_error,
    parse_json,
    read_json_object,
)
from webstreamer.openapi import DOCS_PATH, OPENAPI_PATH
from webstreamer.signing import (
    SESSION_COOKIE,
    SESSION_LIFETIME,
    SIGN_IN_PATH,
    new_session_secret,
    session_key,
)

LOGIN_BODY_LIMIT = 8 * 1024
PUBLIC_API_PATHS = frozenset({"/api/health", OPENAPI_PATH, DOCS_PATH})
LOGOUT_PATH = "/logout"
ME_PATH = "/api/me"
WEBSOCKET_PATH = "/api/ws"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JSON_TYPE = "application/json"
# The body types a cookie-signed request may send, by path (JSON everywhere else).
BODY_TYPES: dict[str, tuple[str, ...]] = {
    "/api/downloads/torrent": (JSON_TYPE, "multipart/form-data"),
}
LOGIN_WINDOW = 60.0  # seconds over which failed sign-ins are counted
USER_AGENT_LIMIT = 200  # characters of a browser's name kept with its session
SESSION_ID_LENGTH = 12  # hex digits of a session's key shown as its id
_DEFAULT_PORTS = {"http": 80, "https": 443}


# --- credentials --------------------------------------------------------------------------------


def _same_text(offered: str, expected: str) -> bool:
    """Constant-time equality of two header texts (a header may hold any bytes)."""
    return hmac.compare_digest(
        offered.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


@dataclass(frozen=True)
class Credential:
    """How a request signed in: a bearer token (`session` None) or a session cookie, and the
    user whose jobs alone it may see (`viewer`; None: every job)."""

    session: WebSession | None
    viewer: int | None = None
    user_id: int | None = None  # the Telegram user it acts for (None: web.token's)
    api_token: str | None = None  # a personal API token's hash, when it signed in with one


# The Telegram user a request acts for, when it signed in as one (a link's session, a token).
ACTING_USER: web.RequestKey[int] = web.RequestKey("acting_user", int)
API_TOKEN_PREFIX = "mrt_"
_API_TOKEN = re.compile(r"mrt_[A-Za-z0-9_-]{43}")
API_TOKEN_NAME_LIMIT = 64  # characters of a token's name
API_TOKENS_PER_USER = 50


def api_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _as_user(
    user_id: int | None,
    session: WebSession | None,
    api_token: str | None,
    telegram: TelegramConfig,
) -> Credential | None:
    """A credential of a Telegram user (None: made with web.token, sees every job), following
    telegram.admins and allowed_users live: an admin sees every job, an allowed user their own,
    anyone else (no longer listed) nothing."""
    if user_id is None or user_id in telegram.admins:
        return Credential(session, None, user_id, api_token)
    if user_id in telegram.allowed_users:
        return Credential(session, user_id, user_id, api_token)
    return None


async def _by_api_token(store: Store, telegram: TelegramConfig, hashed: str) -> Credential | None:
    found = await store.use_api_token(hashed)
    return None if found is None else _as_user(found.user_id, None, hashed, telegram)


async def _by_session(store: Store, telegram: TelegramConfig, key: str) -> Credential | None:
    session = await store.use_web_session(key)
    return None if session is None else _as_user(session.user_id, session, None, telegram)


async def authenticate(request: web.Request) -> Credential | None:
    """A bearer token equal to web.token (or, for /metrics only, to web.metrics_token), or the
    cookie of a live session; else None."""
    ctx = context_of(request)
    token = ctx.secrets.web_token
    offered = _bearer(request)
    if offered is not None and _API_TOKEN.fullmatch(offered):
        found = await _by_api_token(ctx.store, ctx.config.telegram, api_token_hash(offered))
        if found is not None:
            return found
    if offered is not None:
        scrape = ctx.config.web.metrics_token if request.path == METRICS_PATH else ""
        valid = (token and _same_text(offered, token)) or (scrape and _same_text(offered, scrape))
        return Credential(None) if valid else None
    key = session_key(request.cookies.get(SESSION_COOKIE), token)
    if key is None:
        return None
    return await _by_session(ctx.store, ctx.config.telegram, key)


async def still_holds(request: web.Request, credential: Credential) -> bool:
    """Whether a session or personal API token still signs in as it did for `request`: not
    ended, revoked or expired, and its user still seeing what they saw (not struck off from
    telegram.allowed_users, not made or unmade an admin). The store may raise (it is away)."""
    ctx = context_of(request)
    if credential.session is not None:
        now = await _by_session(ctx.store, ctx.config.telegram, credential.session.token_hash)
    elif credential.api_token is not None:
        now = await _by_api_token(ctx.store, ctx.config.telegram, credential.api_token)
    else:  # web.token itself: what the service runs with
        return True
    return now is not None and (now.viewer, now.user_id) == (credential.viewer, credential.user_id)


# What a user's session (not an admin's) may reach: its own jobs and their uploads and figures,
# adding jobs, the WebSocket, who it is, its own tokens.
USER_ROUTES = frozenset(
    {
        ("GET", "/api/downloads"),
        ("POST", "/api/downloads"),
        ("POST", "/api/downloads/torrent"),
        ("GET", "/api/downloads/{id}"),
        ("DELETE", "/api/downloads/{id}"),
        ("PATCH", "/api/downloads/{id}"),
        ("GET", "/api/downloads/{id}/files"),
        ("PUT", "/api/downloads/{id}/files"),
        ("POST", "/api/downloads/{id}/{action}"),
        ("POST", "/api/downloads/bulk"),
        ("GET", "/api/downloads/statistics"),
        ("GET", "/api/uploads"),
        ("GET", "/api/uploads/statistics"),
        ("POST", "/api/uploads/{id}/{action}"),
        ("GET", WEBSOCKET_PATH),
        ("GET", ME_PATH),
        ("GET", "/api/tokens"),
        ("POST", "/api/tokens"),
        ("DELETE", "/api/tokens/{id}"),
        ("POST", LOGOUT_PATH),
    }
)


_ACTION_CHOICE = re.compile(r"\{action:[a-z|]+\}")  # a route's {action:pause|...} as {action}


def _user_may(request: web.Request) -> bool:
    info = request.match_info
    if info.http_exception is not None:  # no such route: its own 404/405 answers
        return True
    canonical = info.route.resource.canonical if info.route.resource is not None else ""
    canonical = _ACTION_CHOICE.sub("{action}", canonical)
    return (request.method, canonical) in USER_ROUTES


def _endpoint(url: str, scheme: str) -> tuple[str, int] | None:
    """(host, port) of a URL or a ``//host:port``, the port defaulting to `scheme`'s."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname, port or _DEFAULT_PORTS[scheme]


def _origin_is_ours(request: web.Request, origin: str) -> bool:
    """Whether `origin` is this server as the browser reached it (its Host) or as it is
    published (web.public_url). The Host carries no scheme: its default port is the origin's."""
    scheme = urlsplit(origin).scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return False
    offered = _endpoint(origin, scheme)
    ours = {_endpoint(f"//{request.host}", scheme)}
    public_url = context_of(request).config.web.public_url
    if public_url:
        public_scheme = urlsplit(public_url).scheme.lower()
        if public_scheme in _DEFAULT_PORTS:
            ours.add(_endpoint(public_url, public_scheme))
    return offered is not None and offered in ours


def forgery_problem(request: web.Request) -> str | None:
    """Why a request signed in by the session cookie may have been made by another site's
    page, or None when it is the dashboard's own."""
    if request.method in STATE_CHANGING:
        allowed = BODY_TYPES.get(request.path, (JSON_TYPE,))
        if request.content_type not in allowed:
            return f"a request signed in by cookie must send Content-Type {' or '.join(allowed)}"
    elif request.path != WEBSOCKET_PATH:
        return None
    origin = request.headers.get("Origin")
    if origin is None:
        if request.headers.get("Sec-Fetch-Site", "").lower() == "same-origin":
            return None
        return (
            "a request signed in by cookie must send this server's Origin"
            " (or Sec-Fetch-Site: same-origin)"
        )
    if not _origin_is_ours(request, origin):
        return "the request's Origin is not this server"
    return None


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    path = request.path
    is_api = path == "/api" or path.startswith("/api/")
    if (not is_api and path not in (LOGOUT_PATH, METRICS_PATH)) or path in PUBLIC_API_PATHS:
        return await handler(request)
    credential = await authenticate(request)
    if credential is None:
        if path == LOGOUT_PATH:  # no live session: signing out only clears the cookie
            return await handler(request)
        return web.json_response(
            {"error": "unauthorized", "detail": "a valid token or session is required"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="mistrelay"'},
        )
    if credential.session is not None:
        problem = forgery_problem(request)
        if problem is not None:
            return json_error(403, "forbidden", problem)
        request[SESSION] = credential.session
    if credential.viewer is not None:
        if not _user_may(request):
            return json_error(403, "forbidden", f"only an admin may use {request.method} {path}")
        request[VIEWER] = credential.viewer
    if credential.user_id is not None:
        request[ACTING_USER] = credential.user_id
    if credential.session is not None or credential.api_token is not None:

        async def holds() -> bool:
            return await still_holds(request, credential)

        request[CREDENTIAL_CHECK] = holds
    return await handler(request)


# --- failed sign-ins ----------------------------------------------------------------------------


@dataclass
class LoginLimiter:
    """Failed sign-ins per client over the last `LOGIN_WINDOW` seconds."""

    failures: dict[str, deque[float]] = field(default_factory=dict)

    def wait(self, client: str, limit: int, now: float) -> float:
        """Seconds until `client` may try again (0: now)."""
        times = self.failures.get(client)
        if times is None:
            return 0.0
        while times and times[0] <= now - LOGIN_WINDOW:
            times.popleft()
        if not times:
            del self.failures[client]
            return 0.0
        return times[0] + LOGIN_WINDOW - now if len(times) >= limit else 0.0

    def failed(self, client: str, now: float) -> None:
        self.failures.setdefault(client, deque()).append(now)
        if len(self.failures) > 4096:  # many clients: forget those with nothing recent
            for name in [c for c, t in self.failures.items() if t[-1] <= now - LOGIN_WINDOW]:
                del self.failures[name]

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)


@dataclass
class LoginGuard:
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    refused: WarningSummary = field(
        default_factory=lambda: WarningSummary("dashboard sign-in(s) refused", LOGIN_WINDOW)
    )


LOGIN_GUARD: web.AppKey[LoginGuard] = web.AppKey("login_guard", LoginGuard)


# --- sign-in and sign-out -----------------------------------------------------------------------


class _TooLarge(Exception):
    pass


async def _read_small_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise _TooLarge


def _wants_json(request: web.Request) -> bool:
    return request.content_type == JSON_TYPE or JSON_TYPE in request.headers.get("Accept", "")


def _is_https(request: web.Request) -> bool:
    return request.secure or context_of(request).config.web.public_url.startswith("https://")


def _printable(text: str | None, limit: int) -> str | None:
    """A header value as the store can keep it: valid UTF-8, at most `limit` characters."""
    if text is None:
        return None
    return text[:limit].encode("utf-8", "replace").decode("utf-8")


async def login_page(request: web.Request) -> web.Response:
    return await index_response()


async def _offered_token(request: web.Request) -> object:
    """The token a sign-in offers: JSON {"token": ...} or the form field `token`."""
    try:
        body = await _read_small_body(request, LOGIN_BODY_LIMIT)
    except _TooLarge:
        raise web.HTTPRequestEntityTooLarge(
            max_size=LOGIN_BODY_LIMIT,
            actual_size=request.content_length or LOGIN_BODY_LIMIT + 1,
            text=f"at most {LOGIN_BODY_LIMIT} bytes",
        ) from None
    if request.content_type == JSON_TYPE:
        document = parse_json(body)
        return document.get("token") if isinstance(document, dict) else None
    if request.content_type in ("application/x-www-form-urlencoded", ""):
        try:
            fields = parse_qs(body.decode("utf-8"), max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            raise web.HTTPBadRequest(text="the form could not be read") from None
        return fields["token"][0] if fields.get("token") else None
    raise web.HTTPUnsupportedMediaType(text="send JSON or a form")


async def login(request: web.Request) -> web.StreamResponse:
    """Token → a new session, its secret in the cookie. A client with too many failed sign-ins
    in the last minute is refused (429) before its token is looked at."""
    ctx = context_of(request)
    guard = request.app[LOGIN_GUARD]
    client = client_of(request.remote)
    wait = guard.limiter.wait(client, ctx.config.web.login_attempts, time.monotonic())
    if wait > 0:
        guard.refused.add(client)
        seconds = max(1, math.ceil(wait))
        refusal = json_error(
            429,
            "too_many_requests",
            f"too many failed sign-ins from this address; try again in {seconds} s",
        )
        refusal.headers["Retry-After"] = str(seconds)
        return refusal
    as_json = _wants_json(request)
    offered = await _offered_token(request)
    token = ctx.secrets.web_token
    if not (isinstance(offered, str) and token and _same_text(offered.strip(), token)):
        guard.limiter.failed(client, time.monotonic())
        guard.refused.add(client)
        if as_json:
            return json_error(401, "unauthorized", "wrong token")
        return await index_response(401, "failed")
    guard.limiter.succeeded(client)
    return await _start_session(request, as_json)


async def _start_session(
    request: web.Request, as_json: bool, user_id: int | None = None
) -> web.StreamResponse:
    """A new session (for Telegram user `user_id`, or the web token's), its secret in the
    cookie; the answer goes to the page (a redirect) or is JSON."""
    ctx = context_of(request)
    secret = new_session_secret()
    key = session_key(secret, ctx.secrets.web_token)
    assert key is not None  # a fresh secret is always well-formed
    expires = datetime.now(UTC) + timedelta(seconds=SESSION_LIFETIME)
    await ctx.store.create_web_session(
        key,
        expires.isoformat(timespec="milliseconds"),
        request.remote,
        _printable(request.headers.get("User-Agent"), USER_AGENT_LIMIT),
        user_id,
    )
    response: web.StreamResponse
    if as_json:
        response = web.json_response({"ok": True})
    else:
        response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(
        SESSION_COOKIE,
        secret,
        max_age=SESSION_LIFETIME,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_is_https(request) or None,
    )
    response.headers["Cache-Control"] = "no-store"
    logger.bind(peer=request.remote, session=key[:SESSION_ID_LENGTH], user=user_id).info(
        "dashboard session started"
    )
    return response


# --- one-time sign-in links (the bot's /web) ----------------------------------------------------

_SIGN_IN_FIELDS = ("user", "nonce", "exp", "sig")
_SIGN_IN_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<meta name="referrer" content="no-referrer"><title>MistRelay sign-in</title></head>
<body><form method="post" action="{action}">{fields}
<button type="submit">Sign in to MistRelay</button></form></body></html>
"""


def _sign_in_refused(request: web.Request, why: str) -> web.Response:
    guard = request.app[LOGIN_GUARD]
    client = client_of(request.remote)
    guard.limiter.failed(client, time.monotonic())
    guard.refused.add(client)
    logger.bind(peer=request.remote).info("sign-in link refused: {}", why)
    return web.Response(
        status=403, text=f"{why}: ask the bot for a new one with /web", headers=_NO_STORE
    )


_NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def _too_many(request: web.Request) -> web.Response | None:
    ctx = context_of(request)
    guard = request.app[LOGIN_GUARD]
    client = client_of(request.remote)
    wait = guard.limiter.wait(client, ctx.config.web.login_attempts, time.monotonic())
    if wait <= 0:
        return None
    guard.refused.add(client)
    seconds = max(1, math.ceil(wait))
    return web.Response(
        status=429,
        text=f"too many failed sign-ins from this address; try again in {seconds} s",
        headers={"Retry-After": str(seconds), **_NO_STORE},
    )


async def sign_in_page(request: web.Request) -> web.Response:
    """A sign-in link opened: checked (not used up) and answered with a button that uses it, so
    a link preview that only fetches the page cannot spend it."""
    refusal = _too_many(request)
    if refusal is not None:
        return refusal
    values = [request.query.get(name) for name in _SIGN_IN_FIELDS]
    checked = context_of(request).links.signer.verify_sign_in(*values)
    if isinstance(checked, str):
        return _sign_in_refused(request, checked)
    fields = "".join(
        f'<input type="hidden" name="{name}" value="{html.escape(value or "")}">'
        for name, value in zip(_SIGN_IN_FIELDS, values, strict=True)
    )
    page = _SIGN_IN_PAGE.format(action=SIGN_IN_PATH, fields=fields)
    return web.Response(text=page, content_type="text/html", headers=_NO_STORE)


async def sign_in(request: web.Request) -> web.StreamResponse:
    """Use a sign-in link (a form post from its page): a good, unexpired, unused link for a user
    still allowed starts a session for that user; the link never works again."""
    refusal = _too_many(request)
    if refusal is not None:
        return refusal
    origin = request.headers.get("Origin")
    if origin is not None and origin != "null" and not _origin_is_ours(request, origin):
        return _sign_in_refused(request, "the sign-in came from another site")
    try:
        body = await _read_small_body(request, LOGIN_BODY_LIMIT)
        form = parse_qs(body.decode("utf-8"), max_num_fields=10)
    except (_TooLarge, UnicodeDecodeError, ValueError):
        return _sign_in_refused(request, "malformed sign-in form")
    values = [form[name][0] if form.get(name) else None for name in _SIGN_IN_FIELDS]
    ctx = context_of(request)
    checked = ctx.links.signer.verify_sign_in(*values)
    if isinstance(checked, str):
        return _sign_in_refused(request, checked)
    user_id, nonce, expires = checked
    telegram = ctx.config.telegram
    if user_id not in telegram.admins and user_id not in telegram.allowed_users:
        return _sign_in_refused(request, "this Telegram user may not use MistRelay")
    expires_at = datetime.fromtimestamp(expires, UTC).isoformat(timespec="milliseconds")
    if not await ctx.store.use_sign_in_link(nonce, user_id, expires_at):
        return _sign_in_refused(request, "this sign-in link was used already")
    request.app[LOGIN_GUARD].limiter.succeeded(client_of(request.remote))
    return await _start_session(request, False, user_id)


def _signed_out(response: web.StreamResponse) -> web.StreamResponse:
    response.del_cookie(SESSION_COOKIE, path="/", samesite="Strict", httponly=True)
    response.headers["Cache-Control"] = "no-store"
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    """End this browser's session on the server (its cookie stops working on every node)."""
    session = request.get(SESSION)
    if session is not None:
        await context_of(request).store.revoke_web_session(session.token_hash)
        logger.bind(peer=request.remote, session=session.token_hash[:SESSION_ID_LENGTH]).info(
            "dashboard session ended"
        )
    if _wants_json(request):
        return _signed_out(web.json_response({"ok": True}))
    return _signed_out(web.Response(status=303, headers={"Location": "/"}))


# --- the sessions -------------------------------------------------------------------------------


def session_json(session: WebSession, current: WebSession | None) -> dict[str, Any]:
    """A session as the API shows it: a short id, never its key or secret."""
    return {
        "id": session.token_hash[:SESSION_ID_LENGTH],
        "address": session.address,
        "user_agent": session.user_agent,
        "created_at": session.created_at,
        "last_used_at": session.last_used_at,
        "expires_at": session.expires_at,
        "current": current is not None and current.token_hash == session.token_hash,
    }


async def list_sessions(request: web.Request) -> web.Response:
    sessions = await context_of(request).store.list_web_sessions()
    current = request.get(SESSION)
    return web.json_response({"sessions": [session_json(s, current) for s in sessions]})


async def revoke_all_sessions(request: web.Request) -> web.StreamResponse:
    """Sign out everywhere: every session ends, this browser's too."""
    count = await context_of(request).store.revoke_all_web_sessions()
    logger.bind(peer=request.remote).info("signed out everywhere: {} session(s) ended", count)
    response = web.json_response({"revoked": count})
    return _signed_out(response) if SESSION in request else response


# --- who is signed in ---------------------------------------------------------------------------


async def who_am_i(request: web.Request) -> web.Response:
    """``{"role": "admin" | "user", "user_id": ...}``: an admin sees every job (the web token,
    its sessions and tokens: `user_id` null), a user only their own."""
    role = "user" if VIEWER in request else "admin"
    return web.json_response({"role": role, "user_id": request.get(ACTING_USER)})


# --- personal API tokens -------------------------------------------------------------------------


def api_token_json(token: ApiToken) -> dict[str, Any]:
    """A token as the API lists it: a short id, never the token or its whole hash."""
    return {
        "id": token.token_hash[:SESSION_ID_LENGTH],
        "name": token.name,
        "created_at": token.created_at,
        "last_used_at": token.last_used_at,
    }


async def list_api_tokens(request: web.Request) -> web.Response:
    """The live tokens of whoever asks (a user's own; the web token's for the web token)."""
    tokens = await context_of(request).store.list_api_tokens(request.get(ACTING_USER))
    return web.json_response({"tokens": [api_token_json(t) for t in tokens]})


async def create_api_token(request: web.Request) -> web.Response:
    """``{"name": "..."}`` → a new token acting as whoever asks, shown this once only."""
    ctx = context_of(request)
    body = await read_json_object(request)
    unknown = set(body) - {"name"}
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown fields: {', '.join(sorted(unknown))}")
    name = body.get("name")
    if (
        not isinstance(name, str)
        or not name.strip()
        or len(name) > API_TOKEN_NAME_LIMIT
        or not name.isprintable()
    ):
        raise web.HTTPBadRequest(
            text=f'"name" must be printable text of 1 to {API_TOKEN_NAME_LIMIT} characters'
        )
    user_id = request.get(ACTING_USER)
    if len(await ctx.store.list_api_tokens(user_id)) >= API_TOKENS_PER_USER:
        return json_error(409, "too_many_tokens", f"at most {API_TOKENS_PER_USER} live tokens")
    token = API_TOKEN_PREFIX + secrets.token_urlsafe(32)
    made = await ctx.store.create_api_token(api_token_hash(token), user_id, name.strip())
    logger.bind(peer=request.remote, user=user_id, token=made.token_hash[:SESSION_ID_LENGTH]).info(
        "API token created"
    )
    response = web.json_response({**api_token_json(made), "token": token}, status=201)
    response.headers["Cache-Control"] = "no-store"
    return response


async def revoke_api_token(request: web.Request) -> web.Response:
    """Revoke one of the asker's tokens by its id; another's answers 404 like none."""
    token_id = request.match_info["id"]
    user_id = request.get(ACTING_USER)
    valid = len(token_id) == SESSION_ID_LENGTH and all(c in "0123456789abcdef" for c in token_id)
    if not valid or not await context_of(request).store.revoke_api_token(token_id, user_id):
        raise web.HTTPNotFound(text=f"no token {token_id[: SESSION_ID_LENGTH * 2]}")
    logger.bind(peer=request.remote, user=user_id, token=token_id).info("API token revoked")
    return web.json_response({"revoked": token_id})


async def _report_refusals(app: web.Application) -> None:
    app[LOGIN_GUARD].refused.close()


def setup(app: web.Application) -> None:
    app[LOGIN_GUARD] = LoginGuard()
    app.on_cleanup.append(_report_refusals)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post(LOGOUT_PATH, logout)
    app.router.add_get(SIGN_IN_PATH, sign_in_page)
    app.router.add_post(SIGN_IN_PATH, sign_in)
    app.router.add_get("/api/sessions", list_sessions)
    app.router.add_post("/api/sessions/revoke-all", revoke_all_sessions)
    app.router.add_get(ME_PATH, who_am_i)
    app.router.add_get("/api/tokens", list_api_tokens)
    app.router.add_post("/api/tokens", create_api_token)
    app.router.add_delete("/api/tokens/{id}", revoke_api_token)
