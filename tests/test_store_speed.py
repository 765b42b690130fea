"""The store's paths that must not scan, on both backends (a real SQLite file, a real PostgreSQL
database): the statistics' running totals against a count of every row after a random mix of
operations, the check that finds and repairs their drift, keyset pages of the grouped list that
stay put while rows arrive (through the API too, with its cursor), and many jobs created in one
transaction, all or nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app import check_command
from configer import Config, DatabaseConfig
from db import SCHEMA_VERSION, Database, DuplicateDownload, StoreError
from events import EventHub
from records import DownloadGroup, NewDownload, ProgressUpdate, Statistics, TgMediaRecord
from tests.support.http_files import FileServer
from tests.support.service import ServiceFactory
from tests.support.stores import Peek, StoreBackend
from tests.test_db import make_old_database

TARGETS = ("cloud", "backup")
Op = tuple[Any, ...]
NO_ROW = ("create", "delete_all")  # the operations that need no row to exist


def operations() -> st.SearchStrategy[list[Op]]:
    """Steps on rows picked by position (modulo what exists): every write the store offers that
    moves a status, a size, a speed or a cleaned mark, or adds or removes rows."""
    pick = st.integers(0, 50)
    size = st.integers(0, 10**12)
    one = st.one_of(
        st.tuples(st.just("create"), st.integers(1, 4), size, st.booleans()),
        st.tuples(st.just("queue"), pick),
        st.tuples(st.just("progress"), pick, size, size, st.integers(0, 10**9)),
        st.tuples(st.just("start"), pick),
        st.tuples(st.just("complete"), pick, size),
        st.tuples(st.just("fail"), pick),
        st.tuples(st.just("cancel"), pick),
        st.tuples(st.just("pause"), pick),
        st.tuples(st.just("retry"), pick),
        st.tuples(st.just("upload"), pick, st.sampled_from(TARGETS), st.booleans()),
        st.tuples(st.just("upload_start"), pick, size),
        st.tuples(
            st.just("upload_progress"),
            pick,
            size,
            size,
            st.floats(0, 1e9, allow_nan=False, allow_infinity=False),
        ),
        st.tuples(st.just("upload_done"), pick),
        st.tuples(st.just("upload_fail"), pick),
        st.tuples(st.just("clean"), pick),
        st.tuples(st.just("delete"), pick),
        st.tuples(st.just("delete_all")),
    )
    return st.lists(one, min_size=1, max_size=20)


class Harness:
    """One database and one event loop for a whole property test."""

    def __init__(self, backend: StoreBackend) -> None:
        self.runner = asyncio.Runner()
        self.db: Database = self.runner.run(backend.database(EventHub()).open())
        self.peek = backend.peek
        self.created = 0

    def close(self) -> None:
        self.runner.run(self.db.close())
        self.runner.close()

    def ids(self, table: str) -> list[int]:
        return [int(r[0]) for r in self.peek.fetch(f"SELECT id FROM {table} ORDER BY id")]

    def run(self, ops: list[Op]) -> None:
        for op in ops:
            # Refused (a forbidden transition, a row gone): its transaction rolled back.
            with contextlib.suppress(StoreError):
                self.runner.run(self.apply(op))

    async def apply(self, op: Op) -> None:
        db = self.db
        name, *args = op
        downloads, uploads = self.ids("downloads"), self.ids("uploads")
        download = downloads[args[0] % len(downloads)] if downloads and args else 0
        upload = uploads[args[0] % len(uploads)] if uploads and args else 0
        gid = f"{download:016x}"
        if (name.startswith("upload_") and not upload) or (name not in NO_ROW and not download):
            return  # nothing to apply it to
        if name == "create":
            count, total, repeat = args
            jobs = []
            for _ in range(count):
                self.created += 1
                number = self.created - 1 if repeat else self.created  # a duplicate source
                jobs.append((NewDownload("http", f"http://h/{number}", total_length=total), None))
            await db.create_downloads(jobs)
        elif name == "queue":
            await db.mark_download_queued_by_id(download, gid)
        elif name == "progress":
            await db.update_progress_batch([ProgressUpdate(gid, args[1], args[2], args[3])])
        elif name == "start":
            await db.mark_download_started(gid)
        elif name == "complete":
            await db.mark_download_completed(gid, "/x", args[1])
        elif name == "fail":
            await db.mark_download_failed_by_id(download, "property step")
        elif name == "cancel":
            await db.mark_download_cancelled_by_id(download, "property step")
        elif name == "pause":
            await db.mark_download_paused(gid)
        elif name == "retry":
            await db.reset_download_for_retry(download)
        elif name == "upload":
            await db.create_upload(download, args[1], None, 3, ready=args[2])
        elif name == "upload_start":
            await db.mark_upload_started(upload, args[1])
        elif name == "upload_progress":
            await db.update_upload_progress(upload, args[1], args[2], args[3])
        elif name == "upload_done":
            await db.record_upload_verified(upload, 1, None)
            await db.mark_upload_completed(upload, "remote")
        elif name == "upload_fail":
            await db.mark_upload_failed(upload, "network", "property step")
        elif name == "clean":
            await db.mark_download_cleaned_by_id(download)
        elif name == "delete":
            await db.delete_download_record(download)
        else:
            await db.delete_all_downloads()

    def statistics(self) -> Statistics:
        return self.runner.run(self.db.get_statistics())

    def recount(self, *, repair: bool) -> list[str]:
        return self.runner.run(self.db.recount_totals(repair=repair))


@pytest.fixture
def harness(store_backend: StoreBackend) -> Iterator[Harness]:
    instance = Harness(store_backend)
    try:
        yield instance
    finally:
        instance.close()


def counted(peek: Peek) -> dict[str, Any]:
    """The statistics, counted from every row by plain SQL (no code of the store's)."""
    downloads = {
        str(status): (int(n), int(total), int(speed))
        for status, n, total, speed in peek.fetch(
            "SELECT status, COUNT(*), COALESCE(SUM(total_length), 0),"
            " COALESCE(SUM(download_speed), 0) FROM downloads GROUP BY status"
        )
    }
    by_target: dict[str, dict[str, int]] = {}
    upload_status: dict[str, int] = {}
    upload_bytes = cleaned = 0
    upload_speed = 0.0
    for target, status, n, total, speed, clean in peek.fetch(
        "SELECT upload_target, status, COUNT(*), COALESCE(SUM(total_size), 0),"
        " COALESCE(SUM(upload_speed), 0), COUNT(cleaned_at) FROM uploads"
        " GROUP BY upload_target, status"
    ):
        by_target.setdefault(str(target), {})[str(status)] = int(n)
        upload_status[str(status)] = upload_status.get(str(status), 0) + int(n)
        upload_bytes += int(total)
        upload_speed += float(speed)
        cleaned += int(clean)
    return {
        "downloads": {s: v[0] for s, v in downloads.items()},
        "total_bytes": sum(v[1] for v in downloads.values()),
        "completed_bytes": downloads.get("completed", (0, 0, 0))[1],
        "download_speed": sum(v[2] for v in downloads.values()),
        "uploads": upload_status,
        "by_target": by_target,
        "upload_bytes": upload_bytes,
        "upload_speed": upload_speed,
        "cleaned": cleaned,
        "upload_rows": sum(upload_status.values()),
    }


def assert_statistics_counted(statistics: Statistics, peek: Peek) -> None:
    want = counted(peek)
    downloads, uploads = statistics["downloads"], statistics["uploads"]
    assert {s: n for s, n in downloads["by_status"].items() if n} == want["downloads"]
    assert downloads["total"] == sum(want["downloads"].values())
    assert downloads["total_bytes"] == want["total_bytes"]
    assert downloads["completed_bytes"] == want["completed_bytes"]
    assert downloads["download_speed"] == want["download_speed"]
    assert {s: n for s, n in uploads["by_status"].items() if n} == want["uploads"]
    assert uploads["by_target"] == want["by_target"]
    assert uploads["total_bytes"] == want["upload_bytes"]
    assert uploads["cleaned"] == want["cleaned"]
    # Speeds are summed as whole bytes/s: each row's speed rounded, at most 0.5 off a row.
    assert abs(uploads["upload_speed"] - want["upload_speed"]) <= 0.5 * want["upload_rows"]


def test_running_totals_equal_a_count_of_every_row_after_any_mix_of_writes(
    harness: Harness,
) -> None:
    examples = 0

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(ops=operations())
    def run(ops: list[Op]) -> None:
        nonlocal examples
        examples += 1
        harness.run(ops)
        assert_statistics_counted(harness.statistics(), harness.peek)
        assert harness.recount(repair=False) == []

    run()
    assert examples == 60
    assert harness.created > 0


def test_the_recount_finds_and_repairs_drift(harness: Harness) -> None:
    harness.run([("create", 3, 1000, False), ("queue", 0), ("start", 0), ("complete", 0, 2000)])
    harness.run([("upload", 0, "cloud", True), ("upload_start", 0, 1000), ("upload_done", 0)])
    harness.run([("clean", 0), ("queue", 1), ("progress", 1, 10, 1000, 5)])
    right = harness.statistics()
    assert right["downloads"]["by_status"]["completed"] == 1
    assert right["downloads"]["download_speed"] == 5
    assert right["uploads"]["cleaned"] == 1
    # Totals changed behind the store's back (as a hand edit or a bug would leave them).
    harness.peek.execute(
        "UPDATE store_totals SET items = items + 5, bytes = bytes - 7"
        " WHERE entity = 'download' AND status = 'completed'"
    )
    harness.peek.execute("DELETE FROM store_totals WHERE entity = 'upload'")
    harness.peek.execute(
        "INSERT INTO store_totals (entity, target, status, items, bytes, speed, cleaned)"
        " VALUES ('download', '', 'failed', 1, 0, 0, 0)"
    )
    assert harness.statistics() != right
    drift = harness.recount(repair=False)
    assert drift == [
        "statistics of downloads in completed: kept 6 rows, 1993 bytes, 0 B/s, counted 1 rows,"
        " 2000 bytes, 0 B/s",
        "statistics of downloads in failed: kept 1 rows, 0 bytes, 0 B/s, counted 0 rows,"
        " 0 bytes, 0 B/s",
        "statistics of uploads to cloud in completed: kept 0 rows, 0 bytes, 0 B/s, 0 cleaned,"
        " counted 1 rows, 1000 bytes, 0 B/s, 1 cleaned",
    ]
    assert harness.recount(repair=False) == drift  # a dry run changes nothing
    assert harness.recount(repair=True) == drift
    assert harness.recount(repair=False) == []
    assert harness.statistics() == right
    assert_statistics_counted(right, harness.peek)


async def test_check_command_reports_and_repairs_drift_of_the_statistics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = Config()
    config = replace(
        base,
        database=DatabaseConfig(path=tmp_path / "data" / "mistrelay.db"),
        aria2=replace(base.aria2, download_dir=tmp_path / "downloads"),
    )
    async with Database(config.database.path) as db:
        jobs = [(NewDownload("http", f"http://h/{i}"), None) for i in range(4)]
        for download_id in await db.create_downloads(jobs):
            assert isinstance(download_id, int)
            await db.mark_download_failed_by_id(download_id, "test")
    async with Database(config.database.path) as db, db._write() as tx:
        await tx.execute("UPDATE store_totals SET items = 9 WHERE status = 'failed'")
    assert await check_command(config, fix=False) == 1
    printed = capsys.readouterr().out
    assert "statistics of downloads in failed: kept 9 rows" in printed
    assert "counted 4 rows" in printed
    assert "Dry run: nothing was changed" in printed
    assert "  statistics: replaced by a recount of every row" in printed
    assert await check_command(config, fix=True) == 1
    assert "Changed:\n  statistics: replaced by a recount of every row" in capsys.readouterr().out
    assert await check_command(config, fix=False) == 0
    assert "No mismatches" in capsys.readouterr().out


# --- keyset pages of the grouped list ----------------------------------------------------------


def media(number: int, album: str) -> TgMediaRecord:
    return TgMediaRecord(
        file_unique_id=f"U{number}",
        file_id=f"F{number}",
        chat_id=-100,
        message_id=number,
        media_type="video",
        file_name=f"{number}.mp4",
        media_group_id=album,
    )


def telegram(number: int, album: str) -> tuple[NewDownload, TgMediaRecord]:
    new = NewDownload(
        "telegram", f"tg:U{number}", file_unique_id=f"U{number}", group_key=f"album:{album}"
    )
    return new, media(number, album)


def keys(groups: list[DownloadGroup]) -> list[str]:
    return [g.group_key for g in groups]


async def all_pages(
    db: Database, limit: int, status: str | None = None
) -> list[list[DownloadGroup]]:
    pages: list[list[DownloadGroup]] = []
    before: int | None = None
    while True:
        page = await db.fetch_downloads_grouped(limit, status=status, before=before)
        if not page:
            return pages
        pages.append(page)
        before = max(d.id for d in page[-1].downloads)


async def test_keyset_pages_cover_every_group_once_and_stay_put_while_rows_arrive(
    store_backend: StoreBackend,
) -> None:
    async with store_backend.database() as db:
        jobs: list[tuple[NewDownload, TgMediaRecord | None]] = []
        for n in range(30):
            if n % 3 == 0:  # an album of three, interleaved with links
                jobs += [telegram(n * 10 + k, f"A{n}") for k in range(3)]
            jobs.append((NewDownload("http", f"http://h/{n}"), None))
        await db.create_downloads(jobs)
        everything = await db.fetch_downloads_grouped(-1)
        assert len(everything) == 40
        pages = await all_pages(db, 7)
        assert [len(p) for p in pages] == [7, 7, 7, 7, 7, 5]
        assert [g for page in pages for g in page] == everything  # the same order, once each

        # Rows arrive (new links, and a new member of an album on page 4): the pages after the
        # first move neither forwards nor back.
        first = await db.fetch_downloads_grouped(7)
        before = max(d.id for d in first[-1].downloads)
        second = await db.fetch_downloads_grouped(7, before=before)
        album = next(g for g in pages[3] if g.group_key.startswith("album:"))
        await db.create_downloads(
            [(NewDownload("http", f"http://new/{n}"), None) for n in range(5)]
            + [telegram(999, album.group_key.removeprefix("album:"))]
        )
        assert await db.fetch_downloads_grouped(7, before=before) == second
        now = await db.fetch_downloads_grouped(-1)
        assert now[0].group_key == album.group_key  # the album moved up: its newest is new
        assert now[1:6] == (await db.fetch_downloads_grouped(6))[1:]
        later = max(d.id for d in pages[2][-1].downloads)
        after = await db.fetch_downloads_grouped(-1, before=later)
        assert album.group_key not in keys(after)  # shown above, not again below
        assert keys(after) == [k for k in keys(everything) if k in keys(after)]

        # One status: pages through downloads_by_status.
        for job in everything[::4]:
            await db.mark_download_failed_by_id(job.downloads[-1].id, "test")
        failed = await db.fetch_downloads_grouped(-1, status="failed")
        assert len(failed) == 10
        pages = await all_pages(db, 3, status="failed")
        assert [g for page in pages for g in page] == failed
        assert all(d.status == "failed" for g in failed for d in g.downloads)


async def test_grouped_list_api_pages_with_an_opaque_cursor(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    svc = await service_factory()
    for n in range(5):
        file_server.add_file(f"{n}.bin", size=1000)
    urls = [file_server.url(f"{n}.bin") for n in range(5)] + [file_server.url("0.bin")]
    status, answer = await svc.api("POST", "/api/downloads", json={"urls": urls})
    assert status == 201, answer
    assert len(answer["downloads"]) == 5
    # The same link twice in one call: created once, the second is its duplicate.
    created = [d["id"] for d in answer["downloads"]]
    assert answer["duplicates"] == [{"url": urls[0], "existing_id": created[0]}]
    seen: list[int] = []
    cursor = ""
    answers = []
    while True:
        status, answer = await svc.api("GET", f"/api/downloads?grouped=true&limit=2{cursor}")
        assert status == 200, answer
        answers.append(answer)
        seen += [d["id"] for g in answer["groups"] for d in g["downloads"]]
        if answer["next_cursor"] is None:
            break
        assert isinstance(answer["next_cursor"], str)
        cursor = f"&cursor={answer['next_cursor']}"
    assert seen == sorted(created, reverse=True)
    assert [len(a["groups"]) for a in answers] == [2, 2, 1]

    for bad in ("x", "Zm9v", "ZzEuLjA", "%00", "a" * 80, answers[0]["next_cursor"] + "A"):
        status, answer = await svc.api("GET", f"/api/downloads?grouped=true&cursor={bad}")
        assert status == 400, (bad, answer)
        assert "cursor" in str(answer), answer
    # A cursor of one list is refused by another (another status filter).
    status, answer = await svc.api(
        "GET", f"/api/downloads?grouped=true&status=failed&cursor={answers[0]['next_cursor']}"
    )
    assert status == 400 and "belongs to the list of status any" in str(answer), answer


# --- many jobs in one transaction -----------------------------------------------------------------


async def test_many_jobs_in_one_transaction_and_one_event_batch(
    store_backend: StoreBackend, peek: Peek
) -> None:
    hub = EventHub()
    subscription = hub.subscribe("test", maxsize=1000)
    async with store_backend.database(hub) as db:
        existing = await db.create_download(NewDownload("http", "http://h/taken"))
        while len(subscription):
            await subscription.get()
        jobs: list[tuple[NewDownload, TgMediaRecord | None]] = [
            (NewDownload("http", f"http://h/{n}"), None) for n in range(200)
        ]
        jobs.insert(50, (NewDownload("http", "http://h/taken"), None))
        jobs.insert(80, (NewDownload("http", "http://h/7"), None))  # twice in the batch
        jobs += [telegram(n, "album-1") for n in range(10)]
        answers = await db.create_downloads(jobs)
        assert isinstance(answers[50], DuplicateDownload) and answers[50].existing_id == existing
        created = [a for a in answers if isinstance(a, int)]
        assert isinstance(answers[80], DuplicateDownload)
        assert answers[80].existing_id == created[7]
        assert len(created) == 210 and created == sorted(created)
        assert peek.count("tg_media") == 10
        groups = {r[0] for r in peek.fetch("SELECT group_key FROM downloads WHERE id > ?", (1,))}
        assert "album:album-1" in groups and f"download:{created[0]}" in groups
        assert peek.count("status_history") == 211
        events = [await subscription.get() for _ in range(len(subscription))]
        assert [e.item_id for e in events if e.kind == "download"] == created  # in order
        assert (await db.get_statistics())["downloads"]["by_status"]["pending"] == 211


async def test_a_failing_batch_leaves_no_row(store_backend: StoreBackend, peek: Peek) -> None:
    async with store_backend.database() as db:
        before = peek.count("downloads"), peek.count("tg_media"), peek.count("status_history")
        bad_owner = NewDownload("http", "http://h/bad", owner_id=2**70)  # no 64-bit integer
        jobs: list[tuple[NewDownload, TgMediaRecord | None]] = [
            telegram(1, "x"),
            (NewDownload("http", "http://h/good"), None),
            (bad_owner, None),
        ]
        with pytest.raises(Exception) as raised:
            await db.create_downloads(jobs)
        assert not isinstance(raised.value, AssertionError)
        after = peek.count("downloads"), peek.count("tg_media"), peek.count("status_history")
        assert after == before
        with pytest.raises(StoreError, match="unknown source type 'gopher'"):
            gopher = NewDownload("gopher", "gopher://h/")  # type: ignore[arg-type]
            await db.create_downloads([(gopher, None)])
        assert (await db.get_statistics())["downloads"]["total"] == 0
        assert await db.recount_totals(repair=False) == []


async def test_jobs_handed_over_together_are_queued_in_one_transaction(
    store_backend: StoreBackend, peek: Peek
) -> None:
    hub = EventHub()
    subscription = hub.subscribe("test", maxsize=100)
    async with store_backend.database(hub) as db:
        jobs: list[tuple[NewDownload, TgMediaRecord | None]] = [
            (NewDownload("http", f"http://h/{n}"), None) for n in range(3)
        ]
        ids = [i for i in await db.create_downloads(jobs) if isinstance(i, int)]
        await db.mark_download_cancelled_by_id(ids[1], "cancelled before aria2 answered")
        while len(subscription):
            await subscription.get()
        queued = await db.mark_downloads_queued([(i, f"gid-{i}") for i in ids])
        assert queued == [ids[0], ids[2]]
        rows = [await db.get_download_by_id(i) for i in ids]
        assert [(r.status, r.gid) for r in rows if r] == [
            ("waiting", f"gid-{ids[0]}"),
            ("cancelled", f"gid-{ids[1]}"),  # its gid kept: aria2 has the job
            ("waiting", f"gid-{ids[2]}"),
        ]
        events = [await subscription.get() for _ in range(len(subscription))]
        assert [e.item_id for e in events if e.kind == "download"] == ids
        assert (await db.get_statistics())["downloads"]["by_status"]["waiting"] == 2
        assert await db.recount_totals(repair=False) == []


async def test_jobs_given_their_gids_are_recorded_queued_in_one_transaction(
    store_backend: StoreBackend, peek: Peek
) -> None:
    hub = EventHub()
    subscription = hub.subscribe("test", maxsize=100)
    async with store_backend.database(hub) as db:
        existing = await db.create_download(NewDownload("http", "http://h/taken"))
        while len(subscription):
            await subscription.get()
        history_before = peek.count("status_history")
        jobs: list[tuple[NewDownload, TgMediaRecord | None]] = [
            (NewDownload("http", "http://h/a"), None),
            (NewDownload("http", "http://h/taken"), None),
            telegram(1, "album-q"),
        ]
        answers = await db.create_downloads(jobs, gids=["a" * 16, "b" * 16, "c" * 16])
        assert isinstance(answers[1], DuplicateDownload) and answers[1].existing_id == existing
        first, _, third = answers
        assert isinstance(first, int) and isinstance(third, int)
        rows = [await db.get_download_by_id(i) for i in (first, third)]
        assert [(r.status, r.gid) for r in rows if r] == [
            ("waiting", "a" * 16),
            ("waiting", "c" * 16),
        ]
        # The duplicate's gid was never recorded; each new job's is, with both of its steps.
        assert sorted(r[0] for r in peek.fetch("SELECT gid FROM download_gids")) == [
            "a" * 16,
            "c" * 16,
        ]
        assert await db.get_download_id_by_gid("b" * 16) is None
        assert peek.count("status_history") == history_before + 4
        assert [
            (h.from_status, h.to_status) for h in await db.get_status_history("download", first)
        ] == [
            (None, "pending"),
            ("pending", "waiting"),
        ]
        # No event ever showed a new job pending: its first one shows it queued.
        events = [await subscription.get() for _ in range(len(subscription))]
        shown = [(e.item_id, e.data.row.status) for e in events if e.kind == "download"]
        assert shown == [(first, "waiting"), (third, "waiting")]
        assert (await db.get_statistics())["downloads"]["by_status"]["waiting"] == 2
        assert await db.recount_totals(repair=False) == []
        # A gid already taken refuses the whole batch.
        downloads_before = peek.count("downloads")
        with pytest.raises(StoreError, match="the gid chosen is taken"):
            await db.create_downloads(
                [
                    (NewDownload("http", "http://h/x"), None),
                    (NewDownload("http", "http://h/y"), None),
                ],
                gids=["d" * 16, "a" * 16],
            )
        assert peek.count("downloads") == downloads_before
        with pytest.raises(ValueError, match="1 gids for 2 jobs"):
            await db.create_downloads(
                [
                    (NewDownload("http", "http://h/x"), None),
                    (NewDownload("http", "http://h/y"), None),
                ],
                gids=["d" * 16],
            )


async def test_schema_5_is_migrated_with_its_totals_counted(
    store_backend: StoreBackend, peek: Peek
) -> None:
    await make_old_database(store_backend, 5)
    async with store_backend.database() as db:
        assert await db.schema_version() == SCHEMA_VERSION
        assert await db.recount_totals(repair=False) == []
        statistics = await db.get_statistics()
        assert statistics["downloads"]["by_status"]["completed"] == 1
        assert statistics["uploads"]["by_target"] == {
            "waits": {"pending": 1},
            "final": {"failed": 1},
            "runs": {"uploading": 1},
        }
        assert_statistics_counted(statistics, peek)
        await db.mark_upload_failed(3, "network", "after the migration")
        assert await db.recount_totals(repair=False) == []
