"""/stream: a download's bytes behind a signed link — from local disk once the file is whole,
else from another byte source (Telegram) registered on the application context.

A whole local file is served from the application's `FileCache`: once opened, a request for it
is answered without a store read or a thread hop (see webstreamer/filecache.py for how the
cache stays fresh)."""

from __future__ import annotations

from aiohttp import web
from loguru import logger

from webstreamer.byteserve import ByteSource, serve_bytes
from webstreamer.context import CONTEXT, context_of, json_error, redirect_to_node, signed_link
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
