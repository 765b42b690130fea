"""The whole service on PostgreSQL, end to end: real aria2c, the web server, a WebSocket client,
a loopback file server and the session's throwaway PostgreSQL server, all on 127.0.0.1.

`database.url` carries a password (the throwaway server trusts every local connection, so it
connects all the same): it must never show in an answer, a log line or the stored settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from app import configure_logging
from tests.support.http_files import MIB, FileServer
from tests.support.postgres import PostgresServer
from tests.support.service import RunningService, ServiceFactory
from tests.support.service_process import APP_SCRIPT, PROJECT_ROOT, clean_environment
from tests.test_engine_api import add_link, fetch, path_exists, read_file, settled

pytestmark = pytest.mark.slow

WAIT = 60.0
PASSWORD = f"s3cret-pass-{secrets.token_hex(8)}"  # unreserved characters: the same URL-encoded


# --- fixtures and helpers -----------------------------------------------------------------------


@pytest.fixture
def database(postgres_url: str) -> tuple[str, str]:
    """(database.url with PASSWORD in it, the same URL as the service must show it)."""
    parts = urlsplit(postgres_url)
    server = f"{parts.hostname}:{parts.port}"
    return (
        f"postgresql://{parts.username}:{PASSWORD}@{server}{parts.path}",
        f"postgresql://{parts.username}:***@{server}{parts.path}",
    )


@pytest.fixture
def overrides(database: tuple[str, str]) -> dict[str, Any]:
    """Ask for it before `service_factory`: fixtures end newest first, so the database is then
    dropped after the services stopped (not under a running pool, which would keep retrying)."""
    return {"database": {"url": database[0]}}


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Listed before capfd, this tears down after it: the service pointed loguru at the capture,
    so logging goes back to pytest's stream instead of the closed capture."""
    yield
    configure_logging("DEBUG")


async def start(service_factory: ServiceFactory, **kwargs: Any) -> RunningService:
    """A service on the PostgreSQL database, its poller past the start-up reconnect."""
    svc = await settled(await service_factory(**kwargs))
    # Really on PostgreSQL: no SQLite file appears in the data folder.
    assert not await path_exists(svc.config.database.path)
    return svc


async def psql(server: PostgresServer, url: str, sql: str) -> list[list[str]]:
    """Rows of `sql` in the database of `url`, read by psql (another client, as a person would)."""
    name = urlsplit(url).path.lstrip("/")
    out = await asyncio.to_thread(server.execute, sql, name)
    return [line.split("|") for line in out.splitlines() if line]


async def completed_download(
    svc: RunningService, file_server: FileServer, name: str, size: int
) -> tuple[dict[str, Any], bytes]:
    data = file_server.add_file(name, size=size, seed=size % 89)
    row = await add_link(svc, file_server.url(name))
    done = await svc.wait_download(row["id"], ["completed", "failed", "cancelled"], timeout=WAIT)
    assert done["status"] == "completed", done
    return done, data


async def receive(ws: aiohttp.ClientWebSocketResponse, timeout: float = 10) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return dict(json.loads(message.data))


async def pushed_for(
    ws: aiohttp.ClientWebSocketResponse, download_id: int, until: dict[str, Any]
) -> dict[str, Any]:
    """The last `download_update` data for `download_id` once one matches every item of `until`
    and the push has been quiet for a second (anything later about the row is kept too)."""
    last: dict[str, Any] = {}
    deadline = time.monotonic() + WAIT
    while not until.items() <= last.items():
        assert time.monotonic() < deadline, f"no download_update matching {until}; last {last}"
        message = await receive(ws)
        if message["type"] == "download_update" and message["data"].get("id") == download_id:
            last = message["data"]
    with contextlib.suppress(TimeoutError):
        while True:
            message = await receive(ws, timeout=1.0)
            if message["type"] == "download_update" and message["data"].get("id") == download_id:
                last = message["data"]
    return last


def is_subsequence(wanted: Sequence[str], seen: Sequence[str]) -> bool:
    remaining = iter(seen)
    return all(step in remaining for step in wanted)


def assert_unbroken(history: list[dict[str, Any]]) -> list[str]:
    """The history starts as `pending` and each step leaves the status the previous one reached;
    returns the statuses in order."""
    assert history[0]["from"] is None and history[0]["to"] == "pending", history
    for before, after in itertools.pairwise(history):
        assert after["from"] == before["to"], history
    assert all(step["at"] for step in history), history
    return [step["to"] for step in history]


# --- one download, from the link to deletion ----------------------------------------------------


async def test_a_download_end_to_end_on_postgresql(
    overrides: dict[str, Any],
    service_factory: ServiceFactory,
    database: tuple[str, str],
    postgres_server: PostgresServer,
    file_server: FileServer,
) -> None:
    svc = await start(service_factory, overrides=overrides)
    ws = await svc.http.ws_connect(
        svc.base_url.replace("http://", "ws://", 1) + "/api/ws", headers=svc.auth
    )
    try:
        assert (await receive(ws))["type"] == "hello"
        data = file_server.add_file("pg movie.bin", size=3 * MIB + 17, seed=7)
        added = await add_link(svc, file_server.url("pg movie.bin"))
        download_id = added["id"]
        pushed = await pushed_for(ws, download_id, {"status": "completed"})

        # The pushed completion is exactly the row of the list.
        status, listed = await svc.api("GET", "/api/downloads")
        assert status == 200, listed
        (row,) = [d for d in listed["downloads"] if d["id"] == download_id]
        assert pushed == row
        assert row["status"] == "completed" and row["actions"] == []
        assert row["total_length"] == row["completed_length"] == len(data)
        assert row["stream_url"] and row["watch_url"]

        # The detail adds an unbroken history from pending to completed.
        done = await svc.wait_download(download_id, ["completed"], timeout=5)
        assert {k: v for k, v in done.items() if k != "history"} == row
        statuses = assert_unbroken(done["history"])
        assert statuses[-1] == "completed" and "downloading" in statuses, statuses

        # The grouped list holds the same row, with its actions.
        status, grouped = await svc.api("GET", "/api/downloads?grouped=true")
        assert status == 200, grouped
        in_groups = [d for g in grouped["groups"] for d in g["downloads"]]
        assert in_groups == [row]

        # The rows are in PostgreSQL, as another client reads them.
        stored = f"SELECT status, local_path FROM downloads WHERE id = {download_id}"
        assert await psql(postgres_server, database[0], stored) == [
            ["completed", row["local_path"]]
        ]
        steps = (
            "SELECT to_status FROM status_history"
            f" WHERE entity = 'download' AND entity_id = {download_id} ORDER BY id"
        )
        assert [s for (s,) in await psql(postgres_server, database[0], steps)] == statuses

        # The signed link serves the bytes, whole and in a range, without the API token.
        status, headers, body = await fetch(svc, row["stream_url"])
        assert status == 200 and body == data
        assert int(headers["Content-Length"]) == len(data)
        status, headers, body = await fetch(
            svc, row["stream_url"], headers={"Range": f"bytes={MIB - 5}-{2 * MIB + 4}"}
        )
        assert status == 206, headers
        assert body == data[MIB - 5 : 2 * MIB + 5]
        assert headers["Content-Range"] == f"bytes {MIB - 5}-{2 * MIB + 4}/{len(data)}"
        status, headers, body = await fetch(svc, row["stream_url"], headers={"Range": "bytes=-17"})
        assert status == 206 and body == data[-17:]

        # Deleted with its file: the row, the file and the job folder are gone, and it is pushed.
        local = Path(row["local_path"])
        assert await read_file(local) == data
        status, answer = await svc.api("DELETE", f"/api/downloads/{download_id}?delete_file=true")
        assert status == 200, answer
        assert answer == {"deleted": download_id, "file_deleted": True}
        assert not await path_exists(local)
        assert not await path_exists(svc.config.aria2.download_dir / str(download_id))
        assert await pushed_for(ws, download_id, {"deleted": True}) == {
            "id": download_id,
            "deleted": True,
        }
        status, _ = await svc.api("GET", f"/api/downloads/{download_id}")
        assert status == 404
        count = f"SELECT count(*) FROM downloads WHERE id = {download_id}"
        assert await psql(postgres_server, database[0], count) == [["0"]]
        status, _, _ = await fetch(svc, row["stream_url"])
        assert status == 404
    finally:
        await ws.close()


async def test_pause_resume_cancel_retry_through_the_api(
    overrides: dict[str, Any], service_factory: ServiceFactory, file_server: FileServer
) -> None:
    svc = await start(service_factory, overrides=overrides)
    data = file_server.add_file("slow.bin", size=MIB, seed=11)
    row = await add_link(svc, file_server.url("slow.bin", route="slow", rate=256 * 1024))
    download_id = row["id"]

    async def moving(above: int = 0) -> dict[str, Any]:
        deadline = time.monotonic() + WAIT
        while True:
            now = await svc.wait_download(download_id, ["downloading"], timeout=WAIT)
            if now["completed_length"] > above:
                return now
            assert time.monotonic() < deadline, now
            await asyncio.sleep(0.05)

    async def act(action: str, statuses: set[str], actions: list[str]) -> dict[str, Any]:
        status, answer = await svc.api("POST", f"/api/downloads/{download_id}/{action}")
        assert status == 200, (action, answer)
        assert answer["id"] == download_id
        assert answer["status"] in statuses, (action, answer)
        assert answer["actions"] == actions, (action, answer)
        return dict(answer)

    await moving()
    paused = await act("pause", {"paused"}, ["resume", "cancel"])
    await asyncio.sleep(1.0)  # several poller cycles: it stays paused and gets no bytes
    still = await svc.wait_download(download_id, ["paused"], timeout=1)
    assert still["completed_length"] < len(data)
    status, again = await svc.api("POST", f"/api/downloads/{download_id}/pause")
    assert status == 409, again

    await act("resume", {"waiting", "downloading"}, ["pause", "cancel"])
    resumed = await moving(above=still["completed_length"])
    assert resumed["completed_length"] < len(data), "the slow download ended before its cancel"

    cancelled = await act("cancel", {"cancelled"}, ["retry"])
    assert cancelled["stream_url"] is None
    await asyncio.sleep(1.0)
    assert (await svc.wait_download(download_id, ["cancelled"], timeout=1))["status"] == (
        "cancelled"
    )

    await act("retry", {"pending", "waiting", "downloading"}, ["pause", "cancel"])
    done = await svc.wait_download(download_id, ["completed", "failed"], timeout=WAIT)
    assert done["status"] == "completed", done
    assert done["actions"] == [] and done["error_message"] is None
    assert await read_file(done["local_path"]) == data
    assert done["gid"] != paused["gid"]
    statuses = assert_unbroken(done["history"])
    wanted = ["pending", "downloading", "paused", "downloading", "cancelled", "pending"]
    assert is_subsequence([*wanted, "downloading", "completed"], statuses), statuses
    assert statuses[-1] == "completed"


# --- the password -------------------------------------------------------------------------------


async def test_the_database_password_never_shows(
    overrides: dict[str, Any],
    service_factory: ServiceFactory,
    database: tuple[str, str],
    postgres_server: PostgresServer,
    file_server: FileServer,
    restore_logging: None,
    capfd: pytest.CaptureFixture[str],
) -> None:
    svc = await start(service_factory, overrides=overrides)
    answers: dict[str, str] = {}
    for path in ("/api/config", "/api/health", "/api/downloads/statistics"):
        async with svc.http.get(svc.base_url + path, headers=svc.auth) as response:
            assert response.status == 200, path
            answers[path] = await response.text()
    done, _ = await completed_download(svc, file_server, "secret.bin", 200_000)
    failing = await add_link(svc, file_server.status_url(500))
    failed = await svc.wait_download(failing["id"], ["failed"], timeout=WAIT)
    answers["failed"] = str(failed)
    status, reloaded = await svc.api("POST", "/api/config/reload")
    assert status == 200, reloaded
    status, settings = await svc.api("GET", "/api/config")
    assert status == 200
    # The effective URL is shown, with *** for its password.
    assert settings["settings"]["database.url"] == database[1]
    answers["/api/config"] += str(settings)
    status, detail = await svc.api("GET", f"/api/downloads/{done['id']}")
    answers["detail"] = str(detail)
    await svc.stop()
    captured = capfd.readouterr()
    logged = captured.err + captured.out

    for where, text in answers.items():
        assert PASSWORD not in text, f"the password in {where}"
    assert "configuration reloaded" in logged and "MistRelay stopped" in logged, logged
    # The log names the database (masked), so an unmasked URL would have shown here.
    assert f"database {database[1]} migrated" in logged
    assert PASSWORD not in logged
    # Nor is it stored: no table of the database holds it.
    tables = await psql(
        postgres_server, database[0], "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
    )
    assert ["config_settings"] in tables
    for (table,) in tables:
        rows = await psql(postgres_server, database[0], f"SELECT t::text FROM {table} t")
        assert not any(PASSWORD in "|".join(r) for r in rows), table


# --- a restart, then the consistency check ------------------------------------------------------


async def test_a_restart_keeps_the_rows_and_the_check_agrees(
    overrides: dict[str, Any], service_factory: ServiceFactory, file_server: FileServer
) -> None:
    first = await start(service_factory, overrides=overrides)
    done, data = await completed_download(first, file_server, "kept.bin", 300_000)
    await first.service.parts.media.wait_idle()  # nothing changes the row after this read
    status, before = await first.api("GET", "/api/downloads")
    assert status == 200
    await first.stop()

    again = await start(service_factory, config_path=first.config_path)
    status, after = await again.api("GET", "/api/downloads")
    assert status == 200, after
    assert after == before  # same id, status, links and times
    assert [d["id"] for d in after["downloads"]] == [done["id"]]
    assert await read_file(done["local_path"]) == data
    later, _ = await completed_download(again, file_server, "later.bin", 100_000)
    assert later["id"] > done["id"]

    # `app.py check` on the same config, as its own process beside the running service.
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(APP_SCRIPT), "--config", str(first.config_path), "check"],
        cwd=PROJECT_ROOT,
        env=clean_environment(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "aria2: compared" in output and "No mismatches" in output, output
    assert PASSWORD not in output
