"""The API's contract: one OpenAPI 3.1 document for every route the web server has, served at
`GET /api/openapi.json`, and the small page at `GET /api/docs` that shows it.

Every route is one `Operation` in `OPERATIONS`; `document()` builds the OpenAPI document from
them and the shared schemas in `SCHEMAS`. The shapes follow `webstreamer.views` (downloads,
uploads, the cluster) and the store's statistics. A route with a fixed set of actions
(`/api/downloads/{id}/{action:pause|resume|retry|cancel}`) is documented once per action, so a
client sees each as its own path. aiohttp answers HEAD for every GET route: HEAD is documented
only where it is part of the contract (`/stream`, for players probing a file's size).

Both the document and the page are public, like the health check: they describe the routes of
the published source, hold no data and no secret, and serve from memory without a store read;
tools and the page can fetch them before anyone signs in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from aiohttp import web

from configer import BOT_LANGUAGES
from db import DOWNLOAD_STATUSES, SOURCE_TYPES, UPLOAD_STATUSES
from records import ARCHIVE_ACTIONS
from webstreamer.context import (
    MAX_LIST_LIMIT,
    STATIC_DIR,
    VERSION,
    context_of,
    page_headers,
)
from webstreamer.routes.api import (
    BULK_ACTIONS,
    MAX_BULK_IDS,
    MAX_FILES_PER_PAGE,
    MAX_PASSWORD_LENGTH,
    MAX_QUERY_LENGTH,
    MAX_SELECTED_FILES,
    MAX_URLS_PER_REQUEST,
)
from webstreamer.signing import SESSION_COOKIE

OPENAPI_PATH = "/api/openapi.json"
DOCS_PATH = "/api/docs"
DOCS_FILE = STATIC_DIR / "apidocs.html"

JSON_TYPE = "application/json"
HTML_TYPE = "text/html"
Schema = dict[str, Any]


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def nullable(schema: Schema) -> Schema:
    """`schema` or null (OpenAPI 3.1 is JSON Schema 2020-12: a type list)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        return {**schema, "type": [kind, "null"]}
    return {"anyOf": [schema, {"type": "null"}]}


def _obj(properties: dict[str, Schema], *, optional: tuple[str, ...] = ()) -> Schema:
    """A JSON object with exactly these properties, all required but `optional`."""
    return {
        "type": "object",
        "properties": properties,
        "required": [name for name in properties if name not in optional],
        "additionalProperties": False,
    }


INT: Schema = {"type": "integer"}
COUNT: Schema = {"type": "integer", "minimum": 0}
STR: Schema = {"type": "string"}
# The optional archive step of a new job (POST /api/downloads).
ARCHIVE_FIELDS: dict[str, Schema] = {
    "archive": {"type": "string", "enum": list(ARCHIVE_ACTIONS)},
    "archive_password": {"type": "string", "minLength": 1, "maxLength": MAX_PASSWORD_LENGTH},
}
# The upload targets chosen for a new job (POST /api/downloads); [] keeps the file here only.
LINK_JOB_FIELDS: dict[str, Schema] = {
    **ARCHIVE_FIELDS,
    "targets": {"type": "array", "items": STR, "uniqueItems": True},
}
BOOL: Schema = {"type": "boolean"}
TIME: Schema = {"type": "string", "description": "ISO 8601 time (UTC)"}
ROW_ID: Schema = {"type": "integer", "minimum": 1}
SIZE_VALUE: Schema = {
    "type": ["integer", "string"],
    "description": "bytes a second, or text like 2MiB or 500KB; 0 = no limit",
}


def _counts(names: tuple[str, ...]) -> Schema:
    return {
        "type": "object",
        "properties": {name: COUNT for name in names},
        "required": list(names),
        "additionalProperties": COUNT,
    }


def _ws_message(kind: str, data: Schema) -> Schema:
    return _obj({"type": {"const": kind}, "seq": {"type": "integer", "minimum": 1}, "data": data})


SCHEMAS: dict[str, Schema] = {
    "Error": {
        **_obj({"error": STR, "detail": {}}),
        "description": "Every error: a short code and what was wrong (text, object or list).",
    },
    "Ok": _obj({"ok": {"const": True}}),
    "Health": _obj(
        {"status": {"const": "ok"}, "aria2": {"enum": ["connected", "down"]}, "version": STR}
    ),
    "TorrentFile": _obj(
        {
            "index": {"type": "integer", "minimum": 1, "description": "aria2's 1-based index"},
            "path": STR,
            "length": COUNT,
            "selected": BOOL,
            "stream_url": nullable(
                {"type": "string", "description": "signed; null until completed"}
            ),
        }
    ),
    "Upload": _obj(
        {
            "id": ROW_ID,
            "download_id": ROW_ID,
            "upload_target": STR,
            "target_type": STR,
            "status": {"enum": list(UPLOAD_STATUSES)},
            "remote_path": nullable(STR),
            "uploaded_size": COUNT,
            "total_size": COUNT,
            "upload_speed": {"type": "number", "minimum": 0},
            "retry_count": COUNT,
            "max_retries": COUNT,
            "failure_reason": nullable(STR),
            "error_message": nullable(STR),
            "error_code": nullable(STR),
            "verified_size": nullable(COUNT),
            "verified_hash": nullable(STR),
            "verified_at": nullable(TIME),
            "next_attempt_at": nullable(TIME),
            "created_at": TIME,
            "started_at": nullable(TIME),
            "completed_at": nullable(TIME),
            "cleaned_at": nullable(TIME),
            "updated_at": TIME,
            "public_link": {
                **nullable(STR),
                "description": "the remote's link to the file (rclone link), when it makes one",
            },
            "actions": {"type": "array", "items": {"enum": ["retry", "cancel"]}},
        }
    ),
    "HistoryEntry": _obj({"from": nullable(STR), "to": STR, "reason": nullable(STR), "at": TIME}),
    "Download": _obj(
        {
            "id": ROW_ID,
            "gid": nullable(STR),
            "source_type": {"enum": list(SOURCE_TYPES)},
            "source_key": STR,
            "source_url": nullable({"type": "string", "description": "passwords shown as ***"}),
            "status": {"enum": list(DOWNLOAD_STATUSES)},
            "file_name": nullable(STR),
            "local_path": nullable(STR),
            "total_length": COUNT,
            "completed_length": COUNT,
            "download_speed": COUNT,
            "error_message": nullable(STR),
            "error_code": nullable(STR),
            "file_unique_id": nullable(STR),
            "owner_id": nullable(INT),
            "chat_id": nullable(INT),
            "message_id": nullable(INT),
            "group_key": STR,
            "progress_message_id": nullable(INT),
            "info_hash": nullable(STR),
            "files": {
                "type": "array",
                "items": ref("TorrentFile"),
                "description": "the first 20; page through /api/downloads/{id}/files",
            },
            "files_total": COUNT,
            "media_info": nullable({"type": "object", "description": "ffprobe's JSON"}),
            "created_at": TIME,
            "started_at": nullable(TIME),
            "completed_at": nullable(TIME),
            "updated_at": TIME,
            "node": nullable({"type": "string", "description": "the cluster node holding it"}),
            "uploads": {"type": "array", "items": ref("Upload")},
            "stream_url": nullable(
                {"type": "string", "description": "signed; null if not streamable"}
            ),
            "watch_url": nullable({"type": "string", "description": "signed player page"}),
            "thumbnail_url": nullable(
                {"type": "string", "description": "signed frame of a completed video"}
            ),
            "actions": {
                "type": "array",
                "items": {"enum": ["pause", "resume", "retry", "cancel"]},
            },
            "history": {
                "type": "array",
                "items": ref("HistoryEntry"),
                "description": "only in GET /api/downloads/{id}",
            },
        },
        optional=("history",),
    ),
    "DownloadList": _obj({"downloads": {"type": "array", "items": ref("Download")}}),
    "DownloadPage": _obj(
        {
            "downloads": {"type": "array", "items": ref("Download")},
            "next_cursor": nullable(STR),
        }
    ),
    "BulkResults": _obj(
        {
            "action": {"enum": list(BULK_ACTIONS)},
            "results": {
                "type": "array",
                "items": _obj(
                    {"id": ROW_ID, "ok": BOOL, "status": STR, "error": STR, "message": STR},
                    optional=("status", "error", "message"),
                ),
                "description": "one per id, in the order given; `status` when ok, else"
                " `error` (not_found, conflict) and `message`",
            },
        }
    ),
    "DownloadGroups": _obj(
        {
            "groups": {
                "type": "array",
                "items": _obj(
                    {
                        "group_key": STR,
                        "source_type": STR,
                        "media_group_id": nullable(STR),
                        "downloads": {"type": "array", "items": ref("Download")},
                    }
                ),
            },
            "next_cursor": {
                **nullable(STR),
                "description": "pass as `cursor` for the next page; null on the last one",
            },
        }
    ),
    "Added": _obj(
        {
            "downloads": {"type": "array", "items": ref("Download")},
            "duplicates": {
                "type": "array",
                "items": _obj(
                    {
                        "url": {"type": "string", "description": "passwords shown as ***"},
                        "existing_id": ROW_ID,
                    }
                ),
            },
        }
    ),
    "FilePage": _obj(
        {
            "files": {"type": "array", "items": ref("TorrentFile")},
            "total": COUNT,
            "offset": COUNT,
            "limit": {"type": "integer", "minimum": 1},
        }
    ),
    "Deleted": _obj({"deleted": ROW_ID, "file_deleted": BOOL}),
    "DeletedAll": _obj({"deleted": COUNT, "files_deleted": BOOL}),
    "DownloadStatistics": _obj(
        {
            "total": COUNT,
            "by_status": _counts(DOWNLOAD_STATUSES),
            "total_bytes": COUNT,
            "completed_bytes": COUNT,
            "download_speed": COUNT,
        }
    ),
    "UploadStatistics": _obj(
        {
            "total": COUNT,
            "by_status": _counts(UPLOAD_STATUSES),
            "by_target": {"type": "object", "additionalProperties": _counts(())},
            "total_bytes": COUNT,
            "upload_speed": {"type": "number", "minimum": 0},
            "cleaned": COUNT,
        }
    ),
    "UploadList": _obj({"uploads": {"type": "array", "items": ref("Upload")}}),
    "Statistics": _obj(
        {"downloads": ref("DownloadStatistics"), "uploads": ref("UploadStatistics")}
    ),
    "WsMessage": {
        "description": "One message of GET /api/ws; `seq` counts 1, 2, 3 … per connection.",
        "oneOf": [
            _ws_message(
                "hello",
                _obj(
                    {
                        "statistics": nullable(ref("Statistics")),
                        "version": STR,
                        "server_time": {"type": "number"},
                    }
                ),
            ),
            _ws_message(
                "download_update",
                {
                    "oneOf": [
                        ref("Download"),
                        _obj({"id": ROW_ID, "deleted": {"const": True}}),
                        _obj({"deleted_all": {"const": True}}),
                    ]
                },
            ),
            _ws_message("upload_update", ref("Upload")),
            _ws_message("cleanup_update", ref("Upload")),
            _ws_message("statistics_update", ref("Statistics")),
            _ws_message("pong", _obj({"server_time": {"type": "number"}})),
        ],
    },
    "ConfigReload": _obj(
        {
            "applied": {"type": "array", "items": STR},
            "needs_restart": {"type": "array", "items": STR},
        }
    ),
    "Settings": _obj(
        {
            "settings": {
                "type": "object",
                "additionalProperties": STR,
                "description": "dotted key → value as stored; secrets shown as ***",
            }
        }
    ),
    "SettingValues": _obj(
        {
            "limits.download": {**COUNT, "description": "bytes a second; 0 = no limit"},
            "limits.upload": {**COUNT, "description": "bytes a second; 0 = no limit"},
            "aria2.max_concurrent_downloads": INT,
            "upload.max_concurrent": INT,
            "telegram.progress_interval": {"type": "number"},
            "telegram.language": {"enum": list(BOT_LANGUAGES)},
            "upload.auto_delete": BOOL,
            "upload.targets": {"type": "array", "items": {"type": "object"}},
        }
    ),
    "LiveSettings": _obj({"settings": ref("SettingValues")}),
    "SettingsChange": _obj(
        {
            "id": ROW_ID,
            "changed_at": TIME,
            "changed_by": {
                "type": "string",
                "description": "web:<session id start>, api-token or telegram:<user id>",
            },
            "key": STR,
            "old_value": {"type": "string", "description": "as in GET /api/config"},
            "new_value": {"type": "string", "description": "as in GET /api/config"},
        }
    ),
    "SettingsChanges": _obj({"changes": {"type": "array", "items": ref("SettingsChange")}}),
    "SettingsChanged": _obj(
        {
            "settings": ref("SettingValues"),
            "changes": {"type": "array", "items": ref("SettingsChange")},
        }
    ),
    "DownloadLimit": _obj({"id": ROW_ID, "max_download_limit": COUNT}),
    "Node": _obj(
        {
            "name": STR,
            "public_url": STR,
            "state": {"enum": ["alive", "dead", "stopped"]},
            "slots": COUNT,
            "running": COUNT,
            "disk_free": COUNT,
            "heartbeat_age": {"type": "number"},
            "leader": BOOL,
            "started_at": TIME,
            "heartbeat_at": TIME,
            "self": BOOL,
        }
    ),
    "Cluster": _obj(
        {
            "enabled": BOOL,
            "node": STR,
            "leader": nullable(STR),
            "nodes": {"type": "array", "items": ref("Node")},
        }
    ),
    "Session": _obj(
        {
            "id": {"type": "string", "description": "the first digits of its key"},
            "address": nullable(STR),
            "user_agent": nullable(STR),
            "created_at": TIME,
            "last_used_at": TIME,
            "expires_at": TIME,
            "current": BOOL,
        }
    ),
    "SessionList": _obj({"sessions": {"type": "array", "items": ref("Session")}}),
    "Revoked": _obj({"revoked": COUNT}),
}

SECURITY_SCHEMES: dict[str, Schema] = {
    "token": {
        "type": "http",
        "scheme": "bearer",
        "description": "web.token (or the generated data/web_token) as `Authorization: Bearer`.",
    },
    "session": {
        "type": "apiKey",
        "in": "cookie",
        "name": SESSION_COOKIE,
        "description": (
            "The dashboard's session, given by POST /login. A request signed in by it that"
            " changes something (POST, PUT, PATCH, DELETE) must send a JSON body (multipart"
            " only for the torrent upload) and come from this server's origin (`Origin`, or"
            " `Sec-Fetch-Site: same-origin`); so must the WebSocket upgrade. Else 403."
        ),
    },
    "metricsToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "web.metrics_token as `Authorization: Bearer`: opens GET /metrics only.",
    },
    "signature": {
        "type": "apiKey",
        "in": "query",
        "name": "sig",
        "description": "The HMAC signature of a stream link (with its expiry `exp`, if any).",
    },
}

SIGNED_IN: list[dict[str, list[str]]] = [{"token": []}, {"session": []}]
SIGNED_LINK: list[dict[str, list[str]]] = [{"signature": []}]
PUBLIC: list[dict[str, list[str]]] = []


def _response(description: str, schema: Schema | None = None, media: str = JSON_TYPE) -> Schema:
    if schema is None:
        return {"description": description}
    return {"description": description, "content": {media: {"schema": schema}}}


def _error(description: str) -> Schema:
    return _response(description, ref("Error"))


def _html(description: str) -> Schema:
    return _response(description, STR, HTML_TYPE)


def path_param(name: str, description: str, schema: Schema = ROW_ID) -> Schema:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema,
        "description": description,
    }


def query_param(name: str, schema: Schema, description: str) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def json_body(schema: Schema) -> Schema:
    return {"required": True, "content": {JSON_TYPE: {"schema": schema}}}


DOWNLOAD_ID = path_param("id", "the download's id")
UPLOAD_ID = path_param("id", "the upload's id")
LIMIT = query_param(
    "limit", {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT}, "rows (default 50)"
)
FLAG: Schema = {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]}
SIGNED_QUERY = (
    {
        "name": "sig",
        "in": "query",
        "required": True,
        "schema": STR,
        "description": "the link's signature",
    },
    query_param("exp", {"type": "string", "pattern": "^[0-9]*$"}, "the link's expiry (Unix time)"),
)
FILE_INDEX = path_param("index", "a torrent's file (aria2's 1-based index)")

# What every signed-in route may answer besides its own.
AUTH_ERRORS: dict[str, Schema] = {
    "401": _error("no valid token or session"),
    "403": _error("signed in by cookie from another site's page, or without a JSON body"),
}
STORE_AWAY: dict[str, Schema] = {
    "503": _error("the store, or the node holding the job, did not answer")
}
BAD_BODY: dict[str, Schema] = {
    "400": _error("the body is not what the route takes (the detail says what)"),
    "413": _error("the body is larger than web.max_body_size"),
}


@dataclass(frozen=True)
class Operation:
    """One method on one path, as documented."""

    method: str
    path: str
    summary: str
    tag: str
    responses: dict[str, Schema]
    security: list[dict[str, list[str]]] = field(default_factory=lambda: SIGNED_IN)
    parameters: tuple[Schema, ...] = ()
    body: Schema | None = None
    description: str = ""

    @property
    def operation_id(self) -> str:
        words = self.path.strip("/").replace("{", "").replace("}", "").replace(".", "_")
        name = words.replace("/", "_").replace("-", "_") or "index"
        return f"{self.method.lower()}_{name}"

    def as_openapi(self) -> Schema:
        responses = dict(self.responses)
        if self.security == SIGNED_IN:
            responses = {**AUTH_ERRORS, **responses}
        operation: Schema = {
            "operationId": self.operation_id,
            "summary": self.summary,
            "tags": [self.tag],
            "security": self.security,
            "responses": dict(sorted(responses.items())),
        }
        if self.description:
            operation["description"] = self.description
        if self.parameters:
            operation["parameters"] = list(self.parameters)
        if self.body is not None:
            operation["requestBody"] = self.body
        return operation


def _download_action(action: str, allowed_from: str) -> Operation:
    return Operation(
        "POST",
        f"/api/downloads/{{id}}/{action}",
        f"{action.capitalize()} a download",
        "downloads",
        {
            "200": _response("the download after the action", ref("Download")),
            "404": _error("no such download"),
            "409": _error(f"the download's status forbids it (allowed from: {allowed_from})"),
            **STORE_AWAY,
        },
        parameters=(DOWNLOAD_ID,),
    )


def _upload_action(action: str, allowed_from: str) -> Operation:
    return Operation(
        "POST",
        f"/api/uploads/{{id}}/{action}",
        f"{action.capitalize()} an upload",
        "uploads",
        {
            "200": _response("the upload after the action", ref("Upload")),
            "404": _error("no such upload"),
            "409": _error(f"the upload's status forbids it (allowed from: {allowed_from})"),
            **STORE_AWAY,
        },
        parameters=(UPLOAD_ID,),
    )


def _stream(method: str, path: str, parameters: tuple[Schema, ...]) -> Operation:
    body = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return Operation(
        method,
        path,
        "A download's bytes (Range requests honoured)",
        "files",
        {
            "200": {"description": "the whole file", "content": body},
            "206": {"description": "the range asked for", "content": body},
            "304": _response("not modified since the client's copy"),
            "307": _response("another node holds the file: the same path and query there"),
            "403": _error("the signature is missing, forged or expired"),
            "404": _error("no such download or file"),
            "409": _error("the download has no whole file to serve yet"),
            "412": _response("the file changed since the client's copy (If-Match)"),
            "416": _response("the range lies outside the file"),
        },
        security=SIGNED_LINK,
        parameters=(*parameters, *SIGNED_QUERY),
        description=(
            "`?download=1` asks for an attachment. Multi-file torrents: one file per index."
        ),
    )


def _watch(path: str, parameters: tuple[Schema, ...]) -> Operation:
    return Operation(
        "GET",
        path,
        "The player page of a stream link",
        "files",
        {
            "200": _html("the player page"),
            "307": _response("another node holds the file: the same path and query there"),
            "403": _error("the signature is missing, forged or expired"),
            "404": _error("no such download or file"),
            "409": _error("the download cannot be played yet"),
        },
        security=SIGNED_LINK,
        parameters=(*parameters, *SIGNED_QUERY),
    )


# What a client does next with the first download a POST /api/downloads made.
NEW_DOWNLOAD_LINKS: dict[str, Schema] = {
    name: {
        "operationId": operation_id,
        "parameters": {"path.id": "$response.body#/downloads/0/id"},
    }
    for name, operation_id in (
        ("GetDownload", "get_api_downloads_id"),
        ("GetFiles", "get_api_downloads_id_files"),
        ("Pause", "post_api_downloads_id_pause"),
        ("Resume", "post_api_downloads_id_resume"),
        ("Retry", "post_api_downloads_id_retry"),
        ("Cancel", "post_api_downloads_id_cancel"),
        ("Delete", "delete_api_downloads_id"),
    )
}

STREAM_NAME = path_param("name", "the file's name (for the player; not checked)", STR)

OPERATIONS: tuple[Operation, ...] = (
    # --- service
    Operation(
        "GET",
        "/api/health",
        "Status of the service and of aria2",
        "service",
        {"200": _response("the service answers", ref("Health"))},
        security=PUBLIC,
    ),
    Operation(
        "GET",
        OPENAPI_PATH,
        "This document",
        "service",
        {"200": _response("the OpenAPI 3.1 document", {"type": "object"})},
        security=PUBLIC,
    ),
    Operation(
        "GET",
        DOCS_PATH,
        "A page listing this document's routes",
        "service",
        {"200": _html("the page")},
        security=PUBLIC,
    ),
    Operation(
        "GET",
        "/api/config",
        "The configuration in force on this node, secrets masked",
        "service",
        {"200": _response("dotted keys and their values", ref("Settings"))},
    ),
    Operation(
        "GET",
        "/api/settings",
        "The settings an admin changes live, with their values in force",
        "service",
        {"200": _response("dotted keys and their values", ref("LiveSettings"))},
    ),
    Operation(
        "PATCH",
        "/api/settings",
        "Change live settings: all checked, written to config.yaml and applied, or none",
        "service",
        {
            "200": _response(
                "the settings in force and the changes recorded", ref("SettingsChanged")
            ),
            **BAD_BODY,
            "400": _error("a key or value is not valid (the detail names the key)"),
            **STORE_AWAY,
        },
        body=json_body(
            {
                "type": "object",
                "minProperties": 1,
                "additionalProperties": False,
                "properties": {
                    "limits.download": SIZE_VALUE,
                    "limits.upload": SIZE_VALUE,
                    "aria2.max_concurrent_downloads": {"type": "integer", "minimum": 1},
                    "upload.max_concurrent": {"type": "integer", "minimum": 1},
                    "telegram.progress_interval": {"type": "number", "exclusiveMinimum": 0},
                    "telegram.language": {"enum": list(BOT_LANGUAGES)},
                    "upload.auto_delete": BOOL,
                    "upload.targets": {"type": "array", "items": {"type": "object"}},
                },
            }
        ),
        description=(
            "Each value is checked as config.yaml's key; the file keeps its comments and is"
            " replaced atomically; each key that changed is recorded (GET /api/settings/changes)."
        ),
    ),
    Operation(
        "GET",
        "/api/settings/changes",
        "The latest setting changes: who, when, old and new value",
        "service",
        {
            "200": _response("newest first", ref("SettingsChanges")),
            "400": _error("a query value is out of range"),
            **STORE_AWAY,
        },
        parameters=(
            query_param(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_LIST_LIMIT},
                "rows (default 100)",
            ),
        ),
    ),
    Operation(
        "POST",
        "/api/config/reload",
        "Re-read config.yaml (as SIGHUP)",
        "service",
        {
            "200": _response("what changed now and what needs a restart", ref("ConfigReload")),
            "400": _error("the file has a bad value (the detail names the key)"),
        },
    ),
    Operation(
        "GET",
        "/api/cluster",
        "This node, the leader and every node's last heartbeat",
        "service",
        {"200": _response("the cluster as this node sees it", ref("Cluster")), **STORE_AWAY},
    ),
    Operation(
        "GET",
        "/api/ws",
        "WebSocket push of download, upload, cleanup and statistics updates",
        "service",
        {
            "101": _response("switching to the WebSocket protocol"),
            "400": _error("not a WebSocket upgrade"),
            "503": _error("too many WebSocket clients"),
        },
        description=(
            "Each message is a WsMessage (see the schemas): hello first, then the updates."
            ' Send "ping" to get a pong.'
        ),
    ),
    # --- downloads
    Operation(
        "POST",
        "/api/downloads",
        "Queue links (http, https, ftp, magnet)",
        "downloads",
        {
            "201": {
                **_response("the new downloads, and the links already queued", ref("Added")),
                "links": NEW_DOWNLOAD_LINKS,
            },
            **BAD_BODY,
            "409": _error("every link is queued already (the detail names the existing ids)"),
            **STORE_AWAY,
        },
        body=json_body(
            {
                "oneOf": [
                    _obj({"url": STR, **LINK_JOB_FIELDS}, optional=tuple(LINK_JOB_FIELDS)),
                    _obj(
                        {
                            "urls": {
                                "type": "array",
                                "items": STR,
                                "minItems": 1,
                                "maxItems": MAX_URLS_PER_REQUEST,
                            },
                            **LINK_JOB_FIELDS,
                        },
                        optional=tuple(LINK_JOB_FIELDS),
                    ),
                ]
            }
        ),
        description=(
            '"targets" names the upload targets the new jobs go to ([] keeps them here only;'
            " without it, the targets' match rules decide; an unknown name is refused)."
            ' "archive": "extract" unpacks a downloaded zip, 7z, rar or tar(.gz/.xz/.bz2/.zst)'
            ' before it is uploaded (with "archive_password" if it has one); "zip" packs a'
            " downloaded folder (a torrent) into one zip. The password is never shown again."
        ),
    ),
    Operation(
        "POST",
        "/api/downloads/torrent",
        "Queue a .torrent",
        "downloads",
        {
            "201": _response("the new download", ref("DownloadList")),
            **BAD_BODY,
            "409": _error("that torrent is queued already"),
            **STORE_AWAY,
        },
        body={
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            **ARCHIVE_FIELDS,
                            "targets": {
                                "type": "string",
                                "description": 'a JSON list of target names, as "targets" of'
                                " POST /api/downloads",
                            },
                        },
                        "required": ["file"],
                    }
                }
            },
        },
    ),
    Operation(
        "GET",
        "/api/downloads",
        "The latest downloads, or grouped by album or torrent",
        "downloads",
        {
            "200": _response(
                "downloads (newest first), or groups with ?grouped=true",
                {"oneOf": [ref("DownloadPage"), ref("DownloadGroups")]},
            ),
            "400": _error("a query value is out of range (the detail names it)"),
            **STORE_AWAY,
        },
        parameters=(
            query_param("grouped", FLAG, "group by album or torrent"),
            query_param(
                "cursor",
                STR,
                "the `next_cursor` of the page before (opaque; tied to the filters given)",
            ),
            LIMIT,
            query_param("status", {"enum": list(DOWNLOAD_STATUSES)}, "only this status"),
            query_param(
                "q",
                {"type": "string", "maxLength": MAX_QUERY_LENGTH},
                "without grouped: only file names containing this text, whatever the letter case",
            ),
            query_param(
                "source", {"enum": list(SOURCE_TYPES)}, "without grouped: only this source type"
            ),
            query_param(
                "target", STR, "without grouped: only jobs with an upload to this target name"
            ),
        ),
    ),
    Operation(
        "POST",
        "/api/downloads/bulk",
        "One action on several downloads",
        "downloads",
        {"200": _response("each id's outcome", ref("BulkResults")), **BAD_BODY, **STORE_AWAY},
        body=json_body(
            _obj(
                {
                    "action": {"enum": list(BULK_ACTIONS)},
                    "ids": {
                        "type": "array",
                        "items": ROW_ID,
                        "minItems": 1,
                        "maxItems": MAX_BULK_IDS,
                    },
                }
            )
        ),
        description=(
            "Each job in turn, under the same status rules as one job's action: retry (failed or"
            " cancelled), cancel (queued or running), delete (the record, its uploads and its"
            " file), delete_file (the file only, of a job that is not running nor uploading; the"
            " record stays). A refused id does not stop the others."
        ),
    ),
    Operation(
        "DELETE",
        "/api/downloads",
        "Delete every download",
        "downloads",
        {"200": _response("how many were deleted", ref("DeletedAll")), **BAD_BODY, **STORE_AWAY},
        body=json_body(
            {
                "type": "object",
                "properties": {"confirm": {"const": "delete-all"}, "delete_files": BOOL},
                "required": ["confirm"],
            }
        ),
    ),
    Operation(
        "GET",
        "/api/downloads/statistics",
        "Counts, bytes and speed of the downloads (a user's: of their own jobs)",
        "downloads",
        {"200": _response("statistics", ref("DownloadStatistics")), **STORE_AWAY},
    ),
    Operation(
        "GET",
        "/api/downloads/{id}",
        "One download with its uploads and status history",
        "downloads",
        {
            "200": _response("the download", ref("Download")),
            "404": _error("no such download"),
            **STORE_AWAY,
        },
        parameters=(DOWNLOAD_ID,),
    ),
    Operation(
        "DELETE",
        "/api/downloads/{id}",
        "Delete a download (and its file with ?delete_file=true)",
        "downloads",
        {
            "200": _response("what was deleted", ref("Deleted")),
            "400": _error("a query value is not true or false"),
            "404": _error("no such download"),
            **STORE_AWAY,
        },
        parameters=(DOWNLOAD_ID, query_param("delete_file", FLAG, "also delete its file")),
    ),
    Operation(
        "PATCH",
        "/api/downloads/{id}",
        "Limit one download's speed (aria2's max-download-limit)",
        "downloads",
        {
            "200": _response("the limit in force", ref("DownloadLimit")),
            **BAD_BODY,
            "404": _error("no such download"),
            "409": _error("the download is not waiting, downloading or paused on this node"),
            **STORE_AWAY,
        },
        parameters=(DOWNLOAD_ID,),
        body=json_body(
            _obj({"max_download_limit": SIZE_VALUE}),
        ),
    ),
    Operation(
        "GET",
        "/api/downloads/{id}/files",
        "A page of a torrent's files",
        "downloads",
        {
            "200": _response("the page and how many files there are", ref("FilePage")),
            "400": _error("a query value is out of range"),
            "404": _error("no such download"),
            **STORE_AWAY,
        },
        parameters=(
            DOWNLOAD_ID,
            query_param("offset", {"type": "integer", "minimum": 0}, "the first file (from 0)"),
            query_param(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": MAX_FILES_PER_PAGE},
                "files (default 100)",
            ),
        ),
    ),
    Operation(
        "PUT",
        "/api/downloads/{id}/files",
        "Choose which of a torrent's files are fetched, uploaded and streamed",
        "downloads",
        {
            "200": _response("the first page of the files, as chosen", ref("FilePage")),
            "400": _error("the body or an index is wrong: none, repeated or unknown (named)"),
            "404": _error("no such download"),
            "409": _error("the download is over or held by another node"),
            **STORE_AWAY,
        },
        parameters=(DOWNLOAD_ID,),
        body=json_body(
            _obj(
                {
                    "select": {
                        "type": "array",
                        "items": {"type": "integer", "minimum": 1},
                        "minItems": 1,
                        "maxItems": MAX_SELECTED_FILES,
                        "uniqueItems": True,
                    }
                }
            )
        ),
        description=(
            "1-based indexes as the file list numbers them. May change while the torrent "
            "downloads; a file left out gets no stream link."
        ),
    ),
    _download_action("pause", "waiting, downloading"),
    _download_action("resume", "paused"),
    _download_action("retry", "failed, cancelled"),
    _download_action("cancel", "pending, waiting, downloading, paused"),
    # --- uploads
    Operation(
        "GET",
        "/api/uploads",
        "The latest uploads (a user's: of their own jobs)",
        "uploads",
        {
            "200": _response("uploads, newest first", ref("UploadList")),
            "400": _error("a query value is out of range"),
            **STORE_AWAY,
        },
        parameters=(
            LIMIT,
            query_param("status", {"enum": list(UPLOAD_STATUSES)}, "only this status"),
            query_param("target", STR, "only this target's name"),
        ),
    ),
    Operation(
        "GET",
        "/api/uploads/statistics",
        "Counts, bytes and speed of the uploads (a user's: of their own jobs)",
        "uploads",
        {"200": _response("statistics", ref("UploadStatistics")), **STORE_AWAY},
    ),
    _upload_action("retry", "failed, cancelled"),
    _upload_action("cancel", "waiting_download, pending, uploading, paused"),
    # --- the dashboard's sessions
    Operation(
        "GET",
        "/api/sessions",
        "The dashboard's live sessions (never a secret)",
        "sessions",
        {"200": _response("the sessions", ref("SessionList")), **STORE_AWAY},
    ),
    Operation(
        "POST",
        "/api/sessions/revoke-all",
        "Sign out everywhere: every session ends",
        "sessions",
        {"200": _response("how many sessions ended", ref("Revoked")), **STORE_AWAY},
    ),
    Operation(
        "GET",
        "/login",
        "The sign-in form (the dashboard's page)",
        "sessions",
        {"200": _html("the page")},
        security=PUBLIC,
    ),
    Operation(
        "POST",
        "/login",
        "Sign in with the web token: a session cookie",
        "sessions",
        {
            "200": _response("signed in (JSON request); the cookie is set", ref("Ok")),
            "303": _response("signed in (form); the cookie is set, on to /"),
            "400": _error("the body could not be read"),
            "401": {
                "description": "wrong token",
                "content": {JSON_TYPE: {"schema": ref("Error")}, HTML_TYPE: {"schema": STR}},
            },
            "413": _error("the body is larger than 8 KiB"),
            "415": _error("neither JSON nor a form"),
            "429": _error("too many failed sign-ins from this address in a minute"),
        },
        security=PUBLIC,
        body={
            "required": True,
            "content": {
                JSON_TYPE: {"schema": {"type": "object", "properties": {"token": STR}}},
                "application/x-www-form-urlencoded": {
                    "schema": {"type": "object", "properties": {"token": STR}}
                },
            },
        },
    ),
    Operation(
        "GET",
        "/api/me",
        "Who is signed in: an admin sees every job, a user only their own",
        "sessions",
        {
            "200": _response(
                "the role, and the Telegram user it acts for (null: the web token's)",
                {
                    "type": "object",
                    "properties": {
                        "role": {"type": "string", "enum": ["admin", "user"]},
                        "user_id": {"type": ["integer", "null"]},
                    },
                },
            ),
        },
    ),
    Operation(
        "GET",
        "/api/tokens",
        "Your live personal API tokens (never a token)",
        "sessions",
        {
            "200": _response(
                "the tokens",
                {
                    "type": "object",
                    "properties": {
                        "tokens": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "id": STR,
                                    "name": STR,
                                    "created_at": STR,
                                    "last_used_at": {"type": ["string", "null"]},
                                },
                            },
                        }
                    },
                },
            ),
            **STORE_AWAY,
        },
    ),
    Operation(
        "POST",
        "/api/tokens",
        "A new personal API token acting as you; the token is in this answer only",
        "sessions",
        {
            "201": _response(
                "the token: send it as Authorization: Bearer",
                {"type": "object", "properties": {"id": STR, "name": STR, "token": STR}},
            ),
            "400": _error("the name is missing, too long or not printable"),
            "409": _error("too many live tokens"),
            **STORE_AWAY,
        },
        body={
            "required": True,
            "content": {JSON_TYPE: {"schema": {"type": "object", "properties": {"name": STR}}}},
        },
    ),
    Operation(
        "DELETE",
        "/api/tokens/{id}",
        "Revoke one of your personal API tokens",
        "sessions",
        {
            "200": _response("revoked", {"type": "object", "properties": {"revoked": STR}}),
            "404": _error("no such token of yours"),
            **STORE_AWAY,
        },
        parameters=(path_param("id", "the token's id", STR),),
    ),
    Operation(
        "GET",
        "/signin",
        "A one-time sign-in link from the bot's /web: checked (not used) and answered with a"
        " button that uses it",
        "sessions",
        {
            "200": _html("the page with the button"),
            "403": _response("the link is incomplete, forged or expired", STR, "text/plain"),
            "429": _response("too many failed sign-ins from this address", STR, "text/plain"),
        },
        security=PUBLIC,
        parameters=tuple(
            query_param(name, STR, description)
            for name, description in (
                ("user", "the Telegram user id"),
                ("nonce", "the link's random nonce"),
                ("exp", "its expiry (Unix seconds)"),
                ("sig", "its signature"),
            )
        ),
    ),
    Operation(
        "POST",
        "/signin",
        "Use a one-time sign-in link: a session cookie scoped to that user's own jobs (an"
        " admin's sees every job); the link never works again",
        "sessions",
        {
            "303": _response("signed in; the cookie is set, on to /"),
            "403": _response(
                "the link is forged, expired, used already or its user no longer allowed",
                STR,
                "text/plain",
            ),
            "429": _response("too many failed sign-ins from this address", STR, "text/plain"),
        },
        security=PUBLIC,
        body={
            "required": True,
            "content": {
                "application/x-www-form-urlencoded": {
                    "schema": {
                        "type": "object",
                        "properties": {"user": STR, "nonce": STR, "exp": STR, "sig": STR},
                    }
                }
            },
        },
    ),
    Operation(
        "POST",
        "/logout",
        "End this browser's session (the cookie is cleared)",
        "sessions",
        {
            "200": _response("signed out (JSON request)", ref("Ok")),
            "303": _response("signed out (form), on to /"),
            "403": _error("signed in by cookie from another site's page"),
        },
        security=[*SIGNED_IN, {}],
    ),
    # --- the page and files
    Operation("GET", "/", "The dashboard", "page", {"200": _html("the page")}, security=PUBLIC),
    Operation(
        "GET",
        "/favicon.ico",
        "No icon",
        "page",
        {"204": _response("nothing")},
        security=PUBLIC,
    ),
    Operation(
        "GET",
        "/static/{path}",
        "The page's scripts, styles and fonts",
        "page",
        {
            "200": {"description": "the file", "content": {"*/*": {"schema": STR}}},
            "404": _error("no such file"),
        },
        security=PUBLIC,
        parameters=(path_param("path", "a file under the static folder", STR),),
    ),
    Operation(
        "GET",
        "/metrics",
        "The service's figures in the Prometheus text format",
        "service",
        {
            "200": _response("the metrics", STR, "text/plain"),
            "401": _error("no valid token, metrics token or session"),
        },
        security=[*SIGNED_IN, {"metricsToken": []}],
    ),
    _watch("/watch/{id}", (DOWNLOAD_ID,)),
    _watch("/watch/{id}/{index}", (DOWNLOAD_ID, FILE_INDEX)),
    _stream("GET", "/stream/{id}/{name}", (DOWNLOAD_ID, STREAM_NAME)),
    _stream("HEAD", "/stream/{id}/{name}", (DOWNLOAD_ID, STREAM_NAME)),
    _stream("GET", "/stream/{id}/{index}/{name}", (DOWNLOAD_ID, FILE_INDEX, STREAM_NAME)),
    _stream("HEAD", "/stream/{id}/{index}/{name}", (DOWNLOAD_ID, FILE_INDEX, STREAM_NAME)),
    Operation(
        "GET",
        "/thumb/{id}",
        "A frame of a completed video (JPEG)",
        "files",
        {
            "200": {
                "description": "the frame, at most 320 px a side",
                "content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}},
            },
            "403": _error("the signature is missing, forged or expired"),
            "404": _error("no such download, or it is not a completed single-file video"),
            "409": _error("ffmpeg could read no frame from the file"),
        },
        security=SIGNED_LINK,
        parameters=(DOWNLOAD_ID, *SIGNED_QUERY),
        description="Made once with ffmpeg and kept in the data folder; signed like /stream.",
    ),
)


def document(version: str = VERSION) -> dict[str, Any]:
    """The OpenAPI 3.1 document of every route in `OPERATIONS`."""
    paths: dict[str, dict[str, Schema]] = {}
    for operation in OPERATIONS:
        paths.setdefault(operation.path, {})[operation.method.lower()] = operation.as_openapi()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "MistRelay",
            "version": version,
            "description": (
                "The JSON API, the dashboard and the stream links of one MistRelay node."
                ' Errors are JSON: {"error": code, "detail": ...}. Every GET also answers'
                " HEAD. Signed-in routes take the web token as a bearer token or the"
                " dashboard's session cookie."
            ),
        },
        "tags": [
            {"name": name}
            for name in ("service", "downloads", "uploads", "sessions", "page", "files")
        ],
        "paths": paths,
        "components": {"schemas": SCHEMAS, "securitySchemes": SECURITY_SCHEMES},
    }


@cache
def _encoded(version: str) -> bytes:
    return json.dumps(document(version), separators=(",", ":")).encode()


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(
        body=_encoded(context_of(request).version),
        content_type=JSON_TYPE,
        headers={"Cache-Control": "no-cache"},
    )


async def docs_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(
        DOCS_FILE, headers={**page_headers(), "Content-Type": "text/html; charset=utf-8"}
    )


def setup(app: web.Application) -> None:
    app.router.add_get(OPENAPI_PATH, openapi_json)
    app.router.add_get(DOCS_PATH, docs_page)
