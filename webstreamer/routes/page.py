"""The dashboard page, its static files and the /watch player page.

`/` and `/static/...` are public: the page itself shows the sign-in form (routes/auth.py) until
the browser holds a session cookie, which the API and the WebSocket then accept. `/watch/...` is
authorised by the same HMAC signature as the `/stream/...` link it plays, and served by the node
that holds the file.
"""

from __future__ import annotations

import asyncio
import os
from html import escape
from pathlib import Path

from aiohttp import web
from loguru import logger

from webstreamer.context import (
    STATIC_DIR,
    context_of,
    index_response,
    json_error,
    page_headers,
    redirect_to_node,
    signed_request,
)
from webstreamer.i18n import language_for, translate
from webstreamer.links import can_stream, file_name_of
from webstreamer.ranges import guess_mime

# The player page has no script at all: the browser's own controls seek with Range requests.
WATCH_CSP = (
    "default-src 'none'; style-src 'self'; media-src 'self'; img-src 'self'; "
    "form-action 'none'; base-uri 'none'; frame-ancestors 'none'"
)

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


async def index(request: web.Request) -> web.Response:
    return await index_response()


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
    headers = page_headers()
    headers["Content-Type"] = STATIC_TYPES[path.suffix.lower()]
    return web.FileResponse(path, headers=headers)


# --- the player ---------------------------------------------------------------------------------


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
    signed = await signed_request(request, "download")
    if isinstance(signed, web.Response):
        return signed
    row, index, expires = signed.row, signed.index, signed.expires
    download_id = row.id
    if not can_stream(row):
        return json_error(409, "not_ready", f"download {download_id} cannot be played yet")
    # The player plays a /stream link of its own origin (media-src 'self'): the node holding
    # the file serves both.
    holder = ctx.cluster.origin_of(row.node) if row.status == "completed" else None
    if holder is not None:
        logger.bind(job=download_id).debug("player sent to node {} at {}", row.node, holder)
        return redirect_to_node(request, holder)
    lang = language_for(request.headers.get("Accept-Language"))
    title = row.file_name or f"#{row.id}"
    message_key: str | None = None
    stream_src: str | None
    if index is None:
        if len(row.files) > 1:
            stream_src, message_key = None, "watch.several_files"
            mime = "application/octet-stream"
        else:
            name = file_name_of(row)
            stream_src = ctx.links.player_source(download_id, name, None, expires)
            mime = guess_mime(name)
    else:
        entry = next((f for f in row.files if f.index == index), None)
        if entry is None:
            return json_error(404, "not_found", f"download {download_id} has no file {index}")
        title = os.path.basename(entry.path) or title
        stream_src = ctx.links.player_source(download_id, title, index, expires)
        mime = guess_mime(title)
    html = render_watch_page(lang, title, stream_src, mime, message_key)
    headers = page_headers(WATCH_CSP)
    headers["Cache-Control"] = "private, no-store"
    return web.Response(text=html, content_type="text/html", charset="utf-8", headers=headers)


def setup(app: web.Application) -> None:
    app.router.add_get("/", index)
    app.router.add_get("/favicon.ico", favicon)
    app.router.add_get("/static/{path:.+}", static)
    app.router.add_get("/watch/{id}", watch)
    app.router.add_get("/watch/{id}/{index}", watch)
