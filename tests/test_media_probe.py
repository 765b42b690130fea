"""Media facts with the real ffprobe: tiny files made by ffmpeg, a file that is not media, a
missing or hanging ffprobe, and the event loop staying responsive while ffprobe works."""

from __future__ import annotations

import asyncio
import itertools
import random
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from loguru import logger

from db import Database
from files import DownloadFiles
from records import DownloadRow, NewDownload, TorrentFile
from tests.support.processes import pid_alive
from uploads.media import MediaProber, is_media_name, probe


@dataclass(frozen=True)
class MediaFiles:
    video: Path  # 64x48 mpeg4 + aac, 1 s
    audio: Path  # aac in m4a, 1 s
    text: Path


def _ffmpeg(*args: str) -> None:
    subprocess.run(
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args],
        check=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def media_files(tmp_path_factory: pytest.TempPathFactory) -> MediaFiles:
    root = tmp_path_factory.mktemp("media")
    video, audio, text = root / "clip.mp4", root / "tone.m4a", root / "notes.txt"
    _ffmpeg(
        "-f", "lavfi", "-i", "testsrc=duration=1:size=64x48:rate=10",
        "-f", "lavfi", "-i", "sine=duration=1",
        "-shortest", "-c:v", "mpeg4", "-c:a", "aac", str(video),
    )  # fmt: skip
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(audio))
    text.write_text("not a media file\n" * 100)
    return MediaFiles(video, audio, text)


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def warnings() -> Iterator[list[str]]:
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    try:
        yield messages
    finally:
        logger.remove(sink)


async def test_probe_reads_video_and_audio(media_files: MediaFiles) -> None:
    video = await probe(media_files.video)
    assert video is not None
    assert (video["width"], video["height"]) == (64, 48)
    assert video["video_codec"] == "mpeg4"
    assert video["audio_codec"] == "aac"
    assert "mp4" in (video["format"] or "")
    assert 0.5 < (video["duration"] or 0) < 2.0
    # The raw answer is kept whole as the audit copy.
    assert {s["codec_type"] for s in video["ffprobe"]["streams"]} == {"video", "audio"}
    assert video["ffprobe"]["format"]["filename"].endswith("clip.mp4")

    audio = await probe(media_files.audio)
    assert audio is not None
    assert audio["audio_codec"] == "aac"
    assert audio["video_codec"] is None and audio["width"] is None and audio["height"] is None
    assert 0.5 < (audio["duration"] or 0) < 2.0


async def test_probe_returns_none_for_what_ffprobe_cannot_read(
    media_files: MediaFiles, tmp_path: Path
) -> None:
    # ffprobe would render any text as ANSI art ("tty"): that is not media.
    assert await probe(media_files.text) is None
    noise = tmp_path / "noise.bin"
    noise.write_bytes(random.Random(7).randbytes(50_000))
    assert await probe(noise) is None
    assert await probe(tmp_path / "absent.mp4") is None
    # A name that looks like a protocol or an option is still read as a local file.
    odd = tmp_path / "-concat:x.mp4"
    odd.write_bytes(media_files.video.read_bytes())
    info = await probe(odd)
    assert info is not None and info["width"] == 64


async def test_missing_ffprobe_warns_once(media_files: MediaFiles, warnings: list[str]) -> None:
    missing = "/nonexistent/bin/ffprobe-for-test"
    assert await probe(media_files.video, missing) is None
    assert await probe(media_files.audio, missing) is None
    assert len([m for m in warnings if "ffprobe-for-test" in m]) == 1


async def test_hanging_ffprobe_is_killed_by_pid(
    media_files: MediaFiles, tmp_path: Path, warnings: list[str]
) -> None:
    pid_file = tmp_path / "pid"
    # exec: the PID the probe kills is the sleeping process itself, not a shell around it.
    hanging = _script(tmp_path / "ffprobe-hangs", f'echo $$ > "{pid_file}"\nexec sleep 60')
    started = time.monotonic()
    assert await probe(media_files.video, hanging, timeout=0.5) is None
    assert time.monotonic() - started < 10
    pid = int(pid_file.read_text())
    assert not pid_alive(pid)
    assert any("killed" in m for m in warnings)


async def test_event_loop_keeps_running_while_probing(
    media_files: MediaFiles, tmp_path: Path
) -> None:
    # A slow ffprobe (1 s of sleep first) makes a blocking implementation visible: the heartbeat
    # would stall for the whole second.
    slow = _script(tmp_path / "ffprobe-slow", 'sleep 1\nexec ffprobe "$@"')
    beats: list[float] = []

    async def heartbeat() -> None:
        while True:
            beats.append(time.monotonic())
            await asyncio.sleep(0.02)

    ticker = asyncio.create_task(heartbeat())
    try:
        await asyncio.sleep(0.05)
        before = len(beats)
        info = await probe(media_files.video, slow)
    finally:
        ticker.cancel()
    assert info is not None and info["width"] == 64
    assert len(beats) - before >= 10
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    assert max(gaps) < 0.5


def test_media_names() -> None:
    assert is_media_name("Film.MKV")
    assert is_media_name("song.flac")
    assert is_media_name("voice", "audio/ogg")
    assert not is_media_name("archive.zip")
    assert not is_media_name("notes.txt", "text/plain")


# -- the completion listener with a real database ---------------------------------------------


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database(tmp_path / "data" / "mistrelay.db")
    await database.open()
    try:
        yield database
    finally:
        await database.close()


async def _completed_row(
    db: Database, name: str, local_path: Path, size: int, files: list[TorrentFile] | None = None
) -> DownloadRow:
    download_id = await db.create_download(
        NewDownload(
            source_type="torrent" if files else "http",
            source_key=f"test:{name}",
            source_url=None if files else f"http://127.0.0.1:9/{name}",
            file_name=name,
        )
    )
    gid = f"{download_id:016x}"
    await db.mark_download_queued_by_id(download_id, gid)
    await db.mark_download_started(gid)
    if files:
        await db.update_download_details_by_id(download_id, files=files)
    await db.mark_download_completed(gid, str(local_path), size)
    row = await db.get_download_by_id(download_id)
    assert row is not None
    return row


async def test_prober_stores_media_info_of_completed_downloads(
    db: Database, media_files: MediaFiles, tmp_path: Path
) -> None:
    downloads = tmp_path / "downloads"
    single = downloads / "1" / "clip.mp4"
    single.parent.mkdir(parents=True)
    single.write_bytes(media_files.video.read_bytes())
    plain = downloads / "2" / "notes.txt"
    plain.parent.mkdir(parents=True)
    plain.write_bytes(media_files.text.read_bytes())
    pack = downloads / "3" / "pack"
    (pack / "sub").mkdir(parents=True)
    (pack / "sub" / "clip.mp4").write_bytes(media_files.video.read_bytes())
    (pack / "tone.m4a").write_bytes(media_files.audio.read_bytes())
    (pack / "readme.txt").write_text("hello")

    video_row = await _completed_row(db, "clip.mp4", single, single.stat().st_size)
    text_row = await _completed_row(db, "notes.txt", plain, plain.stat().st_size)
    files = [
        TorrentFile(0, "pack/readme.txt", 5),
        TorrentFile(1, "pack/sub/clip.mp4", (pack / "sub" / "clip.mp4").stat().st_size),
        TorrentFile(2, "pack/tone.m4a", (pack / "tone.m4a").stat().st_size),
    ]
    pack_row = await _completed_row(db, "pack", pack, sum(f.length for f in files), files)

    prober = MediaProber(db, files=DownloadFiles(downloads))
    await prober.start()
    try:
        for row in (video_row, text_row, pack_row):
            await prober.on_download_completed(row)
        await prober.wait_idle()
    finally:
        await prober.stop()

    stored = await db.get_download_by_id(video_row.id)
    assert stored is not None and stored.media_info is not None
    assert (stored.media_info["width"], stored.media_info["height"]) == (64, 48)
    assert stored.media_info["ffprobe"]["streams"]

    text = await db.get_download_by_id(text_row.id)
    assert text is not None and text.media_info is None

    torrent = await db.get_download_by_id(pack_row.id)
    assert torrent is not None and torrent.media_info is not None
    assert torrent.media_info["file"] == "pack/sub/clip.mp4"  # the largest media file
    assert [f["file"] for f in torrent.media_info["files"]] == [
        "pack/sub/clip.mp4",
        "pack/tone.m4a",
    ]
    assert torrent.media_info["files"][1]["audio_codec"] == "aac"


async def test_prober_leaves_files_outside_the_download_dir_alone(
    db: Database, media_files: MediaFiles, tmp_path: Path
) -> None:
    row = await _completed_row(db, "clip.mp4", media_files.video, media_files.video.stat().st_size)
    prober = MediaProber(db, files=DownloadFiles(tmp_path / "downloads"))
    await prober.start()
    await prober.on_download_completed(row)
    await prober.wait_idle()
    await prober.stop()
    stored = await db.get_download_by_id(row.id)
    assert stored is not None and stored.media_info is None
