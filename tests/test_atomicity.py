"""An error leaves the state unchanged (seed 002, property 4): a failure injected at any statement
of one of the store's multi-row operations leaves every table exactly as it was, on SQLite and on
PostgreSQL, and publishes nothing.

The failure is put at the edge: the backend's statement runner is wrapped for the operation's
transactions, so that its Nth statement raises, either instead of running or just after it ran
(its change then exists inside the transaction, which must roll it back). Every N is tried, from
the first statement until the operation runs to its end. The property draws the database the
operation meets (downloads in every status, held by nodes or none, with gids, Telegram media and
uploads in every status) and the operation's arguments. Every table is read through a second
connection, the way another process would see it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from db import DOWNLOAD_STATUSES, UPLOAD_STATUSES, Database, _Row, _Statements
from events import EventHub
from records import DownloadChange, NewDownload, TgMediaRecord
from tests.support.stores import Peek, StoreBackend

T = TypeVar("T")
Table = list[tuple[Any, ...]]
Snapshot = dict[str, Table]
Operation = Callable[[Database], Awaitable[object]]
NODES = ("n1", "n2")
EXAMPLES = 12  # per operation and backend: the file runs in well under a minute
# Tables that are the backends' own bookkeeping: compared, never emptied between examples.
BOOKKEEPING = frozenset({"mistrelay_schema", "sqlite_sequence"})


class InjectedFailure(Exception):
    """The failure put in place of (or just after) one statement."""


@dataclass
class Injection:
    """Fail the `fail_at`-th statement (counted over every transaction of the operation)."""

    fail_at: int
    after: bool  # run the statement first, then fail
    seen: int = 0
    fired: bool = False
    natural: BaseException | None = None  # the statement, run first, failed on its own

    async def run(self, statement: Callable[[], Awaitable[T]]) -> T:
        self.seen += 1
        if self.seen != self.fail_at:
            return await statement()
        self.fired = True
        if self.after:
            try:
                await statement()
            except Exception as exc:  # e.g. a unique index refusing the row
                self.natural = exc
                raise
        raise InjectedFailure(f"statement {self.fail_at} ({'after' if self.after else 'before'})")


class FailingStatements:
    """A transaction's statement runner whose statements go through an `Injection`."""

    def __init__(self, inner: _Statements, injection: Injection) -> None:
        self.inner = inner
        self.injection = injection

    @property
    def committed(self) -> bool:
        return self.inner.committed

    @committed.setter
    def committed(self, value: bool) -> None:
        self.inner.committed = value

    async def execute(self, sql: str, params: Sequence[object] = ()) -> int:
        return await self.injection.run(lambda: self.inner.execute(sql, params))

    async def executemany(self, sql: str, rows: Iterable[Sequence[object]]) -> None:
        await self.injection.run(lambda: self.inner.executemany(sql, rows))

    async def fetch_all(self, sql: str, params: Sequence[object] = ()) -> Sequence[_Row]:
        return await self.injection.run(lambda: self.inner.fetch_all(sql, params))

    async def fetch_one(self, sql: str, params: Sequence[object] = ()) -> _Row | None:
        return await self.injection.run(lambda: self.inner.fetch_one(sql, params))


@contextlib.contextmanager
def failing_transactions(db: Database, injection: Injection) -> Iterator[None]:
    """Every write transaction of `db` runs its statements through `injection` meanwhile,
    those opened as a context and those run whole (on SQLite, in the writer's thread)."""
    backend = db._backend
    original = backend.transaction
    original_run = backend.run

    @contextlib.asynccontextmanager
    async def transaction() -> AsyncIterator[_Statements]:
        async with original() as sql:
            yield FailingStatements(sql, injection)

    async def run(body: Callable[[_Statements], Coroutine[Any, Any, T]]) -> T:
        return await original_run(lambda sql: body(FailingStatements(sql, injection)))

    setattr(backend, "transaction", transaction)  # noqa: B010 (instance attributes, undone below)
    setattr(backend, "run", run)  # noqa: B010
    try:
        yield
    finally:
        delattr(backend, "transaction")
        delattr(backend, "run")


# --- the database an operation meets -----------------------------------------------------------


@dataclass(frozen=True)
class UploadSeed:
    status: str
    cleaned: bool


@dataclass(frozen=True)
class DownloadSeed:
    status: str
    node: str | None
    has_gid: bool
    telegram: bool
    uploads: tuple[UploadSeed, ...]


@dataclass
class Seeded:
    """The rows made from a world: ids, and each download's status and gid as seeded."""

    download_ids: list[int] = field(default_factory=list)
    statuses: list[str] = field(default_factory=list)
    gids: list[str | None] = field(default_factory=list)


UPLOAD_SEEDS = st.builds(UploadSeed, st.sampled_from(UPLOAD_STATUSES), st.booleans())
DOWNLOAD_SEEDS = st.builds(
    DownloadSeed,
    st.sampled_from(DOWNLOAD_STATUSES),
    st.sampled_from((None, *NODES)),
    st.booleans(),
    st.booleans(),
    st.lists(UPLOAD_SEEDS, max_size=3).map(tuple),
)
WORLDS = st.lists(DOWNLOAD_SEEDS, min_size=1, max_size=4)


def media(key: str) -> TgMediaRecord:
    return TgMediaRecord(
        file_unique_id=key, file_id=f"id-{key}", chat_id=7, message_id=len(key), media_type="video"
    )


class Harness:
    """One database, one event loop and one peek for a whole property test."""

    def __init__(self, backend: StoreBackend) -> None:
        self.runner = asyncio.Runner()
        self.hub = EventHub()
        self.db: Database = self.runner.run(backend.database(self.hub).open())
        self.peek: Peek = backend.peek
        self.failures = 0  # injected failures checked, over every example

    def close(self) -> None:
        self.runner.run(self.db.close())
        self.runner.close()

    def tables(self) -> list[str]:
        return sorted(self.peek.tables())

    def snapshot(self) -> Snapshot:
        """Every row of every table, in a stable order."""
        return {
            table: sorted(self.peek.fetch(f"SELECT * FROM {table}"), key=repr)
            for table in self.tables()
        }

    def empty(self) -> None:
        """Every table but the bookkeeping emptied (tables referenced by others last)."""
        left = [t for t in self.tables() if t not in BOOKKEEPING]
        for _ in range(len(left) + 1):
            failed: list[str] = []
            for table in left:
                try:
                    self.peek.execute(f"DELETE FROM {table}")
                except Exception:  # a foreign key of a table not emptied yet
                    failed.append(table)
            if not failed:
                return
            left = failed
        raise AssertionError(f"could not empty {left}")

    def seed(self, world: Sequence[DownloadSeed]) -> Seeded:
        self.empty()
        return self.runner.run(self._seed(world))

    async def _seed(self, world: Sequence[DownloadSeed]) -> Seeded:
        seeded = Seeded()
        for number, seed in enumerate(world):
            key = f"m{number}"
            new = NewDownload(
                source_type="telegram" if seed.telegram else "http",
                source_key=f"k{number}",
                file_unique_id=key if seed.telegram else None,
                file_name=f"file{number}.bin",
                group_key="album" if seed.telegram else None,
            )
            download_id = await self.db.create_download(new, media(key) if seed.telegram else None)
            gid = f"{number:016x}" if seed.has_gid else None
            if gid is not None:
                await self.db.mark_download_queued_by_id(download_id, gid)
            for target, upload in enumerate(seed.uploads):
                upload_id = await self.db.create_upload(download_id, f"t{target}", None, 3)
                self.peek.execute(
                    "UPDATE uploads SET status = ?, cleaned_at = ? WHERE id = ?",
                    (upload.status, "2020-01-01T00:00:00Z" if upload.cleaned else None, upload_id),
                )
            self.peek.execute(
                "UPDATE downloads SET status = ?, node = ? WHERE id = ?",
                (seed.status, seed.node, download_id),
            )
            seeded.download_ids.append(download_id)
            seeded.statuses.append(seed.status)
            seeded.gids.append(gid)
        return seeded

    def attempt(self, operation: Operation, injection: Injection | None) -> BaseException | None:
        """Run the operation (with the injection, if any); the exception it ended with."""

        async def run() -> None:
            if injection is None:
                await operation(self.db)
                return
            with failing_transactions(self.db, injection):
                await operation(self.db)

        try:
            self.runner.run(run())
        except Exception as exc:
            return exc
        return None


def differences(before: Snapshot, after: Snapshot) -> dict[str, dict[str, Table]]:
    changed: dict[str, dict[str, Table]] = {}
    for table in sorted(set(before) | set(after)):
        old, new = before.get(table, []), after.get(table, [])
        if old != new:
            changed[table] = {
                "gone": [r for r in old if r not in new],
                "new": [r for r in new if r not in old],
            }
    return changed


def check_atomic(harness: Harness, name: str, operation: Operation) -> int:
    """Fail every statement of `operation` in turn, before and then after it runs; each time
    every table must be as it was and nothing published. The last attempt, with fewer statements
    than the one to fail, runs it whole. Returns its statement count."""
    before = harness.snapshot()
    fail_at = 1
    while True:
        for after in (False, True):
            injection = Injection(fail_at, after)
            published = harness.hub.published
            error = harness.attempt(operation, injection)
            if not injection.fired:  # it ran to its end
                if error is not None:  # refused on its own (a duplicate): nothing changed
                    assert not differences(before, harness.snapshot()), f"{name}: {error!r}"
                return fail_at - 1
            if injection.natural is None:
                assert isinstance(error, InjectedFailure), (
                    f"{name}: the failure at statement {fail_at} ended as {error!r}"
                )
            else:
                assert error is not None, f"{name}: {injection.natural!r} was swallowed"
            changed = differences(before, harness.snapshot())
            assert not changed, (
                f"{name} failing at statement {fail_at} ({'after' if after else 'before'} it"
                f" ran) left changes: {changed}"
            )
            assert harness.hub.published == published, f"{name}: a failed operation published"
            harness.failures += 1
        fail_at += 1
        assert fail_at < 1000, f"{name}: no end in sight"


# --- the operations ------------------------------------------------------------------------------
#
# Each operation: a strategy of its arguments (download positions in the world, not ids: the ids
# are known once it is seeded), the operation they make, and the arguments of an explicit example
# on RICH_WORLD, where each one changes several rows.


@dataclass(frozen=True)
class OperationCase:
    arguments: Callable[[int], st.SearchStrategy[Any]]  # given the number of downloads
    make: Callable[[Any, Seeded], Operation]
    rich: Any  # the arguments of the explicit example


def _create(arguments: tuple[str, str, str | None], seeded: Seeded) -> Operation:
    key, source_key, group_key = arguments
    new = NewDownload(
        source_type="telegram",
        source_key=source_key,
        file_unique_id=key,
        file_name="new.mkv",
        group_key=group_key,
    )
    return lambda db: db.create_download(new, media(key))


Change = tuple[int, bool, str | None, int, bool, bool]
COLUMNS: tuple[dict[str, object], ...] = ({}, {"download_speed": 0}, {"error_code": "gone"})


def _repair(changes: list[Change], seeded: Seeded) -> Operation:
    """The consistency check's repairs; a stale one expects a status the row does not have."""
    made = [
        DownloadChange(
            download_id=seeded.download_ids[position],
            expected_status="failed" if stale else seeded.statuses[position],
            expected_gid=seeded.gids[position],
            reason="repair",
            target=target,
            columns=COLUMNS[columns],
            new_gid=f"{position:015x}f" if new_gid else None,
            cancel_unstarted_uploads=cancel,
        )
        for position, stale, target, columns, new_gid, cancel in changes
    ]
    return lambda db: db.apply_download_changes(made)


def _positions(count: int) -> st.SearchStrategy[int]:
    return st.integers(0, count - 1)


def _changes(count: int) -> st.SearchStrategy[list[Change]]:
    change = st.tuples(
        _positions(count),
        st.integers(0, 4).map(lambda n: n == 0),
        st.sampled_from((None, "downloading", "waiting", "paused", "completed", "failed")),
        st.integers(0, len(COLUMNS) - 1),
        st.booleans(),
        st.booleans(),
    )
    return st.lists(change, min_size=1, max_size=3, unique_by=lambda c: c[0])


def _claim(arguments: tuple[str, int, list[int] | None], seeded: Seeded) -> Operation:
    node, limit, positions = arguments
    ids = None if positions is None else [seeded.download_ids[p] for p in positions]
    return lambda db: db.claim_downloads(node, limit, ids)


NODE = st.sampled_from(NODES)
OPERATIONS: dict[str, OperationCase] = {
    "create_download with media": OperationCase(
        # m0 may be a media row already; k0 may be an active job already (a duplicate).
        lambda count: st.tuples(
            st.sampled_from(("m0", "fresh")),
            st.sampled_from(("k0", "k-new")),
            st.sampled_from((None, "album")),
        ),
        _create,
        ("m1", "k-new", None),
    ),
    "delete_all_downloads": OperationCase(
        lambda count: st.none(), lambda _, seeded: lambda db: db.delete_all_downloads(), None
    ),
    "release_waiting_uploads": OperationCase(
        _positions,
        lambda position, seeded: (
            lambda db: db.release_waiting_uploads(seeded.download_ids[position])
        ),
        0,
    ),
    "mark_download_cleaned_by_id": OperationCase(
        _positions,
        lambda position, seeded: (
            lambda db: db.mark_download_cleaned_by_id(seeded.download_ids[position])
        ),
        0,
    ),
    "apply_download_changes": OperationCase(
        _changes,
        _repair,
        [
            (2, False, "completed", 1, False, True),
            (3, False, "waiting", 0, True, False),
            (1, False, None, 2, False, True),
        ],
    ),
    "requeue_downloads_of_node": OperationCase(
        lambda count: NODE,
        lambda node, seeded: lambda db: db.requeue_downloads_of_node(node, f"{node} went silent"),
        "n1",
    ),
    "claim_downloads": OperationCase(
        lambda count: st.tuples(
            NODE, st.integers(1, 4), st.none() | st.lists(_positions(count), min_size=1)
        ),
        _claim,
        ("n2", 4, None),
    ),
    "fail_uploads_of_node": OperationCase(
        lambda count: NODE,
        lambda node, seeded: lambda db: db.fail_uploads_of_node(node, "its node is gone"),
        "n1",
    ),
}


def upload_seeds(*statuses: str) -> tuple[UploadSeed, ...]:
    return tuple(UploadSeed(status, False) for status in statuses)


RICH_WORLD = [
    DownloadSeed(
        "completed",
        "n1",
        True,
        False,
        upload_seeds("waiting_download", "waiting_download", "pending", "uploading"),
    ),
    DownloadSeed("pending", None, False, True, upload_seeds("waiting_download")),
    DownloadSeed("downloading", "n1", True, False, upload_seeds("paused", "pending")),
    DownloadSeed("paused", "n1", True, False, ()),
    DownloadSeed("pending", None, False, True, ()),
]


@st.composite
def worlds_and_arguments(
    draw: Callable[[st.SearchStrategy[Any]], Any], case: OperationCase
) -> tuple[list[DownloadSeed], Any]:
    world = draw(WORLDS)
    return world, draw(case.arguments(len(world)))


@pytest.fixture
def harness(store_backend: StoreBackend) -> Iterator[Harness]:
    instance = Harness(store_backend)
    try:
        yield instance
    finally:
        instance.close()


@pytest.mark.fault(
    "a statement of a multi-row store operation fails (each statement in turn)",
    promise="every table exactly as before, nothing published",
)
@pytest.mark.parametrize("name", list(OPERATIONS))
def test_a_failure_at_any_statement_leaves_every_table_as_it_was(
    harness: Harness, name: str
) -> None:
    case = OPERATIONS[name]
    most = 0

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    @given(drawn=worlds_and_arguments(case))
    @example(drawn=(RICH_WORLD, case.rich))
    def run(drawn: tuple[list[DownloadSeed], Any]) -> None:
        nonlocal most
        world, arguments = drawn
        seeded = harness.seed(world)
        most = max(most, check_atomic(harness, name, case.make(arguments, seeded)))

    run()
    # Multi-row: an example ran several statements, and each of them failed in turn.
    assert most >= 3, f"{name} never ran more than {most} statements"
    assert harness.failures >= 2 * most


def test_the_check_sees_a_change_left_by_two_transactions(harness: Harness) -> None:
    """The check can fail: two writes in two transactions are not atomic, and a failure in
    the second leaves the first."""
    seeded = harness.seed([DownloadSeed("completed", None, False, False, upload_seeds("pending"))])
    [download_id] = seeded.download_ids

    async def cleaned_then_another_upload(db: Database) -> None:
        await db.mark_download_cleaned_by_id(download_id)
        await db.create_upload(download_id, "late", None, 3)

    with pytest.raises(AssertionError, match="left changes") as caught:
        check_atomic(harness, "two writes", cleaned_then_another_upload)
    assert "'uploads'" in str(caught.value)
