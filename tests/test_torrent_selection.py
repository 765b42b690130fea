"""Choosing a torrent's files: the API checks the choice, aria2 (real) fetches only those files."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.rclone_cloud import RcloneCloud
from tests.support.service import RunningService, ServiceFactory
from tests.support.torrents import SeederFactory, Tracker, make_torrent
from tests.test_archives import read_tree
from tests.test_browser import CHROMIUM, chromium, sign_in
from tests.test_engine_api import FINAL, fetch, path_exists, read_file, settled
from tests.test_engine_sources import three_files, upload_torrent
from tests.test_uploads import all_in, rclone_target, upload_overrides, wait_uploads

WAIT = 90.0


@pytest.fixture
async def svc(service_factory: ServiceFactory) -> RunningService:
    return await settled(await service_factory())


@pytest.mark.slow
async def test_only_the_chosen_files_of_a_torrent_are_fetched_and_streamed(
    svc: RunningService, tracker: Tracker, seeder_factory: SeederFactory, tmp_path: Path
) -> None:
    # No seeder yet: the torrent waits for peers while its files are chosen.
    info = make_torrent(three_files(), tmp_path / "seed", tracker.announce_url, "choice")
    status, answer = await upload_torrent(svc, info.torrent_bytes)
    assert status == 201, answer
    row = answer["downloads"][0]
    path = f"/api/downloads/{row['id']}/files"
    by_index = {f["index"]: f["path"] for f in row["files"]}
    assert sorted(by_index) == [1, 2, 3]

    wrong: list[tuple[object, str]] = [
        ({"select": []}, "at least one"),
        ({"select": [1, 3, 1]}, "repeated: 1"),
        ({"select": [1, 4, 0]}, "no file with index 0, 4"),
        ({"select": ["1"]}, "integers"),
        ({"select": [True]}, "integers"),
        ({"select": 1}, "integers"),
        ({"choose": [1]}, "unknown fields: choose"),
        ([1], "object"),
    ]
    for body, named in wrong:
        status, answer = await svc.api("PUT", path, json=body)
        assert status == 400, (body, answer)
        assert named in str(answer["detail"]), (body, answer)
    status, answer = await svc.api("PUT", "/api/downloads/999999/files", json={"select": [1]})
    assert status == 404, answer

    status, answer = await svc.api("PUT", path, json={"select": [3, 1]})
    assert status == 200, answer
    assert [(f["index"], f["selected"]) for f in answer["files"]] == [
        (1, True),
        (2, False),
        (3, True),
    ]
    assert answer["total"] == 3
    options = await svc.service.parts.engine.aria2.get_option(row["gid"])
    assert options["select-file"] == "1,3"
    # The choice may change while the job is live; the last one holds.
    status, answer = await svc.api("PUT", path, json={"select": [2]})
    assert status == 200, answer
    status, answer = await svc.api("PUT", path, json={"select": [1, 3]})
    assert status == 200, answer
    status, listed = await svc.api("GET", path)
    assert status == 200, listed
    assert [f["selected"] for f in listed["files"]] == [True, False, True]
    # Cancelled and retried, the job is added to aria2 again with its choice.
    for action in ("cancel", "retry"):
        status, answer = await svc.api("POST", f"/api/downloads/{row['id']}/{action}")
        assert status == 200, (action, answer)
    again = await svc.wait_download(row["id"], ("waiting", "downloading"), timeout=WAIT)
    assert again["gid"] != row["gid"]
    options = await svc.service.parts.engine.aria2.get_option(again["gid"])
    assert options["select-file"] == "1,3"

    await seeder_factory(info)
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    job_dir = svc.config.aria2.download_dir / str(row["id"])
    files = {f["index"]: f for f in done["files"]}
    for index in (1, 3):
        data = info.files[by_index[index]]
        assert await read_file(job_dir / by_index[index]) == data
        link = files[index]["stream_url"]
        assert link, files[index]
        status, _, body = await fetch(svc, link)
        assert status == 200 and body == data, (index, status)
    # The file left out was not fetched whole and has no stream link.
    left_out = job_dir / by_index[2]
    assert not await path_exists(left_out) or (await read_file(left_out)) != info.files[by_index[2]]
    assert files[2]["selected"] is False and files[2]["stream_url"] is None

    status, answer = await svc.api("PUT", path, json={"select": [2]})
    assert status == 409, answer  # a finished job keeps the files it has
    assert answer["detail"]["status"] == "completed"


@pytest.mark.slow
async def test_only_the_chosen_files_of_a_torrent_are_uploaded(
    tmp_path: Path,
    service_factory: ServiceFactory,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    tracker: Tracker,
    seeder_factory: SeederFactory,
) -> None:
    svc = await service_factory(
        upload_overrides(rclone_config, [rclone_target("dav", "testdav", "/s")])
    )
    info = make_torrent(three_files(), tmp_path / "seed", tracker.announce_url, "part")
    status, answer = await upload_torrent(svc, info.torrent_bytes)
    assert status == 201, answer
    download_id = answer["downloads"][0]["id"]
    status, answer = await svc.api(
        "PUT", f"/api/downloads/{download_id}/files", json={"select": [1, 3]}
    )
    assert status == 200, answer
    chosen = {f["path"] for f in answer["files"] if f["selected"]}
    await seeder_factory(info)

    (row,) = await wait_uploads(svc, download_id, all_in("completed", "failed"))
    assert row.status == "completed", row
    uploaded = await asyncio.to_thread(read_tree, webdav_cloud.root / "s")
    assert uploaded == {path: info.files[path] for path in chosen}


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_the_page_chooses_a_torrents_files_with_checkboxes(
    svc: RunningService, tracker: Tracker, tmp_path: Path
) -> None:
    # No seeder: the torrent stays live while its files are chosen on the page.
    info = make_torrent(three_files(), tmp_path / "seed", tracker.announce_url, "boxes")
    status, answer = await upload_torrent(svc, info.torrent_bytes)
    assert status == 201, answer
    download_id, gid = answer["downloads"][0]["id"], answer["downloads"][0]["gid"]
    row = f"document.querySelector('article.item[data-download-id=\"{download_id}\"]')"
    boxes = f"{row}.querySelectorAll('.details ul.files input.pick')"
    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        await page.send("Runtime.enable")
        await sign_in(page, svc.base_url, svc.token)
        await page.wait_for(f"!!{row}", 10, "the torrent's row")
        await page.evaluate(f"{row}.querySelector('button[data-action=\"details\"]').click()")
        await page.wait_for(f"{boxes}.length === 3", 10, "a checkbox for each file")
        assert await page.evaluate(f"Array.from({boxes}, (b) => b.checked)") == [True] * 3

        await page.evaluate(f"{boxes}[1].click()")
        await page.wait_for(
            f"Array.from({boxes}, (b) => b.checked && !b.disabled).join() === 'true,false,true'",
            10,
            "the choice shown after it was taken",
        )
        status, listed = await svc.api("GET", f"/api/downloads/{download_id}/files")
        assert [f["selected"] for f in listed["files"]] == [True, False, True], listed
        options = await svc.service.parts.engine.aria2.get_option(gid)
        assert options["select-file"] == "1,3"

        # Nothing chosen is refused, and the page says so.
        await page.evaluate(f"{boxes}[0].click()")
        await page.wait_for(
            f"Array.from({boxes}, (b) => b.checked && !b.disabled).join() === 'false,false,true'",
            10,
            "the second choice taken",
        )
        await page.evaluate(f"{boxes}[2].click()")
        error = f"{row}.querySelector('.details p.error')"
        await page.wait_for(f"!!{error}", 10, "the refusal")
        assert "at least one file" in await page.evaluate(f"{error}.textContent")
        status, listed = await svc.api("GET", f"/api/downloads/{download_id}/files")
        assert [f["selected"] for f in listed["files"]] == [False, False, True], listed
        # The boxes show the choice in force again.
        assert await page.evaluate(f"Array.from({boxes}, (b) => b.checked)") == [False, False, True]


async def wait_files_listed(svc: RunningService, download_id: int) -> dict[str, Any]:
    """The job once it is paused with its file list known (a magnet's comes with its metadata)."""
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        row = await svc.wait_download(download_id, ("paused",), timeout=WAIT)
        if row["files"]:
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"download {download_id} never listed its files")


@pytest.mark.slow
async def test_a_torrent_waits_paused_for_its_choice_then_fetches_it(
    service_factory: ServiceFactory,
    tracker: Tracker,
    seeder_factory: SeederFactory,
    tmp_path: Path,
) -> None:
    svc = await settled(
        await service_factory(
            {"aria2": {"ask_file_selection": "always", "file_selection_timeout": 600}}
        )
    )
    info = make_torrent(three_files(), tmp_path / "seed", tracker.announce_url, "asked")
    await seeder_factory(info)
    await tracker.wait_for_peers(info.info_hash, 1, within_s=20)

    status, answer = await upload_torrent(svc, info.torrent_bytes)
    assert status == 201, answer
    row = answer["downloads"][0]
    assert row["status"] == "paused", row  # nothing fetched before the choice
    status, answer = await svc.api("PUT", f"/api/downloads/{row['id']}/files", json={"select": [3]})
    assert status == 200, answer
    done = await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert [f["selected"] for f in done["files"]] == [False, False, True]
    third = done["files"][2]["path"]
    job_dir = svc.config.aria2.download_dir / str(row["id"])
    assert await read_file(job_dir / third) == info.files[third]

    # A magnet waits too, once its metadata has named the files.
    magnet = make_torrent(three_files(), tmp_path / "seed2", tracker.announce_url, "asked2")
    await seeder_factory(magnet)
    await tracker.wait_for_peers(magnet.info_hash, 1, within_s=20)
    status, answer = await svc.api("POST", "/api/downloads", json={"url": magnet.magnet})
    assert status == 201, answer
    waiting = await wait_files_listed(svc, answer["downloads"][0]["id"])
    follow_up = await svc.service.parts.engine.aria2.tell_status(waiting["gid"])
    assert follow_up.status == "paused" and follow_up.completed_length == 0, follow_up
    status, answer = await svc.api(
        "PUT", f"/api/downloads/{waiting['id']}/files", json={"select": [1]}
    )
    assert status == 200, answer
    done = await svc.wait_download(waiting["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert [f["selected"] for f in done["files"]] == [True, False, False]


@pytest.mark.slow
async def test_after_the_deadline_every_file_is_taken(
    service_factory: ServiceFactory,
    tracker: Tracker,
    seeder_factory: SeederFactory,
    tmp_path: Path,
) -> None:
    svc = await settled(
        await service_factory(
            {"aria2": {"ask_file_selection": "always", "file_selection_timeout": 1}}
        )
    )
    info = make_torrent(three_files(), tmp_path / "seed", tracker.announce_url, "late")
    await seeder_factory(info)
    await tracker.wait_for_peers(info.info_hash, 1, within_s=20)
    status, answer = await upload_torrent(svc, info.torrent_bytes)
    assert status == 201, answer
    assert answer["downloads"][0]["status"] == "paused", answer
    done = await svc.wait_download(answer["downloads"][0]["id"], FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert all(f["selected"] for f in done["files"]), done["files"]
    job_dir = svc.config.aria2.download_dir / str(done["id"])
    for path, data in info.files.items():
        assert await read_file(job_dir / path) == data
