"""The REST API for uploads: list, statistics, retry and cancel (JSON under /api/uploads)."""

from __future__ import annotations

from aiohttp import web

from db import UPLOAD_STATUSES
from webstreamer.context import MAX_LIST_LIMIT, context_of, path_id, query_choice, query_int
from webstreamer.views import upload_json


async def list_uploads(request: web.Request) -> web.Response:
    ctx = context_of(request)
    limit = query_int(request, "limit", 50, 1, MAX_LIST_LIMIT)
    status = query_choice(request, "status", UPLOAD_STATUSES)
    target = request.query.get("target") or None
    rows = await ctx.store.fetch_recent_uploads(limit, status=status, upload_target=target)
    return web.json_response({"uploads": [upload_json(row) for row in rows]})


async def upload_statistics(request: web.Request) -> web.Response:
    return web.json_response(await context_of(request).store.get_upload_statistics())


async def act_on_upload(request: web.Request) -> web.Response:
    manager = context_of(request).uploads
    upload_id = path_id(request, "upload")
    if request.match_info["action"] == "retry":
        row = await manager.retry(upload_id)
    else:
        row = await manager.cancel(upload_id)
    return web.json_response(upload_json(row))


def setup(app: web.Application) -> None:
    app.router.add_get("/api/uploads", list_uploads)
    app.router.add_get("/api/uploads/statistics", upload_statistics)
    app.router.add_post(r"/api/uploads/{id}/{action:retry|cancel}", act_on_upload)
