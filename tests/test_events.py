"""The event hub: ordered fan-out, coalescing, dropping slow subscribers, throttled statistics."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import pytest

from events import Event, EventHub, Subscription, SubscriptionClosed


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
        hub.publish("download", {"n": index}, index)
    hub.publish("upload", {"n": 50}, 7)
    hub.publish("cleanup", {"n": 51}, 7)
    for subscription in (first, second):
        events = await take(subscription, 52)
        assert [e.data["n"] for e in events] == list(range(52))
        assert [e.kind for e in events[-3:]] == ["download", "upload", "cleanup"]
        assert len(subscription) == 0
    assert hub.published == 52


async def test_subscriber_waiting_in_get_is_woken(hub: EventHub) -> None:
    subscription = hub.subscribe("waiter")
    waiter = asyncio.create_task(subscription.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    hub.publish("download", {"n": 1}, 1)
    event = await asyncio.wait_for(waiter, 5)
    assert (event.kind, event.item_id, event.data) == ("download", 1, {"n": 1})


async def test_coalescing_keeps_latest_data_and_original_position(hub: EventHub) -> None:
    subscription = hub.subscribe("t")
    hub.publish("download", {"v": "a1"}, 1)
    hub.publish("download", {"v": "b1"}, 2)
    hub.publish("upload", {"v": "u1"}, 1)
    hub.publish("download", {"v": "a2"}, 1)
    hub.publish("download", {"v": "a3"}, 1)
    hub.publish("statistics", {"v": "s1"})
    hub.publish("upload", {"v": "u2"}, 1)
    hub.publish("statistics", {"v": "s2"})
    assert len(subscription) == 4
    events = await take(subscription, 4)
    assert [(e.kind, e.item_id, e.data["v"]) for e in events] == [
        ("download", 1, "a3"),
        ("download", 2, "b1"),
        ("upload", 1, "u2"),
        ("statistics", None, "s2"),
    ]
    # once taken, the same item queues again at the end
    hub.publish("download", {"v": "b2"}, 2)
    hub.publish("download", {"v": "a4"}, 1)
    assert [e.data["v"] for e in await take(subscription, 2)] == ["b2", "a4"]


async def test_slow_subscriber_is_dropped_other_keeps_everything(hub: EventHub) -> None:
    slow = hub.subscribe("slow", maxsize=5)
    fast = hub.subscribe("fast", maxsize=5)
    received: list[int] = []

    async def consume() -> None:
        async for event in fast:
            received.append(event.data["n"])
            if event.data["n"] == 99:
                return

    consumer = asyncio.create_task(consume())
    for index in range(100):
        hub.publish("download", {"n": index}, index)
        await asyncio.sleep(0)  # the fast subscriber keeps up; the slow one never reads
    await asyncio.wait_for(consumer, 5)
    assert received == list(range(100))
    assert slow.dropped and slow.closed
    assert not fast.dropped and not fast.closed
    assert hub.subscriber_count == 1
    assert not slow.offer(Event("download", {"n": -1}, 1))
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
        hub.publish("download", {"v": 0}, item)
    for version in range(1, 50):
        hub.publish("download", {"v": version}, 2)
    assert not subscription.dropped
    events = await take(subscription, 3)
    assert [(e.item_id, e.data["v"]) for e in events] == [(1, 0), (2, 49), (3, 0)]
    hub.publish("download", {"v": 0}, 4)
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

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        await asyncio.sleep(0)
        return {"state": self.state}


async def wait_for_statistics(subscription: Subscription, state: int) -> list[int]:
    """Read statistics events until one shows `state`; returns every state seen."""
    seen: list[int] = []
    while not seen or seen[-1] != state:
        event = await subscription.get()
        if event.kind == "statistics":
            seen.append(event.data["state"])
    return seen


async def test_statistics_burst_is_throttled_and_ends_on_final_state() -> None:
    hub = EventHub(statistics_interval=0.2)
    source = CountingSource()
    try:
        subscription = hub.subscribe("page", maxsize=5000)
        hub.start_statistics(source)
        for _ in range(1000):
            source.state += 1
            hub.publish("download", {"state": source.state}, source.state)
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
                hub.publish("download", {"state": source.state}, source.state)
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

    async def __call__(self) -> dict[str, Any]:
        self.calls += 1
        snapshot = self.state
        self.computing.set()
        await self.gate.wait()
        return {"state": snapshot}


async def test_change_during_statistics_computation_is_not_lost() -> None:
    hub = EventHub(statistics_interval=0.05)
    source = GatedSource()
    try:
        subscription = hub.subscribe("page")
        hub.start_statistics(source)
        source.state = 1
        hub.publish("download", {"state": 1}, 1)
        await asyncio.wait_for(source.computing.wait(), 5)
        source.state = 2
        hub.publish("download", {"state": 2}, 1)
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
    hub.publish("download", {}, 1)
    await asyncio.wait_for(wait_for_statistics(subscription, 0), 5)
    await hub.close()
    calls = source.calls
    assert hub._statistics_task is None
    for index in range(10):
        hub.publish("download", {}, index)
        await asyncio.sleep(0.02)
    assert source.calls == calls


async def test_failing_statistics_source_does_not_stop_the_loop() -> None:
    hub = EventHub(statistics_interval=0.02)
    attempts = 0

    async def flaky() -> dict[str, Any]:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise RuntimeError("database busy")
        return {"state": attempts}

    try:
        subscription = hub.subscribe("page")
        hub.start_statistics(flaky)
        hub.publish("download", {}, 1)
        await asyncio.sleep(0.1)
        hub.publish("download", {}, 2)
        event = await asyncio.wait_for(subscription.get(), 5)
        while event.kind != "statistics":
            event = await asyncio.wait_for(subscription.get(), 5)
        assert event.data["state"] >= 2
    finally:
        await hub.close()


def test_publish_is_synchronous_and_needs_no_running_loop() -> None:
    assert not inspect.iscoroutinefunction(EventHub.publish)
    assert not inspect.iscoroutinefunction(Subscription.offer)
    hub = EventHub()
    subscription = hub.subscribe("t", maxsize=100)
    for index in range(10):
        assert hub.publish("download", {"n": index}, index) is None  # type: ignore[func-returns-value]
    assert len(subscription) == 10
    assert hub.published == 10
