"""Streaming a Telegram file: TelegramStreamer (parts in flight) against Pyrogram's stream_media.

Both read the same file from the offline fake Telegram (tests/support/fake_telegram.py), whose
``upload.GetFile`` answers each 1 MiB part after a fixed delay, standing in for the round trip to
a Telegram media DC. The two are measured in one run, alternating A/B, and the medians compared.
The ceiling for the streamer is parts_in_flight x 1 MiB per delay; for a sequential reader it is
1 MiB per delay.

Run from the project root:  .venv/bin/python -m bench.bench_tg_stream
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyrogram
from loguru import logger
from pyrogram import filters
from pyrogram.types import Message

from bot.tg_source import TelegramFileRef, TelegramStreamer
from tests.support.fake_telegram import MIB, FakeTelegram


async def _received_message(fake: FakeTelegram, client: pyrogram.Client, update: object) -> Message:
    received: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

    @client.on_message(filters.private)  # type: ignore[misc]
    async def collect(_: pyrogram.Client, message: Message) -> None:
        if not received.done():
            received.set_result(message)

    await fake.feed(client, update)  # type: ignore[arg-type]
    return await asyncio.wait_for(received, 10)


async def timed_read(read: Callable[[], AsyncIterator[bytes]], expected: bytes) -> float:
    """Seconds to read a whole stream, checked against the bytes expected."""
    chunks: list[bytes] = []
    started = time.perf_counter()
    async for chunk in read():
        chunks.append(chunk)
    elapsed = time.perf_counter() - started
    if b"".join(chunks) != expected:
        raise SystemExit("streamed bytes differ from the file")
    return elapsed


async def run(size_mib: int, delay: float, parts_in_flight: int, runs: int) -> None:
    fake = FakeTelegram()
    client = fake.make_client("bench")
    await client.start()
    streamer = TelegramStreamer(client, parts_in_flight=parts_in_flight)
    try:
        data = random.Random(size_mib).randbytes(size_mib * MIB)
        file = fake.add_file(data, kind="video", file_name="bench.mp4")
        message = await _received_message(fake, client, fake.message_update(file=file))
        assert message.video is not None and message.video.file_size is not None
        ref = TelegramFileRef(file_id=message.video.file_id, size=message.video.file_size)

        def ours() -> AsyncIterator[bytes]:
            return streamer.iter_range(ref, 0, ref.size - 1)

        def theirs() -> AsyncIterator[bytes]:
            return client.stream_media(message)

        # Warm both paths (media sessions opened) before measuring; no delay for this.
        await timed_read(lambda: streamer.iter_range(ref, 0, 0), data[:1])
        async for _ in client.stream_media(message, limit=1):
            pass

        fake.delay_get_file = delay
        contenders = {"TelegramStreamer": ours, "pyrogram stream_media": theirs}
        times: dict[str, list[float]] = {name: [] for name in contenders}
        calls: dict[str, int] = {}
        for index in range(runs):
            order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
            for name in order:
                before = fake.get_file_calls
                times[name].append(await timed_read(contenders[name], data))
                calls[name] = fake.get_file_calls - before
    finally:
        await streamer.close()
        await client.stop()

    size = len(data) / MIB
    median = {name: statistics.median(values) for name, values in times.items()}
    speed = {name: size / seconds for name, seconds in median.items()}
    limit = parts_in_flight * 1 / delay
    ours_speed = speed["TelegramStreamer"]
    theirs_speed = speed["pyrogram stream_media"]
    print(
        f"file {size:.0f} MiB, upload.GetFile delay {delay * 1000:.0f} ms per 1 MiB part, "
        f"{runs} runs each (alternating), median"
    )
    for name in contenders:
        runs_text = ", ".join(f"{t:.3f}" for t in times[name])
        print(
            f"  {name:<22} {speed[name]:7.1f} MiB/s  median {median[name]:.3f} s  "
            f"[{runs_text}]  GetFile calls/run {calls[name]}"
        )
    print(f"  ratio TelegramStreamer / stream_media: {ours_speed / theirs_speed:.2f}x")
    print(
        f"  limit parts_in_flight({parts_in_flight}) x 1 MiB / {delay * 1000:.0f} ms = "
        f"{limit:.1f} MiB/s; reached {ours_speed / limit:.1%}"
    )
    print(f"  sequential limit 1 MiB / {delay * 1000:.0f} ms = {1 / delay:.1f} MiB/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds per GetFile call")
    parser.add_argument("--parts-in-flight", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(run(args.size_mib, args.delay, args.parts_in_flight, args.runs))


if __name__ == "__main__":
    main()
