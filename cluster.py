"""This node among the others on one PostgreSQL store.

Every node registers in the store's `nodes` table and beats there every third of
`cluster.node_timeout`; its jobs are claimed from the shared queue by its download manager (see
`aria2_client.download_handler.Placement`). One node, the leader, holds the store's leader lock:
it runs the Telegram bot and sends the jobs of dead nodes (heartbeat older than the timeout) back
to the queue, and fails their uploads once `cluster.upload_wait` has passed. A node that has not
itself been in touch with the store for a whole timeout judges no one: after the store restarts,
every heartbeat is old.

With SQLite there is one node: :class:`Cluster` is then off, and that node always leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from loguru import logger

from configer import ClusterConfig
from db import STORE_ERRORS, Store, StoreError, parse_utc
from records import NodeHeartbeat, NodeRow, NodeState, NodeStatus

# Told whether this node leads: once when first known, then at every change (and on stop).
LeadershipHook = Callable[[bool], Awaitable[None]]

_LEAD_RETRY = 1.0  # seconds between attempts to become the leader
_HOLDER_TIMEOUT = aiohttp.ClientTimeout(total=15, connect=5)


class NodeNameTaken(StoreError):
    """Another live node has this `cluster.node_name`."""


class HolderError(Exception):
    """The node holding a job did not do an action on it: it refused (its HTTP status and
    answer), or it did not answer (503)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _age(row: NodeRow, now: datetime) -> float:
    beat = parse_utc(row.heartbeat_at)
    return (now - beat).total_seconds() if beat is not None else float("inf")


def _holder_request(action: str, item_id: int) -> tuple[str, str]:
    """The API call on the holding node that does `action`."""
    if action.startswith("upload-"):
        return "POST", f"/api/uploads/{item_id}/{action.removeprefix('upload-')}"
    if action == "delete":
        return "DELETE", f"/api/downloads/{item_id}"
    if action == "delete-with-file":
        return "DELETE", f"/api/downloads/{item_id}?delete_file=true"
    return "POST", f"/api/downloads/{item_id}/{action}"


class Cluster:
    """This node's place in the cluster: registration, heartbeat, the view of the other nodes,
    the sweep of dead ones, leadership, and asking the node holding a job to act on it."""

    def __init__(
        self,
        store: Store,
        config: ClusterConfig,
        *,
        public_url: str,
        slots: Callable[[], int],
        download_dir: Path,
        web_token: str,
    ) -> None:
        self.store = store
        self.config = config
        self.enabled = store.shared
        self.node_name = config.name
        self.public_url = (config.public_url or public_url).rstrip("/")
        self.instance = secrets.token_hex(8)
        self.leading = not self.enabled  # a lone node always leads
        self._slots = slots
        self._download_dir = download_dir
        self._web_token = web_token
        self._view: dict[str, NodeRow] = {}
        self._in_touch_since: float | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._leadership: asyncio.Task[None] | None = None
        self._on_change: LeadershipHook | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def interval(self) -> float:
        return self.config.node_timeout / 3

    # --- start and stop --------------------------------------------------------------------------

    async def start(self) -> None:
        """Register (waiting up to one timeout for a node that had this name to be seen dead),
        then beat. NodeNameTaken when a live node keeps the name."""
        if not self.enabled:
            return
        log = logger.bind(node=self.node_name)
        deadline = time.monotonic() + self.config.node_timeout + 1
        timeout = self.config.node_timeout
        while (row := await self.store.register_node(await self._beat(), timeout=timeout)) is None:
            if time.monotonic() > deadline:
                raise NodeNameTaken(
                    f"cluster.node_name {self.node_name!r} is taken by another node that is "
                    "alive; give this node a name of its own"
                )
            await asyncio.sleep(0.5)
        self._in_touch_since = time.monotonic()
        self._view = {node.name: node for node in await self.store.list_nodes()}
        await self.store.follow_peers()
        self._http = aiohttp.ClientSession(timeout=_HOLDER_TIMEOUT)
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="cluster-heartbeat")
        log.info(
            "node {} joined the cluster ({} node(s) known; public URL {})",
            row.name,
            len(self._view),
            self.public_url,
        )

    async def stop(self) -> None:
        if not self.enabled:
            return
        task, self._heartbeat = self._heartbeat, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._http is not None:
            await self._http.close()
            self._http = None
        try:
            await self.store.stop_node(self.node_name, self.instance)
        except STORE_ERRORS as exc:
            logger.bind(node=self.node_name).warning("could not record the node's stop: {}", exc)

    # --- heartbeat, view and sweep ---------------------------------------------------------------

    async def _beat(self) -> NodeHeartbeat:
        usage = await asyncio.to_thread(shutil.disk_usage, self._download_dir)
        return NodeHeartbeat(
            name=self.node_name,
            instance=self.instance,
            public_url=self.public_url,
            slots=self._slots(),
            disk_free=usage.free,
            leader=self.leading,
        )

    async def _beat_forever(self) -> None:
        log = logger.bind(node=self.node_name)
        while True:
            await asyncio.sleep(self.interval)
            try:
                if not await self.store.heartbeat_node(await self._beat()):
                    log.error(
                        "the nodes table no longer names this process as node {}: another "
                        "node took the name while this one was out of touch",
                        self.node_name,
                    )
                self._view = {node.name: node for node in await self.store.list_nodes()}
                if self._in_touch_since is None:
                    log.info("in touch with the store again")
                    self._in_touch_since = time.monotonic()
                if self.leading and self._judging():
                    await self._sweep()
            except STORE_ERRORS as exc:
                if self._in_touch_since is not None:
                    log.warning("heartbeat failed: {}", " ".join(str(exc).split()))
                self._in_touch_since = None

    def _judging(self) -> bool:
        """Whether this node has been in touch long enough to call others dead."""
        since = self._in_touch_since
        return since is not None and time.monotonic() - since >= self.config.node_timeout

    async def _sweep(self) -> None:
        now = datetime.now(UTC)
        for node in self._view.values():
            if node.name == self.node_name:
                continue
            age = _age(node, now)
            if age <= self.config.node_timeout:
                continue
            log = logger.bind(node=node.name)
            reason = (
                f"node {node.name} stopped answering (last heartbeat {age:.0f} s ago): "
                "back to the queue"
            )
            requeued = await self.store.requeue_downloads_of_node(node.name, reason)
            if requeued:
                log.warning("node {} dead: {} job(s) back to the queue", node.name, len(requeued))
            if age > self.config.node_timeout + self.config.upload_wait:
                why = (
                    f"the file is on node {node.name}, gone for {age:.0f} s "
                    f"(cluster.upload_wait is {self.config.upload_wait:g} s)"
                )
                failed = await self.store.fail_uploads_of_node(node.name, why)
                if failed:
                    log.warning("{} upload(s) of dead node {} failed", len(failed), node.name)

    # --- what the web and the engine ask ---------------------------------------------------------

    def origin_of(self, node: str | None) -> str | None:
        """The public URL of the node holding a job, when that is another known node."""
        if not self.enabled or node is None or node == self.node_name:
            return None
        row = self._view.get(node)
        return row.public_url if row is not None else None

    def leader_origin(self) -> str | None:
        """The public URL of the node running the bot, when that is another node."""
        if self.leading:
            return None
        leader = next((row for row in self._view.values() if row.leader), None)
        return None if leader is None or leader.name == self.node_name else leader.public_url

    async def nodes(self) -> list[NodeStatus]:
        if not self.enabled:
            return []
        now = datetime.now(UTC)
        found: list[NodeStatus] = []
        for row in await self.store.list_nodes():
            age = _age(row, now)
            state: NodeState = "alive"
            if row.stopped_at is not None:
                state = "stopped"
            elif age > self.config.node_timeout:
                state = "dead"
            if state != "alive":  # a dead leader's row says so until another beats for it
                row = row._replace(leader=False)
            found.append(NodeStatus(row, state, round(age, 3), row.name == self.node_name))
        return found

    async def ask_holder(self, node: str, action: str, item_id: int) -> None:
        """Have `node` do `action` on a job it holds, through its own API: pause, resume,
        cancel, delete, delete-with-file (a download), upload-retry, upload-cancel (an upload).
        HolderError when it refuses or does not answer."""
        origin = self.origin_of(node)
        if origin is None or self._http is None:
            raise HolderError(503, "node_unknown", f"job {item_id} is held by unknown node {node}")
        method, path = _holder_request(action, item_id)
        log = logger.bind(job=item_id, node=node)
        headers = {"Authorization": f"Bearer {self._web_token}"}
        try:
            async with self._http.request(method, origin + path, headers=headers) as answer:
                if answer.status < 300:
                    log.info("node {} did {} on {}", node, action, path)
                    return
                detail = await answer.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise HolderError(
                503,
                "node_unreachable",
                f"node {node} holding job {item_id} did not answer: {type(exc).__name__}",
            ) from None
        raise HolderError(answer.status, "refused_by_node", f"node {node}: {detail[:300]}")

    # --- leadership ------------------------------------------------------------------------------

    async def start_leading(self, on_change: LeadershipHook) -> None:
        """Try for the leader's lock, now (`on_change(leading)` hears the outcome before this
        returns) and then whenever it is free (`on_change` hears every change). A lone node
        leads at once."""
        self._on_change = on_change
        if not self.enabled:
            await on_change(True)
            return
        await self._try_lead()
        await on_change(self.leading)
        self._leadership = asyncio.create_task(self._lead(on_change), name="cluster-leadership")

    async def _try_lead(self) -> None:
        log = logger.bind(node=self.node_name)
        try:
            if not self.leading and await self.store.try_lead():
                self.leading = True
                log.info("node {} leads the cluster: it runs the bot", self.node_name)
            elif self.leading and not await self.store.still_leading():
                self.leading = False
                log.warning("node {} lost the lead", self.node_name)
        except STORE_ERRORS as exc:
            log.debug("leadership: {}", exc)

    async def _lead(self, on_change: LeadershipHook) -> None:
        told = self.leading
        while True:
            await asyncio.sleep(_LEAD_RETRY)
            await self._try_lead()
            if self.leading != told:
                told = self.leading
                await on_change(self.leading)

    async def stop_leading(self) -> None:
        task, self._leadership = self._leadership, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.leading and self._on_change is not None:
            if self.enabled:
                self.leading = False
                await self.store.resign()
            await self._on_change(False)
