"""The aiohttp application: shared context, JSON errors, authentication, and its lifecycle."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from loguru import logger

from aria2_client.download_handler import DownloadManager
from aria2_client.sources import SourceError
from configer import Config, ConfigDiff, Secrets
from db import Database, DownloadRow, DuplicateDownload, NotFound, StoreError, TransitionError
from events import EventHub
from webstreamer.byteserve import ByteSource
from webstreamer.signing import SESSION_COOKIE, LinkSigner

ByteSourceProvider = Callable[[DownloadRow, int | None], Awaitable[ByteSource | None]]
VERSION = "0.1.0"


@dataclass
class AppContext:
    """Everything the routes need, built by app.py (or a test) and stored on the application."""

    config: Config
    secrets: Secrets
    db: Database
    hub: EventHub
    downloads: DownloadManager
    signer: LinkSigner
    aria2_connected: Callable[[], bool]
    reload_config: Callable[[], Awaitable[ConfigDiff]] | None = None
    byte_sources: list[ByteSourceProvider] = field(default_factory=list)
    uploads: Any = None  # the upload manager, when uploads are configured
    version: str = VERSION

    @property
    def base_url(self) -> str:
        return self.config.web.base_url.rstrip("/")


CONTEXT: web.AppKey[AppContext] = web.AppKey("context", AppContext)


def context_of(request: web.Request) -> AppContext:
    return request.app[CONTEXT]


def json_error(status: int, error: str, detail: Any = None) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure answers JSON with a fitting status — never an HTML page or a traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.reason.lower().replace(" ", "_")
        detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else None
        response = json_error(exc.status, reason, detail)
        for name in ("Allow", "WWW-Authenticate"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except DuplicateDownload as exc:
        return json_error(409, "duplicate", {"existing_id": exc.existing_id, "message": str(exc)})
    except TransitionError as exc:
        return json_error(
            409,
            "forbidden_transition",
            {"status": exc.current, "requested": exc.target, "message": str(exc)},
        )
    except NotFound as exc:
        return json_error(404, "not_found", str(exc))
    except SourceError as exc:
        return json_error(400, "bad_source", str(exc))
    except StoreError as exc:
        return json_error(409, "conflict", str(exc))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unhandled error in {} {}", request.method, request.path)
        return json_error(500, "internal_error", "the server failed; see its log")


PUBLIC_API_PATHS = frozenset({"/api/health"})


def request_is_authenticated(request: web.Request) -> bool:
    """A bearer token equal to web.token, or a valid dashboard session cookie."""
    ctx = context_of(request)
    token = ctx.secrets.web_token
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        offered = header[7:].strip()
        return hmac.compare_digest(offered.encode(), token.encode())
    return ctx.signer.session_valid(request.cookies.get(SESSION_COOKIE), token)


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


@web.middleware
async def security_headers_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Referrer-Policy", "no-referrer")
    response.headers.setdefault("X-Frame-Options", "DENY")
    return response


def create_app(ctx: AppContext) -> web.Application:
    from webstreamer.routes import api, page, stream, uploads, ws

    app = web.Application(
        middlewares=[security_headers_middleware, error_middleware, auth_middleware],
        client_max_size=ctx.config.web.max_body_size,
    )
    app[CONTEXT] = ctx
    api.setup(app)
    uploads.setup(app)
    stream.setup(app)
    ws.setup(app)
    page.setup(app)
    return app


class WebServer:
    """Runs the application on web.host:web.port until stopped."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.app = create_app(ctx)
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        web_config = self.ctx.config.web
        self._runner = web.AppRunner(
            self.app, access_log=None, handle_signals=False, handler_cancellation=True
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, web_config.host, web_config.port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.port = sockets[0].getsockname()[1] if sockets else web_config.port
        logger.info("web server listening on {}", self.ctx.base_url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
