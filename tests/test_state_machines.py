"""Property tests of both status machines through the store on both backends (a real SQLite
file, a real PostgreSQL database), and the action tables (what a row offers the page and the
bot) held against the machines.

Random sequences of target statuses are applied to one fresh row per example, in one database
per test. After every step:
an allowed edge moved the row and added one history row; repeating the status wrote nothing; any
other target raised TransitionError and left the row and the history byte-for-byte unchanged.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from db import (
    DOWNLOAD_TRANSITIONS,
    MACHINES,
    UPLOAD_TRANSITIONS,
    Database,
    TransitionError,
    allowed_sources,
    download_actions,
    upload_actions,
)
from events import EventHub
from records import NewDownload
from tests.support.stores import StoreBackend

UNKNOWN_STATUS = "teleported"
# (a target status, or an index into the allowed next statuses; use the public function if any)
Step = tuple[str | int, bool]
PublicCall = Callable[[Database, int], Awaitable[Any]]

# The public functions that move a row by id to a given status.
DOWNLOAD_PUBLIC: dict[str, PublicCall] = {
    "failed": lambda db, i: db.mark_download_failed_by_id(i, "property step", "1"),
    "cancelled": lambda db, i: db.mark_download_cancelled_by_id(i, "property step"),
    "pending": lambda db, i: db.reset_download_for_retry(i),
}
UPLOAD_PUBLIC: dict[str, PublicCall] = {
    "uploading": lambda db, i: db.mark_upload_started(i, 100),
    "failed": lambda db, i: db.mark_upload_failed(i, "network", "property step"),
    "cancelled": lambda db, i: db.mark_upload_cancelled(i, "property step"),
    "pending": lambda db, i: db.update_upload_status(i, "pending", reason="property step"),
    "paused": lambda db, i: db.update_upload_status(i, "paused", reason="property step"),
}
PUBLIC = {"download": DOWNLOAD_PUBLIC, "upload": UPLOAD_PUBLIC}
TABLES = {"download": "downloads", "upload": "uploads"}


def steps(machine: dict[str, frozenset[str]]) -> st.SearchStrategy[list[Step]]:
    """Any status (allowed or not), or an allowed edge so that sequences reach deep states."""
    targets = st.one_of(st.sampled_from([*machine, UNKNOWN_STATUS]), st.integers(0, 6))
    return st.lists(st.tuples(targets, st.booleans()), min_size=1, max_size=25)


def resolve(machine: dict[str, frozenset[str]], current: str, choice: str | int) -> str:
    if isinstance(choice, str):
        return choice
    allowed = sorted(machine[current])
    return allowed[choice % len(allowed)] if allowed else current


class Harness:
    """One database and one event loop for a whole property test."""

    def __init__(self, backend: StoreBackend) -> None:
        self.runner = asyncio.Runner()
        self.db: Database = self.runner.run(self._open(backend))
        self.inspector = backend.peek
        self.examples = 0

    async def _open(self, backend: StoreBackend) -> Database:
        return await backend.database(EventHub()).open()

    def close(self) -> None:
        self.runner.run(self.db.close())
        self.runner.close()

    def new_row(self, entity: str, ready: bool) -> int:
        self.examples += 1
        return self.runner.run(self._new_row(entity, ready, self.examples))

    async def _new_row(self, entity: str, ready: bool, number: int) -> int:
        download_id = await self.db.create_download(
            NewDownload(source_type="http", source_key=f"http://h/{entity}/{number}")
        )
        if entity == "download":
            return download_id
        return await self.db.create_upload(download_id, "cloud", None, 3, ready=ready)

    def row(self, entity: str, item_id: int) -> tuple[Any, ...]:
        return self.inspector.row(TABLES[entity], item_id)

    def status(self, entity: str, item_id: int) -> str:
        [(status,)] = self.inspector.fetch(
            f"SELECT status FROM {TABLES[entity]} WHERE id = ?", (item_id,)
        )
        return str(status)

    def history(self, entity: str, item_id: int) -> list[tuple[Any, ...]]:
        return self.inspector.fetch(
            "SELECT id, from_status, to_status, reason, at FROM status_history"
            " WHERE entity = ? AND entity_id = ? ORDER BY id",
            (entity, item_id),
        )

    def apply(self, entity: str, item_id: int, target: str, public: bool) -> TransitionError | None:
        return self.runner.run(self._apply(entity, item_id, target, public))

    async def _apply(
        self, entity: str, item_id: int, target: str, public: bool
    ) -> TransitionError | None:
        try:
            call = PUBLIC[entity].get(target)
            if public and call is not None:
                await call(self.db, item_id)
            else:
                async with self.db._write() as tx:
                    await tx.transition(entity, item_id, target, "property step")
        except TransitionError as exc:
            return exc
        return None


@pytest.fixture
def harness(store_backend: StoreBackend) -> Iterator[Harness]:
    instance = Harness(store_backend)
    try:
        yield instance
    finally:
        instance.close()


def check_sequence(harness: Harness, entity: str, ready: bool, sequence: list[Step]) -> None:
    machine = MACHINES[entity]
    item_id = harness.new_row(entity, ready)
    for choice, public in sequence:
        current = harness.status(entity, item_id)
        target = resolve(machine, current, choice)
        row_before = harness.row(entity, item_id)
        history_before = harness.history(entity, item_id)
        error = harness.apply(entity, item_id, target, public)
        row_after = harness.row(entity, item_id)
        history_after = harness.history(entity, item_id)
        if target in machine.get(current, frozenset()):
            assert error is None, f"{current} -> {target} is allowed but was refused: {error}"
            assert harness.status(entity, item_id) == target
            assert history_after[: len(history_before)] == history_before
            assert len(history_after) == len(history_before) + 1
            added = history_after[-1]
            assert (added[1], added[2]) == (current, target)
        elif target == current:
            assert error is None
            assert row_after == row_before
            assert history_after == history_before
        else:
            assert error is not None, f"{current} -> {target} is forbidden but was accepted"
            assert error.target == target
            assert row_after == row_before
            assert history_after == history_before
        status = harness.status(entity, item_id)
        assert status in machine
        history = harness.history(entity, item_id)
        initial = "waiting_download" if entity == "upload" and not ready else "pending"
        assert (history[0][1], history[0][2]) == (None, initial)
        for earlier, later in itertools.pairwise(history):
            assert earlier[2] == later[1], "history is not a chain"
            assert later[2] in machine[later[1]], f"history holds {later[1]} -> {later[2]}"
        assert history[-1][2] == status


def test_download_machine_property(harness: Harness) -> None:
    assert MACHINES["download"] is DOWNLOAD_TRANSITIONS

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(sequence=steps(DOWNLOAD_TRANSITIONS))
    def run(sequence: list[Step]) -> None:
        check_sequence(harness, "download", True, sequence)

    run()
    assert harness.examples >= 200


def test_upload_machine_property(harness: Harness) -> None:
    assert MACHINES["upload"] is UPLOAD_TRANSITIONS

    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(ready=st.booleans(), sequence=steps(UPLOAD_TRANSITIONS))
    def run(ready: bool, sequence: list[Step]) -> None:
        check_sequence(harness, "upload", ready, sequence)

    run()
    assert harness.examples >= 200


# What each action asks of the machine: any one of these targets.
ACTION_TARGETS: dict[str, dict[str, tuple[str, ...]]] = {
    "download": {
        "pause": ("paused",),
        "resume": ("waiting", "downloading"),
        "retry": ("pending",),
        "cancel": ("cancelled",),
    },
    "upload": {"retry": ("pending",), "cancel": ("cancelled",)},
}
ACTIONS = {"download": download_actions, "upload": upload_actions}


@pytest.mark.parametrize("entity", ["download", "upload"])
def test_every_action_offered_is_a_transition_the_machine_allows(entity: str) -> None:
    machine = MACHINES[entity]
    targets = ACTION_TARGETS[entity]
    for status in machine:
        offered = ACTIONS[entity](status)
        assert list(offered) == [a for a in targets if a in offered], f"{status}: order {offered}"
        for action in offered:
            assert any(t in machine[status] for t in targets[action]), (
                f"{entity} {status} offers {action}, but the machine allows none of "
                f"{targets[action]} from it"
            )
    assert ACTIONS[entity]("teleported") == ()


@pytest.mark.parametrize(
    ("entity", "action"), [("download", "pause"), ("download", "cancel"), ("upload", "cancel")]
)
def test_actions_are_offered_wherever_the_machine_allows_them(entity: str, action: str) -> None:
    (target,) = ACTION_TARGETS[entity][action]
    offering = {status for status in MACHINES[entity] if action in ACTIONS[entity](status)}
    assert offering == set(allowed_sources(entity, target))


def test_action_tables() -> None:
    assert {s: download_actions(s) for s in DOWNLOAD_TRANSITIONS} == {
        "pending": ("cancel",),
        "waiting": ("pause", "cancel"),
        "downloading": ("pause", "cancel"),
        "paused": ("resume", "cancel"),
        "completed": (),
        "failed": ("retry",),
        "cancelled": ("retry",),
    }
    assert {s: upload_actions(s) for s in UPLOAD_TRANSITIONS} == {
        "waiting_download": ("cancel",),
        "pending": ("cancel",),
        "uploading": ("cancel",),
        "paused": ("cancel",),
        "completed": (),
        "failed": ("retry",),
        "cancelled": ("retry",),
    }
