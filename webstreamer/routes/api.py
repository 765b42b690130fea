"""The REST API for downloads, statistics, health and configuration (JSON under /api)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from loguru import logger

from aria2_client.download_handler import Requester
from aria2_client.sources import SourceError, parse_link
from cluster import HolderError
from configer import ConfigError, mask_url_passwords, masked_settings, parse_setting
from db import DOWNLOAD_STATUSES, SOURCE_TYPES, DuplicateDownload, NotFound, StoreError
from records import ARCHIVE_ACTIONS, ArchiveRequest, DownloadRow, DownloadSearch
from webstreamer.context import (
    MAX_LIST_LIMIT,
    SESSION,
    context_of,
    flat_cursor,
    json_error,
    list_cursor,
    may_see,
    path_id,
    query_bool,
    query_choice,
    query_cursor,
    query_flat_cursor,
    query_int,
    read_json_object,
    viewer_of,
)
from webstreamer.views import download_json, file_json

MAX_URLS_PER_REQUEST = 500
MAX_QUERY_LENGTH = 200  # characters of a name search
MAX_BULK_IDS = 500  # jobs one bulk action may name
BULK_ACTIONS = ("retry", "cancel", "delete", "delete_file")
MAX_PASSWORD_LENGTH = 1024  # characters of an archive password
MAX_FILES_PER_PAGE = 1000  # files one page of a torrent's file list may ask for
MAX_SELECTED_FILES = 1_000_000  # indexes one choice may name (the most files a torrent may have)


async def health(request: web.Request) -> web.Response:
    ctx = context_of(request)
    return web.json_response(
        {
            "status": "ok",
            "aria2": "connected" if ctx.aria2_connected() else "down",
            "version": ctx.version,
        }
    )


async def owned_download(request: web.Request, download_id: int) -> DownloadRow:
    """The job, if this request may see it; else 404, the same as for no job (an id of another
    user's job tells nothing)."""
    row = await context_of(request).store.get_download_by_id(download_id)
    viewer = viewer_of(request)
    if row is None or (viewer is not None and row.owner_id != viewer):
        raise web.HTTPNotFound(text=f"no download {download_id}")
    return row


def requester_of(request: web.Request) -> Requester | None:
    """Whose job an addition is: a user's session's user, else no one (the web token's)."""
    viewer = viewer_of(request)
    return None if viewer is None else Requester(owner_id=viewer)


async def add_downloads(request: web.Request) -> web.Response:
    ctx = context_of(request)
    viewer = viewer_of(request)
    body = await read_json_object(request)
    unknown = set(body) - {"url", "urls", "archive", "archive_password", "targets"}
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown fields: {', '.join(sorted(unknown))}")
    archive = archive_request(body)
    targets = targets_request(body, [t.name for t in ctx.config.upload.targets])
    if ("url" in body) == ("urls" in body):
        raise web.HTTPBadRequest(text='give either "url" or "urls"')
    urls = [body["url"]] if "url" in body else body["urls"]
    if not isinstance(urls, list) or not urls:
        raise web.HTTPBadRequest(text='"urls" must be a non-empty list of strings')
    if len(urls) > MAX_URLS_PER_REQUEST:
        raise web.HTTPBadRequest(text=f"at most {MAX_URLS_PER_REQUEST} links per request")
    bad: list[dict[str, Any]] = []
    for position, url in enumerate(urls):
        if not isinstance(url, str):
            bad.append({"index": position, "url": None, "reason": "not a string"})
            continue
        try:
            parse_link(url)
        except SourceError as exc:
            shown = mask_url_passwords(url)[:200]
            bad.append({"index": position, "url": shown, "reason": mask_url_passwords(str(exc))})
    if bad:
        return json_error(400, "invalid_urls", bad)
    added: list[DownloadRow] = []
    duplicates: list[dict[str, Any]] = []
    for url, outcome in zip(
        urls,
        await ctx.downloads.add_links(
            urls, requester_of(request), archive=archive, targets=targets
        ),
        strict=True,
    ):
        if isinstance(outcome, DuplicateDownload):
            # The answer names the link as the page shows it: its password masked.
            # Another user's job is not named: only that the link is taken.
            existing = await ctx.store.get_download_by_id(outcome.existing_id)
            seen = existing is not None and may_see(viewer, existing.owner_id)
            duplicates.append(
                {
                    "url": mask_url_passwords(url)[:200],
                    "existing_id": outcome.existing_id if seen else None,
                }
            )
        elif isinstance(outcome, SourceError):
            raise outcome  # checked above: only a refusal of this server's policy is left
        else:
            added.append(outcome)
    if not added and duplicates:
        return json_error(409, "duplicate", duplicates if len(duplicates) > 1 else duplicates[0])
    return web.json_response(
        {
            "downloads": [download_json(ctx.links, row, []) for row in added],
            "duplicates": duplicates,
        },
        status=201,
    )


def archive_request(body: dict[str, Any]) -> ArchiveRequest | None:
    """The optional "archive" step ("extract" or "zip") and "archive_password" of a new job."""
    action = body.get("archive")
    password = body.get("archive_password")
    if action is None:
        if password is not None:
            raise web.HTTPBadRequest(text='"archive_password" needs "archive": "extract"')
        return None
    if action not in ARCHIVE_ACTIONS:
        raise web.HTTPBadRequest(text=f'"archive" must be one of {", ".join(ARCHIVE_ACTIONS)}')
    if password is not None:
        if action != "extract":
            raise web.HTTPBadRequest(text='"archive_password" goes only with "extract"')
        if not isinstance(password, str) or not 1 <= len(password) <= MAX_PASSWORD_LENGTH:
            raise web.HTTPBadRequest(
                text=f'"archive_password" must be a string of 1-{MAX_PASSWORD_LENGTH} characters'
            )
    return ArchiveRequest(action, password)


def targets_request(body: dict[str, Any], configured: Sequence[str]) -> list[str] | None:
    """The optional "targets" of a new job: names of configured upload targets ([] = keep the
    file here only). Absent, the targets' `match` rules decide."""
    if "targets" not in body:
        return None
    targets = body["targets"]
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise web.HTTPBadRequest(text='"targets" must be a list of target names')
    unknown = [name for name in targets if name not in configured]
    if unknown:
        known = ", ".join(configured) or "none configured"
        raise web.HTTPBadRequest(
            text=f'unknown target "{unknown[0][:100]}" in "targets" (configured: {known})'
        )
    if len(set(targets)) != len(targets):
        raise web.HTTPBadRequest(text='"targets" names a target twice')
    return targets


async def add_torrent(request: web.Request) -> web.Response:
    ctx = context_of(request)
    if not request.content_type.startswith("multipart/"):
        raise web.HTTPBadRequest(text='send the .torrent as multipart form field "file"')
    data: bytes | None = None
    fields: dict[str, Any] = {}
    try:
        reader = await request.multipart()
        async for part in reader:
            name = getattr(part, "name", None)
            if name == "file":
                data = bytes(await part.read(decode=False))  # type: ignore[union-attr]
            elif name in ("archive", "archive_password", "targets"):
                value = bytes(await part.read(decode=False))  # type: ignore[union-attr]
                if len(value) > 4 * MAX_PASSWORD_LENGTH:
                    raise web.HTTPBadRequest(text=f'multipart field "{name}" is too long')
                fields[name] = value.decode("utf-8", "replace")
    except (HttpProcessingError, ValueError) as exc:  # a part's head or the boundary is broken
        raise web.HTTPBadRequest(text=f"the multipart body could not be read: {exc}") from None
    if data is None:
        raise web.HTTPBadRequest(text='multipart field "file" is missing')
    archive = archive_request(fields)
    if "targets" in fields:
        try:
            fields["targets"] = json.loads(fields["targets"])
        except ValueError:
            raise web.HTTPBadRequest(
                text='multipart field "targets" must be a JSON list of target names'
            ) from None
    targets = targets_request(fields, [t.name for t in ctx.config.upload.targets])
    try:
        row = await ctx.downloads.add_torrent(
            data, requester_of(request), archive=archive, targets=targets
        )
    except DuplicateDownload as exc:
        existing = await ctx.store.get_download_by_id(exc.existing_id)
        if existing is not None and may_see(viewer_of(request), existing.owner_id):
            raise
        # Another user's job is not named: only that the torrent is taken.
        return json_error(409, "duplicate", {"existing_id": None, "message": "already a job"})
    return web.json_response({"downloads": [download_json(ctx.links, row, [])]}, status=201)


async def list_downloads(request: web.Request) -> web.Response:
    ctx = context_of(request)
    limit = query_int(request, "limit", 50, 1, MAX_LIST_LIMIT)
    status = query_choice(request, "status", DOWNLOAD_STATUSES)
    viewer = viewer_of(request)
    if query_bool(request, "grouped"):
        before = query_cursor(request, status)
        groups = await ctx.store.fetch_downloads_grouped(limit, status=status, before=before)
        # A full page may have a next one: it starts below this page's last group's newest.
        last = max(d.id for d in groups[-1].downloads) if len(groups) == limit else None
        if viewer is not None:  # a user's page holds only their jobs (it may come out short)
            for group in groups:
                group.downloads[:] = [d for d in group.downloads if d.owner_id == viewer]
            groups = [g for g in groups if g.downloads]
        ids = [d.id for g in groups for d in g.downloads]
        uploads = await ctx.store.get_uploads_for_downloads(ids)
        return web.json_response(
            {
                "next_cursor": None if last is None else list_cursor(status, last),
                "groups": [
                    {
                        "group_key": g.group_key,
                        "source_type": g.source_type,
                        "media_group_id": g.media_group_id,
                        "downloads": [
                            download_json(ctx.links, d, uploads[d.id]) for d in g.downloads
                        ],
                    }
                    for g in groups
                ],
            }
        )
    name = request.query.get("q", "").strip() or None
    if name is not None and len(name) > MAX_QUERY_LENGTH:
        raise web.HTTPBadRequest(text=f"q must be at most {MAX_QUERY_LENGTH} characters")
    source = query_choice(request, "source", SOURCE_TYPES)
    target = query_choice(request, "target", [t.name for t in ctx.config.upload.targets])
    filters = (name, status, source, target, None if viewer is None else str(viewer))
    before = query_flat_cursor(request, filters)
    search = DownloadSearch(name, status, source, target, before, owner_id=viewer)
    rows = await ctx.store.search_downloads(limit, search)
    uploads = await ctx.store.get_uploads_for_downloads([r.id for r in rows])
    # A full page may have a next one: it starts below this page's last (oldest) row.
    last = rows[-1].id if len(rows) == limit else None
    return web.json_response(
        {
            "next_cursor": None if last is None else flat_cursor(filters, last),
            "downloads": [download_json(ctx.links, r, uploads[r.id]) for r in rows],
        }
    )


async def bulk_action(request: web.Request) -> web.Response:
    """``{"action": "retry"|"cancel"|"delete"|"delete_file", "ids": [...]}``: the action on each
    job in turn, through the same rules as one job's; answers each id's outcome."""
    ctx = context_of(request)
    body = await read_json_object(request)
    unknown = set(body) - {"action", "ids"}
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown fields: {', '.join(sorted(unknown))}")
    manager = ctx.downloads
    operations: dict[str, Callable[[int], Awaitable[DownloadRow]]] = dict(
        zip(
            BULK_ACTIONS,
            (manager.retry, manager.cancel, manager.delete, manager.delete_file_only),
            strict=True,
        )
    )
    action = body.get("action")
    if not isinstance(action, str) or action not in operations:
        raise web.HTTPBadRequest(text=f'"action" must be one of {", ".join(operations)}')
    ids = body.get("ids")
    if (
        not isinstance(ids, list)
        or not 1 <= len(ids) <= MAX_BULK_IDS
        or not all(isinstance(i, int) and not isinstance(i, bool) and i > 0 for i in ids)
    ):
        raise web.HTTPBadRequest(
            text=f'"ids" must be a list of 1 to {MAX_BULK_IDS} download ids (positive integers)'
        )
    results: list[dict[str, object]] = []
    viewer = viewer_of(request)
    for download_id in dict.fromkeys(ids):
        try:
            if viewer is not None:  # another user's job is no job to this user
                owned = await ctx.store.get_download_by_id(download_id)
                if owned is None or owned.owner_id != viewer:
                    raise NotFound("download", download_id)
            row = await operations[action](download_id)
        except NotFound as exc:
            results.append(
                {"id": download_id, "ok": False, "error": "not_found", "message": str(exc)}
            )
            continue
        except StoreError as exc:  # a status the action does not apply to, or a conflict
            results.append(
                {"id": download_id, "ok": False, "error": "conflict", "message": str(exc)}
            )
            continue
        except HolderError as exc:  # the node holding the job refused or is away
            results.append(
                {"id": download_id, "ok": False, "error": exc.code, "message": exc.message}
            )
            continue
        results.append({"id": download_id, "ok": True, "status": row.status})
    logger.bind(action=action, count=len(results)).info(
        "bulk {}: {} of {} done", action, sum(1 for r in results if r["ok"]), len(results)
    )
    return web.json_response({"action": action, "results": results})


async def get_download(request: web.Request) -> web.Response:
    ctx = context_of(request)
    download_id = path_id(request)
    row = await owned_download(request, download_id)
    uploads = await ctx.store.get_uploads_by_download(download_id)
    history = await ctx.store.get_status_history("download", download_id)
    return web.json_response(download_json(ctx.links, row, uploads, history))


async def download_files(request: web.Request) -> web.Response:
    """A page of a torrent's files (`offset` from 0, `limit` 1-1000, default 100) and how many
    there are; the list and the pushes carry only the first few."""
    ctx = context_of(request)
    download_id = path_id(request)
    offset = query_int(request, "offset", 0, 0, 2**31 - 1)
    limit = query_int(request, "limit", 100, 1, MAX_FILES_PER_PAGE)
    row = await owned_download(request, download_id)
    page = row.files[offset : offset + limit]
    return web.json_response(
        {
            "files": [file_json(ctx.links, row, entry) for entry in page],
            "total": len(row.files),
            "offset": offset,
            "limit": limit,
        }
    )


async def select_download_files(request: web.Request) -> web.Response:
    """Choose a torrent's files: ``{"select": [1, 3]}`` (1-based indexes, as the file list
    numbers them); only those are fetched, uploaded and streamed. Answers the first page of the
    file list."""
    ctx = context_of(request)
    download_id = path_id(request)
    await owned_download(request, download_id)
    body = await read_json_object(request)
    unknown = set(body) - {"select"}
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown fields: {', '.join(sorted(unknown))}")
    indexes = body.get("select")
    if (
        not isinstance(indexes, list)
        or len(indexes) > MAX_SELECTED_FILES
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in indexes)
    ):
        raise web.HTTPBadRequest(
            text=f'"select" must be a list of at most {MAX_SELECTED_FILES} file indexes (integers)'
        )
    try:
        row = await ctx.downloads.select_files(download_id, indexes)
    except ValueError as exc:
        return json_error(400, "bad_selection", str(exc))
    page = row.files[:100]
    return web.json_response(
        {
            "files": [file_json(ctx.links, row, entry) for entry in page],
            "total": len(row.files),
            "offset": 0,
            "limit": 100,
        }
    )


async def act_on_download(request: web.Request) -> web.Response:
    ctx = context_of(request)
    download_id = path_id(request)
    await owned_download(request, download_id)
    action = request.match_info["action"]
    manager = ctx.downloads
    operations = {
        "pause": manager.pause,
        "resume": manager.resume,
        "retry": manager.retry,
        "cancel": manager.cancel,
    }
    row = await operations[action](download_id)
    uploads = await ctx.store.get_uploads_by_download(download_id)
    return web.json_response(download_json(ctx.links, row, uploads))


async def change_download(request: web.Request) -> web.Response:
    """Change a job's options: ``{"max_download_limit": "1MiB"}`` (bytes a second, 0 = none)."""
    ctx = context_of(request)
    download_id = path_id(request)
    await owned_download(request, download_id)
    body = await read_json_object(request)
    unknown = set(body) - {"max_download_limit"}
    if unknown:
        raise web.HTTPBadRequest(text=f"unknown fields: {', '.join(sorted(unknown))}")
    if "max_download_limit" not in body:
        raise web.HTTPBadRequest(text='give "max_download_limit"')
    try:
        limit = parse_setting("limits.download", body["max_download_limit"], ctx.files.root)
    except ConfigError as exc:
        return json_error(400, "bad_limit", f"max_download_limit {exc.problem}")
    row = await ctx.downloads.set_download_limit(download_id, limit)
    return web.json_response({"id": row.id, "max_download_limit": limit})


async def delete_download(request: web.Request) -> web.Response:
    ctx = context_of(request)
    download_id = path_id(request)
    await owned_download(request, download_id)
    delete_file = query_bool(request, "delete_file")
    row = await ctx.downloads.delete(download_id, delete_file=delete_file)
    return web.json_response({"deleted": row.id, "file_deleted": delete_file})


async def delete_all(request: web.Request) -> web.Response:
    ctx = context_of(request)
    body = await read_json_object(request)
    if body.get("confirm") != "delete-all":
        raise web.HTTPBadRequest(text='confirm with {"confirm": "delete-all"}')
    delete_files = body.get("delete_files", False)
    if not isinstance(delete_files, bool):
        raise web.HTTPBadRequest(text='"delete_files" must be true or false')
    count = await ctx.downloads.delete_all(delete_files=delete_files)
    return web.json_response({"deleted": count, "files_deleted": delete_files})


async def download_statistics(request: web.Request) -> web.Response:
    """Every job's figures; a user's own jobs' for a user."""
    store = context_of(request).store
    return web.json_response(await store.get_download_statistics(viewer_of(request)))


async def reload_config(request: web.Request) -> web.Response:
    ctx = context_of(request)
    try:
        diff = await ctx.reload_config()
    except ConfigError as exc:
        return json_error(400, "bad_config", str(exc))
    return web.json_response({"applied": diff.applied, "needs_restart": diff.needs_restart})


async def get_config(request: web.Request) -> web.Response:
    """The configuration in force on this node (secrets masked), as it is also stored; in a
    cluster each node answers with its own."""
    return web.json_response({"settings": masked_settings(context_of(request).live_config())})


def _who(request: web.Request) -> str:
    """Who a change is recorded for: a dashboard session (by the start of its id) or the token."""
    session = request.get(SESSION)
    return f"web:{session.token_hash[:12]}" if session is not None else "api-token"


async def get_settings(request: web.Request) -> web.Response:
    """Every live setting with its value in force (secrets as ``***``)."""
    return web.json_response({"settings": context_of(request).settings.current()})


async def change_settings(request: web.Request) -> web.Response:
    """``{"dotted.key": value, ...}``: all checked, written to config.yaml and applied, or none
    (400 naming the bad key)."""
    ctx = context_of(request)
    body = await read_json_object(request)
    try:
        changes = await ctx.settings.change(body, _who(request))
    except ConfigError as exc:
        return json_error(400, "bad_setting", {"key": exc.key, "message": str(exc)})
    return web.json_response(
        {"settings": ctx.settings.current(), "changes": [c._asdict() for c in changes]}
    )


async def settings_changes(request: web.Request) -> web.Response:
    """The latest recorded setting changes, newest first."""
    limit = query_int(request, "limit", 100, 1, MAX_LIST_LIMIT)
    changes = await context_of(request).settings.history(limit)
    return web.json_response({"changes": [c._asdict() for c in changes]})


def setup(app: web.Application) -> None:
    app.router.add_get("/api/health", health)
    app.router.add_post("/api/downloads", add_downloads)
    app.router.add_post("/api/downloads/torrent", add_torrent)
    app.router.add_get("/api/downloads", list_downloads)
    app.router.add_delete("/api/downloads", delete_all)
    app.router.add_post("/api/downloads/bulk", bulk_action)
    app.router.add_get("/api/downloads/statistics", download_statistics)
    app.router.add_get(r"/api/downloads/{id}", get_download)
    app.router.add_delete(r"/api/downloads/{id}", delete_download)
    app.router.add_patch(r"/api/downloads/{id}", change_download)
    app.router.add_get(r"/api/downloads/{id}/files", download_files)
    app.router.add_put(r"/api/downloads/{id}/files", select_download_files)
    app.router.add_post(r"/api/downloads/{id}/{action:pause|resume|retry|cancel}", act_on_download)
    app.router.add_post("/api/config/reload", reload_config)
    app.router.add_get("/api/config", get_config)
    app.router.add_get("/api/settings", get_settings)
    app.router.add_patch("/api/settings", change_settings)
    app.router.add_get("/api/settings/changes", settings_changes)
