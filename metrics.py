"""What the service measures, for `GET /metrics` (the Prometheus text format).

One `Metrics` object per service owns a registry of its own (never the library's global one, so
that tests and several services in one process keep their figures apart) and every metric in it.
The parts are handed its hooks when the service builds them and call each one at one place: the
store after each write transaction, the aria2 transport after each reply, the poller after each
cycle, the engine when aria2c was restarted, the WebSocket when it cuts a client off, the Telegram
streamer when it waits out a FloodWait.

Three kinds of figures:
- counters from the event hub: a download or upload that reaches `completed` or `failed`, retries,
  bytes downloaded and uploaded (the growth of each job's progress as the hub carries it). They
  count what this process saw since it started; in a cluster, the jobs this node holds.
- histograms and counters from the hooks above, and the event loop's lag, measured here.
- gauges computed when scraped: jobs by status, speeds and queue depths from the store's statistics
  (the whole store: in a cluster, every node's jobs), aria2's connection and the WebSocket clients.

Built on prometheus-client, the reference client: registries of our own, histograms with fixed
buckets, the text format rendered in microseconds (no I/O, so the event loop is never held), and
its own parser for the tests. Nothing asynchronous is needed from the library: the only await of
a scrape is the store's statistics, done by the route.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from loguru import logger
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from events import Event, EventHub
from records import DownloadRemoved, DownloadRow, DownloadSnapshot, Statistics, UploadRow

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST  # text/plain; version=1.0.0; charset=utf-8
FINAL_STATUSES = ("completed", "failed")
LAG_PROBE_INTERVAL = 0.5  # seconds between two looks at the event loop's lag

_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class _Seen:
    """What the hub last said of one job: its status, its bytes done, its retries."""

    status: str | None  # None: not known (the job is newer than this process)
    done: int
    retries: int = 0
    download_id: int = 0  # an upload's download


class Metrics:
    """The registry and its metrics; `start` follows the hub and probes the loop, `stop` ends it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Gauges set from the store's statistics when scraped.
        self.downloads = Gauge("mistrelay_downloads", "Downloads by status", ["status"], registry=r)
        self.uploads = Gauge("mistrelay_uploads", "Uploads by status", ["status"], registry=r)
        self.download_speed = Gauge(
            "mistrelay_download_speed_bytes", "Download speed now, bytes/s", registry=r
        )
        self.upload_speed = Gauge(
            "mistrelay_upload_speed_bytes", "Upload speed now, bytes/s", registry=r
        )
        self.queue_depth = Gauge(
            "mistrelay_queue_depth",
            "Jobs waiting to run: downloads pending or waiting, uploads pending",
            ["queue"],
            registry=r,
        )
        self.aria2_up = Gauge("mistrelay_aria2_up", "1 while aria2 is connected", registry=r)
        self.websocket_clients = Gauge(
            "mistrelay_websocket_clients", "Open dashboard WebSockets", registry=r
        )
        # Counters from the hub's events.
        self.downloads_finished = Counter(
            "mistrelay_downloads_finished",
            "Downloads that reached completed or failed, by source type",
            ["source", "status"],
            registry=r,
        )
        self.uploads_finished = Counter(
            "mistrelay_uploads_finished",
            "Uploads that reached completed or failed, by target",
            ["target", "status"],
            registry=r,
        )
        self.downloaded_bytes = Counter(
            "mistrelay_downloaded_bytes", "Bytes downloaded", registry=r
        )
        self.uploaded_bytes = Counter("mistrelay_uploaded_bytes", "Bytes uploaded", registry=r)
        self.download_retries = Counter(
            "mistrelay_download_retries", "Downloads started again after failing", registry=r
        )
        self.upload_retries = Counter(
            "mistrelay_upload_retries",
            "Upload attempts repeated, by target",
            ["target"],
            registry=r,
        )
        # From the parts' hooks and the loop probe.
        self.aria2_restarts = Counter(
            "mistrelay_aria2_restarts",
            "Times the embedded aria2c died and was restarted",
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "mistrelay_aria2_rpc_duration_seconds",
            "aria2 JSON-RPC calls, from sending to the reply, by method",
            ["method"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.poll_seconds = Histogram(
            "mistrelay_poll_cycle_duration_seconds",
            "One poller cycle (aria2's progress read and written to the store)",
            buckets=_SLOW_BUCKETS,
            registry=r,
        )
        self.loop_lag_seconds = Histogram(
            "mistrelay_event_loop_lag_seconds",
            f"How late a {LAG_PROBE_INTERVAL:g} s sleep of the event loop woke",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.websocket_dropped = Counter(
            "mistrelay_websocket_clients_dropped",
            "WebSocket clients cut off for not keeping up",
            registry=r,
        )
        self.flood_wait_seconds = Counter(
            "mistrelay_telegram_flood_wait_seconds",
            "Seconds Telegram asked to wait (FloodWait) while its files were streamed",
            registry=r,
        )
        self.db_write_seconds = Histogram(
            "mistrelay_db_write_duration_seconds",
            "One write transaction of the store, from its start to its commit",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self._node: str | None = None
        self._started = ""
        self._downloads: dict[int, _Seen] = {}
        self._uploads: dict[int, _Seen] = {}
        self._foreign: set[int] = set()  # downloads another node of the cluster holds
        self._probe: asyncio.Task[None] | None = None
        self._unwatch: Callable[[], None] | None = None
        self._downloaded = self._uploaded = 0  # bytes of the batch being counted

    # --- hooks the parts call ---------------------------------------------------------------

    def rpc_call(self, method: str, seconds: float) -> None:
        self.rpc_seconds.labels(method).observe(seconds)

    def poll_cycle(self, seconds: float) -> None:
        self.poll_seconds.observe(seconds)

    def db_write(self, seconds: float) -> None:
        self.db_write_seconds.observe(seconds)

    def aria2_restarted(self) -> None:
        self.aria2_restarts.inc()

    def websocket_client_dropped(self) -> None:
        self.websocket_dropped.inc()

    def flood_wait(self, seconds: float) -> None:
        self.flood_wait_seconds.inc(max(0.0, seconds))

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self, hub: EventHub, *, node: str | None, since: str) -> None:
        """Count the hub's events and probe the loop. `node`: this node's name in a cluster
        (None alone); `since`: the start's UTC timestamp, as the store writes them — a job whose
        row changed before it is not counted as finishing now."""
        self._node = node
        self._started = since
        self._unwatch = hub.watch(self._observe)
        self._probe = asyncio.create_task(self._probe_loop(), name="metrics-loop-lag")

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None

    async def _probe_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(LAG_PROBE_INTERVAL)
            self.loop_lag_seconds.observe(max(0.0, loop.time() - before - LAG_PROBE_INTERVAL))

    def _observe(self, events: Sequence[Event]) -> None:
        """Every batch the hub publishes, as it is published (so none is coalesced away)."""
        self._downloaded = self._uploaded = 0
        try:
            for event in events:
                self._count(event.data)
        except Exception:  # a figure must never break a publisher
            logger.exception("metrics: an event could not be counted")
        # Once a batch: a poll cycle publishes the progress of every running job at once.
        if self._downloaded:
            self.downloaded_bytes.inc(self._downloaded)
        if self._uploaded:
            self.uploaded_bytes.inc(self._uploaded)

    # --- counting from events -------------------------------------------------------------------

    def _count(self, data: object) -> None:
        """Count one committed change the hub carried."""
        if isinstance(data, DownloadSnapshot):
            self._download(data.row)
            for upload in data.uploads:
                self._upload(upload)
        elif isinstance(data, UploadRow):
            self._upload(data)
        elif isinstance(data, DownloadRemoved):
            self._forget(data.download_id)

    def _first_sight(self, status: str, created_at: str, updated_at: str, done: int) -> _Seen:
        """A job the hub had not shown yet: one made since the start counts from nothing; an
        older one from where it stands, and its status counts only if it changed since."""
        return _Seen(
            status=None if updated_at >= self._started else status,
            done=0 if created_at >= self._started else done,
        )

    def _download(self, row: DownloadRow) -> None:
        if row.node is not None and row.node != self._node:
            self._foreign.add(row.id)
            return
        self._foreign.discard(row.id)
        seen = self._downloads.get(row.id)
        if seen is None:
            seen = self._first_sight(
                row.status, row.created_at, row.updated_at, row.completed_length
            )
            self._downloads[row.id] = seen
        if row.completed_length > seen.done:
            self._downloaded += row.completed_length - seen.done
        seen.done = row.completed_length  # a retry starts again from 0
        if row.status != seen.status:
            if row.status in FINAL_STATUSES:
                self.downloads_finished.labels(row.source_type, row.status).inc()
            elif row.status == "pending" and seen.status in ("failed", "cancelled"):
                self.download_retries.inc()
            seen.status = row.status

    def _upload(self, row: UploadRow) -> None:
        if row.download_id in self._foreign:
            return
        seen = self._uploads.get(row.id)
        if seen is None:
            seen = self._first_sight(row.status, row.created_at, row.updated_at, row.uploaded_size)
            seen.download_id = row.download_id
            if row.created_at < self._started:
                seen.retries = row.retry_count
            self._uploads[row.id] = seen
        if row.uploaded_size > seen.done:
            self._uploaded += row.uploaded_size - seen.done
        seen.done = row.uploaded_size
        if row.retry_count > seen.retries:
            self.upload_retries.labels(row.upload_target).inc(row.retry_count - seen.retries)
        seen.retries = row.retry_count  # a retry by hand sets it back to 0
        if row.status != seen.status:
            if row.status in FINAL_STATUSES:
                self.uploads_finished.labels(row.upload_target, row.status).inc()
            seen.status = row.status

    def _forget(self, download_id: int | None) -> None:
        if download_id is None:  # every download was removed
            self._downloads.clear()
            self._uploads.clear()
            self._foreign.clear()
            return
        self._downloads.pop(download_id, None)
        self._foreign.discard(download_id)
        for upload_id in [i for i, s in self._uploads.items() if s.download_id == download_id]:
            del self._uploads[upload_id]

    # --- the scrape -------------------------------------------------------------------------------

    def render(self, statistics: Statistics, *, aria2_up: bool) -> bytes:
        """The whole registry in the text format, the gauges set from what is given (the
        WebSocket's count is read from the web server's own set of clients)."""
        downloads, uploads = statistics["downloads"], statistics["uploads"]
        for status, count in downloads["by_status"].items():
            self.downloads.labels(status).set(count)
        for status, count in uploads["by_status"].items():
            self.uploads.labels(status).set(count)
        self.download_speed.set(downloads["download_speed"])
        self.upload_speed.set(uploads["upload_speed"])
        by_status = downloads["by_status"]
        self.queue_depth.labels("downloads").set(
            by_status.get("pending", 0) + by_status.get("waiting", 0)
        )
        self.queue_depth.labels("uploads").set(uploads["by_status"].get("pending", 0))
        self.aria2_up.set(1 if aria2_up else 0)
        return generate_latest(self.registry)
