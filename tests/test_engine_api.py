"""The engine end to end through its HTTP API: a real service, its own aria2c, a real HTTP peer."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from loguru import logger

from aria2_client.transport import Aria2RpcError
from tests.support.http_files import MIB, FileServer
from tests.support.processes import free_port
from tests.support.service import RunningService, ServiceFactory
from tests.support.sessions import stored_session
from webstreamer.signing import SESSION_COOKIE, LinkSigner

WAIT = 60.0  # generous upper bound for any download in these tests
FINAL = ("completed", "failed", "cancelled")

# Every /api route but /api/health (the id 1 need not exist: auth comes first).
PROTECTED_ROUTES: list[tuple[str, str]] = [
    ("GET", "/api/downloads"),
    ("POST", "/api/downloads"),
    ("DELETE", "/api/downloads"),
    ("POST", "/api/downloads/torrent"),
    ("GET", "/api/downloads/statistics"),
    ("GET", "/api/downloads/1"),
    ("DELETE", "/api/downloads/1"),
    ("POST", "/api/downloads/1/pause"),
    ("POST", "/api/downloads/1/resume"),
    ("POST", "/api/downloads/1/retry"),
    ("POST", "/api/downloads/1/cancel"),
    ("PUT", "/api/downloads/1/files"),
    ("POST", "/api/config/reload"),
    ("GET", "/api/config"),
    ("GET", "/api/no-such-route"),
]


# --- helpers (shared with the other engine test modules) ----------------------------------------


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = WAIT, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def add_links(svc: RunningService, *urls: str) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"url": urls[0]} if len(urls) == 1 else {"urls": list(urls)}
    status, answer = await svc.api("POST", "/api/downloads", json=body)
    assert status == 201, answer
    assert len(answer["downloads"]) == len(urls)
    return list(answer["downloads"])


async def add_link(svc: RunningService, url: str) -> dict[str, Any]:
    return (await add_links(svc, url))[0]


async def row_count(svc: RunningService) -> int:
    status, body = await svc.api("GET", "/api/downloads?limit=1000")
    assert status == 200, body
    return len(body["downloads"])


async def fetch(
    svc: RunningService, url: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A request without the API token (signed links must stand on their own)."""
    if url.startswith("/"):
        url = svc.base_url + url
    async with svc.http.request(method, url, headers=headers or {}) as response:
        return response.status, dict(response.headers), await response.read()


async def read_file(path: str | Path) -> bytes:
    return await asyncio.to_thread(Path(path).read_bytes)


async def path_exists(path: str | Path) -> bool:
    return await asyncio.to_thread(Path(path).exists)


async def file_size(path: str | Path | None) -> int:
    """The size of a file, -1 when there is none."""
    if not path:
        return -1
    try:
        return (await asyncio.to_thread(Path(path).stat)).st_size
    except FileNotFoundError:
        return -1


def job_files(svc: RunningService, download_id: int) -> list[Path]:
    folder = svc.config.aria2.download_dir / str(download_id)
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


async def aria2_knows(svc: RunningService, gid: str) -> bool:
    try:
        await svc.service.parts.engine.downloads.aria2.tell_status(gid)
    except Aria2RpcError as exc:
        assert exc.is_not_found, exc
        return False
    return True


async def aria2_state(svc: RunningService, gid: str) -> str:
    return (await svc.service.parts.engine.downloads.aria2.tell_status(gid)).status


def signer_of(svc: RunningService) -> LinkSigner:
    return svc.service.parts.web.ctx.links.signer


def edit_config(svc: RunningService, change: Callable[[dict[str, Any]], None]) -> None:
    document = yaml.safe_load(svc.config_path.read_text())
    change(document)
    svc.config_path.write_text(yaml.safe_dump(document, sort_keys=False))


# --- fixtures -----------------------------------------------------------------------------------


async def settled(svc: RunningService) -> RunningService:
    """Wait until the poller has run after the start-up reconnect (its wake-up is spent).

    Stopping a service while that wake-up is in flight hits the poller stop bug (see
    test_poller_stops_when_woken_at_the_same_moment); waiting here keeps the other tests clear.
    """
    poller = svc.service.parts.engine.poller
    assert poller is not None

    async def cycled() -> bool:
        return poller.cycles >= 2

    await wait_until(cycled, timeout=15, what="two poller cycles")
    await asyncio.sleep(0.05)
    return svc


@pytest.fixture
async def svc(service_factory: ServiceFactory) -> RunningService:
    return await settled(await service_factory())


# --- stopping ----------------------------------------------------------------------------------


async def test_poller_stops_when_woken_at_the_same_moment(svc: RunningService) -> None:
    poller = svc.service.parts.engine.poller
    assert poller is not None
    task = poller._task
    assert task is not None
    poller.wake()
    # Poller.stop suppresses CancelledError around `await task`, so a bound on it would also be
    # swallowed: bound the wait on the task itself.
    stopping = asyncio.ensure_future(poller.stop())
    done, _ = await asyncio.wait({task}, timeout=5)
    assert task in done, "the poller task was still running 5 s after Poller.stop()"
    await stopping


# --- authentication -----------------------------------------------------------------------------


async def test_health_is_public_and_holds_no_secret(svc: RunningService) -> None:
    async with svc.http.get(svc.base_url + "/api/health") as response:
        assert response.status == 200
        text = await response.text()
        body = await response.json()
    assert body["status"] == "ok"
    assert body["aria2"] == "connected"
    assert body["version"]
    secrets = svc.service.parts.secrets
    assert secrets is not None
    for secret in (secrets.web_token, secrets.aria2_secret, secrets.link_key.hex()):
        assert secret not in text
    assert "token" not in text.lower()
    assert "secret" not in text.lower()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "token"},
        {"Cookie": f"{SESSION_COOKIE}=123.forged"},
        {"Cookie": f"{SESSION_COOKIE}=garbage"},
    ],
    ids=[
        "none",
        "wrong",
        "bearer-only",
        "bearer-space",
        "basic",
        "bare",
        "forged-cookie",
        "junk-cookie",
    ],
)
async def test_every_api_route_but_health_needs_the_token(
    svc: RunningService, headers: dict[str, str]
) -> None:
    for method, path in PROTECTED_ROUTES:
        kwargs: dict[str, Any] = {}
        if method in ("POST", "DELETE"):
            kwargs["json"] = {"confirm": "delete-all", "url": "http://127.0.0.1:1/x"}
        status, body = await svc.api(method, path, auth=False, headers=headers, **kwargs)
        assert status == 401, (method, path, status, body)
        assert body["error"] == "unauthorized", (method, path, body)
        assert svc.token not in str(body)


async def test_unauthorised_requests_change_nothing(
    svc: RunningService, file_server: FileServer
) -> None:
    file_server.add_file("kept.bin", size=64 * 1024)
    row = await add_link(svc, file_server.url("kept.bin"))
    await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    bad = {"Authorization": "Bearer " + svc.token[:-1] + ("y" if svc.token.endswith("x") else "x")}
    status, _ = await svc.api(
        "DELETE", "/api/downloads", auth=False, headers=bad, json={"confirm": "delete-all"}
    )
    assert status == 401
    status, _ = await svc.api(
        "POST", "/api/downloads", auth=False, headers=bad, json={"url": file_server.url("x")}
    )
    assert status == 401
    assert await row_count(svc) == 1


async def test_the_right_token_and_a_session_cookie_are_accepted(svc: RunningService) -> None:
    status, body = await svc.api("GET", "/api/downloads")
    assert status == 200
    assert body == {"next_cursor": None, "downloads": []}
    cookie = await stored_session(svc.service.parts.store, svc.token)
    status, body = await svc.api(
        "GET", "/api/downloads", auth=False, headers={"Cookie": f"{SESSION_COOKIE}={cookie}"}
    )
    assert status == 200, body


# --- adding links -------------------------------------------------------------------------------


async def test_a_link_completes_into_its_job_folder_and_streams(
    svc: RunningService, file_server: FileServer
) -> None:
    data = file_server.add_file("movie.bin", size=3 * MIB + 17, seed=1)
    row = await add_link(svc, file_server.url("movie.bin"))
    assert row["status"] in ("waiting", "downloading", "completed")
    assert row["gid"]
    assert row["source_type"] == "http"
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    job_dir = svc.config.aria2.download_dir / str(row["id"])
    local = Path(done["local_path"])
    assert local.parent == job_dir
    assert local.name == "movie.bin"
    assert await read_file(local) == data
    assert done["total_length"] == done["completed_length"] == len(data)
    assert done["file_name"] == "movie.bin"
    assert done["error_message"] is None
    assert done["stream_url"]
    status, headers, body = await fetch(svc, done["stream_url"])
    assert status == 200
    assert body == data
    assert int(headers["Content-Length"]) == len(data)


async def test_several_urls_in_one_request(svc: RunningService, file_server: FileServer) -> None:
    datas = {
        f"part{i}.bin": file_server.add_file(f"part{i}.bin", size=200_000 + i, seed=i)
        for i in range(3)
    }
    rows = await add_links(svc, *(file_server.url(name) for name in datas))
    assert len({r["id"] for r in rows}) == 3
    for row, (name, data) in zip(rows, datas.items(), strict=True):
        done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
        assert done["status"] == "completed", done
        assert Path(done["local_path"]).name == name
        assert await read_file(done["local_path"]) == data


async def test_a_404_link_fails_with_aria2s_reason_and_nothing_is_served(
    svc: RunningService, file_server: FileServer
) -> None:
    row = await add_link(svc, file_server.status_url(404))
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "failed", done
    assert done["error_message"]
    assert "404" in done["error_message"] or "not found" in done["error_message"].lower()
    assert done["error_code"]
    assert done["stream_url"] is None
    # The HTML error page was not saved as the file.
    for path in job_files(svc, row["id"]):
        assert b"This is an error page" not in path.read_bytes()
    status, _, body = await fetch(svc, signer_of(svc).stream_path(row["id"], "404"))
    assert status == 409
    assert b"error page" not in body


async def test_a_host_that_does_not_resolve_fails_with_a_reason(svc: RunningService) -> None:
    row = await add_link(svc, "http://nonexistent.invalid/x")
    done = await svc.wait_download(row["id"], FINAL, timeout=120)
    assert done["status"] == "failed", done
    assert done["error_message"]
    assert job_files(svc, row["id"]) == []


async def test_redirects_unicode_names_and_empty_files(
    svc: RunningService, file_server: FileServer
) -> None:
    redirected = file_server.add_file("target.bin", size=100_000, seed=7)
    unicode_data = file_server.add_file("naïve file #1.bin", size=50_000, seed=8)
    file_server.add_file("empty.bin", data=b"")
    rows = await add_links(
        svc,
        file_server.url("target.bin", route="redirect", hops=3),
        file_server.url("naïve file #1.bin"),
        file_server.url("empty.bin"),
    )
    expected = {rows[0]["id"]: redirected, rows[1]["id"]: unicode_data, rows[2]["id"]: b""}
    for row in rows:
        done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
        assert done["status"] == "completed", done
        data = expected[row["id"]]
        assert await read_file(done["local_path"]) == data
        assert done["total_length"] == len(data)
        status, _, body = await fetch(svc, done["stream_url"])
        assert (status, body) == (200, data), done["stream_url"]
    status, answer = await svc.api("GET", f"/api/downloads/{rows[1]['id']}")
    assert answer["file_name"] == "naïve file #1.bin"


async def test_the_content_disposition_name_is_used(
    svc: RunningService, file_server: FileServer
) -> None:
    data = file_server.add_file("opaque-id-123", size=30_000, seed=10)
    row = await add_link(svc, file_server.url("opaque-id-123", disposition="Réport final.pdf"))
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert done["file_name"] == "Réport final.pdf"
    assert Path(done["local_path"]).name == "Réport final.pdf"
    assert await read_file(done["local_path"]) == data
    status, _, body = await fetch(svc, done["stream_url"])
    assert (status, body) == (200, data)


@pytest.mark.parametrize(
    "disposition", ["../../escape.bin", "/etc/escape.bin", "..", "sub/dir/escape.bin"]
)
async def test_a_hostile_content_disposition_stays_in_the_job_folder(
    svc: RunningService, file_server: FileServer, tmp_path: Path, disposition: str
) -> None:
    data = file_server.add_file("plain.bin", size=20_000, seed=9)
    row = await add_link(svc, file_server.url("plain.bin", disposition=disposition))
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    job_dir = await asyncio.to_thread((svc.config.aria2.download_dir / str(row["id"])).resolve)
    if done["status"] == "completed":
        local = await asyncio.to_thread(Path(done["local_path"]).resolve)
        assert job_dir in local.parents, local
        assert await read_file(local) == data
        assert "/" not in done["file_name"] and done["file_name"] not in ("", ".", "..")

    def escaped() -> list[Path]:
        found = [p.resolve() for p in tmp_path.rglob("escape.bin")]
        return [p for p in found if job_dir not in p.parents]

    assert await asyncio.to_thread(escaped) == []
    assert not await path_exists("/etc/escape.bin")


async def test_a_link_larger_than_max_download_size_fails_and_is_not_served(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    svc = await settled(await service_factory({"aria2": {"max_download_size": 200_000}}))
    file_server.add_file("big.bin", size=1 * MIB)
    file_server.add_file("small.bin", size=1000)
    big, small = await add_links(svc, file_server.url("big.bin"), file_server.url("small.bin"))
    done = await svc.wait_download(big["id"], FINAL, timeout=WAIT)
    assert done["status"] == "failed", done
    assert "max_download_size" in done["error_message"]
    assert done["stream_url"] is None
    assert not await aria2_knows(svc, big["gid"])
    status, _, _ = await fetch(svc, signer_of(svc).stream_path(big["id"], "big.bin"))
    assert status == 409
    assert (await svc.wait_download(small["id"], FINAL, timeout=WAIT))["status"] == "completed"


@pytest.mark.parametrize(
    "bad_url", ["file:///etc/passwd", "javascript:alert(1)", "data:text/plain,hi", "http://"]
)
async def test_a_bad_link_is_a_400_naming_it_and_creates_no_row(
    svc: RunningService, file_server: FileServer, bad_url: str
) -> None:
    file_server.add_file("fine.bin", size=10)
    good = file_server.url("fine.bin")
    for body in ({"url": bad_url}, {"urls": [good, bad_url]}):
        status, answer = await svc.api("POST", "/api/downloads", json=body)
        assert status == 400, answer
        assert answer["error"] == "invalid_urls"
        assert [item["url"] for item in answer["detail"]] == [bad_url]
        assert answer["detail"][0]["reason"]
    assert await row_count(svc) == 0


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b"{not json", "application/json"),
        (b"", "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"http://example.com/"', "application/json"),
        (b"null", "application/json"),
        (b'{"url": "http://127.0.0.1:1/a", "priority": 1}', "application/json"),
        (b'{"url": "http://127.0.0.1:1/a", "urls": ["http://127.0.0.1:1/b"]}', "application/json"),
        (b"{}", "application/json"),
        (b'{"urls": []}', "application/json"),
        (b'{"urls": "http://127.0.0.1:1/a"}', "application/json"),
        (b'{"url": 42}', "application/json"),
    ],
    ids=[
        "not-json",
        "empty",
        "not-utf8",
        "array",
        "string",
        "null",
        "unknown-field",
        "url-and-urls",
        "neither",
        "empty-list",
        "urls-not-list",
        "url-not-string",
    ],
)
async def test_malformed_bodies_are_json_400s(
    svc: RunningService, raw: bytes, content_type: str
) -> None:
    status, answer = await svc.api(
        "POST", "/api/downloads", data=raw, headers={"Content-Type": content_type}
    )
    assert status == 400, answer
    assert isinstance(answer, dict), answer
    assert answer["error"]
    assert await row_count(svc) == 0


async def test_unknown_fields_are_named(svc: RunningService) -> None:
    status, answer = await svc.api(
        "POST", "/api/downloads", json={"url": "http://127.0.0.1:1/a", "prio": 1}
    )
    assert status == 400
    assert "prio" in str(answer["detail"])


async def test_adding_an_active_download_again_is_a_409_with_the_existing_id(
    svc: RunningService, file_server: FileServer
) -> None:
    file_server.add_file("slow.bin", size=2 * MIB)
    url = file_server.url("slow.bin", route="slow", rate=64 * 1024)
    row = await add_link(svc, url)
    status, answer = await svc.api("POST", "/api/downloads", json={"url": url})
    assert status == 409, answer
    assert answer["error"] == "duplicate"
    assert answer["detail"]["existing_id"] == row["id"]
    # A second link in the same request is still added; the duplicate is reported.
    file_server.add_file("other.bin", size=1000)
    status, answer = await svc.api(
        "POST", "/api/downloads", json={"urls": [url, file_server.url("other.bin")]}
    )
    assert status == 201, answer
    assert len(answer["downloads"]) == 1
    assert answer["duplicates"] == [{"url": url, "existing_id": row["id"]}]
    assert await row_count(svc) == 2
    status, _ = await svc.api("POST", f"/api/downloads/{row['id']}/cancel")
    assert status == 200


# --- listing and reading ------------------------------------------------------------------------


async def test_list_validation_filters_and_grouped_shape(
    svc: RunningService, file_server: FileServer
) -> None:
    file_server.add_file("one.bin", size=1000)
    file_server.add_file("two.bin", size=2000)
    ok_rows = await add_links(svc, file_server.url("one.bin"), file_server.url("two.bin"))
    bad_row = await add_link(svc, file_server.status_url(404))
    for row in [*ok_rows, bad_row]:
        await svc.wait_download(row["id"], FINAL, timeout=WAIT)

    for query in (
        "limit=0",
        "limit=-1",
        "limit=abc",
        "limit=1001",
        "status=bogus",
        "status=COMPLETED",
        "grouped=maybe",
    ):
        status, answer = await svc.api("GET", f"/api/downloads?{query}")
        assert status == 400, (query, answer)
        assert answer["error"], query

    status, answer = await svc.api("GET", "/api/downloads")
    assert status == 200
    assert [d["id"] for d in answer["downloads"]] == [
        bad_row["id"],
        ok_rows[1]["id"],
        ok_rows[0]["id"],
    ]
    status, answer = await svc.api("GET", "/api/downloads?limit=1")
    assert [d["id"] for d in answer["downloads"]] == [bad_row["id"]]
    status, answer = await svc.api("GET", "/api/downloads?status=completed")
    assert sorted(d["id"] for d in answer["downloads"]) == sorted(r["id"] for r in ok_rows)
    status, answer = await svc.api("GET", "/api/downloads?status=failed")
    assert [d["id"] for d in answer["downloads"]] == [bad_row["id"]]

    status, answer = await svc.api("GET", "/api/downloads?grouped=true")
    assert status == 200, answer
    groups = answer["groups"]
    assert len(groups) == 3  # links each form a group of their own
    for group in groups:
        assert set(group) >= {"group_key", "source_type", "media_group_id", "downloads"}
        assert group["source_type"] == "http"
        assert group["media_group_id"] is None
        assert len(group["downloads"]) == 1
        download = group["downloads"][0]
        assert download["group_key"] == group["group_key"]
        assert {"id", "gid", "status", "uploads", "stream_url"} <= set(download)
    status, answer = await svc.api("GET", "/api/downloads?grouped=true&status=failed&limit=5")
    assert [g["downloads"][0]["id"] for g in answer["groups"]] == [bad_row["id"]]


async def test_one_download_with_its_history(svc: RunningService, file_server: FileServer) -> None:
    file_server.add_file("h.bin", size=300_000)
    row = await add_link(svc, file_server.url("h.bin"))
    await svc.wait_download(row["id"], ["completed"], timeout=WAIT)
    status, answer = await svc.api("GET", f"/api/downloads/{row['id']}")
    assert status == 200
    required = {
        "id", "gid", "source_type", "source_url", "status", "file_name", "local_path",
        "total_length", "completed_length", "download_speed", "error_message", "created_at",
        "updated_at", "uploads", "stream_url", "history",
    }  # fmt: skip
    assert required <= set(answer)
    assert "torrent_data" not in answer and "has_torrent_data" not in answer
    history = answer["history"]
    assert history[0]["from"] is None and history[0]["to"] == "pending"
    assert history[-1]["to"] == "completed"
    steps = [(h["from"], h["to"]) for h in history]
    for (_, to), (following_from, _) in itertools.pairwise(steps):
        assert to == following_from, steps  # an unbroken chain
    assert all(h["at"] for h in history)


@pytest.mark.parametrize("bad_id", ["999999", "abc", "-1", "1.5", "0x1", "9" * 30])
async def test_unknown_and_non_numeric_ids_are_json_404s(svc: RunningService, bad_id: str) -> None:
    for method, suffix in (("GET", ""), ("DELETE", ""), ("POST", "/pause"), ("POST", "/retry")):
        status, answer = await svc.api(method, f"/api/downloads/{bad_id}{suffix}")
        assert status == 404, (method, suffix, answer)
        assert isinstance(answer, dict)
        assert answer["error"] == "not_found", answer


# --- actions ------------------------------------------------------------------------------------


async def test_pause_and_resume_a_running_download(
    svc: RunningService, file_server: FileServer
) -> None:
    data = file_server.add_file("pause.bin", size=2 * MIB, seed=3)
    row = await add_link(svc, file_server.url("pause.bin", route="hold", bytes=256 * 1024))
    await file_server.wait_held("pause.bin", within_s=30)
    await svc.wait_download(row["id"], ["downloading"], timeout=WAIT)

    status, paused = await svc.api("POST", f"/api/downloads/{row['id']}/pause")
    assert status == 200, paused
    assert paused["status"] == "paused"
    assert await aria2_state(svc, row["gid"]) == "paused"
    # The poller keeps it paused (no flapping back to downloading).
    await asyncio.sleep(1.0)
    assert (await svc.wait_download(row["id"], ["paused"], timeout=5))["status"] == "paused"
    status, again = await svc.api("POST", f"/api/downloads/{row['id']}/pause")
    assert status == 409, again

    status, resumed = await svc.api("POST", f"/api/downloads/{row['id']}/resume")
    assert status == 200, resumed
    assert resumed["status"] in ("waiting", "downloading")
    file_server.release("pause.bin")
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert await read_file(done["local_path"]) == data
    history = [h["to"] for h in done["history"]]
    assert "paused" in history
    assert history.index("paused") < len(history) - 1


async def test_cancel_stops_aria2_and_forgets_the_gid(
    svc: RunningService, file_server: FileServer
) -> None:
    file_server.add_file("cancel.bin", size=2 * MIB)
    row = await add_link(svc, file_server.url("cancel.bin", route="hold", bytes=128 * 1024))
    await file_server.wait_held("cancel.bin", within_s=30)
    status, cancelled = await svc.api("POST", f"/api/downloads/{row['id']}/cancel")
    assert status == 200, cancelled
    assert cancelled["status"] == "cancelled"
    assert not await aria2_knows(svc, row["gid"])
    await asyncio.sleep(1.0)  # a few poller cycles
    status, answer = await svc.api("GET", f"/api/downloads/{row['id']}")
    assert answer["status"] == "cancelled"
    assert answer["stream_url"] is None
    status, again = await svc.api("POST", f"/api/downloads/{row['id']}/cancel")
    assert status == 409, again


async def test_retry_a_failed_download(svc: RunningService, file_server: FileServer) -> None:
    url = file_server.url("late.bin")  # not there yet: 404
    row = await add_link(svc, url)
    failed = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert failed["status"] == "failed", failed
    data = file_server.add_file("late.bin", size=500_000, seed=5)

    status, retried = await svc.api("POST", f"/api/downloads/{row['id']}/retry")
    assert status == 200, retried
    assert retried["id"] == row["id"]
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert done["error_message"] is None
    assert await read_file(done["local_path"]) == data
    assert done["gid"] != row["gid"]
    db = svc.service.parts.store
    assert db is not None
    assert await db.get_download_id_by_gid(row["gid"]) == row["id"]
    assert await db.get_download_id_by_gid(done["gid"]) == row["id"]
    assert await row_count(svc) == 1


async def test_retry_a_cancelled_download(svc: RunningService, file_server: FileServer) -> None:
    data = file_server.add_file("again.bin", size=1 * MIB, seed=6)
    row = await add_link(svc, file_server.url("again.bin", route="hold", bytes=64 * 1024))
    await file_server.wait_held("again.bin", within_s=30)
    status, _ = await svc.api("POST", f"/api/downloads/{row['id']}/cancel")
    assert status == 200
    file_server.release("again.bin")
    status, retried = await svc.api("POST", f"/api/downloads/{row['id']}/retry")
    assert status == 200, retried
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert await read_file(done["local_path"]) == data
    assert done["gid"] != row["gid"]
    db = svc.service.parts.store
    assert db is not None
    assert await db.get_download_id_by_gid(row["gid"]) == row["id"]


async def test_forbidden_transitions_are_409s_and_change_nothing(
    svc: RunningService, file_server: FileServer
) -> None:
    data = file_server.add_file("done.bin", size=100_000)
    row = await add_link(svc, file_server.url("done.bin"))
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed"
    for action in ("pause", "resume", "retry", "cancel"):
        status, answer = await svc.api("POST", f"/api/downloads/{row['id']}/{action}")
        assert status == 409, (action, answer)
        assert answer["error"] == "forbidden_transition", answer
        assert answer["detail"]["status"] == "completed"
    status, after = await svc.api("GET", f"/api/downloads/{row['id']}")
    assert after["status"] == "completed"
    assert after["history"] == done["history"]
    assert await read_file(after["local_path"]) == data
    status, answer = await svc.api("POST", f"/api/downloads/{row['id']}/explode")
    assert status in (404, 405), answer


# --- deleting -----------------------------------------------------------------------------------


async def test_delete_keeps_or_removes_the_file(
    svc: RunningService, file_server: FileServer
) -> None:
    file_server.add_file("keep.bin", size=100_000)
    file_server.add_file("drop.bin", size=100_000)
    keep, drop = await add_links(svc, file_server.url("keep.bin"), file_server.url("drop.bin"))
    keep_done = await svc.wait_download(keep["id"], ["completed"], timeout=WAIT)
    drop_done = await svc.wait_download(drop["id"], ["completed"], timeout=WAIT)

    status, answer = await svc.api("DELETE", f"/api/downloads/{keep['id']}")
    assert status == 200, answer
    assert answer["file_deleted"] is False
    assert await path_exists(keep_done["local_path"])
    status, _ = await svc.api("GET", f"/api/downloads/{keep['id']}")
    assert status == 404

    status, answer = await svc.api("DELETE", f"/api/downloads/{drop['id']}?delete_file=true")
    assert status == 200, answer
    assert not await path_exists(drop_done["local_path"])
    assert not (svc.config.aria2.download_dir / str(drop["id"])).exists()
    status, _ = await svc.api("DELETE", f"/api/downloads/{drop['id']}")
    assert status == 404
    status, _ = await svc.api("DELETE", f"/api/downloads/{keep['id']}?delete_file=perhaps")
    assert status in (400, 404)


async def test_delete_an_active_download_stops_aria2(
    svc: RunningService, file_server: FileServer
) -> None:
    file_server.add_file("active.bin", size=2 * MIB)
    row = await add_link(svc, file_server.url("active.bin", route="hold", bytes=64 * 1024))
    await file_server.wait_held("active.bin", within_s=30)
    status, answer = await svc.api("DELETE", f"/api/downloads/{row['id']}?delete_file=true")
    assert status == 200, answer
    assert not await aria2_knows(svc, row["gid"])
    assert await row_count(svc) == 0


async def test_delete_file_never_touches_anything_outside_the_download_dir(
    svc: RunningService, file_server: FileServer, tmp_path: Path
) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("do not delete me")
    file_server.add_file("victim.bin", size=1000)
    rows = await add_links(svc, file_server.url("victim.bin"), file_server.status_url(404))
    for row in rows:
        await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    download_dir = svc.config.aria2.download_dir
    db = svc.service.parts.store
    assert db is not None
    link_inside = download_dir / "link-to-outside"
    link_inside.symlink_to(outside)
    # Rows whose recorded path leads outside (crafted: the API never writes such paths).
    await db.update_download_details_by_id(rows[0]["id"], local_path=str(outside))
    await db.update_download_details_by_id(
        rows[1]["id"], local_path=str(download_dir / ".." / ".." / outside.name)
    )
    status, _ = await svc.api("DELETE", f"/api/downloads/{rows[0]['id']}?delete_file=true")
    assert status == 200
    status, _ = await svc.api("DELETE", f"/api/downloads/{rows[1]['id']}?delete_file=true")
    assert status == 200
    assert outside.read_text() == "do not delete me"
    # The download dir itself is never removed either.
    assert download_dir.is_dir()
    assert link_inside.is_symlink()


async def test_delete_all_needs_confirmation(svc: RunningService, file_server: FileServer) -> None:
    file_server.add_file("a.bin", size=1000)
    file_server.add_file("b.bin", size=2000)
    rows = await add_links(svc, file_server.url("a.bin"), file_server.url("b.bin"))
    paths = []
    for row in rows:
        done = await svc.wait_download(row["id"], ["completed"], timeout=WAIT)
        paths.append(Path(done["local_path"]))
    for body in (None, {}, {"confirm": "yes"}, {"confirm": True}, ["delete-all"]):
        kwargs: dict[str, Any] = {} if body is None else {"json": body}
        status, answer = await svc.api("DELETE", "/api/downloads", **kwargs)
        assert status == 400, (body, answer)
    status, answer = await svc.api(
        "DELETE", "/api/downloads", json={"confirm": "delete-all", "delete_files": "yes"}
    )
    assert status == 400, answer
    assert await row_count(svc) == 2

    status, answer = await svc.api("DELETE", "/api/downloads", json={"confirm": "delete-all"})
    assert status == 200, answer
    assert answer["deleted"] == 2
    assert await row_count(svc) == 0
    assert all(p.is_file() for p in paths)  # records only


async def test_delete_all_with_files(svc: RunningService, file_server: FileServer) -> None:
    file_server.add_file("c.bin", size=1000)
    file_server.add_file("d.bin", size=1000, seed=1)
    file_server.add_file("e.bin", size=2 * MIB)
    rows = await add_links(svc, file_server.url("c.bin"), file_server.url("d.bin"))
    paths = []
    for row in rows:
        done = await svc.wait_download(row["id"], ["completed"], timeout=WAIT)
        paths.append(Path(done["local_path"]))
    active = await add_link(svc, file_server.url("e.bin", route="hold", bytes=64 * 1024))
    await file_server.wait_held("e.bin", within_s=30)
    status, answer = await svc.api(
        "DELETE", "/api/downloads", json={"confirm": "delete-all", "delete_files": True}
    )
    assert status == 200, answer
    assert answer["deleted"] == 3
    assert not any(p.exists() for p in paths)
    assert not await aria2_knows(svc, active["gid"])
    assert svc.config.aria2.download_dir.is_dir()


# --- statistics ---------------------------------------------------------------------------------


async def test_statistics_count_by_status(svc: RunningService, file_server: FileServer) -> None:
    data = file_server.add_file("s.bin", size=123_456)
    ok = await add_link(svc, file_server.url("s.bin"))
    bad = await add_link(svc, file_server.status_url(404))
    await svc.wait_download(ok["id"], ["completed"], timeout=WAIT)
    await svc.wait_download(bad["id"], FINAL, timeout=WAIT)
    status, stats = await svc.api("GET", "/api/downloads/statistics")
    assert status == 200, stats
    assert stats["total"] == 2
    assert stats["by_status"]["completed"] == 1
    assert stats["by_status"]["failed"] == 1
    assert stats["by_status"]["downloading"] == 0
    assert stats["completed_bytes"] == len(data)


# --- configuration reload -----------------------------------------------------------------------


async def test_config_reload_applies_live_keys_and_names_restart_keys(
    svc: RunningService,
) -> None:
    old_port = svc.config.web.port

    def change(document: dict[str, Any]) -> None:
        document["aria2"]["poll_interval"] = 0.35
        document["web"]["port"] = free_port()

    edit_config(svc, change)
    status, answer = await svc.api("POST", "/api/config/reload")
    assert status == 200, answer
    assert "aria2.poll_interval" in answer["applied"]
    assert "web.port" in answer["needs_restart"]
    assert "web.port" not in answer["applied"]
    assert svc.config.aria2.poll_interval == 0.35
    assert svc.config.web.port == old_port  # still listening where it was
    status, _ = await svc.api("GET", "/api/health")
    assert status == 200
    status, answer = await svc.api("POST", "/api/config/reload")
    assert status == 200
    assert answer["applied"] == []
    assert answer["needs_restart"] == ["web.port"]  # still different from what runs


async def test_config_reload_with_a_broken_file_keeps_the_old_config(
    svc: RunningService,
) -> None:
    before = svc.config
    edit_config(svc, lambda d: d["aria2"].update({"poll_intervall": 3}))
    status, answer = await svc.api("POST", "/api/config/reload")
    assert status >= 400, answer
    assert isinstance(answer, dict)
    assert svc.config == before
    status, _ = await svc.api("GET", "/api/downloads")
    assert status == 200


async def test_config_reload_with_a_broken_file_is_a_400_naming_the_problem(
    svc: RunningService,
) -> None:
    edit_config(svc, lambda d: d["aria2"].update({"poll_intervall": 3}))
    status, answer = await svc.api("POST", "/api/config/reload")
    assert status == 400, (status, answer)
    assert "poll_interval" in str(answer["detail"])  # the closest known key is suggested


async def test_config_reload_applies_max_concurrent_downloads_to_aria2(
    svc: RunningService,
) -> None:
    edit_config(svc, lambda d: d["aria2"].update({"max_concurrent_downloads": 7}))
    status, answer = await svc.api("POST", "/api/config/reload")
    assert status == 200, answer
    assert "aria2.max_concurrent_downloads" in answer["applied"]
    options = await svc.service.parts.engine.downloads.aria2.get_global_option()
    assert options["max-concurrent-downloads"] == "7"


async def test_secrets_stay_masked_in_the_log_after_a_config_reload(
    svc: RunningService,
) -> None:
    captured: list[str] = []

    def sink_and_log() -> None:
        sink = logger.add(lambda message: captured.append(str(message)), level="DEBUG")
        try:
            logger.info("leak check {}", svc.token)
        finally:
            logger.remove(sink)

    sink_and_log()
    assert captured and svc.token not in captured[-1]  # masked before the reload
    edit_config(svc, lambda d: d["logging"].update({"level": "INFO"}))
    status, _ = await svc.api("POST", "/api/config/reload")
    assert status == 200
    sink_and_log()
    assert svc.token not in captured[-1]


# --- signed stream links ------------------------------------------------------------------------


async def _completed(
    svc: RunningService, file_server: FileServer, name: str, size: int
) -> tuple[dict[str, Any], bytes]:
    data = file_server.add_file(name, size=size, seed=size % 97)
    row = await add_link(svc, file_server.url(name))
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    return done, data


async def test_signed_links_good_forged_missing_expired(
    svc: RunningService, file_server: FileServer
) -> None:
    done, data = await _completed(svc, file_server, "signed.bin", 50_000)
    download_id = done["id"]
    signer = signer_of(svc)
    status, _, body = await fetch(svc, done["stream_url"])
    assert (status, body) == (200, data)

    base = f"/stream/{download_id}/signed.bin"
    good_sig = signer.query(download_id).split("sig=", 1)[1].split("&", 1)[0]
    forged = good_sig[:-2] + ("AA" if not good_sig.endswith("AA") else "BB")
    other_key = LinkSigner(b"k" * 32).query(download_id)
    other_id = signer.query(download_id + 1)
    expired = signer.query(download_id, lifetime=60, now=time.time() - 3600)
    extended = expired.split("&exp=")[0] + f"&exp={int(time.time()) + 3600}"
    cases = {
        "forged": f"sig={forged}",
        "other key": other_key,
        "other id": other_id,
        "missing": "",
        "empty": "sig=",
        "expired": expired,
        "expiry moved": extended,
        "bad exp": f"sig={good_sig}&exp=soon",
        "index": signer.query(download_id, 1),
    }
    for label, query in cases.items():
        status, headers, body = await fetch(svc, f"{base}?{query}")
        assert status == 403, (label, status)
        assert body != data
        assert headers["Content-Type"].startswith("application/json"), label
    # The same link still works with an expiry in the future.
    fresh = signer.query(download_id, lifetime=60)
    status, _, body = await fetch(svc, f"{base}?{fresh}")
    assert (status, body) == (200, data)


async def test_links_expire_with_web_link_expiry(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    svc = await service_factory({"web": {"link_expiry": 2}})
    done, data = await _completed(svc, file_server, "expiring.bin", 20_000)
    assert "exp=" in done["stream_url"]
    status, _, body = await fetch(svc, done["stream_url"])
    assert (status, body) == (200, data)
    await asyncio.sleep(3.2)
    status, _, body = await fetch(svc, done["stream_url"])
    assert status == 403
    assert body != data


# --- Range on a completed file -------------------------------------------------------------------


async def test_stream_ranges_head_and_416(svc: RunningService, file_server: FileServer) -> None:
    size = 1 * MIB + 333
    done, data = await _completed(svc, file_server, "ranged.bin", size)
    url = done["stream_url"]
    status, headers, body = await fetch(svc, url, headers={"Range": "bytes=1000-4999"})
    assert status == 206
    assert body == data[1000:5000]
    assert headers["Content-Range"] == f"bytes 1000-4999/{size}"
    assert int(headers["Content-Length"]) == 4000

    status, headers, body = await fetch(svc, url, headers={"Range": "bytes=-100"})
    assert status == 206
    assert body == data[-100:]

    status, headers, body = await fetch(svc, url, headers={"Range": f"bytes={size - 10}-"})
    assert status == 206
    assert body == data[-10:]

    status, headers, body = await fetch(svc, url, headers={"Range": f"bytes={size}-"})
    assert status == 416
    assert headers["Content-Range"] == f"bytes */{size}"
    assert body != data

    status, headers, body = await fetch(svc, url, method="HEAD")
    assert status == 200
    assert body == b""
    assert int(headers["Content-Length"]) == size
    assert headers.get("Accept-Ranges") == "bytes"


async def test_a_file_changed_on_disk_is_not_served_as_whole(
    svc: RunningService, file_server: FileServer
) -> None:
    done, data = await _completed(svc, file_server, "shrinks.bin", 200_000)
    path = Path(done["local_path"])
    await asyncio.to_thread(os.truncate, path, len(data) // 2)
    status, _, body = await fetch(svc, done["stream_url"])
    assert status == 409
    assert body != data[: len(data) // 2]
    status, _, _ = await fetch(svc, done["stream_url"], headers={"Range": "bytes=0-99"})
    assert status == 409
    await asyncio.to_thread(path.write_bytes, data + b"x")  # now longer than recorded
    status, _, _ = await fetch(svc, done["stream_url"])
    assert status == 409
    await asyncio.to_thread(path.unlink)
    status, _, _ = await fetch(svc, done["stream_url"])
    assert status == 409


async def test_stream_of_unknown_download_is_404(svc: RunningService) -> None:
    signer = signer_of(svc)
    status, _, _ = await fetch(svc, signer.stream_path(424242, "x.bin"))
    assert status == 404


async def test_json_errors_never_html(svc: RunningService) -> None:
    async with svc.http.get(svc.base_url + "/api/downloads/1", headers=svc.auth) as response:
        assert response.status == 404
        assert response.content_type == "application/json"
    async with svc.http.put(svc.base_url + "/api/downloads", headers=svc.auth) as response:
        assert response.status == 405
        assert response.content_type == "application/json"


async def test_a_links_user_and_password_reach_the_server_but_not_aria2s_log(
    svc: RunningService,
) -> None:
    body = os.urandom(50_000)
    expected = "Basic " + base64.b64encode(b"ann:p@ss:w/rd").decode()
    seen: list[str | None] = []

    async def guarded(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="t"'})
        if request.path == "/broken.bin":
            return web.Response(status=500)
        return web.Response(body=body)

    app = web.Application()
    app.router.add_get("/{name}", guarded)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        base = f"http://ann:p%40ss%3Aw%2Frd@127.0.0.1:{port}"
        good, broken = await add_links(svc, f"{base}/guarded.bin", f"{base}/broken.bin")
        done = await svc.wait_download(good["id"], FINAL)
        assert done["status"] == "completed", done
        assert await read_file(done["local_path"]) == body
        assert (await svc.wait_download(broken["id"], FINAL))["status"] == "failed"
        assert seen.count(expected) >= 2  # both requests carried the credentials
    finally:
        await runner.cleanup()
    # aria2 got the credentials as options: the link it logs (a failed one) has none.
    aria2_log = await read_file(svc.service.config.data_dir / "aria2.log")
    assert b"/broken.bin" in aria2_log
    assert b"p@ss" not in aria2_log and b"p%40ss" not in aria2_log
