"""Telegram as a byte source: exact ranges, parts in flight, shared sessions, faults, early stop."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from datetime import UTC

import pyrogram
import pytest
import pytest_asyncio
from pyrogram import filters
from pyrogram.errors import FileIdInvalid, FloodWait
from pyrogram.types import Message

from bot.messages import media_record
from bot.tg_source import (
    PART_SIZE,
    TelegramByteSource,
    TelegramFileRef,
    TelegramStreamer,
    TelegramStreamError,
    refresh_from_message,
)
from metrics import Metrics
from tests.support.fake_telegram import MIB, FakeFile, FakeTelegram

KIB4 = 4096


def _payload(size: int) -> bytes:
    return random.Random(size).randbytes(size)


def _ref(file: FakeFile, **kwargs: object) -> TelegramFileRef:
    return TelegramFileRef(file_id=file.file_id, size=file.size, **kwargs)  # type: ignore[arg-type]


async def _read(streamer: TelegramStreamer, ref: TelegramFileRef, start: int, end: int) -> bytes:
    chunks = [chunk async for chunk in streamer.iter_range(ref, start, end)]
    return b"".join(chunks)


def _fetch_tasks() -> list[asyncio.Task[object]]:
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and "_fetch_part" in repr(task.get_coro())
    ]


@pytest_asyncio.fixture
async def streamer(tg_client: pyrogram.Client) -> AsyncIterator[TelegramStreamer]:
    streamer = TelegramStreamer(tg_client, parts_in_flight=4, retry_backoff=0.01)
    try:
        yield streamer
    finally:
        await streamer.close()


async def _received_message(fake: FakeTelegram, client: pyrogram.Client, file: FakeFile) -> Message:
    received: list[Message] = []
    done = asyncio.Event()

    @client.on_message(filters.private)  # type: ignore[misc]
    async def collect(_: pyrogram.Client, message: Message) -> None:
        received.append(message)
        done.set()

    await fake.feed(client, fake.message_update(file=file))
    await asyncio.wait_for(done.wait(), 5)
    return received[0]


def _ranges(size: int) -> list[tuple[int, int]]:
    last = size - 1
    candidates = [
        (0, last),  # whole file
        (0, 0),
        (last, last),  # the single last byte
        (KIB4, 3 * KIB4 - 1),  # 4 KiB aligned
        (1000, min(last, MIB + 5000)),  # unaligned, across a part boundary
        (max(0, last - 70_000), last),  # the tail
        (MIB - 1, min(last, MIB)),  # the two bytes around the first boundary
        (min(last, MIB), last),  # from the first boundary (k·MiB+1: just one byte)
    ]
    return sorted({(s, e) for s, e in candidates if 0 <= s <= e <= last})


@pytest.mark.parametrize("size", [MIB - 1, MIB, MIB + 1, 3 * MIB - 1, 3 * MIB, 3 * MIB + 1])
async def test_ranges_are_byte_exact_for_sizes_around_part_boundaries(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer, size: int
) -> None:
    data = _payload(size)
    file = fake_telegram.add_file(data, file_name="f.bin")
    ref = _ref(file)
    for start, end in _ranges(size):
        assert await _read(streamer, ref, start, end) == data[start : end + 1], (start, end)


async def test_photos_stream_through_their_own_location(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    data = _payload(MIB + 77)
    file = fake_telegram.add_file(data, kind="photo")
    assert await _read(streamer, _ref(file), 0, file.size - 1) == data


async def test_several_parts_are_in_flight_and_yielded_in_order(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    data = _payload(8 * MIB)
    file = fake_telegram.add_file(data)
    fake_telegram.delay_get_file = 0.02

    chunks = [chunk async for chunk in streamer.iter_range(_ref(file), 0, file.size - 1)]

    assert b"".join(chunks) == data
    assert [len(c) for c in chunks] == [PART_SIZE] * 8
    assert 2 <= fake_telegram.get_file_max_concurrency <= 4
    assert fake_telegram.get_file_calls == 8


async def test_one_media_session_per_dc_is_shared_by_streams(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    data = _payload(2 * MIB + 3)
    file = fake_telegram.add_file(data, dc_id=4)
    ref = _ref(file)

    first, second = await asyncio.gather(
        _read(streamer, ref, 0, file.size - 1), _read(streamer, ref, 5, MIB + 9)
    )
    third = await _read(streamer, ref, MIB, file.size - 1)

    assert first == data
    assert second == data[5 : MIB + 10]
    assert third == data[MIB:]
    assert fake_telegram.media_sessions_opened[4] == 1
    assert fake_telegram.sessions_opened[(4, True)] == 1
    # A foreign DC needs its authorization imported before it serves anything.
    assert fake_telegram.requests_of("auth.ImportAuthorization")


async def test_close_stops_the_media_sessions(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    streamer = TelegramStreamer(tg_client)
    file = fake_telegram.add_file(_payload(100), dc_id=1)
    await _read(streamer, _ref(file), 0, 99)
    media_sessions = [s for s in fake_telegram.open_sessions if s.is_media and s.dc_id == 1]
    assert len(media_sessions) == 1

    await streamer.close()

    assert media_sessions[0] not in fake_telegram.open_sessions
    with pytest.raises(TelegramStreamError):
        await _read(streamer, _ref(file), 0, 99)


async def test_a_short_flood_wait_is_waited_out_and_counted(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    metrics = Metrics()
    streamer = TelegramStreamer(tg_client, on_flood_wait=metrics.flood_wait)
    data = _payload(2 * MIB)
    file = fake_telegram.add_file(data)
    fake_telegram.inject("upload.GetFile", FloodWait(value=1))
    try:
        assert await _read(streamer, _ref(file), 0, file.size - 1) == data
    finally:
        await streamer.close()
    assert fake_telegram.get_file_calls == 3
    seconds = metrics.registry.get_sample_value("mistrelay_telegram_flood_wait_seconds_total")
    assert seconds == 1


async def test_a_flood_wait_beyond_the_bound_raises(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    metrics = Metrics()
    streamer = TelegramStreamer(tg_client, max_flood_wait=5, on_flood_wait=metrics.flood_wait)
    file = fake_telegram.add_file(_payload(1000))
    fake_telegram.inject("upload.GetFile", FloodWait(value=300))
    try:
        with pytest.raises(FloodWait):
            await _read(streamer, _ref(file), 0, 999)
    finally:
        await streamer.close()
    # Asked for, though not waited: the figure says how hard Telegram pushes back.
    seconds = metrics.registry.get_sample_value("mistrelay_telegram_flood_wait_seconds_total")
    assert seconds == 300


async def test_an_expired_file_reference_is_refreshed_through_the_callback(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client, streamer: TelegramStreamer
) -> None:
    data = _payload(3 * MIB + 1)
    file = fake_telegram.add_file(data, kind="video", file_name="film.mp4")
    message = await _received_message(fake_telegram, tg_client, file)
    assert message.chat is not None and message.chat.id is not None
    assert message.video is not None and message.video.file_size is not None
    refresh_calls = 0
    reread = refresh_from_message(tg_client, message.chat.id, message.id)

    async def refresh() -> str:
        nonlocal refresh_calls
        refresh_calls += 1
        return await reread()

    ref = TelegramFileRef(
        file_id=message.video.file_id, size=message.video.file_size, refresh=refresh
    )
    fake_telegram.expire_file_reference(file)

    assert await _read(streamer, ref, 0, file.size - 1) == data
    # All parts in flight saw the expired reference; one refresh served them all.
    assert refresh_calls == 1
    assert fake_telegram.requests_of("messages.GetMessages")


async def test_a_refresh_refuses_a_message_that_carries_another_file(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    file = fake_telegram.add_file(_payload(1000), file_name="one.bin")
    message = await _received_message(fake_telegram, tg_client, file)
    assert message.chat is not None
    same = refresh_from_message(
        tg_client, message.chat.id, message.id, file_unique_id=file.file_unique_id
    )
    assert await same() == file.file_id
    other = refresh_from_message(tg_client, message.chat.id, message.id, file_unique_id="other")
    with pytest.raises(TelegramStreamError):
        await other()


async def test_an_expired_reference_without_refresh_raises(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    file = fake_telegram.add_file(_payload(5000))
    ref = _ref(file)
    fake_telegram.expire_file_reference(file)
    with pytest.raises(TelegramStreamError):
        await _read(streamer, ref, 0, 4999)


async def test_a_permanent_error_raises_instead_of_yielding_short_data(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    data = _payload(3 * MIB)
    file = fake_telegram.add_file(data)
    fake_telegram.inject("upload.GetFile", FileIdInvalid())
    received = bytearray()
    with pytest.raises(FileIdInvalid):
        async for chunk in streamer.iter_range(_ref(file), 0, file.size - 1):
            received += chunk
    assert len(received) < len(data)


async def test_a_part_shorter_than_the_file_size_promises_raises(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    data = _payload(MIB + 500)
    file = fake_telegram.add_file(data)
    # The owner believes the file is bigger than what Telegram holds.
    ref = TelegramFileRef(file_id=file.file_id, size=2 * MIB)
    received = bytearray()
    with pytest.raises(TelegramStreamError, match="expected"):
        async for chunk in streamer.iter_range(ref, 0, 2 * MIB - 1):
            received += chunk
    assert bytes(received) == data[:MIB]


async def test_transient_failures_are_retried_then_given_up(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    data = _payload(MIB // 2)
    file = fake_telegram.add_file(data)

    fake_telegram.inject("upload.GetFile", TimeoutError("Request timed out"), times=2)
    assert await _read(streamer, _ref(file), 0, file.size - 1) == data

    fake_telegram.inject("upload.GetFile", TimeoutError("Request timed out"), times=3)
    with pytest.raises(TelegramStreamError, match="failed 3 times"):
        await _read(streamer, _ref(file), 0, file.size - 1)


async def test_closing_early_cancels_every_request_in_flight(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    file = fake_telegram.add_file(_payload(16 * MIB))
    fake_telegram.delay_get_file = 0.2
    stream = streamer.iter_range(_ref(file), 0, file.size - 1)

    first = await anext(stream)
    assert len(first) == PART_SIZE
    await asyncio.sleep(0.05)  # the parts requested after the first one are now at the server
    assert fake_telegram.get_file_in_flight > 0
    await stream.aclose()

    assert fake_telegram.get_file_in_flight == 0
    assert _fetch_tasks() == []
    calls = fake_telegram.get_file_calls
    assert calls <= 1 + 4
    await asyncio.sleep(0.5)
    assert fake_telegram.get_file_calls == calls


async def test_cancelling_the_consumer_cancels_every_request_in_flight(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    file = fake_telegram.add_file(_payload(16 * MIB))
    fake_telegram.delay_get_file = 0.2
    first_chunk = asyncio.Event()

    async def consume() -> None:
        async with contextlib.aclosing(streamer.iter_range(_ref(file), 0, file.size - 1)) as it:
            async for _ in it:
                first_chunk.set()

    consumer = asyncio.create_task(consume())
    await asyncio.wait_for(first_chunk.wait(), 5)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer

    assert fake_telegram.get_file_in_flight == 0
    assert _fetch_tasks() == []
    calls = fake_telegram.get_file_calls
    await asyncio.sleep(0.5)
    assert fake_telegram.get_file_calls == calls


async def test_invalid_ranges_are_refused(
    fake_telegram: FakeTelegram, streamer: TelegramStreamer
) -> None:
    file = fake_telegram.add_file(_payload(100))
    for start, end in [(-1, 5), (5, 4), (0, 100)]:
        with pytest.raises(ValueError):
            await _read(streamer, _ref(file), start, end)
    assert fake_telegram.get_file_calls == 0


async def test_byte_source_for_recorded_media_describes_and_streams_the_file(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client, streamer: TelegramStreamer
) -> None:
    data = _payload(MIB + 1)
    file = fake_telegram.add_file(data, kind="video", file_name="talk.mp4", dc_id=3)
    message = await _received_message(fake_telegram, tg_client, file)

    record = media_record(message)
    assert record is not None and message.chat is not None
    refresh = refresh_from_message(
        tg_client, message.chat.id, message.id, file_unique_id=record.file_unique_id
    )
    source = TelegramByteSource.for_media(streamer, record, refresh=refresh)

    assert source.size == len(data)
    assert source.name == "talk.mp4"
    assert source.mime == "video/mp4"
    assert source.etag == f'"tg-{file.file_unique_id}"'
    assert source.path is None
    assert source.last_modified is not None and source.last_modified.tzinfo == UTC
    chunks = [c async for c in source.iter_range(MIB - 2, MIB)]
    assert b"".join(chunks) == data[MIB - 2 : MIB + 1]

    fake_telegram.expire_file_reference(file)
    assert b"".join([c async for c in source.iter_range(0, len(data) - 1)]) == data
