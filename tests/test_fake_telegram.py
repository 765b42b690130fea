"""The offline Telegram fake: real Pyrogram (dispatcher, parsers, handlers) over a fake edge."""

from __future__ import annotations

import asyncio
import io
import random
from pathlib import Path

import pyrogram
import pytest
from pyrogram import enums, filters, raw
from pyrogram.errors import (
    ChannelPrivate,
    FileReferenceExpired,
    FileReferenceInvalid,
    FloodWait,
    LimitInvalid,
    MessageNotModified,
    OffsetInvalid,
)
from pyrogram.file_id import FileId
from pyrogram.types import (
    CallbackQuery,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputMediaAudio,
    InputMediaDocument,
    InputMediaPhoto,
    InputMediaVideo,
    Message,
)

from tests.support.fake_telegram import MIB, FakeFile, FakeSession, FakeTelegram

InputMedia = InputMediaPhoto | InputMediaVideo | InputMediaAudio | InputMediaDocument


def _payload(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


async def _collect_messages(
    fake: FakeTelegram, client: pyrogram.Client, updates: list[raw.base.Update], count: int
) -> list[Message]:
    received: list[Message] = []
    done = asyncio.Event()

    @client.on_message(filters.private)  # type: ignore[misc]
    async def collect(_: pyrogram.Client, message: Message) -> None:
        received.append(message)
        if len(received) >= count:
            done.set()

    await fake.feed(client, updates)
    await asyncio.wait_for(done.wait(), 5)
    return received


async def test_client_starts_and_stops_offline(fake_telegram: FakeTelegram) -> None:
    client = fake_telegram.make_client()
    await client.start()
    try:
        assert isinstance(client.session, FakeSession)
        assert client.me is not None and client.me.is_bot
        assert client.me.id == fake_telegram.bot_user.id
        names = [type(q).__name__ for q in fake_telegram.requests]
        assert "ImportBotAuthorization" in names
        assert "GetState" in names
        assert fake_telegram.open_sessions
    finally:
        await client.stop()
    assert not fake_telegram.open_sessions


async def test_start_command_reaches_a_real_handler_and_the_reply_is_recorded(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    seen: list[Message] = []

    @tg_client.on_message(filters.command("start") & filters.private)  # type: ignore[misc]
    async def start(_: pyrogram.Client, message: Message) -> None:
        seen.append(message)
        await message.reply_text(
            "Welcome",
            reply_markup=InlineKeyboardMarkup(
                [[InlineKeyboardButton("Help", callback_data="help")]]
            ),
        )

    user = fake_telegram.make_user(first_name="Grace", language_code="de")
    mark = fake_telegram.mark()
    await fake_telegram.feed(tg_client, fake_telegram.message_update(user, "/start"))
    await fake_telegram.wait_for_requests(1, of_type="messages.SendMessage", after=mark)

    assert len(seen) == 1
    assert seen[0].from_user is not None and seen[0].chat is not None
    assert seen[0].from_user.id == user.id
    assert seen[0].from_user.language_code == "de"
    assert seen[0].chat.type == enums.ChatType.PRIVATE
    assert seen[0].command == ["start"]
    sent = fake_telegram.sent_messages()
    assert [(s.chat_id, s.text) for s in sent] == [(user.id, "Welcome")]
    assert sent[0].callback_data == [b"help"]
    assert sent[0].message_id > seen[0].id


async def test_callback_query_reaches_its_handler_and_the_answer_is_recorded(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    user = fake_telegram.make_user()
    # The user must have talked to the bot before the bot can write to them.
    await _collect_messages(fake_telegram, tg_client, [fake_telegram.message_update(user, "hi")], 1)
    sent = await tg_client.send_message(
        user.id,
        "Job 42 running",
        reply_markup=InlineKeyboardMarkup(
            [[InlineKeyboardButton("Cancel", callback_data=b"cancel:42")]]
        ),
    )
    assert sent is not None
    queries: list[CallbackQuery] = []

    @tg_client.on_callback_query()  # type: ignore[misc]
    async def on_press(_: pyrogram.Client, query: CallbackQuery) -> None:
        queries.append(query)
        await query.answer("Cancelled")

    mark = fake_telegram.mark()
    update = fake_telegram.callback_query_update(user, sent.id, b"cancel:42")
    await fake_telegram.feed(tg_client, update)
    await fake_telegram.wait_for_requests(1, of_type="messages.SetBotCallbackAnswer", after=mark)

    assert len(queries) == 1
    assert queries[0].data == "cancel:42"
    assert queries[0].from_user.id == user.id
    assert queries[0].message is not None and queries[0].message.id == sent.id
    answers = fake_telegram.callback_answers()
    assert [(a.query_id, a.text, a.show_alert) for a in answers] == [
        (update.query_id, "Cancelled", False)
    ]


@pytest.mark.parametrize("kind", ["document", "video", "audio", "photo", "animation", "voice"])
async def test_media_updates_parse_into_pyrogram_attributes(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client, kind: str
) -> None:
    names = {
        "document": "report.pdf",
        "video": "clip.mp4",
        "audio": "song.mp3",
        "animation": "loop.mp4",
    }
    mimes = {"document": "application/pdf", "audio": "audio/mpeg"}
    file = fake_telegram.add_file(
        _payload(5000),
        kind=kind,
        file_name=names.get(kind),
        mime_type=mimes.get(kind),
        duration=33 if kind in ("video", "audio", "voice", "animation") else None,
        width=640 if kind in ("video", "animation", "photo") else None,
        height=360 if kind in ("video", "animation", "photo") else None,
    )
    update = fake_telegram.message_update(text="caption here", file=file)
    (message,) = await _collect_messages(fake_telegram, tg_client, [update], 1)

    media = getattr(message, kind)
    assert media is not None, f"message has no {kind}"
    assert message.media == getattr(enums.MessageMediaType, kind.upper())
    assert message.caption == "caption here"
    assert media.file_unique_id == file.file_unique_id
    assert media.file_size == 5000
    assert media.file_id == file.file_id
    if kind != "photo":
        assert media.mime_type == file.mime_type
    if kind in names:
        assert media.file_name == names[kind]
    if kind in ("video", "audio", "voice", "animation"):
        assert media.duration == 33
    if kind in ("video", "animation", "photo"):
        assert (media.width, media.height) == (640, 360)


async def test_album_arrives_as_separate_messages_with_one_media_group_id(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    files = [fake_telegram.add_file(_payload(100, seed=i), kind="photo") for i in range(2)] + [
        fake_telegram.add_file(_payload(100, seed=9), kind="video", file_name="v.mp4")
    ]
    updates = fake_telegram.album_updates(files, caption="holiday")
    messages = await _collect_messages(fake_telegram, tg_client, list(updates), 3)

    assert len({m.id for m in messages}) == 3
    group_ids = {m.media_group_id for m in messages}
    assert len(group_ids) == 1 and None not in group_ids
    by_id = sorted(messages, key=lambda m: m.id)
    assert by_id[0].caption == "holiday"
    assert [m.media for m in by_id] == [
        enums.MessageMediaType.PHOTO,
        enums.MessageMediaType.PHOTO,
        enums.MessageMediaType.VIDEO,
    ]


async def test_send_document_reassembles_the_uploaded_bytes(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client, tmp_path: Path
) -> None:
    user = fake_telegram.make_user()
    await _collect_messages(fake_telegram, tg_client, [fake_telegram.message_update(user, "hi")], 1)

    small = _payload(1_300_000, seed=1)
    in_memory = io.BytesIO(small)
    in_memory.name = "small.bin"
    sent_small = await tg_client.send_document(user.id, in_memory, caption="small one")
    assert sent_small is not None

    big = _payload(11 * MIB + 12345, seed=2)
    big_path = tmp_path / "big.mkv"
    big_path.write_bytes(big)
    sent_big = await tg_client.send_video(user.id, str(big_path), duration=95, width=1920)
    assert sent_big is not None

    documents = fake_telegram.sent_documents()
    assert [d.message_id for d in documents] == [sent_small.id, sent_big.id]
    assert documents[0].data == small
    assert documents[0].file_name == "small.bin"
    assert documents[0].caption == "small one"
    assert documents[0].uploaded and documents[0].kind == "document"
    assert documents[1].data == big
    assert documents[1].kind == "video"
    assert documents[1].duration == 95
    assert documents[1].file_name == "big.mkv"
    assert sent_big.video is not None and sent_big.video.file_size == len(big)
    assert fake_telegram.requests_of("upload.SaveBigFilePart")
    assert fake_telegram.requests_of("upload.SaveFilePart")


async def test_send_media_group_uploads_each_file(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    user = fake_telegram.make_user()
    await _collect_messages(fake_telegram, tg_client, [fake_telegram.message_update(user, "hi")], 1)
    parts: list[InputMedia] = []
    for index in range(2):
        buffer = io.BytesIO(_payload(70_000, seed=index))
        buffer.name = f"part{index}.bin"
        parts.append(InputMediaDocument(buffer))

    sent = await tg_client.send_media_group(user.id, parts)

    assert sent is not None

    documents = fake_telegram.sent_documents()
    assert [d.file_name for d in documents] == ["part0.bin", "part1.bin"]
    assert [d.data for d in documents] == [_payload(70_000, seed=i) for i in range(2)]
    assert len({d.grouped_id for d in documents}) == 1
    assert {m.media_group_id for m in sent} == {documents[0].grouped_id}


async def test_flood_wait_longer_than_the_threshold_reaches_the_caller(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    user = fake_telegram.make_user()
    await _collect_messages(fake_telegram, tg_client, [fake_telegram.message_update(user, "hi")], 1)
    sent = await tg_client.send_message(user.id, "progress 0%")
    assert sent is not None
    fake_telegram.inject("messages.EditMessage", FloodWait(value=30))

    with pytest.raises(FloodWait) as caught:
        await tg_client.edit_message_text(user.id, sent.id, "progress 10%")
    assert caught.value.value == 30
    assert fake_telegram.edits() == []

    edited = await tg_client.edit_message_text(user.id, sent.id, "progress 20%")
    assert edited.text == "progress 20%"
    assert [e.text for e in fake_telegram.edits()] == ["progress 20%"]


async def test_short_flood_wait_is_slept_through_by_pyrogram(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    user = fake_telegram.make_user()
    await _collect_messages(fake_telegram, tg_client, [fake_telegram.message_update(user, "hi")], 1)
    sent = await tg_client.send_message(user.id, "a")
    assert sent is not None
    fake_telegram.inject(raw.functions.messages.EditMessage, FloodWait(value=1))

    await tg_client.edit_message_text(user.id, sent.id, "b")

    assert len(fake_telegram.requests_of("messages.EditMessage")) == 2
    assert [e.text for e in fake_telegram.edits()] == ["b"]


async def test_unchanged_edit_is_refused_like_telegram(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    user = fake_telegram.make_user()
    await _collect_messages(fake_telegram, tg_client, [fake_telegram.message_update(user, "hi")], 1)
    sent = await tg_client.send_message(user.id, "same")
    assert sent is not None
    with pytest.raises(MessageNotModified):
        await tg_client.edit_message_text(user.id, sent.id, "same")


async def test_pyrogram_download_gets_the_exact_bytes(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    data = _payload(2 * MIB, seed=3)
    file = fake_telegram.add_file(data, kind="document", file_name="two.bin", dc_id=4)
    (message,) = await _collect_messages(
        fake_telegram, tg_client, [fake_telegram.message_update(file=file)], 1
    )
    downloaded = await tg_client.download_media(message, in_memory=True)
    assert isinstance(downloaded, io.BytesIO)
    assert downloaded.getvalue() == data
    assert fake_telegram.media_sessions_opened[4] == 1
    assert fake_telegram.requests_of("auth.ImportAuthorization")


async def _get_file(
    client: pyrogram.Client, file: FakeFile, offset: int, limit: int, reference: bytes | None = None
) -> bytes:
    session = await client.get_session(file.dc_id, is_media=True)
    result = await session.invoke(
        raw.functions.upload.GetFile(
            location=raw.types.InputDocumentFileLocation(
                id=file.id,
                access_hash=file.access_hash,
                file_reference=file.file_reference if reference is None else reference,
                thumb_size="",
            ),
            offset=offset,
            limit=limit,
        ),
        retries=1,
    )
    return bytes(result.bytes)


async def test_get_file_enforces_telegram_offset_and_limit_rules(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    data = _payload(3 * MIB, seed=4)
    file = fake_telegram.add_file(data)

    assert await _get_file(tg_client, file, MIB, MIB) == data[MIB : 2 * MIB]
    assert await _get_file(tg_client, file, 8192, 4096) == data[8192:12288]
    with pytest.raises(OffsetInvalid):
        await _get_file(tg_client, file, 1000, 4096)
    with pytest.raises(LimitInvalid):
        await _get_file(tg_client, file, 0, 3 * 4096)  # 1 MiB is not divisible by 12 KiB
    with pytest.raises(LimitInvalid):
        await _get_file(tg_client, file, MIB - 4096, 8192)  # crosses a 1 MiB boundary


async def test_expired_reference_fails_until_the_message_is_read_again(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    data = _payload(10_000, seed=5)
    file = fake_telegram.add_file(data)
    (message,) = await _collect_messages(
        fake_telegram, tg_client, [fake_telegram.message_update(file=file)], 1
    )
    old_reference = file.file_reference
    fake_telegram.expire_file_reference(file)

    with pytest.raises(FileReferenceExpired):
        await _get_file(tg_client, file, 0, 4096, reference=old_reference)

    assert message.chat is not None and message.document is not None
    again = await tg_client.get_messages(message.chat.id, message.id)
    assert isinstance(again, Message) and again.document is not None
    assert again.document.file_id != message.document.file_id
    assert file.file_reference != old_reference
    assert await _get_file(tg_client, file, 0, 4096) == data[:4096]


async def test_each_bot_gets_its_own_reference_through_the_storage_channel(
    fake_telegram: FakeTelegram, tg_client: pyrogram.Client
) -> None:
    fake = fake_telegram
    member_token, outsider_token = fake.add_bot(), fake.add_bot()
    channel = fake.add_channel([fake.bot_user.id, fake.bot_id_of(member_token)])
    data = _payload(2 * MIB, seed=9)
    file = fake.add_file(data, kind="video", file_name="v.mp4")
    update = fake.message_update(text="a caption", file=file)
    copy = await tg_client.forward_messages(
        channel.peer_id, fake.default_user.id, update.message.id, hide_captions=True
    )
    assert isinstance(copy, Message) and copy.video is not None and not copy.caption
    member = fake.make_client("member", bot_token=member_token)
    outsider = fake.make_client("outsider", bot_token=outsider_token)
    await member.start()
    await outsider.start()
    try:
        assert member.me is not None and member.me.id == fake.bot_id_of(member_token)
        with pytest.raises(FileReferenceInvalid):  # the main bot's reference is not the member's
            await _get_file(member, file, 0, 4096)
        seen = await member.get_messages(channel.peer_id, copy.id)
        assert isinstance(seen, Message) and seen.video is not None
        assert seen.video.file_unique_id == file.file_unique_id
        own = FileId.decode(seen.video.file_id).file_reference
        assert own != file.file_reference
        assert await _get_file(member, file, 0, 4096, reference=own) == data[:4096]
        with pytest.raises(ChannelPrivate):
            await outsider.get_messages(channel.peer_id, copy.id)

        # Over its limit of parts in flight, a bot is told to wait.
        fake.part_limit_per_bot, fake.part_limit_mode = 1, "flood"
        fake.part_limit_flood_wait, fake.delay_get_file = 100, 0.05
        mark = fake.mark()
        first = asyncio.create_task(_get_file(member, file, 0, 4096, reference=own))
        await fake.wait_for_requests(1, of_type=raw.functions.upload.GetFile, after=mark)
        with pytest.raises(FloodWait):
            await _get_file(member, file, MIB, 4096, reference=own)
        assert await first == data[:4096]
        assert await _get_file(tg_client, file, MIB, 4096) == data[MIB : MIB + 4096]
    finally:
        await member.stop()
        await outsider.stop()
