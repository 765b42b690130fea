"""Worker bots: the parts of a Telegram file read by several bot sessions at once.

Real Pyrogram clients (the main bot and the workers) talk to the offline Telegram edge, which knows
every bot, the storage channel and each bot's own file references, and limits each bot to four
parts in flight. The store is a real SQLite file.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from loguru import logger
from pyrogram import raw
from pyrogram.errors import AuthKeyUnregistered, FloodWait

from bot.session import TelegramSession
from configer import TelegramConfig
from db import Database, Store
from records import NewDownload, TgMediaRecord
from tests.support.fake_telegram import FakeChannel, FakeFile, FakeTelegram
from tests.support.http_files import deterministic_bytes
from tests.support.service import ServiceFactory

MIB = 1024 * 1024
PART_LIMIT = 4


@dataclass
class Relay:
    fake: FakeTelegram
    db: Store
    session: TelegramSession
    channel: FakeChannel
    worker_ids: list[int]
    secrets: list[str]  # the secret halves of the worker tokens


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(str(m)), level="INFO", format="{message}")
    yield lines
    logger.remove(sink)


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with Database(tmp_path / "store.db") as database:
        yield database


async def start_relay(
    tmp_path: Path,
    db: Database,
    *,
    workers: int = 2,
    outsiders: int = 0,
    revoked: int = 0,
    main_in_channel: bool = True,
) -> Relay:
    """The main bot and its workers logged in; `outsiders` workers are no channel members and
    `revoked` ones have tokens Telegram refuses."""
    fake = FakeTelegram()
    fake.part_limit_per_bot = PART_LIMIT
    members = [fake.add_bot() for _ in range(workers)]
    others = [fake.add_bot() for _ in range(outsiders + revoked)]
    for token in others[outsiders:]:
        fake.revoked_bots.add(fake.bot_id_of(token))
    member_ids = [fake.bot_id_of(token) for token in members]
    channel = fake.add_channel(member_ids + ([fake.bot_user.id] if main_in_channel else []))
    config = TelegramConfig(
        api_id=1,
        api_hash="x" * 32,
        bot_token="1:x",
        parts_in_flight=PART_LIMIT,
        worker_bot_tokens=tuple(members + others),
        storage_channel=channel.peer_id,
    )
    session = TelegramSession(
        config,
        workdir=tmp_path,
        store=db,
        client_factory=lambda: fake.make_client("main"),
        worker_client_factory=lambda token: fake.make_client(
            f"worker-{fake.bot_id_of(token)}", bot_token=token
        ),
    )
    await session.start(updates=False)
    assert session.workers is not None
    await asyncio.wait_for(session.workers.ready.wait(), 30)
    assert session.logged_in.is_set()
    secrets = [token.partition(":")[2] for token in members + others]
    return Relay(fake, db, session, channel, member_ids, secrets)


@pytest.fixture
async def relays(tmp_path: Path, db: Database) -> AsyncIterator[list[Relay]]:
    started: list[Relay] = []
    yield started
    for relay in started:
        await relay.session.stop()


async def telegram_job(relay: Relay, data: bytes, name: str = "movie.mp4") -> tuple[int, FakeFile]:
    """A user's video sent to the bot, recorded as a Telegram download."""
    file = relay.fake.add_file(data, kind="video", file_name=name)
    update = relay.fake.message_update(text="my holiday", file=file)
    user = relay.fake.default_user
    media = TgMediaRecord(
        file_unique_id=file.file_unique_id,
        file_id=file.file_id,
        chat_id=user.id,
        message_id=update.message.id,
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
        owner_id=user.id,
        chat_id=user.id,
    )
    return await relay.db.create_download(new, media), file


async def read(relay: Relay, download_id: int, start: int, end: int) -> bytes:
    row = await relay.db.get_download_by_id(download_id)
    assert row is not None
    source = await relay.session.byte_source(row, None)
    assert source is not None
    return b"".join([chunk async for chunk in source.iter_range(start, end)])


async def test_parts_spread_over_three_sessions_and_the_bytes_are_exact(
    tmp_path: Path, db: Database, relays: list[Relay]
) -> None:
    relay = await start_relay(tmp_path, db, workers=2)
    relays.append(relay)
    fake = relay.fake
    fake.delay_get_file = 0.02
    data = deterministic_bytes(12 * MIB + 1, seed=3)
    download_id, file = await telegram_job(relay, data)

    assert await read(relay, download_id, 0, len(data) - 1) == data

    bots = [fake.bot_user.id, *relay.worker_ids]
    assert all(fake.get_file_calls_by_bot[bot] > 0 for bot in bots), fake.get_file_calls_by_bot
    assert sum(fake.get_file_calls_by_bot[bot] for bot in bots) == 13  # no part read twice
    assert max(fake.get_file_max_in_flight_by_bot.values()) <= PART_LIMIT
    # More parts in flight at once than one session may have.
    assert fake.get_file_max_concurrency > PART_LIMIT
    # Forwarded once to the storage channel, where each worker read its own reference.
    forwards = fake.requests_of(raw.functions.messages.ForwardMessages)
    assert len(forwards) == 1
    copy_id = await db.get_tg_storage_message(file.file_unique_id, relay.channel.peer_id)
    assert copy_id is not None and relay.channel.messages[copy_id].file is file
    assert relay.channel.messages[copy_id].text == ""  # the user's caption stays with them
    assert await db.get_tg_storage_message(file.file_unique_id, -1009999999999) is None
    assert set(file.bot_references) == set(relay.worker_ids)

    # A second read (a range across part edges): nothing forwarded or looked up again.
    mark = fake.mark()
    start, end = MIB - 7, 9 * MIB + 5
    assert await read(relay, download_id, start, end) == data[start : end + 1]
    assert fake.requests_of(raw.functions.messages.ForwardMessages, after=mark) == []
    assert fake.requests_of(raw.functions.channels.GetMessages, after=mark) == []


async def test_a_flood_wait_on_one_session_moves_its_parts_to_the_others(
    tmp_path: Path, db: Database, relays: list[Relay], log_lines: list[str]
) -> None:
    relay = await start_relay(tmp_path, db, workers=2)
    relays.append(relay)
    fake = relay.fake
    fake.delay_get_file = 0.01
    data = deterministic_bytes(10 * MIB + 3, seed=4)
    download_id, _ = await telegram_job(relay, data)
    flooded = relay.worker_ids[0]
    # Every part the worker has in flight is answered with a wait longer than the whole read:
    # a session in FloodWait takes no part until it ends.
    fake.inject(raw.functions.upload.GetFile, FloodWait(value=30), PART_LIMIT, bot_id=flooded)

    assert await read(relay, download_id, 0, len(data) - 1) == data

    # Only the parts it had in flight when told to wait, all answered with FLOOD_WAIT; every
    # part was read by the other two sessions.
    assert 1 <= fake.get_file_calls_by_bot[flooded] <= PART_LIMIT
    others = [fake.bot_user.id, relay.worker_ids[1]]
    assert sum(fake.get_file_calls_by_bot[bot] for bot in others) == 11
    assert all(fake.get_file_calls_by_bot[bot] > 0 for bot in others)
    assert any(f"worker bot {flooded} to wait 30" in line for line in log_lines)
    assert relay.session.workers is not None and relay.session.workers.workers == 2


async def test_a_worker_without_access_is_dropped_and_the_rest_carry_on(
    tmp_path: Path, db: Database, relays: list[Relay], log_lines: list[str]
) -> None:
    relay = await start_relay(tmp_path, db, workers=1, outsiders=1, revoked=1)
    relays.append(relay)
    fake = relay.fake
    pool = relay.session.workers
    assert pool is not None and pool.workers == 2  # the revoked one never logged in
    data = deterministic_bytes(6 * MIB + 11, seed=5)
    download_id, _ = await telegram_job(relay, data)

    assert await read(relay, download_id, 0, len(data) - 1) == data
    assert await read(relay, download_id, 5, 3 * MIB) == data[5 : 3 * MIB + 1]

    assert pool.workers == 1
    member = relay.worker_ids[0]
    assert fake.get_file_calls_by_bot[member] > 0 and fake.get_file_calls_by_bot[fake.bot_user.id]
    dropped = [line for line in log_lines if "dropped" in line]
    refused = [line for line in log_lines if "could not log in" in line]
    assert len(dropped) == 1 and "CHANNEL_PRIVATE" in dropped[0], log_lines
    assert len(refused) == 1 and "ACCESS_TOKEN_EXPIRED" in refused[0], log_lines
    assert not any(secret in "\n".join(log_lines) for secret in relay.secrets)


async def test_without_a_copy_in_the_storage_channel_the_main_bot_reads_alone(
    tmp_path: Path, db: Database, relays: list[Relay], log_lines: list[str]
) -> None:
    relay = await start_relay(tmp_path, db, workers=2, main_in_channel=False)
    relays.append(relay)
    fake = relay.fake
    data = deterministic_bytes(3 * MIB, seed=6)
    download_id, file = await telegram_job(relay, data)

    assert await read(relay, download_id, 0, len(data) - 1) == data
    assert fake.get_file_calls_by_bot[fake.bot_user.id] == 3
    assert not any(fake.get_file_calls_by_bot[bot] for bot in relay.worker_ids)
    assert await db.get_tg_storage_message(file.file_unique_id, relay.channel.peer_id) is None
    assert any("forwarding the file to the storage channel failed" in line for line in log_lines)
    # The workers are not to blame: they stay.
    assert relay.session.workers is not None and relay.session.workers.workers == 2


async def test_the_stream_route_reads_through_the_workers_and_hides_their_tokens(
    service_factory: ServiceFactory, fake_telegram: FakeTelegram
) -> None:
    fake = fake_telegram
    fake.part_limit_per_bot = PART_LIMIT
    tokens = [fake.add_bot(), fake.add_bot()]
    worker_ids = [fake.bot_id_of(token) for token in tokens]
    channel = fake.add_channel([fake.bot_user.id, *worker_ids])
    telegram = {
        "api_id": 1,
        "api_hash": "x" * 32,
        "bot_token": "1:x",
        "admins": [fake.default_user.id],
        "worker_bot_tokens": tokens,
        "storage_channel": channel.peer_id,
    }
    running = await service_factory(
        {"telegram": telegram},
        telegram_client_factory=lambda: fake.make_client("main"),
        telegram_worker_factory=lambda token: fake.make_client(
            f"worker-{fake.bot_id_of(token)}", bot_token=token
        ),
    )
    session = running.service.parts.telegram
    assert session is not None and session.workers is not None
    await asyncio.wait_for(session.workers.ready.wait(), 30)
    assert session.workers.workers == 2
    relay = Relay(fake, running.service.parts.store, session, channel, worker_ids, [])
    data = deterministic_bytes(5 * MIB + 9, seed=7)
    download_id, _ = await telegram_job(relay, data, "clip.mp4")

    path = running.service.parts.web.ctx.links.signer.stream_path(download_id, "clip.mp4")
    async with running.http.get(running.base_url + path) as response:
        assert response.status == 200
        assert await response.read() == data
    assert all(fake.get_file_calls_by_bot[bot] > 0 for bot in [fake.bot_user.id, *worker_ids])

    status, settings = await running.api("GET", "/api/config")
    assert status == 200
    shown = str(settings)
    assert "***" in shown and not any(token.partition(":")[2] in shown for token in tokens)


async def test_a_worker_refused_mid_stream_is_dropped_and_its_parts_read_by_the_others(
    tmp_path: Path, db: Database, relays: list[Relay], log_lines: list[str]
) -> None:
    relay = await start_relay(tmp_path, db, workers=2)
    relays.append(relay)
    fake = relay.fake
    fake.delay_get_file = 0.01
    data = deterministic_bytes(9 * MIB + 5, seed=8)
    download_id, _ = await telegram_job(relay, data)
    revoked = relay.worker_ids[0]
    fake.inject(raw.functions.upload.GetFile, AuthKeyUnregistered(), PART_LIMIT, bot_id=revoked)

    assert await read(relay, download_id, 0, len(data) - 1) == data

    assert relay.session.workers is not None and relay.session.workers.workers == 1
    dropped = [line for line in log_lines if "dropped" in line]
    assert len(dropped) == 1 and f"worker bot {revoked}" in dropped[0], log_lines
    others = [fake.bot_user.id, relay.worker_ids[1]]
    assert sum(fake.get_file_calls_by_bot[bot] for bot in others) == 10
