"""The REST API for uploads: list, statistics, retry and cancel (JSON under /api/uploads)."""

from __future__ import annotations

from aiohttp import web

from db import UPLOAD_STATUSES, NotFound
from webstreamer.context import (
    MAX_LIST_LIMIT,
    context_of,
    path_id,
    query_choice,
    query_int,
    viewer_of,
)
from webstreamer.views import upload_json


async def list_uploads(request: web.Request) -> web.Response:
    """The newest uploads (a user's: of their own jobs only)."""
    ctx = context_of(request)
    limit = query_int(request, "limit", 50, 1, MAX_LIST_LIMIT)
    status = query_choice(request, "status", UPLOAD_STATUSES)
    target = request.query.get("target") or None
    rows = await ctx.store.fetch_recent_uploads(
        limit, status=status, upload_target=target, owner_id=viewer_of(request)
    )
    return web.json_response({"uploads": [upload_json(row) for row in rows]})


async def upload_statistics(request: web.Request) -> web.Response:
    """Every upload's figures; those of a user's own jobs for a user."""
    store = context_of(request).store
    return web.json_response(await store.get_upload_statistics(viewer_of(request)))


async def act_on_upload(request: web.Request) -> web.Response:
    """Retry or cancel an upload; one of another user's jobs answers as no upload at all."""
    ctx = context_of(request)
    manager = ctx.uploads
    upload_id = path_id(request, "upload")
    viewer = viewer_of(request)
    if viewer is not None:
        upload = await ctx.store.get_upload_by_id(upload_id)
        job = await ctx.store.get_download_by_id(upload.download_id) if upload else None
        if job is None or job.owner_id != viewer:
            raise NotFound("upload", upload_id)
    if request.match_info["action"] == "retry":
        row = await manager.retry(upload_id)
    else:
        row = await manager.cancel(upload_id)
    return web.json_response(upload_json(row))


def setup(app: web.Application) -> None:
    app.router.add_get("/api/uploads", list_uploads)
    app.router.add_get("/api/uploads/statistics", upload_statistics)
    app.router.add_post(r"/api/uploads/{id}/{action:retry|cancel}", act_on_upload)
