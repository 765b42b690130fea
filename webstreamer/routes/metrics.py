"""GET /metrics: the service's figures in the Prometheus text format.

Credentials as for the API (the auth middleware checks them: the web token, a signed-in session),
or `web.metrics_token` as a bearer token, which opens this route only: a scraper need not hold
the token that controls the service."""

from __future__ import annotations

from aiohttp import web

from metrics import CONTENT_TYPE
from webstreamer.context import METRICS_PATH, context_of


async def get_metrics(request: web.Request) -> web.Response:
    ctx = context_of(request)
    body = ctx.metrics.render(await ctx.store.get_statistics(), aria2_up=ctx.aria2_connected())
    return web.Response(
        body=body, headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-store"}
    )


def setup(app: web.Application) -> None:
    app.router.add_get(METRICS_PATH, get_metrics)
