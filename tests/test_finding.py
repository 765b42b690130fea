"""Finding downloads: the flat list's name search, filters and cursor paging (on each store),
and bulk actions on a selection through a real service."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from records import DownloadSearch, NewDownload
from tests.support.http_files import FileServer
from tests.support.service import ServiceFactory
from tests.support.stores import StoreBackend
from tests.test_engine_api import FINAL, WAIT, add_link, add_links, path_exists, settled
from tests.test_uploads import make_video


async def test_search_matches_parts_of_names_filters_and_pages(store_backend: StoreBackend) -> None:
    async with store_backend.database() as db:
        names = ["Holiday_2024.mkv", "holiday%.mp4", "other.bin", "HOLIDAYX.txt", None]
        ids = [
            await db.create_download(
                NewDownload(
                    source_type="magnet" if n == "other.bin" else "http",
                    source_key=f"k{i}",
                    source_url=f"http://h/{i}",
                    file_name=n,
                )
            )
            for i, n in enumerate(names)
        ]
        await db.create_upload(ids[0], "cloud", None, 3)
        await db.create_upload(ids[2], "cloud", None, 3)

        async def found(limit: int = 50, **filters: object) -> list[int]:
            rows = await db.search_downloads(limit, DownloadSearch(**filters))  # type: ignore[arg-type]
            return [r.id for r in rows]

        assert await found() == ids[::-1]
        assert await found(name="HOLIDAY") == [ids[3], ids[1], ids[0]]
        # % and _ are letters in a search, not patterns
        assert await found(name="y%") == [ids[1]]
        assert await found(name="y_") == [ids[0]]
        assert await found(name="nothing like it") == []
        assert await found(source="magnet") == [ids[2]]
        assert await found(target="cloud") == [ids[2], ids[0]]
        assert await found(target="cloud", source="http") == [ids[0]]
        assert await found(status="pending", name="other") == [ids[2]]
        assert await found(status="failed") == []
        # keyset pages: a row arriving between pages neither repeats nor shifts the next page
        first = await found(2, name="holiday")
        assert first == [ids[3], ids[1]]
        await db.create_download(
            NewDownload(source_type="http", source_key="new", file_name="holiday new")
        )
        assert await found(2, name="holiday", before=first[-1]) == [ids[0]]


async def test_the_flat_list_api_filters_pages_and_refuses_bad_values(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    svc = await settled(await service_factory())
    for name in ("alpha-one.bin", "alpha-two.bin", "beta.bin"):
        file_server.add_file(name, size=1000)
    rows = await add_links(
        svc, *(file_server.url(n) for n in ("alpha-one.bin", "alpha-two.bin", "beta.bin"))
    )
    for row in rows:
        await svc.wait_download(row["id"], FINAL, timeout=WAIT)

    status, page = await svc.api("GET", "/api/downloads?q=ALPHA&limit=1")
    assert status == 200, page
    assert [d["id"] for d in page["downloads"]] == [rows[1]["id"]]
    cursor = page["next_cursor"]
    assert cursor
    status, page = await svc.api("GET", f"/api/downloads?q=ALPHA&limit=1&cursor={cursor}")
    assert [d["id"] for d in page["downloads"]] == [rows[0]["id"]]
    status, page = await svc.api(
        "GET", f"/api/downloads?q=ALPHA&limit=1&cursor={page['next_cursor']}"
    )
    assert page == {"next_cursor": None, "downloads": []}
    status, page = await svc.api("GET", "/api/downloads?q=beta&source=http&status=completed")
    assert [d["id"] for d in page["downloads"]] == [rows[2]["id"]]
    assert page["next_cursor"] is None
    status, page = await svc.api("GET", "/api/downloads?source=magnet")
    assert page["downloads"] == []

    for query, named in (
        (f"q=beta&cursor={cursor}", "other filters"),
        ("cursor=bm90LW9uZQ", "not one this list gave"),
        ("source=gopher", "source must be one of"),
        ("target=nowhere", "target must be one of"),
        ("q=" + "x" * 201, "q must be at most"),
    ):
        status, answer = await svc.api("GET", f"/api/downloads?{query}")
        assert status == 400, (query, answer)
        assert named in str(answer["error"]) + str(answer.get("detail")), (query, answer)


async def test_bulk_actions_answer_per_id_under_the_status_rules(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    svc = await settled(await service_factory())
    file_server.add_file("keep.bin", size=5000)
    file_server.add_file("gone.bin", size=5000)
    done = await add_links(svc, file_server.url("keep.bin"), file_server.url("gone.bin"))
    failed = await add_link(svc, file_server.status_url(404))
    for row in [*done, failed]:
        await svc.wait_download(row["id"], FINAL, timeout=WAIT)
    completed = await svc.wait_download(done[0]["id"], ["completed"])
    path = completed["local_path"]
    assert await path_exists(path)

    status, answer = await svc.api(
        "POST", "/api/downloads/bulk", json={"action": "cancel", "ids": [done[0]["id"], 999999]}
    )
    assert status == 200, answer
    assert [(r["id"], r["ok"], r.get("error")) for r in answer["results"]] == [
        (done[0]["id"], False, "conflict"),
        (999999, False, "not_found"),
    ]
    status, answer = await svc.api(
        "POST", "/api/downloads/bulk", json={"action": "delete_file", "ids": [done[0]["id"]]}
    )
    assert answer["results"] == [{"id": done[0]["id"], "ok": True, "status": "completed"}]
    assert not await path_exists(path)
    status, kept = await svc.api("GET", f"/api/downloads/{done[0]['id']}")
    assert status == 200 and kept["status"] == "completed"

    status, answer = await svc.api(
        "POST",
        "/api/downloads/bulk",
        json={"action": "retry", "ids": [failed["id"], done[1]["id"]]},
    )
    retried, refused = answer["results"]
    assert retried["ok"] and retried["status"] in ("pending", "waiting", "downloading", "failed")
    assert (refused["ok"], refused["error"]) == (False, "conflict")
    assert "completed: cannot become pending" in refused["message"]
    status, answer = await svc.api(
        "POST",
        "/api/downloads/bulk",
        json={"action": "delete", "ids": [done[1]["id"], done[1]["id"]]},
    )
    assert answer["results"] == [{"id": done[1]["id"], "ok": True, "status": "completed"}]
    status, _ = await svc.api("GET", f"/api/downloads/{done[1]['id']}")
    assert status == 404

    for body, named in (
        ({"action": "explode", "ids": [1]}, '"action" must be one of'),
        ({"action": "retry", "ids": []}, '"ids" must be'),
        ({"action": "retry", "ids": ["1"]}, '"ids" must be'),
        ({"action": "retry", "ids": [True]}, '"ids" must be'),
        ({"action": "retry", "ids": list(range(1, 502))}, '"ids" must be'),
        ({"action": "retry", "ids": [1], "extra": 1}, "unknown fields: extra"),
    ):
        status, answer = await svc.api("POST", "/api/downloads/bulk", json=body)
        assert status == 400, (body, answer)
        assert named in str(answer), (body, answer)


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
async def test_a_video_gets_a_thumbnail_made_once_behind_the_stream_signature(
    tmp_path: Path, service_factory: ServiceFactory, file_server: FileServer
) -> None:
    video = await asyncio.to_thread(make_video, tmp_path / "clip.mp4")
    file_server.add_file("clip.mp4", data=await asyncio.to_thread(video.read_bytes))
    file_server.add_file("plain.bin", size=1000)
    svc = await settled(await service_factory())
    clip, plain = await add_links(svc, file_server.url("clip.mp4"), file_server.url("plain.bin"))
    await svc.wait_download(plain["id"], ["completed"])
    deadline = time.monotonic() + WAIT
    while (row := await svc.wait_download(clip["id"], ["completed"]))["media_info"] is None:
        assert time.monotonic() < deadline, "the video was never probed"
        await asyncio.sleep(0.1)
    assert row["media_info"]["width"] == 320
    url = row["thumbnail_url"]
    assert url and url.startswith(f"{svc.base_url}/thumb/{clip['id']}?sig=")
    status, answer = await svc.api("GET", f"/api/downloads/{plain['id']}")
    assert status == 200 and answer["thumbnail_url"] is None  # no picture in it

    kept = svc.config.data_dir / "thumbnails" / f"{clip['id']}.jpg"
    for _ in range(2):  # made by the first request, served from the data folder after
        async with svc.http.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == "image/jpeg"
            body = await response.read()
        assert body[:3] == b"\xff\xd8\xff"  # a JPEG
        assert await asyncio.to_thread(kept.read_bytes) == body
    assert sorted(p.name for p in kept.parent.iterdir()) == [kept.name]

    forged = url.replace("sig=", "sig=x")
    other = url.replace(f"/thumb/{clip['id']}?", f"/thumb/{plain['id']}?")
    for wrong, expected in ((forged, 403), (other, 403), (url.split("?")[0], 403)):
        async with svc.http.get(wrong) as response:
            assert response.status == expected, wrong
