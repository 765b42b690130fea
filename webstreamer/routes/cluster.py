"""GET /api/cluster: this node, the leader and every node of the cluster with its last heartbeat
(a single node answers `enabled: false` and no nodes)."""

from __future__ import annotations

from aiohttp import web

from webstreamer.context import context_of
from webstreamer.views import cluster_json


async def get_cluster(request: web.Request) -> web.Response:
    cluster = context_of(request).cluster
    nodes = await cluster.nodes()
    return web.json_response(cluster_json(cluster.enabled, cluster.node_name, nodes))


def setup(app: web.Application) -> None:
    app.router.add_get("/api/cluster", get_cluster)
