"""Archive extraction and folder zipping with the real tools (unar, lsar, zstd, zip).

Every archive is made here, in the test, with the standard tools or the standard library:
good ones, a password one, and hostile ones (an entry climbing out with "..", an absolute path,
a symbolic link, a hard link, a bomb by size and by ratio).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import aiohttp
import pytest
from pyrogram import Client as PyrogramClient

from tests.support.fake_telegram import FakeTelegram
from tests.support.http_files import FileServer
from tests.support.rclone_cloud import RcloneCloud
from tests.support.service import ServiceFactory
from tests.support.torrents import SeederFactory, Tracker, make_torrent
from tests.test_bot import RelayFactory, relay_factory  # noqa: F401 (the relay fixture)
from tests.test_browser import CHROMIUM, chromium, sign_in
from tests.test_uploads import (
    all_in,
    completed_download,
    known_user,
    rclone_target,
    standalone_manager,
    telegram_config,
    upload_overrides,
    wait_row,
    wait_uploads,
)
from uploads.archives import ArchiveError, ArchiveLimits, archive_stem, extract, zip_folder

LIMITS = ArchiveLimits(max_size=10 * 1024 * 1024, max_ratio=100)


def make_tree(root: Path) -> dict[str, bytes]:
    files = {"a.txt": b"hello\n", "sub/b.bin": os.urandom(50_000), "sub/deeper/c.txt": b"c" * 10}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, data: bytes = b"x", **extra: object) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in extra.items():
        setattr(info, key, value)
    return info, data


def run(command: list[str], cwd: Path | None = None) -> None:
    subprocess.run(command, cwd=cwd, check=True, timeout=60)


def names_in(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_archive_names() -> None:
    assert archive_stem("Film.tar.gz") == "Film"
    assert archive_stem("pack.ZIP") == "pack"
    assert archive_stem("x.tar.zst") == "x"
    assert archive_stem("movie.mkv") is None
    assert archive_stem(".zip") is None


@pytest.mark.parametrize("kind", ["zip", "tar.gz", "tar.xz", "tar.zst"])
async def test_good_archives_extract_whole(tmp_path: Path, kind: str) -> None:
    source = tmp_path / "src"
    files = make_tree(source)
    archive = tmp_path / f"pack.{kind}"
    if kind == "zip":
        await asyncio.to_thread(run, ["zip", "-q", "-r", str(archive), "."], source)
    else:
        flag = {"tar.gz": "--gzip", "tar.xz": "--xz", "tar.zst": "--zstd"}[kind]
        await asyncio.to_thread(run, ["tar", flag, "-cf", str(archive), "-C", str(source), "."])
    out = await extract(archive, tmp_path / "pack", LIMITS)
    assert read_tree(out) == files
    assert await asyncio.to_thread(names_in, tmp_path) == ["pack", archive.name, "src"]


async def test_password_zip(tmp_path: Path) -> None:
    source = tmp_path / "src"
    files = make_tree(source)
    archive = tmp_path / "secret.zip"
    await asyncio.to_thread(run, ["zip", "-q", "-r", "-P", "s3cret", str(archive), "."], source)

    with pytest.raises(ArchiveError, match="needs a password"):
        await extract(archive, tmp_path / "none", LIMITS)
    with pytest.raises(ArchiveError, match="password"):
        await extract(archive, tmp_path / "wrong", LIMITS, password="nope")
    assert not (tmp_path / "none").exists() and not (tmp_path / "wrong").exists()
    out = await extract(archive, tmp_path / "right", LIMITS, password="s3cret")
    assert read_tree(out) == files


@pytest.mark.parametrize(
    ("members", "refusal"),
    [
        ([member("../escape.txt")], "'../escape.txt' would land outside"),
        ([member("ok/../../escape.txt")], "would land outside"),
        ([member("/etc/evil")], "'/etc/evil' would land outside"),
        ([member("link", b"", type=tarfile.SYMTYPE, linkname="/etc/passwd")], "'link' is a link"),
        (
            [member("a.txt"), member("hard", b"", type=tarfile.LNKTYPE, linkname="a.txt")],
            "'hard' is a link",
        ),
    ],
)
async def test_hostile_entries_are_refused_before_anything_is_written(
    tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes]], refusal: str
) -> None:
    archive = tar_with(tmp_path / "bad.tar.gz", *members)
    with pytest.raises(ArchiveError, match=refusal):
        await extract(archive, tmp_path / "jobs" / "bad", LIMITS)
    assert list((tmp_path / "jobs").iterdir()) == []
    assert not (tmp_path / "escape.txt").exists()


async def test_bombs_are_refused_by_ratio_and_by_total_size(tmp_path: Path) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("zeros.bin", bytes(5 * 1024 * 1024))
    assert archive.stat().st_size < 10_000
    with pytest.raises(ArchiveError, match=r"× its size, more than the cap of 100×"):
        await extract(archive, tmp_path / "ratio", LIMITS)
    small_cap = ArchiveLimits(max_size=1024 * 1024, max_ratio=1e9)
    with pytest.raises(ArchiveError, match="more than the cap of 1048576"):
        await extract(archive, tmp_path / "size", small_cap)
    assert not (tmp_path / "ratio").exists() and not (tmp_path / "size").exists()


async def test_a_zstd_bomb_stops_at_the_cap(tmp_path: Path) -> None:
    plain = tmp_path / "big.tar"
    with tarfile.open(plain, "w") as handle:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 3 * 1024 * 1024
        handle.addfile(info, io.BytesIO(bytes(info.size)))
    await asyncio.to_thread(run, ["zstd", "-q", "--rm", str(plain), "-o", f"{plain}.zst"])
    with pytest.raises(ArchiveError, match="unpacks to more than 1048576 bytes"):
        await extract(tmp_path / "big.tar.zst", tmp_path / "big", ArchiveLimits(1024 * 1024, 1e9))
    assert await asyncio.to_thread(names_in, tmp_path) == ["big.tar.zst"]


async def test_not_an_archive(tmp_path: Path) -> None:
    fake = tmp_path / "fake.zip"
    fake.write_bytes(b"this is no zip at all")
    with pytest.raises(ArchiveError, match="cannot be read as an archive"):
        await extract(fake, tmp_path / "fake", LIMITS)
    with pytest.raises(ArchiveError, match="not an archive that can be extracted"):
        await extract(tmp_path / "movie.mkv", tmp_path / "movie", LIMITS)


async def test_zip_folder_keeps_files_and_leaves_links_out(tmp_path: Path) -> None:
    folder = tmp_path / "Album"
    files = make_tree(folder)
    (folder / "link").symlink_to("/etc/passwd")
    out = await zip_folder(folder, tmp_path / "Album.zip")
    with zipfile.ZipFile(out) as handle:
        assert handle.testzip() is None
        stored = {
            info.filename: handle.read(info) for info in handle.infolist() if not info.is_dir()
        }
    assert stored == {f"Album/{name}": data for name, data in files.items()}
    # And the zip goes back through extraction to the same files.
    again = await extract(out, tmp_path / "again", ArchiveLimits(10 * 1024 * 1024, 10))
    assert read_tree(again / "Album") == files


# --------------------------------------------------------------------------- through the service


def zip_bytes(files: dict[str, bytes], password: str | None, cwd: Path) -> bytes:
    """A zip of `files` made by the zip tool (ZipCrypto when a password is given)."""
    source, out = cwd / "zip-in", cwd / "zip-out.zip"
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    run(["zip", "-q", "-r", *(["-P", password] if password else []), str(out), "."], source)
    made = out.read_bytes()
    shutil.rmtree(source)
    out.unlink()
    return made


async def test_api_extracts_a_password_zip_before_uploading_and_cleans_up(
    tmp_path: Path,
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(rclone_config, [rclone_target("dav", "testdav", "/x")], auto_delete=True)
    )
    files = {"doc.txt": b"hello\n", "photos/p.bin": os.urandom(40_000)}
    data = await asyncio.to_thread(zip_bytes, files, "pw", tmp_path)
    file_server.add_file("photos.zip", data=data)
    body = {"url": file_server.url("photos.zip"), "archive": "extract", "archive_password": "pw"}
    status, answer = await svc.api("POST", "/api/downloads", json=body)
    assert status == 201, answer
    assert "pw" not in json.dumps(answer)  # the password is never shown
    download_id = answer["downloads"][0]["id"]
    await svc.wait_download(download_id, {"completed"}, timeout=60)

    (row,) = await wait_uploads(
        svc, download_id, lambda rows: len(rows) == 1 and rows[0].cleaned_at is not None
    )
    assert row.status == "completed" and row.remote_path == "testdav:/x/photos"
    assert await asyncio.to_thread(read_tree, webdav_cloud.root / "x" / "photos") == files
    option = await svc.service.parts.store.get_archive_option(download_id)
    assert option is not None and option.password is None  # forgotten once used
    job = svc.service.parts.files.job_dir(download_id)
    assert not await asyncio.to_thread(job.exists)  # archive and extraction both deleted


async def test_api_refuses_a_bomb_and_bad_archive_fields(
    tmp_path: Path,
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    settings = upload_overrides(rclone_config, [rclone_target("dav", "testdav", "/y")])
    settings["upload"]["extract_max_ratio"] = 50
    svc = await service_factory(settings)
    for bad, says in [
        ({"archive": "explode"}, '"archive" must be one of extract, zip'),
        ({"archive": "zip", "archive_password": "x"}, "goes only with"),
        ({"archive_password": "x"}, 'needs "archive"'),
        ({"archive": "extract", "archive_password": ""}, "1-1024 characters"),
    ]:
        status, answer = await svc.api(
            "POST", "/api/downloads", json={"url": file_server.url("a"), **bad}
        )
        assert status == 400 and says in str(answer), (bad, answer)

    bomb = await asyncio.to_thread(zip_bytes, {"zeros.bin": bytes(2 * 1024 * 1024)}, None, tmp_path)
    file_server.add_file("bomb.zip", data=bomb)
    status, answer = await svc.api(
        "POST", "/api/downloads", json={"url": file_server.url("bomb.zip"), "archive": "extract"}
    )
    assert status == 201, answer
    download_id = answer["downloads"][0]["id"]
    (row,) = await wait_uploads(svc, download_id, all_in("failed"))
    assert row.failure_reason == "archive_refused"
    assert "more than the cap of 50×" in (row.error_message or "")
    assert not await asyncio.to_thread((webdav_cloud.root / "y").exists)
    job = svc.service.parts.files.job_dir(download_id)
    assert await asyncio.to_thread(names_in, job) == ["bomb.zip"]  # nothing was extracted


async def test_bot_button_and_command_ask_for_extraction_before_upload(
    tmp_path: Path,
    relay_factory: RelayFactory,  # noqa: F811 (the fixture imported above)
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    relay = await relay_factory(
        upload_overrides(rclone_config, [rclone_target("dav", "testdav", "/z")])
    )
    chat = relay.chat()
    files = {"notes.txt": b"bot\n", "deep/x.bin": os.urandom(30_000)}
    for name, password in (("plain.zip", None), ("locked.zip", "pw 2")):
        made = await asyncio.to_thread(zip_bytes, files, password, tmp_path)
        file_server.add_file(name, data=made)
    plain_url = file_server.url("plain.zip", route="hold", bytes=1000)
    locked_url = file_server.url("locked.zip", route="hold", bytes=1000)
    [plain_ack] = await chat.say(plain_url)
    await chat.say(locked_url)
    plain, locked = sorted(await relay.jobs(2), key=lambda row: row.id)

    # The job's first message carries the button while the job downloads.
    button = f"a:extract:{plain.id}".encode()
    assert button in plain_ack.callback_data
    answer = await chat.press(plain_ack.message_id, button)
    assert answer.text == f"#{plain.id}: the archive will be extracted before it is uploaded."
    # A password goes with the command (the rest of the line, spaces kept).
    [reply] = await chat.say(f"/extract {locked.id} pw 2")
    assert reply.text == f"#{locked.id}: the archive will be extracted before it is uploaded."
    option = await relay.db.get_archive_option(locked.id)
    assert option is not None and (option.action, option.password) == ("extract", "pw 2")

    file_server.release()
    for row, folder in ((plain, "plain"), (locked, "locked")):
        await wait_uploads(relay.running, row.id, all_in("completed"))
        assert await asyncio.to_thread(read_tree, webdav_cloud.root / "z" / folder) == files
    # Too late once the job completed.
    answer = await chat.press(plain_ack.message_id, button)
    assert answer.text == f"#{plain.id} has finished downloading; its upload is already under way."


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_the_page_asks_for_extraction_with_a_password(
    tmp_path: Path,
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(rclone_config, [rclone_target("dav", "testdav", "/p")])
    )
    files = {"page.txt": b"from the page\n", "d/e.bin": os.urandom(20_000)}
    file_server.add_file("paged.zip", data=await asyncio.to_thread(zip_bytes, files, "s", tmp_path))
    password = "document.getElementById('add-archive-password')"
    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        await page.send("Runtime.enable")
        await sign_in(page, svc.base_url, svc.token)
        assert await page.evaluate(f"{password}.hidden") is True
        await page.evaluate(
            "const s = document.getElementById('add-archive'); s.value = 'extract';"
            " s.dispatchEvent(new Event('change'))"
        )
        assert await page.evaluate(f"{password}.hidden") is False
        await page.evaluate(f"{password}.focus()")
        await page.send("Input.insertText", {"text": "s"})
        await page.evaluate("document.getElementById('add-links').focus()")
        await page.send("Input.insertText", {"text": file_server.url("paged.zip")})
        await page.evaluate("document.getElementById('add-submit').click()")
        await page.wait_for(
            "document.querySelector('#add-result li.ok') !== null", 10, "the added line"
        )
        assert await page.evaluate(f"{password}.value") == ""  # not kept in the page
    (row,) = await svc.service.parts.store.fetch_recent_downloads(5)
    await wait_uploads(svc, row.id, all_in("completed"))
    assert await asyncio.to_thread(read_tree, webdav_cloud.root / "p" / "paged") == files


async def test_a_folder_is_zipped_once_and_sent_to_telegram_as_one_file(
    tmp_path: Path, fake_telegram: FakeTelegram, tg_client: PyrogramClient
) -> None:
    chat_id = await known_user(fake_telegram, tg_client)
    files = {"one.txt": b"1", "two/three.bin": os.urandom(10_000)}
    async with standalone_manager(
        tmp_path, telegram_config(chat_id), telegram_client=lambda: tg_client
    ) as (db, manager):
        await manager.start()
        row = await completed_download(db, tmp_path / "downloads", "Album", files)
        await db.set_archive_option(row.id, "zip", None)
        await manager.on_download_completed(row)
        (upload,) = await db.get_uploads_by_download(row.id)
        done = await wait_row(db, upload.id, {"completed", "failed"})
        option = await db.get_archive_option(row.id)

    assert done.status == "completed", done
    (sent,) = fake_telegram.sent_documents()
    assert sent.file_name == "Album.zip" and sent.caption == "Album.zip"
    with zipfile.ZipFile(io.BytesIO(sent.data)) as handle:
        stored = {i.filename: handle.read(i) for i in handle.infolist() if not i.is_dir()}
    assert stored == {f"Album/{name}": data for name, data in files.items()}
    assert option is not None and option.prepared_path == str(
        Path(row.local_path or "").parent / "Album.zip"
    )


@pytest.mark.slow
async def test_a_torrent_sent_to_the_api_with_zip_is_uploaded_as_one_zip(
    tmp_path: Path,
    service_factory: ServiceFactory,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
    tracker: Tracker,
    seeder_factory: SeederFactory,
) -> None:
    svc = await service_factory(
        upload_overrides(rclone_config, [rclone_target("dav", "testdav", "/t")], auto_delete=True)
    )
    files = {"a.bin": os.urandom(30_000), "sub/b.txt": b"torrent file\n"}
    info = await asyncio.to_thread(
        make_torrent, files, tmp_path / "seed", tracker.announce_url, "Set"
    )
    await seeder_factory(info)
    await tracker.wait_for_peers(info.info_hash, 1, within_s=20)
    form = aiohttp.FormData()
    form.add_field("file", info.torrent_bytes, filename="set.torrent")
    form.add_field("archive", "zip")
    status, answer = await svc.api("POST", "/api/downloads/torrent", data=form)
    assert status == 201, answer
    download_id = answer["downloads"][0]["id"]

    (row,) = await wait_uploads(
        svc, download_id, lambda rows: len(rows) == 1 and rows[0].cleaned_at is not None
    )
    assert row.status == "completed" and row.remote_path == "testdav:/t/Set.zip"
    data = await asyncio.to_thread((webdav_cloud.root / "t" / "Set.zip").read_bytes)
    with zipfile.ZipFile(io.BytesIO(data)) as handle:
        stored = {i.filename: handle.read(i) for i in handle.infolist() if not i.is_dir()}
    assert stored == {f"Set/{name}": content for name, content in files.items()}
    job = svc.service.parts.files.job_dir(download_id)
    assert not await asyncio.to_thread(job.exists)  # the folder and its zip both deleted

    bad = aiohttp.FormData()
    bad.add_field("file", info.torrent_bytes, filename="set.torrent")
    bad.add_field("archive", "shred")
    status, answer = await svc.api("POST", "/api/downloads/torrent", data=bad)
    assert status == 400 and "must be one of extract, zip" in str(answer)
