"""The in-process event hub: committed changes fan out to subscribers (WebSocket push, bot notices).

Publishers call :meth:`EventHub.publish` only after their transaction has committed. Each subscriber
owns a bounded, coalescing queue: a newer event for the same item replaces the older one still
waiting, so a burst of progress for one download costs one slot. A subscriber that falls behind by
more than its bound is dropped (it may subscribe again and resynchronise); publishing never waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Literal, NamedTuple

from loguru import logger

from records import EventData, Statistics

EventKind = Literal["download", "upload", "cleanup", "statistics"]


class Event(NamedTuple):
    """One committed change. `data` by kind: "download" a `DownloadSnapshot` or `DownloadRemoved`,
    "upload" and "cleanup" an `UploadRow`, "statistics" the `Statistics`. A named tuple: a poll
    cycle publishes a thousand at once."""

    kind: EventKind
    data: EventData
    item_id: int | None = None

    @property
    def key(self) -> tuple[str, int | None]:
        return (self.kind, self.item_id)


class SubscriptionClosed(Exception):
    """Raised by :meth:`Subscription.get` once the subscription is closed or was dropped."""


class Subscription:
    """A bounded queue of pending events, coalesced by item."""

    def __init__(self, hub: EventHub, name: str, maxsize: int) -> None:
        self.name = name
        self.maxsize = maxsize
        self.dropped = False
        self._hub = hub
        self._pending: OrderedDict[tuple[str, int | None], Event] = OrderedDict()
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def closed(self) -> bool:
        return self._closed

    def offer(self, event: Event) -> bool:
        """Queue `event`; returns False when the subscriber had to be dropped for falling behind."""
        return self.offer_many((event,))

    def offer_many(self, events: Iterable[Event]) -> bool:
        """Queue events in order (one wake-up for all); False when the subscriber was dropped."""
        if self._closed:
            return False
        pending = self._pending
        for event in events:
            key = (event.kind, event.item_id)
            if key not in pending and len(pending) >= self.maxsize:
                self.dropped = True
                self.close()
                return False
            pending[key] = event
        self._ready.set()
        return True

    async def get(self) -> Event:
        while not self._pending:
            if self._closed:
                raise SubscriptionClosed(self.name)
            self._ready.clear()
            await self._ready.wait()
        _, event = self._pending.popitem(last=False)
        return event

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.set()
        self._hub._remove(self)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None


class EventHub:
    """Fans committed events out to subscribers; throttles statistics recomputation."""

    def __init__(self, statistics_interval: float = 0.5) -> None:
        self._subscribers: list[Subscription] = []
        self._watchers: list[Callable[[Sequence[Event]], None]] = []
        self._statistics_interval = statistics_interval
        self._statistics_source: Callable[[], Awaitable[Statistics]] | None = None
        self._statistics_dirty = asyncio.Event()
        self._statistics_task: asyncio.Task[None] | None = None
        self.published = 0

    def subscribe(self, name: str, maxsize: int = 1000) -> Subscription:
        subscription = Subscription(self, name, maxsize)
        self._subscribers.append(subscription)
        return subscription

    def _remove(self, subscription: Subscription) -> None:
        with contextlib.suppress(ValueError):
            self._subscribers.remove(subscription)
        if subscription.dropped:
            logger.warning("event subscriber {} fell behind and was dropped", subscription.name)

    def watch(self, callback: Callable[[Sequence[Event]], None]) -> Callable[[], None]:
        """Call `callback` with each published batch, inside `publish`, before any subscriber
        hears of it: for caches that must never answer with a committed change's old state. It
        must be quick and must not block. Returns what stops the calls."""
        self._watchers.append(callback)

        def unwatch() -> None:
            with contextlib.suppress(ValueError):
                self._watchers.remove(callback)

        return unwatch

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, kind: EventKind, data: EventData, item_id: int | None = None) -> None:
        self.publish_many(((kind, data, item_id),))

    def publish_many(self, items: Iterable[tuple[EventKind, EventData, int | None]]) -> None:
        """Publish several committed changes at once (e.g. one poll cycle's progress)."""
        events = [Event(kind=kind, data=data, item_id=item_id) for kind, data, item_id in items]
        if not events:
            return
        self.published += len(events)
        for watcher in list(self._watchers):
            try:
                watcher(events)
            except Exception:
                logger.exception("an event watcher failed")
        for subscription in list(self._subscribers):
            subscription.offer_many(events)
        if any(event.kind != "statistics" for event in events):
            self._statistics_dirty.set()

    def start_statistics(self, source: Callable[[], Awaitable[Statistics]]) -> None:
        """Publish a statistics event at most every `statistics_interval` s after any change."""
        self._statistics_source = source
        if self._statistics_task is None:
            self._statistics_task = asyncio.create_task(self._statistics_loop())

    async def _statistics_loop(self) -> None:
        assert self._statistics_source is not None
        while True:
            await self._statistics_dirty.wait()
            self._statistics_dirty.clear()
            try:
                statistics = await self._statistics_source()
            except Exception as exc:
                logger.warning("statistics could not be computed: {}", exc)
            else:
                self.publish("statistics", statistics)
            await asyncio.sleep(self._statistics_interval)

    async def close(self) -> None:
        if self._statistics_task is not None:
            self._statistics_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._statistics_task
            self._statistics_task = None
        for subscription in list(self._subscribers):
            subscription.close()
