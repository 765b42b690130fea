"""The Telegram bot, end to end: a real service, real Pyrogram objects through the real dispatcher,
and an offline Telegram at the network edge (tests/support/fake_telegram.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import string
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pyrogram
import pytest
from pyrogram import raw
from pyrogram.errors import FloodWait
from pyrogram.file_id import FileId

from app import configure_logging
from bot.commands import COMMANDS, DOWNLOAD_ACTIONS, UPLOAD_ACTIONS
from bot.file_choice import SHORTCUTS
from bot.runner import TelegramBot
from bot.session import TelegramSession
from bot.text import has_key
from db import DOWNLOAD_STATUSES, UPLOAD_STATUSES
from records import ARCHIVE_ACTIONS, DownloadRow, TgMediaRecord
from tests.support.fake_telegram import CallbackAnswer, FakeTelegram, SentMessage
from tests.support.http_files import FileServer
from tests.support.rclone_cloud import add_remote
from tests.support.service import RunningService, ServiceFactory
from tests.support.torrents import corrupt_torrent_cases, make_torrent

ADMIN = 424_242  # the fake's default user
USER = 515_151
OTHER = 616_161
STRANGER = 999_001
CREDENTIALS = {"api_id": 1, "api_hash": "x" * 32, "bot_token": "1:x"}


def telegram_section(**extra: Any) -> dict[str, Any]:
    return {**CREDENTIALS, "admins": [ADMIN], "allowed_users": [USER, OTHER], **extra}


async def eventually(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 20.0,
    what: str = "condition",
) -> None:
    """Wait (bounded) until `check` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def raw_message(update: raw.types.UpdateNewMessage) -> Any:
    """The raw message of an update (a plain `Message` for what the fake builds)."""
    return update.message


@dataclass
class Chat:
    """One user's private chat with the bot."""

    relay: Relay
    user: raw.types.User

    @property
    def fake(self) -> FakeTelegram:
        return self.relay.fake

    def message_update(self, text: str = "", **kwargs: Any) -> raw.types.UpdateNewMessage:
        return self.fake.message_update(self.user, text, **kwargs)

    async def feed(
        self, update: raw.base.Update, *, replies: int = 1, timeout: float = 10.0
    ) -> list[SentMessage]:
        """Deliver `update`; wait for `replies` messages sent by the bot; return those to us."""
        before = len(self.fake.sent_messages())
        mark = self.fake.mark()
        await self.fake.feed(self.relay.client, update)
        if replies:
            await self.fake.wait_for_requests(
                replies, of_type="messages.SendMessage", after=mark, timeout=timeout
            )
        return [m for m in self.fake.sent_messages()[before:] if m.chat_id == self.user.id]

    async def say(self, text: str = "", *, replies: int = 1, **kwargs: Any) -> list[SentMessage]:
        return await self.feed(self.message_update(text, **kwargs), replies=replies)

    async def press(self, message_id: int, data: bytes | str) -> CallbackAnswer:
        payload = data.encode() if isinstance(data, str) else data
        before = len(self.fake.callback_answers())
        mark = self.fake.mark()
        update = self.fake.callback_query_update(self.user, message_id, payload)
        await self.fake.feed(self.relay.client, update)
        await self.fake.wait_for_requests(
            1, of_type="messages.SetBotCallbackAnswer", after=mark, timeout=10
        )
        return self.fake.callback_answers()[before]


@dataclass
class Relay:
    running: RunningService
    fake: FakeTelegram

    @property
    def bot(self) -> TelegramBot:
        bot = self.running.service.parts.bot
        assert bot is not None
        return bot

    @property
    def session(self) -> TelegramSession:
        session = self.running.service.parts.telegram
        assert session is not None
        return session

    @property
    def client(self) -> pyrogram.Client:
        client = self.session.client
        assert client is not None, "the bot is not logged in"
        return client

    @property
    def db(self) -> Any:
        return self.running.service.parts.store

    def chat(self, user_id: int = ADMIN, language_code: str = "en", name: str = "Ada") -> Chat:
        if user_id == ADMIN and language_code == "en":
            return Chat(self, self.fake.default_user)
        user = self.fake.users.get(user_id)
        if user is None or user.lang_code != language_code:
            user = self.fake.make_user(
                user_id=user_id, first_name=name, language_code=language_code
            )
        return Chat(self, user)

    async def downloads(self) -> list[DownloadRow]:
        rows = await self.db.fetch_recent_downloads(limit=100)
        return list(reversed(rows))

    async def jobs(self, count: int, timeout: float = 10.0) -> list[DownloadRow]:
        """The `count` downloads, once each has its progress message recorded."""
        rows: list[DownloadRow] = []

        async def ready() -> bool:
            nonlocal rows
            rows = await self.downloads()
            return len(rows) == count and all(r.progress_message_id for r in rows)

        await eventually(ready, timeout, f"{count} jobs with progress messages")
        return rows

    async def wait_status(self, download_id: int, *statuses: str, timeout: float = 30) -> None:
        row: DownloadRow | None = None

        async def reached() -> bool:
            nonlocal row
            row = await self.db.get_download_by_id(download_id)
            return row is not None and row.status in statuses

        try:
            await eventually(reached, timeout, f"download {download_id} reaching {statuses}")
        except AssertionError:
            raise AssertionError(f"download {download_id} is {row}") from None


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def relay_factory(
    service_factory: ServiceFactory, fake_telegram: FakeTelegram
) -> AsyncIterator[RelayFactory]:
    async def start(
        overrides: dict[str, Any] | None = None,
        *,
        telegram: dict[str, Any] | None = None,
        client_options: dict[str, Any] | None = None,
        interval: float = 0.05,
        name: str = "svc",
        config_path: Path | None = None,
        wait_started: bool = True,
    ) -> Relay:
        document = dict(overrides or {})
        section = telegram if telegram is not None else telegram_section()
        document["telegram"] = {**section, "progress_interval": interval}
        options = client_options or {}
        running = await service_factory(
            document,
            name=name,
            config_path=config_path,
            telegram_client_factory=lambda: fake_telegram.make_client(**options),
        )
        relay = Relay(running, fake_telegram)
        started.append(relay)
        if wait_started:
            # The service logs the bot in in the background; tests talk to it once it is in.
            await asyncio.wait_for(relay.bot.started.wait(), 20)
        return relay

    started: list[Relay] = []
    yield start
    for relay in reversed(started):
        try:
            await asyncio.wait_for(relay.running.stop(), 60)
        except TimeoutError:
            for task in asyncio.all_tasks():
                task.print_stack(limit=8)
            raise


@pytest.fixture
async def relay(relay_factory: RelayFactory) -> Relay:
    return await relay_factory()


# --- the catalogue ------------------------------------------------------------------------------


def test_catalogue_covers_every_message_in_both_languages() -> None:
    document = json.loads(
        (Path(__file__).parent.parent / "webstreamer/static/i18n/bot.json").read_text("utf-8")
    )
    assert set(document["en"]) == set(document["zh"])
    formatter = string.Formatter()
    for key, english in document["en"].items():
        fields = {name for _, name, _, _ in formatter.parse(english) if name}
        chinese = {name for _, name, _, _ in formatter.parse(document["zh"][key]) if name}
        assert fields == chinese, key
    used: set[str] = set()
    for source in (Path(__file__).parent.parent / "bot").glob("*.py"):
        used |= set(re.findall(r'"(bot\.[a-z_]+(?:\.[a-z_]+)*)"', source.read_text("utf-8")))
    used |= {f"bot.menu.{name}" for name, _ in COMMANDS}
    used |= {f"bot.{p}.{a}" for p in ("action", "done") for a in DOWNLOAD_ACTIONS}
    used |= {f"bot.done.upload_{a}" for a in UPLOAD_ACTIONS}
    used |= {f"bot.button.{a}" for a in DOWNLOAD_ACTIONS}
    used |= {f"bot.button.upload_{a}" for a in UPLOAD_ACTIONS}
    used |= {"bot.role.admin", "bot.role.user"}
    used |= {f"bot.button.choice_{shortcut}" for shortcut in SHORTCUTS}
    used |= {
        f"bot.{k}{a}{e}"
        for k, e in (("button.archive_", ""), ("archive_", "_set"))
        for a in ARCHIVE_ACTIONS
    }
    missing = sorted(key for key in used if not has_key(key))
    assert missing == []
    for status in DOWNLOAD_STATUSES:
        assert has_key(f"status.{status}")
    for status in UPLOAD_STATUSES:
        assert has_key(f"upload_status.{status}")


# --- commands -------------------------------------------------------------------------------------


async def test_start_help_and_command_menu(relay: Relay) -> None:
    chat = relay.chat()
    [start] = await chat.say("/start")
    assert "/help" in start.text and "admin" in start.text
    [help_reply] = await chat.say("/help")
    for name, _args in COMMANDS:
        assert any(line.startswith(f"/{name}") for line in help_reply.text.splitlines()), name
    menus: list[Any] = relay.fake.requests_of("bots.SetBotCommands")
    assert menus, "the command menu was not set"
    for menu in menus:
        assert [c.command for c in menu.commands] == [name for name, _ in COMMANDS]
    assert {m.lang_code for m in menus} == {"", "zh"}


async def test_chinese_for_a_zh_language_code(relay: Relay) -> None:
    chat = relay.chat(USER, language_code="zh-hans", name="李")
    [help_reply] = await chat.say("/help")
    assert "命令" in help_reply.text
    english = relay.chat(OTHER, language_code="de")
    [other] = await english.say("/help")
    assert other.text.startswith("Commands:")


async def test_web_targets_stats_and_empty_lists(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    relay = await relay_factory(
        {
            "web": {"public_url": "https://relay.example.com/base"},
            "upload": {
                "targets": [
                    {"name": "cloud", "type": "rclone", "remote": "mycloud", "path": "/Films"},
                    {"name": "tg", "type": "telegram", "chat_id": -100123},
                ]
            },
        }
    )
    chat = relay.chat()
    [web] = await chat.say("/web")
    assert "https://relay.example.com/base" in web.text
    token = relay.running.token
    assert token not in web.text
    [targets] = await chat.say("/targets")
    assert "cloud (rclone) → mycloud:/Films" in targets.text
    assert "tg (telegram)" in targets.text and "-100123" in targets.text
    [stats] = await chat.say("/stats")
    assert "Downloads: 0 in all" in stats.text and "Disk:" in stats.text and "free" in stats.text
    [status] = await chat.say("/status")
    assert status.text == "Nothing is downloading or waiting."
    [downloads] = await chat.say("/downloads")
    assert downloads.text == "No downloads yet."
    [uploads] = await chat.say("/uploads")
    assert uploads.text == "No uploads yet."


async def test_unknown_command_and_text_without_links(relay: Relay) -> None:
    chat = relay.chat()
    [unknown] = await chat.say("/frobnicate")
    assert "/help" in unknown.text
    [nothing] = await chat.say("hello there, how are you?")
    assert "no link" in nothing.text
    assert await relay.downloads() == []


# --- who may use it -------------------------------------------------------------------------------


async def test_stranger_is_refused_once_and_nothing_is_recorded(relay: Relay) -> None:
    stranger = relay.chat(STRANGER, name="Eve")
    file = relay.fake.add_file(b"secret" * 1000, file_name="eve.bin")
    [refusal] = await stranger.say(file=file)
    assert "private" in refusal.text and str(STRANGER) in refusal.text
    before = len(relay.fake.sent_messages())
    await stranger.say("http://example.com/a.bin", replies=0)
    await stranger.say("/status", replies=0)
    torrent = relay.fake.add_file(b"d4:infoe", file_name="x.torrent")
    await stranger.say(file=torrent, replies=0)
    await asyncio.sleep(0.5)
    assert len(relay.fake.sent_messages()) == before, "a stranger got more than one refusal"
    assert await relay.downloads() == []
    assert await relay.db.get_tg_media(file.file_unique_id) is None
    assert relay.fake.get_file_calls == 0, "a stranger's file was fetched"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Listed before capfd, this tears down after it: logging goes back to pytest's stream
    instead of the closed capture."""
    yield
    configure_logging("DEBUG")


async def test_no_admins_serves_no_one_and_says_so_once(
    relay_factory: RelayFactory, restore_logging: None, capfd: pytest.CaptureFixture[str]
) -> None:
    relay = await relay_factory(telegram=dict(CREDENTIALS))
    lines = [
        line for line in capfd.readouterr().err.splitlines() if "MISTRELAY_TELEGRAM_ADMINS" in line
    ]
    assert len(lines) == 1
    assert "telegram.admins" in lines[0] and "config.yaml" in lines[0]
    [refusal] = await relay.chat().say("/status")
    assert str(ADMIN) in refusal.text
    assert await relay.downloads() == []


async def test_callback_on_someone_elses_job_is_refused(
    relay_factory: RelayFactory, file_server: FileServer
) -> None:
    # Loopback links are for admins unless private addresses are allowed: allow them here.
    relay = await relay_factory({"aria2": {"allow_private_addresses": True}})
    file_server.add_file("held.bin", size=4 * 1024 * 1024)
    owner = relay.chat(USER)
    [ack] = await owner.say(file_server.url("held.bin", route="hold", bytes=65536))
    [row] = await relay.jobs(1)
    assert row.owner_id == USER and row.progress_message_id == ack.message_id
    await relay.wait_status(row.id, "downloading")
    other = relay.chat(OTHER)
    answer = await other.press(ack.message_id, f"d:cancel:{row.id}")
    assert f"no download #{row.id}" in (answer.text or "")  # another's job: as if none
    stranger = relay.chat(STRANGER)
    answer = await stranger.press(ack.message_id, f"d:cancel:{row.id}")
    assert "may not use" in (answer.text or "")
    await asyncio.sleep(0.3)
    still = await relay.db.get_download_by_id(row.id)
    assert still.status == "downloading"
    # The owner may; so may an admin.
    answer = await owner.press(ack.message_id, f"d:pause:{row.id}")
    assert "Paused" in (answer.text or "")
    await relay.wait_status(row.id, "paused")
    answer = await relay.chat().press(ack.message_id, f"d:cancel:{row.id}")
    assert "Cancelled" in (answer.text or "")
    await relay.wait_status(row.id, "cancelled")


# --- media ----------------------------------------------------------------------------------------

KIND_CASES: dict[str, dict[str, Any]] = {
    "document": {"file_name": "report.pdf", "mime_type": "application/pdf"},
    "video": {"file_name": "clip.mp4", "duration": 42, "width": 640, "height": 360},
    "audio": {"file_name": "song.mp3", "duration": 200, "title": "Song", "performer": "Band"},
    "photo": {"width": 800, "height": 600},
    "animation": {"file_name": "loop.mp4", "duration": 3},
    "voice": {"duration": 7},
}


@pytest.mark.parametrize("kind", list(KIND_CASES))
async def test_each_media_kind_is_recorded_and_downloaded(relay: Relay, kind: str) -> None:
    data = bytes((i * 7 + len(kind)) % 251 for i in range(300_001))
    file = relay.fake.add_file(data, kind=kind, **KIND_CASES[kind])
    chat = relay.chat()
    update = chat.message_update("a caption", file=file)
    [ack] = await chat.feed(update)
    message_id = raw_message(update).id
    assert ack.reply_to_message_id == message_id

    media = await relay.db.get_tg_media(file.file_unique_id)
    assert isinstance(media, TgMediaRecord)
    assert media.media_type == kind
    assert (media.chat_id, media.message_id, media.sender_id) == (ADMIN, message_id, ADMIN)
    assert media.sender_name == "Ada"
    assert FileId.decode(media.file_id).media_id == file.id
    assert media.file_size == len(data)
    assert media.caption == "a caption"
    assert media.message_date is not None and media.dc_id == file.dc_id
    assert media.media_group_id is None
    assert media.mime_type == file.mime_type
    if kind in ("video", "animation", "photo"):
        assert (media.width, media.height) == (file.width, file.height)
    if kind in ("video", "audio", "voice", "animation"):
        assert media.duration == int(file.duration or 0)
    expected_name = file.file_name or f"{kind}_{ADMIN}_{message_id}"
    assert media.file_name is not None and media.file_name.startswith(expected_name)

    [row] = await relay.jobs(1)
    assert row.source_type == "telegram" and row.file_unique_id == file.file_unique_id
    assert (row.owner_id, row.chat_id, row.message_id) == (ADMIN, ADMIN, message_id)
    assert row.group_key == f"message:{ADMIN}:{message_id}"
    assert row.progress_message_id == ack.message_id
    await relay.wait_status(row.id, "completed")
    done = await relay.db.get_download_by_id(row.id)
    assert await asyncio.to_thread(Path(done.local_path).read_bytes) == data


async def test_album_sent_in_pieces_joins_one_group(relay: Relay) -> None:
    files = [
        relay.fake.add_file(bytes([n]) * (100_000 + n), kind=kind, file_name=f"part{n}.bin")
        for n, kind in enumerate(("document", "video", "document"))
    ]
    chat = relay.chat()
    updates = relay.fake.album_updates(files, user=chat.user, caption="holiday")
    for update in updates:  # each piece is its own update
        await chat.feed(update)
    rows = await relay.jobs(3)
    group_ids = {raw_message(update).grouped_id for update in updates}
    assert len(group_ids) == 1
    [grouped_id] = group_ids
    assert {row.group_key for row in rows} == {f"album:{grouped_id}"}
    for row, file in zip(rows, files, strict=True):
        media = await relay.db.get_tg_media(row.file_unique_id)
        assert media.media_group_id == str(grouped_id)
        await relay.wait_status(row.id, "completed")
        done = await relay.db.get_download_by_id(row.id)
        assert await asyncio.to_thread(Path(done.local_path).read_bytes) == file.data
    groups = await relay.db.fetch_downloads_grouped()
    assert len(groups) == 1 and len(groups[0].downloads) == 3


async def test_file_above_the_size_limit_is_refused(relay_factory: RelayFactory) -> None:
    relay = await relay_factory({"aria2": {"max_download_size": 100_000}})
    file = relay.fake.add_file(b"x" * 150_000, file_name="big.iso")
    [reply] = await relay.chat().say(file=file)
    assert "big.iso" in reply.text and "97.7 KiB" in reply.text  # the limit, named
    assert await relay.downloads() == []
    assert await relay.db.get_tg_media(file.file_unique_id) is None


async def test_same_file_twice_while_active_names_the_first_job(
    relay_factory: RelayFactory,
) -> None:
    # With no aria2 slot free the first job stays queued: the second send is a duplicate.
    relay = await relay_factory({"aria2": {"max_concurrent_downloads": 1}})
    relay.fake.delay_get_file = 0.5
    file = relay.fake.add_file(b"y" * (3 * 1024 * 1024), file_name="twice.bin")
    chat = relay.chat()
    await chat.say(file=file)
    [first] = await relay.jobs(1)
    [again] = await chat.say(file=file)
    assert f"#{first.id}" in again.text
    assert len(await relay.downloads()) == 1


# --- links and torrents ------------------------------------------------------------------------


async def test_links_good_bad_and_not_understood(relay: Relay, file_server: FileServer) -> None:
    first = file_server.add_file("one.bin", size=200_000, seed=1)
    second = file_server.add_file("two.bin", size=300_000, seed=2)
    text = "\n".join(
        [
            file_server.url("one.bin"),
            "look at this: " + file_server.url("two.bin") + " thanks",
            "gopher://old.example.com/file",
            "just some words",
        ]
    )
    sent = await relay.chat().say(text, replies=3)
    acks = [m for m in sent if m.text.startswith(("⏳", "🕒", "⬇️", "✅"))]
    summary = [m for m in sent if m not in acks]
    assert len(acks) == 2 and len(summary) == 1
    assert "gopher" in summary[0].text and "just some words" in summary[0].text
    rows = await relay.jobs(2)
    assert [r.source_type for r in rows] == ["http", "http"]
    assert {r.group_key for r in rows} == {rows[0].group_key}
    for row, data in zip(rows, (first, second), strict=True):
        assert row.owner_id == ADMIN and row.chat_id == ADMIN
        await relay.wait_status(row.id, "completed")
        done = await relay.db.get_download_by_id(row.id)
        assert await asyncio.to_thread(Path(done.local_path).read_bytes) == data


async def test_private_addresses_refused_for_users_but_not_admins(
    relay: Relay, file_server: FileServer
) -> None:
    file_server.add_file("inside.bin", size=1000)
    url = file_server.url("inside.bin")
    [reply] = await relay.chat(USER).say(url)
    assert "refused" in reply.text and "loopback" in reply.text
    assert "Nothing was added" in reply.text
    assert await relay.downloads() == []
    [ack] = await relay.chat().say(url)
    [row] = await relay.jobs(1)
    assert row.progress_message_id == ack.message_id


async def test_magnet_link_is_added(relay: Relay) -> None:
    info_hash = "c" * 40
    [ack] = await relay.chat().say(f"magnet:?xt=urn:btih:{info_hash}&dn=thing")
    [row] = await relay.jobs(1)
    assert row.source_type == "magnet" and row.info_hash == info_hash
    assert row.progress_message_id == ack.message_id


async def test_torrent_file_is_added_and_bad_ones_are_explained(
    relay: Relay, tmp_path: Path
) -> None:
    info = make_torrent(b"t" * 50_000, tmp_path / "t", "http://127.0.0.1:9/announce", "movie.mkv")
    chat = relay.chat()
    good = relay.fake.add_file(
        info.torrent_bytes, file_name="movie.mkv.torrent", mime_type="application/x-bittorrent"
    )
    [ack] = await chat.say(file=good)
    [row] = await relay.jobs(1)
    assert row.source_type == "torrent" and row.info_hash == info.info_hash
    assert row.file_name == "movie.mkv" and row.progress_message_id == ack.message_id
    assert await relay.db.get_tg_media(good.file_unique_id) is None  # a torrent, not a media job

    broken = relay.fake.add_file(
        corrupt_torrent_cases()["truncated_bencode"], file_name="broken.torrent"
    )
    [reply] = await chat.say(file=broken)
    assert "cannot be used" in reply.text
    assert len(await relay.downloads()) == 1


async def test_choose_files_buttons_pick_a_torrents_files(relay: Relay, tmp_path: Path) -> None:
    files = {f"notes/{n:02}.txt": bytes([n]) * 2_000 for n in range(1, 9)}
    files |= {"big.bin": b"b" * 60_000, "film.mkv": b"f" * 30_000}
    info = make_torrent(files, tmp_path / "t", "http://127.0.0.1:9/announce", "pack")
    chat = relay.chat()
    torrent = relay.fake.add_file(info.torrent_bytes, file_name="pack.torrent")
    [ack] = await chat.say(file=torrent)
    [row] = await relay.jobs(1)
    await relay.wait_status(row.id, "paused")  # a job from a chat waits for its choice
    assert f"f:{row.id}:o".encode() in ack.callback_data
    index = {PurePosixPath(f.path).name: f.index for f in row.files}
    page = {PurePosixPath(f.path).name: n // 8 + 1 for n, f in enumerate(row.files)}
    last = page["08.txt"]  # a page that is not the big file's
    assert page["big.bin"] != last

    answer = await relay.chat(OTHER).press(ack.message_id, f"f:{row.id}:o")
    assert f"no download #{row.id}" in (answer.text or "")
    await chat.press(ack.message_id, f"f:{row.id}:o")
    [chooser] = [m for m in relay.fake.sent_messages() if m.text.startswith(f"Files of #{row.id}")]
    assert chooser.reply_to_message_id == ack.message_id
    assert "10 of 10 chosen" in chooser.text and "page 1/2" in chooser.text
    toggles = [d for d in chooser.callback_data if d.startswith(f"f:{row.id}:t:".encode())]
    assert len(toggles) == 8 and f"f:{row.id}:p:1".encode() in chooser.callback_data

    def shown() -> str:
        edits = [e for e in relay.fake.edits() if e.message_id == chooser.message_id]
        return edits[-1].text

    def labels() -> list[str]:
        edits = [e for e in relay.fake.edits() if e.message_id == chooser.message_id]
        return [b.text for line in edits[-1].buttons for b in line]

    await chat.press(chooser.message_id, f"f:{row.id}:none")
    assert "0 of 10 chosen" in shown()
    answer = await chat.press(chooser.message_id, f"f:{row.id}:apply")
    assert answer.show_alert and "at least one file" in (answer.text or "")
    await chat.press(chooser.message_id, f"f:{row.id}:largest")
    assert "1 of 10 chosen" in shown() and "page 1/2" in shown()
    await chat.press(chooser.message_id, f"f:{row.id}:p:{page['big.bin'] - 1}")
    assert f"page {page['big.bin']}/2" in shown()
    assert any(t.startswith("✅ big.bin") for t in labels())
    await chat.press(chooser.message_id, f"f:{row.id}:p:{last - 1}")
    assert f"page {last}/2" in shown()
    await chat.press(chooser.message_id, f"f:{row.id}:videos")
    await chat.press(chooser.message_id, f"f:{row.id}:t:{index['08.txt']}")
    assert "2 of 10 chosen" in shown() and f"page {last}/2" in shown()
    assert "✅ 08.txt (2.0 KiB)" in labels() and "⬜ 07.txt (2.0 KiB)" in labels()
    assert (await relay.db.get_download_by_id(row.id)).status == "paused"  # nothing applied yet

    answer = await chat.press(chooser.message_id, f"f:{row.id}:apply")
    assert "2 of 10 files chosen" in (answer.text or "")
    updated = await relay.db.get_download_by_id(row.id)
    chosen = sorted(f.index for f in updated.files if f.selected)
    assert chosen == sorted([index["film.mkv"], index["08.txt"]])
    assert updated.status != "paused"  # the choice started it
    options = await relay.running.service.parts.engine.aria2.get_option(updated.gid)
    assert options["select-file"] == ",".join(map(str, chosen))
    assert labels() == [] and "2 of 10 files chosen" in shown()


async def test_huge_torrent_file_is_refused_without_fetching_it(relay: Relay) -> None:
    huge = relay.fake.add_file(b"d" * (10 * 1024 * 1024 + 1), file_name="huge.torrent")
    calls = relay.fake.get_file_calls
    [reply] = await relay.chat().say(file=huge)
    assert "10.0 MiB" in reply.text
    assert relay.fake.get_file_calls == calls
    assert await relay.downloads() == []


async def test_telegram_error_while_fetching_a_torrent_is_reported(
    relay: Relay, tmp_path: Path
) -> None:
    info = make_torrent(b"q" * 10_000, tmp_path / "t", "http://127.0.0.1:9/announce", "q.bin")
    torrent = relay.fake.add_file(info.torrent_bytes, file_name="q.torrent")
    relay.fake.inject("upload.GetFile", FloodWait(value=120))
    [reply] = await relay.chat().say(file=torrent)
    assert "120" in reply.text
    assert await relay.downloads() == []
    # The same file a moment later goes through.
    [ack] = await relay.chat().say(file=torrent)
    [row] = await relay.jobs(1)
    assert row.info_hash == info.info_hash and row.progress_message_id == ack.message_id


# --- job control ----------------------------------------------------------------------------------


async def test_pause_resume_cancel_retry_commands(relay: Relay, file_server: FileServer) -> None:
    file_server.add_file("slow.bin", size=4 * 1024 * 1024)
    chat = relay.chat()
    await chat.say(file_server.url("slow.bin", route="hold", bytes=65536))
    [row] = await relay.jobs(1)
    await relay.wait_status(row.id, "downloading")

    [usage] = await chat.say("/pause")
    assert "/pause <id>" in usage.text
    [missing] = await chat.say("/retry 999999")
    assert "no download #999999" in missing.text
    [refused] = await chat.say(f"/retry {row.id}")
    assert "Cannot retry" in refused.text and "Downloading" in refused.text

    [paused] = await chat.say(f"/pause {row.id}")
    assert "Paused" in paused.text
    await relay.wait_status(row.id, "paused")
    [resumed] = await chat.say(f"/resume #{row.id}")
    assert "Resumed" in resumed.text
    await relay.wait_status(row.id, "waiting", "downloading")

    [foreign] = await relay.chat(USER).say(f"/cancel {row.id}")
    assert f"no download #{row.id}" in foreign.text  # another's job is named to no one
    assert (await relay.db.get_download_by_id(row.id)).status in ("waiting", "downloading")

    [cancelled] = await chat.say(f"/cancel {row.id}")
    assert "Cancelled" in cancelled.text
    await relay.wait_status(row.id, "cancelled")
    file_server.release()
    [retried] = await chat.say(f"/retry {row.id}")
    assert "Retrying" in retried.text
    await relay.wait_status(row.id, "completed")


async def test_status_pages_buttons_and_lists(relay: Relay, file_server: FileServer) -> None:
    chat = relay.chat()
    links = []
    for n in range(7):
        file_server.add_file(f"job{n}.bin", size=2 * 1024 * 1024, seed=n)
        links.append(file_server.url(f"job{n}.bin", route="hold", bytes=65536))
    await chat.say("\n".join(links), replies=7)
    rows = await relay.jobs(7)
    for row in rows:
        await relay.wait_status(row.id, "waiting", "downloading")

    [status] = await chat.say("/status")
    assert "7" in status.text and "page 1/2" in status.text
    assert "[░" in status.text and "ETA" in status.text
    assert b"s:1" in status.callback_data
    pause_buttons = [d for d in status.callback_data if d.startswith(b"d:pause:")]
    assert len(pause_buttons) == 5

    answer = await chat.press(status.message_id, "s:1")
    assert answer.text is None
    page_two = [e for e in relay.fake.edits() if e.message_id == status.message_id][-1]
    assert "page 2/2" in page_two.text

    # A pause button in the list pauses that job and redraws the page it sat on.
    target = int(pause_buttons[0].split(b":")[2])
    answer = await chat.press(status.message_id, pause_buttons[0])
    assert "Paused" in (answer.text or "")
    await relay.wait_status(target, "paused")
    resume = f"d:resume:{target}:s0".encode()

    def redrawn() -> bool:
        last = [e for e in relay.fake.edits() if e.message_id == status.message_id][-1]
        buttons = [b.callback_data for line in last.buttons for b in line]
        return "page 1/2" in last.text and resume in buttons

    await eventually(redrawn, 10, "the status page being redrawn")

    [downloads] = await chat.say("/downloads")
    for row in rows:
        assert f"#{row.id} job" in downloads.text
    assert "Paused" in downloads.text

    # An allowed user sees only their own jobs.
    [theirs] = await relay.chat(USER).say("/status")
    assert theirs.text == "Nothing is downloading or waiting."
    file_server.release()


# --- progress ----------------------------------------------------------------------------------


async def test_progress_message_is_edited_and_completion_announced(relay: Relay) -> None:
    data = b"p" * 1_500_000
    file = relay.fake.add_file(data, file_name="progress.bin")
    chat = relay.chat()
    [ack] = await chat.say(file=file)
    [row] = await relay.jobs(1)

    def announced() -> bool:
        return any(
            m.text.startswith(f"✅ Downloaded #{row.id}") for m in relay.fake.sent_messages()
        )

    await eventually(announced, 20, "the completion notice")
    [notice] = [m for m in relay.fake.sent_messages() if m.text.startswith("✅ Downloaded")]
    assert notice.reply_to_message_id == row.message_id
    assert f"/stream/{row.id}/progress.bin?sig=" in notice.text
    edits = [e for e in relay.fake.edits() if e.message_id == ack.message_id]
    assert edits and "Completed" in edits[-1].text
    assert edits[-1].buttons == []  # nothing left to control
    # Only one progress message for the job.
    assert [m for m in relay.fake.sent_messages() if m.text.startswith(("🕒", "⏳", "⬇️"))] == [ack]


async def test_failure_notice_names_the_reason(relay: Relay, file_server: FileServer) -> None:
    [ack] = await relay.chat().say(file_server.status_url(404))
    [row] = await relay.jobs(1)
    await relay.wait_status(row.id, "failed")

    def announced() -> bool:
        return any(m.text.startswith(f"❌ #{row.id}") for m in relay.fake.sent_messages())

    await eventually(announced, 20, "the failure notice")
    [notice] = [m for m in relay.fake.sent_messages() if m.text.startswith(f"❌ #{row.id}")]
    failed = await relay.db.get_download_by_id(row.id)
    assert failed.error_message and failed.error_message in notice.text
    edits = [e for e in relay.fake.edits() if e.message_id == ack.message_id]
    assert edits and "Failed" in edits[-1].text
    assert [b.callback_data for line in edits[-1].buttons for b in line] == [
        f"d:retry:{row.id}".encode()
    ]


@pytest.mark.slow
async def test_flood_wait_on_edit_is_waited_out(relay_factory: RelayFactory) -> None:
    # sleep_threshold=0: Pyrogram hands every FloodWait to us instead of sleeping on its own.
    relay = await relay_factory(client_options={"sleep_threshold": 0})
    relay.fake.inject("messages.EditMessage", FloodWait(value=2))
    file = relay.fake.add_file(b"f" * 800_000, file_name="flood.bin")
    [ack] = await relay.chat().say(file=file)
    [row] = await relay.jobs(1)

    def announced() -> bool:
        return any(
            m.text.startswith(f"✅ Downloaded #{row.id}") for m in relay.fake.sent_messages()
        )

    await eventually(announced, 30, "the completion notice after a FloodWait")
    edit_times = [
        r.at
        for r in relay.fake.request_log
        if isinstance(r.query, raw.functions.messages.EditMessage)
    ]
    assert len(edit_times) >= 2  # the refused one, then the one after the wait
    assert edit_times[1] - edit_times[0] >= 1.9
    edits = [e for e in relay.fake.edits() if e.message_id == ack.message_id]
    assert edits and "Completed" in edits[-1].text
    assert relay.bot.progress.running  # the FloodWait did not end the notifier


@pytest.mark.slow
async def test_edits_in_one_chat_are_spaced_by_the_interval(relay_factory: RelayFactory) -> None:
    relay = await relay_factory(interval=0.8)
    files = [relay.fake.add_file(bytes([n]) * 400_000, file_name=f"s{n}.bin") for n in range(2)]
    chat = relay.chat()
    for update in relay.fake.album_updates(files, user=chat.user):
        await chat.feed(update)
    rows = await relay.jobs(2)

    def announced() -> bool:
        texts = [m.text for m in relay.fake.sent_messages()]
        return all(any(t.startswith(f"✅ Downloaded #{r.id}") for t in texts) for r in rows)

    await eventually(announced, 30, "both completion notices")
    notifier_calls = [
        r.at
        for r in relay.fake.request_log
        if isinstance(r.query, raw.functions.messages.EditMessage)
        or (
            isinstance(r.query, raw.functions.messages.SendMessage)
            and r.query.message.startswith("✅")
        )
    ]
    assert len(notifier_calls) >= 4
    gaps = [b - a for a, b in itertools.pairwise(notifier_calls)]
    assert min(gaps) >= 0.75, gaps


@pytest.mark.slow
async def test_progress_continues_in_the_same_message_after_a_restart(
    relay_factory: RelayFactory, file_server: FileServer
) -> None:
    file_server.add_file("long.bin", size=4 * 1024 * 1024)
    relay = await relay_factory(name="restart")
    chat = relay.chat()
    [ack] = await chat.say(file_server.url("long.bin", route="hold", bytes=65536))
    [row] = await relay.jobs(1)
    await relay.wait_status(row.id, "downloading")
    config_path = relay.running.config_path
    await relay.running.stop()

    again = await relay_factory(config_path=config_path, name="restart")
    chat = again.chat()
    sent_before = len(again.fake.sent_messages())
    [paused] = await chat.say(f"/pause {row.id}")
    assert "Paused" in paused.text
    await again.wait_status(row.id, "paused")

    def edited() -> bool:
        return any(
            e.message_id == ack.message_id and "Paused" in e.text for e in again.fake.edits()
        )

    await eventually(edited, 20, "the old progress message being edited")
    new_progress = [
        m
        for m in again.fake.sent_messages()[sent_before:]
        if m.text.startswith(("🕒 #", "⏳ #", "⬇️ #", "⏸ #"))
    ]
    assert new_progress == [], "a new progress message was sent instead of editing the old one"
    file_server.release()


@pytest.mark.slow
async def test_upload_notice_names_the_remote_path(
    relay_factory: RelayFactory, rclone_config: Path, tmp_path: Path
) -> None:
    cloud = tmp_path / "cloud"
    cloud.mkdir()
    add_remote(rclone_config, "localdisk", {"type": "local"})
    relay = await relay_factory(
        {
            "upload": {
                "targets": [
                    {"name": "disk", "type": "rclone", "remote": "localdisk", "path": str(cloud)}
                ],
                "rclone_config": str(rclone_config),
            }
        }
    )
    data = b"u" * 700_000
    file = relay.fake.add_file(data, file_name="up.bin")
    chat = relay.chat()
    [ack] = await chat.say(file=file)
    [row] = await relay.jobs(1)

    def uploaded() -> bool:
        return any(m.text.startswith(f"☁️ #{row.id}") for m in relay.fake.sent_messages())

    await eventually(uploaded, 60, "the upload notice")
    [notice] = [m for m in relay.fake.sent_messages() if m.text.startswith(f"☁️ #{row.id}")]
    [upload] = await relay.db.get_uploads_by_download(row.id)
    assert upload.status == "completed" and upload.remote_path
    assert "disk" in notice.text and upload.remote_path in notice.text
    assert await asyncio.to_thread((cloud / "up.bin").read_bytes) == data

    # /uploads lists it, with a retry button only for uploads that can be retried.
    [uploads] = await chat.say("/uploads")
    assert f"↑{upload.id} #{row.id} → disk" in uploads.text
    assert uploads.callback_data == []
    answer = await chat.press(uploads.message_id, f"u:retry:{upload.id}:l")
    assert "Cannot retry upload" in (answer.text or "")
    edits = [e for e in relay.fake.edits() if e.message_id == ack.message_id]
    assert edits and "uploaded →" in edits[-1].text


async def test_target_buttons_choose_where_a_job_goes(
    relay_factory: RelayFactory, file_server: FileServer, rclone_config: Path, tmp_path: Path
) -> None:
    clouds = {name: tmp_path / name for name in ("near", "far")}
    for folder in clouds.values():
        folder.mkdir()
    add_remote(rclone_config, "localdisk", {"type": "local"})
    targets = [
        {"name": name, "type": "rclone", "remote": "localdisk", "path": str(folder)}
        for name, folder in clouds.items()
    ]
    relay = await relay_factory(
        {"upload": {"targets": targets, "rclone_config": str(rclone_config)}}
    )
    data = file_server.add_file("pick.bin", size=300_000, seed=9)
    chat = relay.chat()
    [ack] = await chat.say(file_server.url("pick.bin", route="hold", bytes=65536))
    [row] = await relay.jobs(1)
    # The first message of the job offers each target, and keeping the file here only.
    choices = [f"t:{row.id}:0", f"t:{row.id}:1", f"t:{row.id}:-"]
    assert [d for d in ack.callback_data if d.startswith(b"t:")] == [c.encode() for c in choices]
    await file_server.wait_held("pick.bin")

    answer = await chat.press(ack.message_id, f"t:{row.id}:-")
    assert "stay here only" in (answer.text or "")
    assert await relay.db.get_download_targets(row.id) == []
    answer = await relay.chat(OTHER).press(ack.message_id, f"t:{row.id}:0")
    assert f"no download #{row.id}" in (answer.text or "")
    answer = await chat.press(ack.message_id, f"t:{row.id}:7")
    assert "no longer valid" in (answer.text or "")  # no such target (any more)
    answer = await chat.press(ack.message_id, f"t:{row.id}:1")
    assert "far only" in (answer.text or "")
    assert await relay.db.get_download_targets(row.id) == ["far"]

    file_server.release("pick.bin")

    def uploaded() -> bool:
        return any(m.text.startswith(f"☁️ #{row.id}") for m in relay.fake.sent_messages())

    await eventually(uploaded, 60, "the upload notice")
    [upload] = await relay.db.get_uploads_by_download(row.id)
    assert upload.upload_target == "far" and upload.status == "completed"
    assert await asyncio.to_thread((clouds["far"] / "pick.bin").read_bytes) == data
    assert not await asyncio.to_thread((clouds["near"] / "pick.bin").exists)
    # A local folder makes no links: the notice names the remote path.
    [notice] = [m for m in relay.fake.sent_messages() if m.text.startswith(f"☁️ #{row.id}")]
    assert upload.public_link is None and upload.remote_path and upload.remote_path in notice.text
    # Once the job has completed, its choice is closed.
    answer = await chat.press(ack.message_id, f"t:{row.id}:0")
    assert "finished downloading" in (answer.text or "")


async def test_refused_credentials_leave_the_rest_running(relay_factory: RelayFactory) -> None:
    # Telegram refuses this token.
    relay = await relay_factory(client_options={"bot_token": "1:"}, wait_started=False)
    await relay.fake.wait_for_requests(1, of_type="auth.ImportBotAuthorization")
    await asyncio.sleep(0.3)
    assert not relay.session.logged_in.is_set() and relay.session.client is None
    assert not relay.session.retrying  # no retry loop for credentials Telegram refused
    assert not relay.bot.started.is_set()
    status, health = await relay.running.api("GET", "/api/health", auth=False)
    assert status == 200 and health["status"] == "ok"
    imports = relay.fake.requests_of("auth.ImportBotAuthorization")
    assert len(imports) == 1


@pytest.mark.slow
async def test_final_upload_failure_is_announced_with_its_reason(
    relay_factory: RelayFactory, rclone_config: Path
) -> None:
    relay = await relay_factory(
        {
            "upload": {
                "targets": [{"name": "nowhere", "type": "rclone", "remote": "missingremote"}],
                "rclone_config": str(rclone_config),
                "max_retries": 0,
            }
        }
    )
    file = relay.fake.add_file(b"n" * 300_000, file_name="lost.bin")
    await relay.chat().say(file=file)
    [row] = await relay.jobs(1)

    def announced() -> bool:
        return any(
            m.text.startswith(f"❌ Upload of #{row.id} lost.bin to nowhere failed")
            for m in relay.fake.sent_messages()
        )

    await eventually(announced, 60, "the upload failure notice")
    [upload] = await relay.db.get_uploads_by_download(row.id)
    assert upload.status == "failed"
    [notice] = [m for m in relay.fake.sent_messages() if m.text.startswith("❌ Upload")]
    reason = upload.error_message or upload.failure_reason
    assert reason and reason[:40] in notice.text
