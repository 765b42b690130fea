"""Who may use the API: a bearer token (`web.token`) or the dashboard's session cookie, given by
signing in with that token (`/login`) and dropped by `/logout`.

Every `/api` path but the health check needs one of the two; the page and the sign-in form are
public, and `/stream` and `/watch` links carry their own signature instead.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from aiohttp import web
from loguru import logger

from webstreamer.context import context_of, index_response, json_error
from webstreamer.signing import SESSION_COOKIE, SESSION_LIFETIME

LOGIN_BODY_LIMIT = 8 * 1024
PUBLIC_API_PATHS = frozenset({"/api/health"})


def request_is_authenticated(request: web.Request) -> bool:
    """A bearer token equal to web.token, or a valid dashboard session cookie."""
    ctx = context_of(request)
    token = ctx.secrets.web_token
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        offered = header[7:].strip()
        return hmac.compare_digest(offered.encode(), token.encode())
    return ctx.links.signer.session_valid(request.cookies.get(SESSION_COOKIE), token)


@web.middleware
async def auth_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    path = request.path
    is_api = path == "/api" or path.startswith("/api/")
    if is_api and path not in PUBLIC_API_PATHS and not request_is_authenticated(request):
        return web.json_response(
            {"error": "unauthorized", "detail": "a valid token or session is required"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="mistrelay"'},
        )
    return await handler(request)


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
    return request.content_type == "application/json" or "application/json" in request.headers.get(
        "Accept", ""
    )


def _is_https(request: web.Request) -> bool:
    return request.secure or context_of(request).config.web.public_url.startswith("https://")


async def login_page(request: web.Request) -> web.Response:
    return await index_response()


async def login(request: web.Request) -> web.StreamResponse:
    """Token (JSON {"token": ...} or form field `token`) → the session cookie."""
    ctx = context_of(request)
    as_json = _wants_json(request)
    try:
        body = await _read_small_body(request, LOGIN_BODY_LIMIT)
    except _TooLarge:
        return json_error(413, "request_entity_too_large", f"at most {LOGIN_BODY_LIMIT} bytes")
    offered: object = None
    if request.content_type == "application/json":
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return json_error(400, "bad_request", "the body is not valid JSON")
        if isinstance(document, dict):
            offered = document.get("token")
    elif request.content_type in ("application/x-www-form-urlencoded", ""):
        try:
            fields = parse_qs(body.decode("utf-8"), max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            return json_error(400, "bad_request", "the form could not be read")
        offered = fields["token"][0] if fields.get("token") else None
    else:
        return json_error(415, "unsupported_media_type", "send JSON or a form")
    token = ctx.secrets.web_token
    good = (
        isinstance(offered, str)
        and bool(token)
        and hmac.compare_digest(offered.strip().encode(), token.encode())
    )
    if not good:
        logger.bind(peer=request.remote).warning("dashboard sign-in refused: wrong token")
        if as_json:
            return json_error(401, "unauthorized", "wrong token")
        return await index_response(401, "failed")
    response: web.StreamResponse
    if as_json:
        response = web.json_response({"ok": True})
    else:
        response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(
        SESSION_COOKIE,
        ctx.links.signer.session_cookie(token),
        max_age=SESSION_LIFETIME,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=_is_https(request) or None,
    )
    response.headers["Cache-Control"] = "no-store"
    logger.bind(peer=request.remote).info("dashboard session started")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    response: web.StreamResponse
    if _wants_json(request):
        response = web.json_response({"ok": True})
    else:
        response = web.Response(status=303, headers={"Location": "/"})
    response.del_cookie(SESSION_COOKIE, path="/", samesite="Strict", httponly=True)
    response.headers["Cache-Control"] = "no-store"
    return response


def setup(app: web.Application) -> None:
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
