"""The event hub: ordered fan-out, coalescing, dropping slow subscribers, throttled statistics."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Sequence

import pytest

from events import Event, EventHub, Subscription, SubscriptionClosed
from records import (
    DownloadRemoved,
    DownloadSnapshot,
    Statistics,
    UploadRow,
)
from tests.support.records import download_row, upload_row


def snapshot(
    download_id: int, completed: int = 0, file_name: str | None = None
) -> DownloadSnapshot:
    """A download event's record; `completed` tells one version from another."""
    row = download_row(
        id=download_id,
        gid=None,
        source_key=f"http://h/{download_id}",
        source_url=None,
        file_name=file_name,
        total_length=1_000_000,
        completed_length=completed,
        group_key=f"download:{download_id}",
    )
    return DownloadSnapshot(row, ())


def upload(upload_id: int, uploaded: int = 0, cleaned_at: str | None = None) -> UploadRow:
    return upload_row(
        id=upload_id,
        download_id=1,
        uploaded_size=uploaded,
        total_size=1_000_000,
        cleaned_at=cleaned_at,
    )


def statistics(state: int) -> Statistics:
    """Statistics whose download total is `state`."""
    return {
        "downloads": {
            "total": state,
            "by_status": {},
            "total_bytes": 0,
            "completed_bytes": 0,
            "download_speed": 0,
        },
        "uploads": {
            "total": 0,
            "by_status": {},
            "by_target": {},
            "total_bytes": 0,
            "upload_speed": 0.0,
            "cleaned": 0,
        },
    }


def version(event: Event) -> int:
    """The number a test put in an event's record."""
    data = event.data
    if isinstance(data, DownloadSnapshot):
        return data.row.completed_length
    if isinstance(data, UploadRow):
        return data.uploaded_size
    if isinstance(data, DownloadRemoved):
        raise AssertionError(f"no version in {data}")
    return data["downloads"]["total"]


@pytest.fixture
async def hub() -> AsyncIterator[EventHub]:
    event_hub = EventHub(statistics_interval=0.05)
    try:
        yield event_hub
    finally:
        await event_hub.close()


async def take(subscription: Subscription, count: int) -> list[Event]:
    return [await asyncio.wait_for(subscription.get(), 5) for _ in range(count)]


async def test_events_reach_every_subscriber_in_order(hub: EventHub) -> None:
    first = hub.subscribe("first")
    second = hub.subscribe("second")
    assert hub.subscriber_count == 2
    for index in range(50):
        hub.publish("download", snapshot(index, index), index)
    hub.publish("upload", upload(7, 50), 7)
    hub.publish("cleanup", upload(7, 51), 7)
    for subscription in (first, second):
        events = await take(subscription, 52)
        assert [version(e) for e in events] == list(range(52))
        assert [e.kind for e in events[-3:]] == ["download", "upload", "cleanup"]
        assert len(subscription) == 0
    assert hub.published == 52


async def test_watchers_see_each_batch_before_publish_returns(hub: EventHub) -> None:
    seen: list[list[tuple[str, int | None]]] = []

    def failing(events: Sequence[Event]) -> None:
        raise RuntimeError("a broken watcher")

    stop_failing = hub.watch(failing)
    stop = hub.watch(lambda events: seen.append([(e.kind, e.item_id) for e in events]))
    subscription = hub.subscribe("after")
    hub.publish_many([("download", snapshot(1), 1), ("cleanup", upload(7, 2), 7)])
    assert seen == [[("download", 1), ("cleanup", 7)]]  # at once, despite the broken watcher
    assert [e.item_id for e in await take(subscription, 2)] == [1, 7]
    stop()
    stop_failing()
    hub.publish("download", DownloadRemoved(None), None)
    assert len(seen) == 1


async def test_subscriber_waiting_in_get_is_woken(hub: EventHub) -> None:
    subscription = hub.subscribe("waiter")
    waiter = asyncio.create_task(subscription.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.publish("download", DownloadRemoved(1), 1)
    event = await asyncio.wait_for(waiter, 5)
    assert (event.kind, event.item_id, event.data) == ("download", 1, DownloadRemoved(1))


async def test_coalescing_keeps_latest_data_and_original_position(hub: EventHub) -> None:
    subscription = hub.subscribe("t")
    hub.publish("download", snapshot(1, 11), 1)
    hub.publish("download", snapshot(2, 21), 2)
    hub.publish("upload", upload(1, 1), 1)
    hub.publish("download", snapshot(1, 12), 1)
    hub.publish("download", snapshot(1, 13), 1)
    hub.publish("statistics", statistics(1))
    hub.publish("upload", upload(1, 2), 1)
    hub.publish("statistics", statistics(2))
    assert len(subscription) == 4
    events = await take(subscription, 4)
    assert [(e.kind, e.item_id, version(e)) for e in events] == [
        ("download", 1, 13),
        ("download", 2, 21),
        ("upload", 1, 2),
        ("statistics", None, 2),
    ]
    # once taken, the same item queues again at the end
    hub.publish("download", snapshot(2, 22), 2)
    hub.publish("download", snapshot(1, 14), 1)
    assert [version(e) for e in await take(subscription, 2)] == [22, 14]


async def test_slow_subscriber_is_dropped_other_keeps_everything(hub: EventHub) -> None:
    slow = hub.subscribe("slow", maxsize=5)
    fast = hub.subscribe("fast", maxsize=5)
    received: list[int] = []

    async def consume() -> None:
        async for event in fast:
            received.append(version(event))
            if version(event) == 99:
                return

    consumer = asyncio.create_task(consume())
    for index in range(100):
        hub.publish("download", snapshot(index, index), index)
        await asyncio.sleep(0)  # the fast subscriber keeps up; the slow one never reads
    await asyncio.wait_for(consumer, 5)
    assert received == list(range(100))
    assert slow.dropped and slow.closed
    assert not fast.dropped and not fast.closed
    assert hub.subscriber_count == 1
    assert not slow.offer(Event("download", DownloadRemoved(1), 1))
    # what was queued before the drop may be read; then the subscription reports it is closed
    leftovers = 0
    with pytest.raises(SubscriptionClosed):
        for _ in range(slow.maxsize + 1):
            await asyncio.wait_for(slow.get(), 5)
            leftovers += 1
    assert leftovers <= slow.maxsize
    assert [e async for e in slow] == []


async def test_coalescing_at_capacity_does_not_drop(hub: EventHub) -> None:
    subscription = hub.subscribe("t", maxsize=3)
    for item in (1, 2, 3):
        hub.publish("download", snapshot(item, 0), item)
    for step in range(1, 50):
        hub.publish("download", snapshot(2, step), 2)
    assert not subscription.dropped
    events = await take(subscription, 3)
    assert [(e.item_id, version(e)) for e in events] == [(1, 0), (2, 49), (3, 0)]
    hub.publish("download", snapshot(4, 0), 4)
    assert not subscription.dropped


async def test_close_subscription_and_hub(hub: EventHub) -> None:
    subscription = hub.subscribe("t")
    waiter = asyncio.create_task(subscription.get())
    await asyncio.sleep(0)
    subscription.close()
    with pytest.raises(SubscriptionClosed):
        await asyncio.wait_for(waiter, 5)
    assert not subscription.dropped
    assert hub.subscriber_count == 0
    other = hub.subscribe("other")
    await hub.close()
    assert other.closed
    with pytest.raises(SubscriptionClosed):
        await asyncio.wait_for(other.get(), 5)


class CountingSource:
    """A statistics source over a counter; records every computation."""

    def __init__(self) -> None:
        self.state = 0
        self.calls = 0

    async def __call__(self) -> Statistics:
        self.calls += 1
        await asyncio.sleep(0)
        return statistics(self.state)


async def wait_for_statistics(subscription: Subscription, state: int) -> list[int]:
    """Read statistics events until one shows `state`; returns every state seen."""
    seen: list[int] = []
    while not seen or seen[-1] != state:
        event = await subscription.get()
        if event.kind == "statistics":
            seen.append(version(event))
    return seen


async def test_statistics_burst_is_throttled_and_ends_on_final_state() -> None:
    hub = EventHub(statistics_interval=0.2)
    source = CountingSource()
    try:
        subscription = hub.subscribe("page", maxsize=5000)
        hub.start_statistics(source)
        for _ in range(1000):
            source.state += 1
            hub.publish("download", snapshot(source.state, source.state), source.state)
        seen = await asyncio.wait_for(wait_for_statistics(subscription, 1000), 5)
        assert seen[-1] == 1000
        # let any further computation that the burst could cause happen, then count
        await asyncio.sleep(0.5)
        assert 1 <= source.calls <= 3
    finally:
        await hub.close()


async def test_statistics_spread_burst_is_throttled() -> None:
    hub = EventHub(statistics_interval=0.1)
    source = CountingSource()
    try:
        subscription = hub.subscribe("page", maxsize=5000)
        hub.start_statistics(source)
        for _ in range(20):
            for _ in range(50):
                source.state += 1
                hub.publish("download", snapshot(source.state, source.state), source.state)
            await asyncio.sleep(0.005)
        seen = await asyncio.wait_for(wait_for_statistics(subscription, 1000), 5)
        assert seen == sorted(seen)
        # ~0.1-0.2 s of publishing at most one computation per 0.1 s: a few, not one per publish
        assert source.calls <= 20
    finally:
        await hub.close()


class GatedSource:
    """A statistics source that reads the state, then waits for `gate` before answering, like a
    query whose result is on its way while new changes commit."""

    def __init__(self) -> None:
        self.state = 0
        self.calls = 0
        self.computing = asyncio.Event()
        self.gate = asyncio.Event()

    async def __call__(self) -> Statistics:
        self.calls += 1
        state = self.state
        self.computing.set()
        await self.gate.wait()
        return statistics(state)


async def test_change_during_statistics_computation_is_not_lost() -> None:
    hub = EventHub(statistics_interval=0.05)
    source = GatedSource()
    try:
        subscription = hub.subscribe("page")
        hub.start_statistics(source)
        source.state = 1
        hub.publish("download", snapshot(1, 1), 1)
        await asyncio.wait_for(source.computing.wait(), 5)
        source.state = 2
        hub.publish("download", snapshot(1, 2), 1)
        source.gate.set()
        seen = await asyncio.wait_for(wait_for_statistics(subscription, 2), 2)
        assert seen[-1] == 2
    finally:
        await hub.close()


async def test_close_stops_statistics_task() -> None:
    hub = EventHub(statistics_interval=0.02)
    source = CountingSource()
    subscription = hub.subscribe("page")
    hub.start_statistics(source)
    hub.publish("download", DownloadRemoved(1), 1)
    await asyncio.wait_for(wait_for_statistics(subscription, 0), 5)
    await hub.close()
    calls = source.calls
    assert hub._statistics_task is None
    for index in range(10):
        hub.publish("download", DownloadRemoved(index), index)
        await asyncio.sleep(0.02)
    assert source.calls == calls


async def test_failing_statistics_source_does_not_stop_the_loop() -> None:
    hub = EventHub(statistics_interval=0.02)
    attempts = 0

    async def flaky() -> Statistics:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("database busy")
        return statistics(attempts)

    try:
        subscription = hub.subscribe("page")
        hub.start_statistics(flaky)
        hub.publish("download", DownloadRemoved(1), 1)
        await asyncio.sleep(0.1)
        hub.publish("download", DownloadRemoved(2), 2)
        event = await asyncio.wait_for(subscription.get(), 5)
        while event.kind != "statistics":
            event = await asyncio.wait_for(subscription.get(), 5)
        assert version(event) >= 2
    finally:
        await hub.close()


def test_publish_is_synchronous_and_needs_no_running_loop() -> None:
    assert not inspect.iscoroutinefunction(EventHub.publish)
    assert not inspect.iscoroutinefunction(Subscription.offer)
    hub = EventHub()
    subscription = hub.subscribe("t", maxsize=100)
    for index in range(10):
        assert hub.publish("download", DownloadRemoved(index), index) is None  # type: ignore[func-returns-value]
    assert len(subscription) == 10
    assert hub.published == 10
