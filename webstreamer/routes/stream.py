"""/stream: a download's bytes behind a signed link — from local disk once the file is whole,
else from another byte source (Telegram) registered on the application context.

A whole local file is served from the application's `FileCache`: once opened, a request for it
is answered without a store read or a thread hop (see webstreamer/filecache.py for how the
cache stays fresh)."""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

from aiohttp import web
from loguru import logger

from uploads.media import make_thumbnail
from webstreamer.byteserve import ByteSource, serve_bytes
from webstreamer.context import (
    CONTEXT,
    context_of,
    json_error,
    redirect_to_node,
    signed_link,
    signed_request,
)
from webstreamer.filecache import FileCache, OpenFile

FILE_CACHE: web.AppKey[FileCache] = web.AppKey("file_cache", FileCache)


async def _serve_open(
    request: web.Request, cache: FileCache, entry: OpenFile
) -> web.StreamResponse:
    cache.acquire(entry)
    try:
        return await serve_bytes(request, entry.source, open_file=entry.file)
    finally:
        cache.release(entry)


async def stream(request: web.Request) -> web.StreamResponse:
    """The bytes from here when this node has them whole (or a byte source does); else a 307 to
    the node that holds the completed file, or, for a Telegram file, to the node running the
    bot; else 409."""
    link = signed_link(request, "stream")
    if isinstance(link, web.Response):
        return link
    download_id, index = link.download_id, link.index
    cache = request.app[FILE_CACHE]
    entry = cache.get((download_id, index))
    if entry is not None:
        return await _serve_open(request, cache, entry)

    ctx = context_of(request)
    with cache.loading(download_id) as load:
        row = await ctx.store.get_download_by_id(download_id)
        if row is None:
            return json_error(404, "not_found", f"no download {download_id}")
        entry = await cache.open(load, row, index)
    if entry is not None:
        return await _serve_open(request, cache, entry)
    log = logger.bind(job=download_id)
    if row.status == "completed":
        holder = ctx.cluster.origin_of(row.node)
        if holder is not None:
            log.debug(
                "{} sent to node {} at {}, which holds the file", request.method, row.node, holder
            )
            return redirect_to_node(request, holder)
    source: ByteSource | None = None
    if index is None:
        for provider in ctx.byte_sources:
            source = await provider(row, index)
            if source is not None:
                break
    if source is None and index is None and row.source_type == "telegram":
        leader = ctx.cluster.leader_origin()  # this node does not read Telegram; the leader does
        if leader is not None:
            log.debug("{} sent to {}, the node that reads Telegram", request.method, leader)
            return redirect_to_node(request, leader)
    if source is None:
        return json_error(409, "not_ready", f"download {download_id} has no whole file to serve")
    log.debug("streaming {} ({} bytes)", source.name, source.size)
    return await serve_bytes(request, source)


THUMBNAILS_DIR = "thumbnails"  # in the data folder: one JPEG a download, named by its id


def _keep(made: Path, out: Path) -> None:
    os.replace(made, out)  # whole or not at all: two first requests each make one, one stays


async def thumbnail(request: web.Request) -> web.StreamResponse:
    """A frame of a completed single-file video, made once with ffmpeg and kept in the data
    folder; the link carries the download's stream signature."""
    found = await signed_request(request, "thumbnail")
    if isinstance(found, web.Response):
        return found
    row, ctx = found.row, context_of(request)
    info = row.media_info or {}
    source = ctx.files.confined(row.local_path) if row.local_path else None
    if row.status != "completed" or row.files or not info.get("width") or source is None:
        return json_error(404, "not_found", f"download {row.id} has no video to show")
    out = ctx.config.data_dir / THUMBNAILS_DIR / f"{row.id}.jpg"
    if not await asyncio.to_thread(out.is_file):
        duration = float(info.get("duration") or 0)
        made = await make_thumbnail(
            source, out.with_name(f"{row.id}.{secrets.token_hex(4)}.jpg"), duration
        )
        if made is None:
            return json_error(409, "not_ready", f"no frame could be read from download {row.id}")
        await asyncio.to_thread(_keep, made, out)
        logger.bind(job=row.id).info("thumbnail of download {} made", row.id)
    return web.FileResponse(
        out, headers={"Content-Type": "image/jpeg", "Cache-Control": "private, max-age=86400"}
    )


def setup(app: web.Application) -> None:
    """The routes, and the application's file cache: watching the hub from startup to cleanup."""
    ctx = app[CONTEXT]
    cache = FileCache(ctx.files)
    app[FILE_CACHE] = cache

    async def watch(app: web.Application) -> None:
        cache.watch(ctx.hub)

    async def close(app: web.Application) -> None:
        cache.close()

    app.on_startup.append(watch)
    app.on_cleanup.append(close)
    for route in ("/stream/{id}/{name}", "/stream/{id}/{index}/{name}"):
        app.router.add_route("GET", route, stream)
        app.router.add_route("HEAD", route, stream)
    app.router.add_get("/thumb/{id}", thumbnail)
