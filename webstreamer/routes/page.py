"""The dashboard page, its static files, sign-in and sign-out, and the /watch player page.

`/`, `/login` and `/static/...` are public: the page itself shows the sign-in form until the
browser holds a session cookie, which the API and the WebSocket then accept. `/watch/...` is
authorised by the same HMAC signature as the `/stream/...` link it plays.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from html import escape
from pathlib import Path
from urllib.parse import parse_qs, quote, urlencode

from aiohttp import web
from loguru import logger

from webstreamer.i18n import language_for, translate
from webstreamer.ranges import guess_mime
from webstreamer.routes.stream import check_signature
from webstreamer.server import context_of, json_error
from webstreamer.signing import SESSION_COOKIE, SESSION_LIFETIME
from webstreamer.views import can_stream

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
INDEX_FILE = STATIC_DIR / "index.html"

# The page runs only its own script and style and talks only to its own origin ('self' also
# covers ws:/wss: to the same host in CSP Level 3); nothing may frame it.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "font-src 'self'; connect-src 'self'; manifest-src 'self'; form-action 'self'; "
    "base-uri 'none'; frame-ancestors 'none'"
)
# The player page has no script at all: the browser's own controls seek with Range requests.
WATCH_CSP = (
    "default-src 'none'; style-src 'self'; media-src 'self'; img-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)
LOGIN_BODY_LIMIT = 8 * 1024
LOGIN_STATE_MARKER = 'data-login-state=""'

# Only these kinds of file are served from /static, each with a fixed type.
STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json; charset=utf-8",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}


def _page_headers(csp: str = PAGE_CSP) -> dict[str, str]:
    return {
        "Content-Security-Policy": csp,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
        "Cross-Origin-Opener-Policy": "same-origin",
    }


def _read_index() -> str:
    return INDEX_FILE.read_text(encoding="utf-8")


async def _index_response(status: int = 200, login_state: str = "") -> web.Response:
    html = await asyncio.to_thread(_read_index)
    if login_state:
        html = html.replace(LOGIN_STATE_MARKER, f'data-login-state="{escape(login_state)}"', 1)
    return web.Response(
        status=status,
        text=html,
        content_type="text/html",
        charset="utf-8",
        headers={**_page_headers(), "Cache-Control": "no-store"},
    )


async def index(request: web.Request) -> web.Response:
    return await _index_response()


async def login_page(request: web.Request) -> web.Response:
    return await _index_response()


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Cache-Control": "max-age=86400"})


# --- static files -------------------------------------------------------------------------------


def static_file_path(name: str) -> Path | None:
    """The file under STATIC_DIR that `name` names, or None for anything else.

    `name` is the already percent-decoded path tail; a `..` segment, an absolute path, a
    backslash, a NUL, a symlink out of the folder or an unknown extension are all refused.
    """
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return None
    parts = name.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts):
        return None
    candidate = (STATIC_DIR / name).resolve()
    if not candidate.is_relative_to(STATIC_DIR) or candidate.suffix.lower() not in STATIC_TYPES:
        return None
    return candidate if candidate.is_file() else None


async def static(request: web.Request) -> web.StreamResponse:
    path = await asyncio.to_thread(static_file_path, request.match_info["path"])
    if path is None:
        return json_error(404, "not_found", "no such file")
    headers = _page_headers()
    headers["Content-Type"] = STATIC_TYPES[path.suffix.lower()]
    return web.FileResponse(path, headers=headers)


# --- sign-in ------------------------------------------------------------------------------------


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
        return await _index_response(401, "failed")
    response: web.StreamResponse
    if as_json:
        response = web.json_response({"ok": True})
    else:
        response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(
        SESSION_COOKIE,
        ctx.signer.session_cookie(token),
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


# --- the player ---------------------------------------------------------------------------------


def _digits(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() and len(text) <= 18 else None


def _signed_query(request: web.Request) -> str:
    """The link's own sig/exp: /watch and /stream are signed alike, so the player reuses them."""
    params = {"sig": request.query.get("sig", "")}
    if request.query.get("exp"):
        params["exp"] = request.query["exp"]
    return urlencode(params)


def render_watch_page(
    lang: str,
    title: str,
    stream_src: str | None,
    mime: str,
    message_key: str | None = None,
) -> str:
    """The player page; every value that comes from a file name or a link is escaped."""
    kind = mime.split("/", 1)[0] if stream_src else ""
    heading = escape(title)
    parts = [
        "<!doctype html>",
        f'<html lang="{escape(lang)}">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>{heading} · {escape(translate(lang, 'watch.title'))}</title>",
        '<link rel="stylesheet" href="/static/watch.css">',
        "</head>",
        '<body class="watch">',
        "<main>",
        f'<h1 class="name">{heading}</h1>',
    ]
    if stream_src and kind in ("video", "audio"):
        source = escape(stream_src, quote=True)
        fallback = escape(translate(lang, "watch.unsupported"))
        parts.append(
            f'<{kind} class="player" controls preload="metadata" src="{source}">'
            f"<p>{fallback}</p></{kind}>"
        )
    elif message_key is None:
        message_key = "watch.not_playable"
    if message_key:
        parts.append(f'<p class="message">{escape(translate(lang, message_key))}</p>')
    if stream_src:
        separator = "&" if "?" in stream_src else "?"
        download_href = escape(f"{stream_src}{separator}download=1", quote=True)
        parts.append(
            f'<p><a class="download" href="{download_href}" rel="noreferrer">'
            f"{escape(translate(lang, 'watch.download'))}</a></p>"
        )
    parts += ["</main>", "</body>", "</html>"]
    return "\n".join(parts)


async def watch(request: web.Request) -> web.StreamResponse:
    ctx = context_of(request)
    download_id = _digits(request.match_info["id"])
    index_text = request.match_info.get("index")
    index = _digits(index_text)
    if download_id is None or (index_text is not None and index is None):
        return json_error(404, "not_found", "no such download")
    refused = check_signature(request, download_id, index or 0)
    if refused is not None:
        return refused
    row = await ctx.db.get_download_by_id(download_id)
    if row is None:
        return json_error(404, "not_found", f"no download {download_id}")
    if not can_stream(row):
        return json_error(409, "not_ready", f"download {download_id} cannot be played yet")
    lang = language_for(request.headers.get("Accept-Language"))
    query = _signed_query(request)
    title = row.file_name or f"#{row.id}"
    message_key: str | None = None
    stream_src: str | None
    if index is None:
        if len(row.files) > 1:
            stream_src, message_key = None, "watch.several_files"
            mime = "application/octet-stream"
        else:
            name = row.file_name or "file"
            stream_src = f"/stream/{download_id}/{quote(name, safe='')}?{query}"
            mime = guess_mime(name)
    else:
        entry = next((f for f in row.files if f.index == index), None)
        if entry is None:
            return json_error(404, "not_found", f"download {download_id} has no file {index}")
        title = os.path.basename(entry.path) or title
        stream_src = f"/stream/{download_id}/{index}/{quote(title, safe='')}?{query}"
        mime = guess_mime(title)
    html = render_watch_page(lang, title, stream_src, mime, message_key)
    headers = _page_headers(WATCH_CSP)
    headers["Cache-Control"] = "private, no-store"
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers=headers)


def setup(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/static/{path:.+}", static)
    app.router.add_get("/watch/{id}", watch)
    app.router.add_get("/watch/{id}/{index}", watch)


__all__ = [
    "LOGIN_BODY_LIMIT",
    "PAGE_CSP",
    "STATIC_DIR",
    "WATCH_CSP",
    "render_watch_page",
    "setup",
    "static_file_path",
]
