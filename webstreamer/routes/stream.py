"""/stream: a download's bytes behind a signed link — from local disk once the file is whole,
else from another byte source (Telegram) registered on the application context."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web
from loguru import logger

from files import DownloadFiles
from records import DownloadRow
from webstreamer.byteserve import ByteSource, LocalFileSource, serve_bytes
from webstreamer.context import context_of, json_error, redirect_to_node, signed_request
from webstreamer.links import file_name_of


def _whole_local_file(
    files: DownloadFiles, row: DownloadRow, index: int | None
) -> tuple[str, int, str] | None:
    """(path, expected size, display name) of the completed bytes on disk, if they are whole."""
    if row.status != "completed" or not row.local_path:
        return None
    if index is None:
        if row.files and len(row.files) > 1:
            return None
        candidate, expected, name = row.local_path, row.total_length, file_name_of(row)
    else:
        entry = next((f for f in row.files if f.index == index), None)
        if entry is None:
            return None
        base = os.path.dirname(row.local_path) if len(row.files) > 1 else None
        candidate = row.local_path if base is None else os.path.join(base, entry.path)
        expected, name = entry.length, os.path.basename(entry.path)
    path = files.confined(candidate)
    if path is None:
        return None
    return str(path), expected, name


async def _local_source(
    files: DownloadFiles, row: DownloadRow, index: int | None
) -> ByteSource | None:
    found = await asyncio.to_thread(_whole_local_file, files, row, index)
    if found is None:
        return None
    path, expected, name = found
    try:
        source = await LocalFileSource.open(path, name=name)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        return None
    # aria2 preallocates: only a file of exactly the recorded size counts as whole.
    return source if source.size == expected else None


async def stream(request: web.Request) -> web.StreamResponse:
    """The bytes from here when this node has them whole (or a byte source does); else a 307 to
    the node that holds the completed file, or, for a Telegram file, to the node running the
    bot; else 409."""
    ctx = context_of(request)
    signed = await signed_request(request, "stream")
    if isinstance(signed, web.Response):
        return signed
    row, index = signed.row, signed.index
    download_id = row.id
    log = logger.bind(job=download_id)
    source = await _local_source(ctx.files, row, index)
    if source is None and row.status == "completed":
        holder = ctx.cluster.origin_of(row.node)
        if holder is not None:
            log.debug(
                "{} sent to node {} at {}, which holds the file", request.method, row.node, holder
            )
            return redirect_to_node(request, holder)
    if source is None and index is None:
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
    for route in ("/stream/{id}/{name}", "/stream/{id}/{index}/{name}"):
        app.router.add_route("GET", route, stream)
        app.router.add_route("HEAD", route, stream)
