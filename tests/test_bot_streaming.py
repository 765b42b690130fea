"""Telegram files as bytes: through the bot's byte source, the real /stream route and aria2.

The key path: media sent to the bot → a tg_media row → aria2 downloads our signed loopback /stream
link → the streamer fetches the parts from (offline) Telegram → a completed file with the same
bytes.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pyrogram.file_id import FileId

from records import NewDownload, TgMediaRecord
from tests.support.fake_telegram import FakeFile, FakeTelegram
from tests.support.http_files import deterministic_bytes
from tests.test_bot import ADMIN, Relay, eventually, raw_message, relay, relay_factory

__all__ = ["relay", "relay_factory"]  # fixtures shared with test_bot.py

MIB = 1024 * 1024


async def _pending_telegram_row(relay: Relay, file: FakeFile, name: str) -> int:
    """A Telegram job recorded but not handed to aria2: /stream must serve it from Telegram."""
    media = TgMediaRecord(
        file_unique_id=file.file_unique_id,
        file_id=file.file_id,
        chat_id=ADMIN,
        message_id=1,
        media_type=file.kind,
        file_name=name,
        mime_type=file.mime_type,
        file_size=file.size,
        dc_id=file.dc_id,
    )
    new = NewDownload(
        source_type="telegram",
        source_key=f"tg:{file.file_unique_id}",
        file_name=name,
        total_length=file.size,
        file_unique_id=file.file_unique_id,
        owner_id=ADMIN,
        chat_id=None,
    )
    download_id: int = await relay.db.create_download(new, media)
    return download_id


def _stream_url(relay: Relay, download_id: int, name: str) -> str:
    signer = relay.running.service.parts.web.ctx.links.signer
    return relay.running.base_url + signer.stream_path(download_id, name)


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers=headers or {}) as response,
    ):
        return response.status, response.headers, await response.read()


# --- the key end-to-end path ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "size"),
    [("document", 3 * MIB + 1), ("video", 2 * MIB), ("photo", MIB - 1)],
)
async def test_media_reaches_disk_through_aria2_and_the_stream_link(
    relay: Relay, kind: str, size: int
) -> None:
    data = deterministic_bytes(size, seed=size)
    file = relay.fake.add_file(data, kind=kind, file_name="movie.mp4" if kind != "photo" else None)
    chat = relay.chat()
    update = chat.message_update(file=file)
    await chat.feed(update)
    [row] = await relay.jobs(1)
    media = await relay.db.get_tg_media(file.file_unique_id)
    assert media is not None and media.message_id == raw_message(update).id
    assert row.file_unique_id == file.file_unique_id and row.total_length == size
    await relay.wait_status(row.id, "completed", timeout=60)
    done = await relay.db.get_download_by_id(row.id)
    assert done.completed_length == size
    on_disk = await asyncio.to_thread(Path(done.local_path).read_bytes)
    assert on_disk == data
    # The bytes came from Telegram, part by part, on one kept media session.
    assert relay.fake.get_file_calls >= -(-size // MIB)
    assert relay.fake.media_sessions_opened[file.dc_id] == 1


@pytest.mark.slow
async def test_expired_file_reference_is_refreshed_and_stored(relay: Relay) -> None:
    data = deterministic_bytes(2 * MIB + 5, seed=7)
    file = relay.fake.add_file(data, file_name="old.bin")
    chat = relay.chat()
    update = chat.message_update(file=file)  # carries the reference issued now
    relay.fake.expire_file_reference(file)  # ...which expires before aria2 asks for the bytes
    await chat.feed(update)
    [row] = await relay.jobs(1)
    await relay.wait_status(row.id, "completed", timeout=60)
    done = await relay.db.get_download_by_id(row.id)
    assert await asyncio.to_thread(Path(done.local_path).read_bytes) == data
    media = await relay.db.get_tg_media(file.file_unique_id)
    stored = FileId.decode(media.file_id)
    first_reference = raw_message(update).media.document.file_reference
    assert stored.file_reference != first_reference
    assert stored.file_reference == file.file_reference  # the fresh one, from get_messages


@pytest.mark.slow
async def test_jobs_survive_the_bot_connection_dropping(relay: Relay) -> None:
    relay.fake.delay_get_file = 0.6  # about two seconds for the whole file
    data = deterministic_bytes(8 * MIB + 3, seed=5)
    file = relay.fake.add_file(data, file_name="steady.bin")
    chat = relay.chat()
    await chat.say(file=file)
    [row] = await relay.jobs(1)
    await relay.wait_status(row.id, "downloading")
    await relay.client.session.restart()  # the bot's own connection drops and comes back
    [status] = await chat.say("/status")
    assert f"#{row.id} steady.bin" in status.text
    await relay.wait_status(row.id, "completed", timeout=60)
    done = await relay.db.get_download_by_id(row.id)
    assert await asyncio.to_thread(Path(done.local_path).read_bytes) == data


async def test_a_timed_out_part_is_retried(relay: Relay) -> None:
    data = deterministic_bytes(MIB + 1, seed=3)
    file = relay.fake.add_file(data, file_name="flaky.bin")
    row_id = await _pending_telegram_row(relay, file, "flaky.bin")
    relay.fake.inject("upload.GetFile", TimeoutError("slow Telegram"), times=1)
    status, _headers, body = await _get(_stream_url(relay, row_id, "flaky.bin"))
    assert status == 200 and body == data


# --- byte-exact ranges through /stream ---------------------------------------------------------

AWKWARD_SIZES = [MIB - 1, MIB, MIB + 1, 2 * MIB - 1, 2 * MIB, 2 * MIB + 1, 3 * MIB + 1]


def _ranges(size: int) -> list[tuple[str, int, int]]:
    """(Range header, first byte, last byte) worth asking of a file of `size` bytes."""
    cases = [
        ("bytes=0-0", 0, 0),
        (f"bytes={size - 1}-", size - 1, size - 1),
        ("bytes=-1", size - 1, size - 1),
        (f"bytes=1-{size - 2}", 1, size - 2),
        (f"bytes={size // 2}-{size + 100}", size // 2, size - 1),
    ]
    for boundary in range(MIB, size, MIB):
        cases.append((f"bytes={boundary - 1}-{boundary}", boundary - 1, boundary))
        cases.append((f"bytes={boundary}-", boundary, size - 1))
        cases.append((f"bytes=-{size - boundary}", boundary, size - 1))
    return cases


@pytest.mark.slow
async def test_awkward_sizes_and_ranges_are_byte_exact(relay: Relay) -> None:
    for size in AWKWARD_SIZES:
        data = deterministic_bytes(size, seed=size % 97)
        name = f"size-{size}.bin"
        file = relay.fake.add_file(data, file_name=name)
        row_id = await _pending_telegram_row(relay, file, name)
        url = _stream_url(relay, row_id, name)
        status, headers, body = await _get(url)
        assert status == 200, (size, body[:200])
        assert int(headers["Content-Length"]) == size and body == data, size
        assert headers["ETag"] == f'"tg-{file.file_unique_id}"'
        for header, first, last in _ranges(size):
            status, headers, body = await _get(url, {"Range": header})
            assert status == 206, (size, header)
            assert headers["Content-Range"] == f"bytes {first}-{last}/{size}", (size, header)
            assert body == data[first : last + 1], (size, header)
        status, headers, _ = await _get(url, {"Range": f"bytes={size}-"})
        assert status == 416 and headers["Content-Range"] == f"bytes */{size}"
    assert relay.fake.media_sessions_opened[2] == 1  # one media session, reused by every stream


async def test_a_foreign_or_unknown_signature_gets_no_bytes(relay: Relay) -> None:
    file = relay.fake.add_file(b"z" * 5000, file_name="z.bin")
    row_id = await _pending_telegram_row(relay, file, "z.bin")
    calls = relay.fake.get_file_calls
    status, _headers, _body = await _get(
        relay.running.base_url + f"/stream/{row_id}/z.bin?sig=forged"
    )
    assert status == 403
    assert relay.fake.get_file_calls == calls


def _part_tasks() -> list[asyncio.Task[Any]]:
    return [
        task
        for task in asyncio.all_tasks()
        if getattr(task.get_coro(), "__qualname__", "").endswith("_fetch_part")
    ]


@pytest.mark.slow
async def test_client_hanging_up_mid_stream_leaks_no_tasks(relay: Relay) -> None:
    fake: FakeTelegram = relay.fake
    size = 12 * MIB
    data = deterministic_bytes(size, seed=11)
    file = fake.add_file(data, file_name="long.mkv")
    row_id = await _pending_telegram_row(relay, file, "long.mkv")
    url = _stream_url(relay, row_id, "long.mkv")
    fake.delay_get_file = 0.05
    tasks_before = len(asyncio.all_tasks())
    for _ in range(3):
        session = aiohttp.ClientSession()
        try:
            response = await session.get(url)
            assert response.status == 200
            first = await response.content.readexactly(300_000)
            assert first == data[:300_000]
            assert fake.get_file_in_flight > 0 or _part_tasks(), "nothing was fetched ahead"
            response.close()  # hang up with parts still being fetched
        finally:
            await session.close()

    async def settled() -> bool:
        return fake.get_file_in_flight == 0 and not _part_tasks()

    await eventually(settled, 10, "the prefetched parts being cancelled")
    calls = fake.get_file_calls
    await asyncio.sleep(0.3)
    assert fake.get_file_calls == calls, "parts kept being fetched for a gone client"
    assert len(asyncio.all_tasks()) <= tasks_before + 1
    # The same link still works in full afterwards.
    fake.delay_get_file = 0
    started = time.monotonic()
    status, _headers, body = await _get(url)
    assert status == 200 and body == data
    assert time.monotonic() - started < 30
