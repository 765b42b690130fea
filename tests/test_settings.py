"""Live settings and speed limits: the settings API (checked, all or nothing, written back to
config.yaml with its comments, applied live, recorded), the per-job download limit on a real
aria2c, the global download limit timed on a real download, the upload limit on a real rclone,
the bot's /limit and /settings through the real dispatcher, and the page in Chromium."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from settings_editor import SETTINGS_KEYS
from tests.support.http_files import MIB, FileServer
from tests.support.rclone_cloud import add_remote
from tests.support.service import RunningService, ServiceFactory, service_config
from tests.support.stores import StoreBackend
from tests.test_bot import USER, Relay, RelayFactory, relay_factory  # noqa: F401 (a fixture)
from tests.test_browser import CHROMIUM, chromium, sign_in

COMMENTED_LIMITS = """
# Speed limits, edited live.
limits:
  # All downloads together.
  download: 0  # none yet
  # Each upload.
  upload: 0
"""


@pytest.fixture
async def svc(service_factory: ServiceFactory, tmp_path: Path) -> RunningService:
    path = service_config(tmp_path / "svc")
    path.write_text(path.read_text() + COMMENTED_LIMITS)
    return await service_factory(config_path=path)


async def add_link(svc: RunningService, url: str) -> dict[str, Any]:
    status, body = await svc.api("POST", "/api/downloads", json={"url": url})
    assert status == 201, body
    return dict(body["downloads"][0])


async def completed_bytes(svc: RunningService, download_id: int) -> int:
    status, body = await svc.api("GET", f"/api/downloads/{download_id}")
    assert status == 200, body
    return int(body["completed_length"])


# --- the record of changes, on both backends -----------------------------------------------------


async def test_changes_are_recorded_in_one_write_and_listed_newest_first(
    store_backend: StoreBackend,
) -> None:
    async with store_backend.database() as db:
        first = await db.record_settings_changes("api-token", [("limits.download", "0", "5")])
        both = await db.record_settings_changes(
            "telegram:7", [("limits.upload", "0", "1"), ("upload.auto_delete", "false", "true")]
        )
        assert [c.id for c in both] == [first[0].id + 1, first[0].id + 2]
        listed = await db.list_settings_changes()
        assert listed == [*reversed(both), *first]
        assert (listed[0].changed_by, listed[0].old_value, listed[0].new_value) == (
            "telegram:7",
            "false",
            "true",
        )
        assert await db.list_settings_changes(limit=1) == [both[1]]


# --- the settings API ----------------------------------------------------------------------------


async def test_get_shows_every_setting_with_its_value(svc: RunningService) -> None:
    status, body = await svc.api("GET", "/api/settings")
    assert status == 200
    assert list(body["settings"]) == list(SETTINGS_KEYS)
    assert body["settings"]["limits.download"] == 0
    assert body["settings"]["aria2.max_concurrent_downloads"] == 5
    assert body["settings"]["upload.targets"] == []


async def test_a_change_is_written_back_with_comments_applied_and_recorded(
    svc: RunningService,
) -> None:
    status, body = await svc.api(
        "PATCH",
        "/api/settings",
        json={"limits.upload": "1MiB", "upload.auto_delete": True, "upload.max_concurrent": 2},
    )
    assert status == 200, body
    assert body["settings"]["limits.upload"] == MIB
    assert body["settings"]["upload.auto_delete"] is True
    # upload.max_concurrent was 2 already: only what changed is recorded.
    changes = {c["key"]: c for c in body["changes"]}
    assert set(changes) == {"limits.upload", "upload.auto_delete"}
    assert (changes["limits.upload"]["old_value"], changes["limits.upload"]["new_value"]) == (
        "0",
        str(MIB),
    )
    assert changes["upload.auto_delete"]["changed_by"] == "api-token"

    text = svc.config_path.read_text()
    assert "  upload: 1MiB\n" in text  # as given, under limits
    assert "  download: 0  # none yet\n" in text and "# All downloads together." in text
    assert "auto_delete: true" in text
    # Applied live: the configuration in force, and each rclone upload from now on.
    assert svc.config.limits.upload == MIB and svc.config.upload.auto_delete is True
    assert svc.service.parts.uploads.rclone.bwlimit == MIB

    status, body = await svc.api("GET", "/api/settings/changes")
    assert status == 200
    assert [c["key"] for c in body["changes"]] == ["upload.auto_delete", "limits.upload"]
    assert all(c["changed_at"] for c in body["changes"])


@pytest.mark.parametrize(
    ("values", "key", "words"),
    [
        (
            {"limits.upload": "1MiB", "aria2.max_concurrent_downloads": 0},
            "aria2.max_concurrent_downloads",
            "1",
        ),
        ({"limits.download": "fast"}, "limits.download", "size"),
        ({"limits.dowload": 1}, "limits.dowload", "did you mean limits.download"),
        ({"web.port": 9000}, "web.port", "restart"),
        ({"logging.level": "DEBUG"}, "logging.level", "reload"),
        ({"upload.targets": [{"name": "x", "type": "ftp"}]}, "upload.targets[0].type", "rclone"),
        ({}, None, "at least one"),
    ],
)
async def test_a_bad_value_changes_nothing_and_names_its_key(
    svc: RunningService, values: dict[str, Any], key: str | None, words: str
) -> None:
    before = svc.config_path.read_bytes()
    status, body = await svc.api("PATCH", "/api/settings", json=values)
    assert status == 400, body
    assert body["error"] == "bad_setting"
    assert body["detail"]["key"] == key
    assert words in body["detail"]["message"]
    assert svc.config_path.read_bytes() == before
    assert svc.config.limits.upload == 0
    status, body = await svc.api("GET", "/api/settings/changes")
    assert body["changes"] == []


async def test_a_key_set_in_the_environment_is_not_changed_here(
    svc: RunningService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MISTRELAY_LIMITS_UPLOAD", "0")
    status, body = await svc.api("PATCH", "/api/settings", json={"limits.upload": 5})
    assert status == 400
    assert body["detail"]["key"] == "limits.upload"
    assert "MISTRELAY_LIMITS_UPLOAD" in body["detail"]["message"]


# --- limits on a real aria2c ---------------------------------------------------------------------


async def test_a_jobs_own_download_limit_reaches_aria2(
    svc: RunningService, file_server: FileServer
) -> None:
    file_server.add_file("held.bin", size=2 * MIB)
    row = await add_link(svc, file_server.url("held.bin", route="hold", bytes=64 * 1024))
    await svc.wait_download(row["id"], {"downloading"}, timeout=30)
    try:
        status, body = await svc.api(
            "PATCH", f"/api/downloads/{row['id']}", json={"max_download_limit": "1MiB"}
        )
        assert status == 200, body
        assert body == {"id": row["id"], "max_download_limit": MIB}
        gid = (await svc.api("GET", f"/api/downloads/{row['id']}"))[1]["gid"]
        options = await svc.service.parts.engine.transport.call("aria2.getOption", gid)
        assert options["max-download-limit"] == str(MIB)

        status, body = await svc.api(
            "PATCH", f"/api/downloads/{row['id']}", json={"max_download_limit": "-1"}
        )
        assert status == 400 and "max_download_limit" in body["detail"]
        status, body = await svc.api("PATCH", f"/api/downloads/{row['id']}", json={"speed": 1})
        assert status == 400
        status, _ = await svc.api("PATCH", "/api/downloads/999999", json={"max_download_limit": 0})
        assert status == 404
    finally:
        file_server.release("held.bin")
    await svc.wait_download(row["id"], {"completed"}, timeout=30)
    status, body = await svc.api(
        "PATCH", f"/api/downloads/{row['id']}", json={"max_download_limit": 0}
    )
    assert status == 409, body


@pytest.mark.slow
async def test_the_download_limit_holds_a_download_and_lifting_it_speeds_it_up(
    svc: RunningService, file_server: FileServer
) -> None:
    size, limit = 6 * MIB, 2 * MIB
    file_server.add_file("limited.bin", size=size)
    file_server.add_file("lifted.bin", size=size, seed=1)
    status, body = await svc.api("PATCH", "/api/settings", json={"limits.download": "2MiB"})
    assert status == 200, body
    options = await svc.service.parts.engine.transport.call("aria2.getGlobalOption")
    assert options["max-overall-download-limit"] == str(limit)

    # 6 MiB at 2 MiB/s: about 3 s (a wide band: the machine may be busy; unlimited, it takes a
    # fraction of a second on loopback).
    started = time.monotonic()
    row = await add_link(svc, file_server.url("limited.bin"))
    await svc.wait_download(row["id"], {"completed"}, timeout=30)
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed <= 8.0, elapsed

    # Mid-way through the next one, the limit is lifted: the rest goes faster than the limit.
    row = await add_link(svc, file_server.url("lifted.bin"))
    deadline = time.monotonic() + 20
    while await completed_bytes(svc, row["id"]) < MIB:
        assert time.monotonic() < deadline, "the limited download did not start"
        await asyncio.sleep(0.1)
    done = await completed_bytes(svc, row["id"])
    assert done < size / 2, "the limited download went too fast to lift the limit mid-way"
    lifted_at = time.monotonic()
    status, body = await svc.api("PATCH", "/api/settings", json={"limits.download": 0})
    assert status == 200, body
    await svc.wait_download(row["id"], {"completed"}, timeout=30)
    after_lift = time.monotonic() - lifted_at
    at_the_limit = (size - done) / limit
    assert after_lift < at_the_limit * 0.6, (after_lift, at_the_limit)
    [change] = body["changes"]
    assert (change["old_value"], change["new_value"]) == (str(limit), "0")


@pytest.mark.slow
async def test_the_upload_limit_reaches_rclone(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    tmp_path: Path,
) -> None:
    cloud = tmp_path / "cloud"
    cloud.mkdir()
    add_remote(rclone_config, "localdisk", {"type": "local"})
    target = {"name": "disk", "type": "rclone", "remote": "localdisk", "path": str(cloud)}
    svc = await service_factory(
        {"upload": {"targets": [target], "rclone_config": str(rclone_config)}}
    )
    status, body = await svc.api("PATCH", "/api/settings", json={"limits.upload": "1MiB"})
    assert status == 200, body
    file_server.add_file("up.bin", size=3 * MIB)
    row = await add_link(svc, file_server.url("up.bin"))
    await svc.wait_download(row["id"], {"completed"}, timeout=30)
    downloaded = time.monotonic()
    deadline = downloaded + 60
    while True:
        status, body = await svc.api("GET", f"/api/downloads/{row['id']}")
        if body["uploads"] and body["uploads"][0]["status"] == "completed":
            break
        assert time.monotonic() < deadline, body["uploads"]
        await asyncio.sleep(0.1)
    # 3 MiB at 1 MiB/s: about 3 s (a copy on the same disk takes a fraction of one unlimited).
    assert time.monotonic() - downloaded >= 1.5
    assert (cloud / "up.bin").stat().st_size == 3 * MIB


# --- the bot -------------------------------------------------------------------------------------


@pytest.fixture
async def bot(relay_factory: RelayFactory) -> Relay:  # noqa: F811 (the imported fixture)
    return await relay_factory()


async def test_bot_limit_and_settings_for_an_admin_only(bot: Relay) -> None:
    relay = bot
    admin = relay.chat()
    [shown] = await admin.say("/limit")
    assert "no limit" in shown.text
    [done] = await admin.say("/limit download 3MiB")
    assert "limits.download" in done.text and "3145728" in done.text, done.text
    assert relay.running.config.limits.download == 3 * MIB
    assert "download: 3MiB" in relay.running.config_path.read_text()
    [shown] = await admin.say("/limit")
    assert "3.0 MiB/s" in shown.text, shown.text
    [refused] = await admin.say("/limit upload lots")
    assert "limits.upload" in refused.text and "size" in refused.text
    [usage] = await admin.say("/limit sideways 1")
    assert "/limit download" in usage.text

    [listing] = await admin.say("/settings")
    for key in SETTINGS_KEYS:
        assert key in listing.text
    [done] = await admin.say("/settings upload.auto_delete true")
    assert "upload.auto_delete" in done.text and "→ true" in done.text
    [same] = await admin.say("/settings upload.auto_delete true")
    assert "nothing changed" in same.text

    status, body = await relay.running.api("GET", "/api/settings/changes")
    assert status == 200
    assert {c["changed_by"] for c in body["changes"]} == {f"telegram:{admin.user.id}"}
    assert [c["key"] for c in body["changes"]] == ["upload.auto_delete", "limits.download"]

    # One language for everyone's replies, then each user's own again.
    [done] = await admin.say("/settings telegram.language zh")
    assert "telegram.language" in done.text
    [help_reply] = await admin.say("/help")
    assert "命令" in help_reply.text
    [done] = await admin.say("/settings telegram.language auto")
    assert "→ auto" in done.text
    [help_reply] = await admin.say("/help")
    assert help_reply.text.startswith("Commands:")

    user = relay.chat(USER)
    [shown] = await user.say("/limit")
    assert "3.0 MiB/s" in shown.text
    [refused] = await user.say("/limit download 0")
    assert "Only admins" in refused.text
    [refused] = await user.say("/settings")
    assert "Only admins" in refused.text
    assert relay.running.config.limits.download == 3 * MIB


# --- the page in Chromium ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)
async def test_the_page_sets_limits_and_settings_and_shows_the_changes(
    svc: RunningService, tmp_path: Path
) -> None:
    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        await sign_in(page, svc.base_url, svc.token)
        await page.wait_for(
            "document.getElementById('limit-download').value === '0'"
            " && document.getElementById('changes-empty').hidden === false",
            20,
            "the settings card",
        )
        assert await page.evaluate(
            "document.getElementById('limit-download-shown').textContent"
        ) == ("no limit")

        await page.evaluate(
            "document.getElementById('limit-download').value = '2MiB';"
            "document.getElementById('limits-save').click()"
        )
        await page.wait_for(
            "!!document.querySelector('#changes-body tr[data-key=\"limits.download\"]')",
            20,
            "the change in the table",
        )
        row = await page.evaluate(
            "Array.from(document.querySelectorAll('#changes-body tr td'), td => td.textContent)"
        )
        assert row[1].startswith("web:") and row[2] == "limits.download"
        assert row[3] == f"0 → {2 * MIB}"
        assert svc.config.limits.download == 2 * MIB
        assert "download: 2MiB" in svc.config_path.read_text()
        shown = await page.evaluate("document.getElementById('limit-download-shown').textContent")
        assert "MiB/s" in shown

        # A refused value: the server's message, naming the key, and nothing changed.
        await page.evaluate(
            "document.getElementById('limit-upload').value = 'lots';"
            "document.getElementById('limits-save').click()"
        )
        refusal = await page.wait_for(
            "document.querySelector('#settings-result.bad')?.textContent",
            20,
            "the refusal",
        )
        assert "limits.upload" in refusal
        assert svc.config.limits.upload == 0

        # The other settings: a checkbox and a number, saved together.
        await page.evaluate(
            "document.getElementById('setting-upload-auto-delete').click();"
            "document.getElementById('setting-aria2-max-concurrent-downloads').value = '3';"
            "document.getElementById('settings-save').click()"
        )
        await page.wait_for(
            "document.querySelectorAll('#changes-body tr').length === 3",
            20,
            "two more changes",
        )
        assert svc.config.upload.auto_delete is True
        assert svc.config.aria2.max_concurrent_downloads == 3
        options = await svc.service.parts.engine.transport.call("aria2.getGlobalOption")
        assert options["max-concurrent-downloads"] == "3"
