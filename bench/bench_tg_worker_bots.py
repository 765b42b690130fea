"""Streaming a Telegram file with worker bots: the main bot and two workers against it alone.

Both read the same file from the offline fake Telegram (tests/support/fake_telegram.py), whose
``upload.GetFile`` answers each 1 MiB part after a fixed delay (a round trip to a media DC) and
lets each bot have at most ``--limit`` parts in flight (a part over the limit waits for a slot,
as Telegram's throttling makes it). "1 bot" is the main bot's own streamer, what MistRelay does
without ``telegram.worker_bot_tokens``; "3 bots" is the same session with two worker bots (the
file forwarded to the storage channel once, before measuring). Measured in one run, alternating
A/B, and the medians compared. Parts go out in rounds of bots x limit, one delay each, so a
side's ceiling is its parts in whole rounds (96 parts on 12 slots: 8 rounds; 64: 6, at most 2.67x).

Run from the project root:  .venv/bin/python -m bench.bench_tg_worker_bots
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loguru import logger

from bench.bench_tg_stream import timed_read
from bot.session import TelegramSession
from bot.tg_source import TelegramByteSource, TelegramStreamer
from configer import TelegramConfig
from db import Database
from records import NewDownload, TgMediaRecord
from tests.support.fake_telegram import MIB, FakeTelegram
from tests.support.http_files import deterministic_bytes


async def run(size_mib: int, delay: float, limit: int, workers: int, runs: int) -> None:
    fake = FakeTelegram()
    fake.part_limit_per_bot = limit
    tokens = [fake.add_bot() for _ in range(workers)]
    channel = fake.add_channel([fake.bot_user.id, *(fake.bot_id_of(t) for t in tokens)])
    config = TelegramConfig(
        api_id=1,
        api_hash="x" * 32,
        bot_token="1:x",
        parts_in_flight=limit,
        worker_bot_tokens=tuple(tokens),
        storage_channel=channel.peer_id,
    )
    with tempfile.TemporaryDirectory() as folder:
        async with Database(Path(folder) / "store.db") as db:
            session = TelegramSession(
                config,
                workdir=Path(folder),
                store=db,
                client_factory=lambda: fake.make_client("main"),
                worker_client_factory=lambda token: fake.make_client(
                    f"worker-{fake.bot_id_of(token)}", bot_token=token
                ),
            )
            await session.start(updates=False)
            assert session.workers is not None
            await asyncio.wait_for(session.workers.ready.wait(), 30)
            client = session.client
            assert client is not None and session.workers is not None
            alone = TelegramStreamer(client, parts_in_flight=limit)
            try:
                times, calls = await _measure(fake, db, session, alone, size_mib, delay, runs)
            finally:
                await alone.close()
                await session.stop()

    bots = workers + 1
    median = {name: statistics.median(values) for name, values in times.items()}
    speed = {name: size_mib / seconds for name, seconds in median.items()}
    print(
        f"file {size_mib} MiB, upload.GetFile delay {delay * 1000:.0f} ms per 1 MiB part, "
        f"at most {limit} parts in flight per bot, {runs} runs each (alternating), median"
    )
    for name, values in times.items():
        runs_text = ", ".join(f"{t:.3f}" for t in values)
        print(
            f"  {name:<7} {speed[name]:7.1f} MiB/s  median {median[name]:.3f} s  [{runs_text}]  "
            f"GetFile calls/run {calls[name]}"
        )
    ours, peer = f"{bots} bots", "1 bot"
    print(f"  ratio {ours} / {peer}: {speed[ours] / speed[peer]:.2f}x")
    floors = {}
    for name, count in ((peer, 1), (ours, bots)):
        # Parts go out in rounds of count x limit: a last round part-full takes a whole delay.
        rounds = -(-size_mib // (count * limit))
        floors[name] = rounds * delay
        print(
            f"  {name} ceiling {size_mib} parts in {rounds} rounds of {count} x {limit} x "
            f"{delay * 1000:.0f} ms = {size_mib / floors[name]:.1f} MiB/s; "
            f"reached {speed[name] * floors[name] / size_mib:.1%}"
        )
    print(f"  best possible ratio at this size: {floors[peer] / floors[ours]:.2f}x")


async def _measure(
    fake: FakeTelegram,
    db: Database,
    session: TelegramSession,
    alone: TelegramStreamer,
    size_mib: int,
    delay: float,
    runs: int,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    data = deterministic_bytes(size_mib * MIB, seed=size_mib)
    file = fake.add_file(data, kind="video", file_name="bench.mp4")
    user = fake.default_user
    update = fake.message_update(file=file)
    media = TgMediaRecord(
        file_unique_id=file.file_unique_id,
        file_id=file.file_id,
        chat_id=user.id,
        message_id=update.message.id,
        media_type=file.kind,
        file_name="bench.mp4",
        mime_type=file.mime_type,
        file_size=file.size,
        dc_id=file.dc_id,
    )
    new = NewDownload(
        source_type="telegram",
        source_key=f"tg:{file.file_unique_id}",
        file_name="bench.mp4",
        total_length=file.size,
        file_unique_id=file.file_unique_id,
        owner_id=user.id,
        chat_id=user.id,
    )
    row = await db.get_download_by_id(await db.create_download(new, media))
    assert row is not None
    pooled = await session.byte_source(row, None)
    assert pooled is not None
    single = TelegramByteSource.for_media(alone, media)
    workers = session.workers
    assert workers is not None
    contenders = {
        f"{workers.workers + 1} bots": lambda: pooled.iter_range(0, len(data) - 1),
        "1 bot": lambda: single.iter_range(0, len(data) - 1),
    }
    # Warm both paths (file forwarded, references read, media sessions opened), no delay yet.
    for read in contenders.values():
        await timed_read(read, data)
    fake.delay_get_file = delay
    times: dict[str, list[float]] = {name: [] for name in contenders}
    calls: dict[str, int] = {}
    for index in range(runs):
        order = list(contenders) if index % 2 == 0 else list(reversed(contenders))
        for name in order:
            before = fake.get_file_calls
            times[name].append(await timed_read(contenders[name], data))
            calls[name] = fake.get_file_calls - before
    return times, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=96, help="a multiple of bots x limit")
    parser.add_argument("--delay", type=float, default=0.05, help="seconds per GetFile call")
    parser.add_argument("--limit", type=int, default=4, help="parts in flight per bot")
    parser.add_argument("--workers", type=int, default=2, help="worker bots besides the main one")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    asyncio.run(run(args.size_mib, args.delay, args.limit, args.workers, args.runs))


if __name__ == "__main__":
    main()
