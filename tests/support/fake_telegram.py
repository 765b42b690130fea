"""Telegram, offline, at the edge: a fake server behind Pyrogram's Session.

Only the network edge is replaced. A Client built by ``FakeTelegram.make_client()`` is a real
``pyrogram.Client``: its dispatcher, parsers, filters, handlers, ``invoke`` (with its FloodWait and
retry rules), ``get_session`` and ``save_file`` all run as in production. Where the real
``Session`` would encrypt a request and write it to a socket, ``FakeSession.send`` hands the raw
TL object to ``FakeTelegram``, which answers it with real raw TL objects (or a Telegram RPC error
raised through Pyrogram's own ``RPCError.raise_it``). Requests are serialised and answers are
serialised and parsed back on the way (``wire_check``), so what could not cross the wire fails here
too and the client reads exactly what it would read from a socket.

The server side knows: the bot's authorization (auth keys, exported/imported authorizations for
other data centres: a foreign-DC session that skipped the import is refused), private chats with
users, messages with one account-wide id sequence (as Telegram's private message box: that is
what lets ``messages.GetMessages`` name a message without its chat), files with access hashes and
file references that can expire, ``upload.GetFile`` with Telegram's offset/limit rules, uploads
in parts (``upload.SaveFilePart`` / ``SaveBigFilePart``) with their size and MD5 checks.

Several bots: ``add_bot()`` registers another bot and returns its token; each auth key belongs to
the bot that authorized it, and each bot gets its own file reference for a file (one bot's
reference is refused to another). ``add_channel()`` makes a channel with bot members: the main bot
forwards a message there (``messages.ForwardMessages``), and a member reads it with
``channels.GetMessages`` to get its own reference; a bot that is no member is refused.
``part_limit_per_bot`` throttles each bot's ``upload.GetFile`` parts in flight (waiting for a free
slot, or answering FLOOD_WAIT when ``part_limit_mode`` is "flood").

Updates come in through ``feed()``, which passes a raw ``Updates`` to ``client.handle_updates``
exactly as the real session does with what it reads from the socket: peers are stored and every
update lands on ``client.dispatcher.updates_queue`` as ``(update, users, chats)``.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import random
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import pyrogram
import pytest
import pytest_asyncio
from pyrogram import client as pyrogram_client_module
from pyrogram import errors, raw, utils
from pyrogram.errors import RPCError
from pyrogram.file_id import FileId, FileType, FileUniqueId, FileUniqueType, ThumbnailSource
from pyrogram.raw.all import layer
from pyrogram.raw.core import TLObject
from pyrogram.session import Auth, Session
from pyrogram.session.session import SessionState

MIB = 1024 * 1024
GET_FILE_ALIGN = 4 * 1024
UPLOAD_PART_MAX = 512 * 1024
MAIN_DC = 2
PHOTO_SIZE_TYPE = "y"
FILE_KINDS = ("document", "video", "audio", "photo", "animation", "voice")

_FILE_TYPES = {
    "document": FileType.DOCUMENT,
    "video": FileType.VIDEO,
    "audio": FileType.AUDIO,
    "photo": FileType.PHOTO,
    "animation": FileType.ANIMATION,
    "voice": FileType.VOICE,
}
_DEFAULT_MIME = {
    "document": "application/octet-stream",
    "video": "video/mp4",
    "audio": "audio/mpeg",
    "photo": "image/jpeg",
    "animation": "video/mp4",
    "voice": "audio/ogg",
}

# Requests a session may send before its auth key is authorized.
_NO_AUTH_NEEDED: tuple[type[TLObject], ...] = (
    raw.functions.Ping,
    raw.functions.InitConnection,
    raw.functions.help.GetConfig,
    raw.functions.auth.ImportBotAuthorization,
    raw.functions.auth.ImportAuthorization,
)


# The file locations upload.GetFile serves.
_SERVED_LOCATIONS = (raw.types.InputDocumentFileLocation, raw.types.InputPhotoFileLocation)


class FakeTelegramUnsupported(NotImplementedError):
    """The fake was asked something it does not model: extend the fake, do not ignore it."""


class _RpcFailure(Exception):
    """An RPC error the fake server answers with (raised to the client as Telegram's would be)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message

    @classmethod
    def of(cls, error_type: type[RPCError], value: int | None = None) -> _RpcFailure:
        assert error_type.ID is not None and error_type.CODE is not None
        message = error_type.ID
        if value is not None:
            message = message.replace("_X", f"_{value}", 1)
        return cls(error_type.CODE, message)


# --------------------------------------------------------------------------------------------
# Records the fake keeps for assertions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the server saw it (wrappers such as InvokeWithLayer removed)."""

    query: TLObject
    dc_id: int
    is_media: bool
    at: float


@dataclass(frozen=True)
class InlineButton:
    text: str
    callback_data: bytes | None = None
    url: str | None = None


@dataclass(frozen=True)
class SentMessage:
    """A text message the bot sent."""

    chat_id: int
    message_id: int
    text: str
    buttons: list[list[InlineButton]]
    reply_to_message_id: int | None
    request: TLObject

    @property
    def callback_data(self) -> list[bytes]:
        return [b.callback_data for row in self.buttons for b in row if b.callback_data is not None]


@dataclass(frozen=True)
class SentDocument:
    """A file the bot sent (uploaded bytes reassembled from the parts, or a resent file)."""

    chat_id: int
    message_id: int
    kind: str
    file_name: str | None
    mime_type: str
    data: bytes
    caption: str
    duration: float | None
    width: int | None
    height: int | None
    grouped_id: int | None
    uploaded: bool
    attributes: list[raw.base.DocumentAttribute]
    file: FakeFile

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class Edit:
    """An edit the bot made (text and keyboard as they are after the edit)."""

    chat_id: int
    message_id: int
    text: str
    buttons: list[list[InlineButton]]
    document: SentDocument | None
    request: TLObject


@dataclass(frozen=True)
class CallbackAnswer:
    query_id: int
    text: str | None
    show_alert: bool
    url: str | None


@dataclass(eq=False)
class FakeFile:
    """A file stored on the fake server."""

    id: int
    access_hash: int
    file_reference: bytes
    dc_id: int
    data: bytes
    kind: str
    file_name: str | None
    mime_type: str
    date: int
    duration: float | None = None
    width: int | None = None
    height: int | None = None
    title: str | None = None
    performer: str | None = None
    reference_valid: bool = True
    past_references: set[bytes] = field(default_factory=set)
    bot_references: dict[int, bytes] = field(default_factory=dict)  # other bots' references

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def file_type(self) -> FileType:
        return _FILE_TYPES[self.kind]

    @property
    def file_unique_id(self) -> str:
        return FileUniqueId(file_unique_type=FileUniqueType.DOCUMENT, media_id=self.id).encode()

    @property
    def file_id(self) -> str:
        """Pyrogram's file id with the reference last handed out (as a parsed message has it)."""
        if self.kind == "photo":
            return FileId(
                file_type=FileType.PHOTO,
                dc_id=self.dc_id,
                media_id=self.id,
                access_hash=self.access_hash,
                file_reference=self.file_reference,
                thumbnail_source=ThumbnailSource.THUMBNAIL,
                thumbnail_file_type=FileType.PHOTO,
                thumbnail_size=PHOTO_SIZE_TYPE,
                volume_id=0,
                local_id=0,
            ).encode()
        return FileId(
            file_type=self.file_type,
            dc_id=self.dc_id,
            media_id=self.id,
            access_hash=self.access_hash,
            file_reference=self.file_reference,
        ).encode()


@dataclass
class FakeMessage:
    """A message in a private chat, kept by the server; media is rendered from its FakeFile."""

    id: int
    chat_id: int
    sender_id: int
    out: bool
    date: int
    text: str = ""
    entities: list[raw.base.MessageEntity] | None = None
    file: FakeFile | None = None
    reply_markup: raw.base.ReplyMarkup | None = None
    grouped_id: int | None = None
    reply_to_message_id: int | None = None
    edit_date: int | None = None
    deleted: bool = False
    channel_id: int | None = None  # set for a channel post (chat_id is then the channel's peer id)


@dataclass
class FakeChannel:
    """A channel whose members are bots; its posts have their own id sequence."""

    id: int
    access_hash: int
    title: str
    members: set[int]
    messages: dict[int, FakeMessage] = field(default_factory=dict)
    last_message_id: int = 0

    @property
    def peer_id(self) -> int:
        return utils.get_channel_id(self.id)


@dataclass
class _Upload:
    parts: dict[int, bytes] = field(default_factory=dict)
    total_parts: int | None = None
    big: bool = False


@dataclass
class _Injection:
    target: str
    error: BaseException | type[BaseException]
    remaining: int
    bot_id: int | None = None


@dataclass
class _Call:
    session: FakeSession
    query: Any  # the raw function being answered; its handler knows which
    timeout: float


# --------------------------------------------------------------------------------------------
# The edge: Session and Auth for clients wired to a fake
# --------------------------------------------------------------------------------------------

_REAL_SESSION = Session
_REAL_AUTH = Auth
_CLIENT_FAKES: weakref.WeakKeyDictionary[pyrogram.Client, FakeTelegram] = (
    weakref.WeakKeyDictionary()
)


class FakeSession(Session):
    """A Session whose transport is the fake server: ``send`` is the edge, ``invoke`` is real."""

    def __init__(self, fake: FakeTelegram, client: pyrogram.Client, *args: Any, **kwargs: Any):
        super().__init__(client, *args, **kwargs)
        self.fake = fake

    async def start(self) -> None:
        if self.state in (SessionState.STARTED, SessionState.STARTING):
            return
        await self._set_state(SessionState.STARTING)
        try:
            # The same two requests the real session sends once its connection is up.
            await self.send(raw.functions.Ping(ping_id=0), timeout=self.START_TIMEOUT)
            if not self.is_cdn:
                params = self.client.init_connection_params
                if isinstance(params, dict):
                    params = utils.obj_to_jsonvalue(params)
                await self.send(
                    raw.functions.InvokeWithLayer(
                        layer=layer,
                        query=raw.functions.InitConnection(
                            api_id=await self.client.storage.api_id(),
                            app_version=self.client.app_version,
                            device_model=self.client.device_model,
                            system_version=self.client.system_version,
                            system_lang_code=self.client.system_lang_code,
                            lang_pack=self.client.lang_pack,
                            lang_code=self.client.lang_code,
                            query=raw.functions.help.GetConfig(),
                            params=params,
                        ),
                    ),
                    timeout=self.START_TIMEOUT,
                )
        except BaseException:
            await self.stop()
            raise
        await self._set_state(SessionState.STARTED)
        self.is_started.set()
        self.fake._session_started(self)
        if callable(self.client.connect_handler):
            await self.client.connect_handler(self.client, self)

    async def _stop(self) -> None:
        if self.state in (SessionState.STOPPED, SessionState.STOPPING):
            return
        await self._set_state(SessionState.STOPPING)
        self.is_started.clear()
        await self._wait_pending_tasks()
        await self._set_state(SessionState.STOPPED)
        self.fake._session_stopped(self)
        if callable(self.client.disconnect_handler):
            await self.client.disconnect_handler(self.client, self)

    async def send(
        self, data: TLObject, wait_response: bool = True, timeout: float = Session.WAIT_TIMEOUT
    ) -> Any:
        return await self.fake._serve(self, data, wait_response, timeout)


class _FakeAuth:
    """Stands for the DH key exchange: the fake server hands out a fresh, unauthorized key."""

    def __init__(
        self, fake: FakeTelegram, client: pyrogram.Client, dc_id: int, *args: Any, **kwargs: Any
    ) -> None:
        self.fake = fake
        self.dc_id = dc_id

    async def create(self) -> bytes:
        return self.fake._new_auth_key(self.dc_id)


def _edge_session(client: pyrogram.Client, *args: Any, **kwargs: Any) -> Session:
    fake = _CLIENT_FAKES.get(client)
    if fake is None:
        return _REAL_SESSION(client, *args, **kwargs)
    return FakeSession(fake, client, *args, **kwargs)


def _edge_auth(client: pyrogram.Client, *args: Any, **kwargs: Any) -> Any:
    fake = _CLIENT_FAKES.get(client)
    if fake is None:
        return _REAL_AUTH(client, *args, **kwargs)
    return _FakeAuth(fake, client, *args, **kwargs)


def _install_edge() -> None:
    # client.py is the one place that builds Sessions and runs key exchanges. Clients that are
    # not wired to a fake still get the real classes.
    vars(pyrogram_client_module).update(Session=_edge_session, Auth=_edge_auth)


def _roundtrip(obj: Any) -> Any:
    if isinstance(obj, TLObject):
        return TLObject.read(BytesIO(obj.write()))
    if isinstance(obj, list):
        return [_roundtrip(item) for item in obj]
    return obj


def _unwrap(query: TLObject) -> TLObject:
    while isinstance(
        query,
        (
            raw.functions.InvokeWithLayer,
            raw.functions.InvokeWithoutUpdates,
            raw.functions.InvokeWithTakeout,
        ),
    ):
        query = query.query
    return query


def _qualname(target: str | type[TLObject]) -> str:
    if isinstance(target, str):
        return target
    return ".".join(target.QUALNAME.split(".")[1:])


def _matches(query: TLObject, target: str) -> bool:
    name = _qualname(type(query))
    return name == target or name.split(".")[-1] == target


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class FakeTelegram:
    """An offline Telegram server for real Pyrogram clients. See the module docstring."""

    def __init__(
        self,
        *,
        bot_id: int = 7_000_001,
        bot_username: str = "mistrelay_test_bot",
        seed: int = 1,
    ) -> None:
        self._random = random.Random(seed)
        self.main_dc = MAIN_DC
        self.wire_check = True
        self.bot_user = raw.types.User(
            id=bot_id,
            is_self=True,
            bot=True,
            access_hash=self._random.getrandbits(63),
            first_name="MistRelay",
            username=bot_username,
            bot_info_version=1,
        )
        self.users: dict[int, raw.types.User] = {bot_id: self.bot_user}
        self.bots: dict[int, raw.types.User] = {bot_id: self.bot_user}
        self.revoked_bots: set[int] = set()
        self.channels: dict[int, FakeChannel] = {}
        self._default_user: raw.types.User | None = None

        self.requests: list[TLObject] = []
        self.request_log: list[RecordedRequest] = []
        self._waiters: list[asyncio.Future[None]] = []

        self.delay_get_file = 0.0
        self.get_file_calls = 0
        self.get_file_in_flight = 0
        self.get_file_max_concurrency = 0
        self.media_sessions_opened: Counter[int] = Counter()
        self.part_limit_per_bot: int | None = None
        self.part_limit_mode = "delay"  # or "flood": FLOOD_WAIT_<part_limit_flood_wait>
        self.part_limit_flood_wait = 1
        self.get_file_calls_by_bot: Counter[int] = Counter()
        self.get_file_max_in_flight_by_bot: Counter[int] = Counter()
        self._bot_parts_in_flight: Counter[int] = Counter()
        self._bot_slot_freed: asyncio.Event | None = None
        self.sessions_opened: Counter[tuple[int, bool]] = Counter()
        self.open_sessions: set[FakeSession] = set()
        self._injections: list[_Injection] = []

        self._auth_keys: dict[bytes, int] = {}
        self._authorized_keys: set[bytes] = set()
        self._key_owner: dict[bytes, int] = {}  # auth key -> the bot it authorized
        self._exported: dict[int, tuple[int, bytes, int]] = {}

        self.files: dict[int, FakeFile] = {}
        self.messages: dict[int, FakeMessage] = {}
        self._last_message_id = 0
        self._pts = 1
        self._uploads: dict[int, _Upload] = {}
        self._part_wire: dict[tuple[int, int, int], bytes] = {}  # upload.File parts, written
        self._callback_queries: dict[int, bool] = {}

        self._sent_messages: list[SentMessage] = []
        self._edits: list[Edit] = []
        self._callback_answers: list[CallbackAnswer] = []
        self._sent_documents: list[SentDocument] = []

        self._handlers: dict[type[TLObject], Any] = {
            raw.functions.Ping: self._on_ping,
            raw.functions.InitConnection: self._on_init_connection,
            raw.functions.help.GetConfig: self._on_get_config,
            raw.functions.auth.ImportBotAuthorization: self._on_import_bot_authorization,
            raw.functions.auth.ExportAuthorization: self._on_export_authorization,
            raw.functions.auth.ImportAuthorization: self._on_import_authorization,
            raw.functions.users.GetFullUser: self._on_get_full_user,
            raw.functions.users.GetUsers: self._on_get_users,
            raw.functions.updates.GetState: self._on_get_state,
            raw.functions.updates.GetDifference: self._on_get_difference,
            raw.functions.messages.SendMessage: self._on_send_message,
            raw.functions.messages.EditMessage: self._on_edit_message,
            raw.functions.messages.SendMedia: self._on_send_media,
            raw.functions.messages.UploadMedia: self._on_upload_media,
            raw.functions.messages.SendMultiMedia: self._on_send_multi_media,
            raw.functions.messages.GetMessages: self._on_get_messages,
            raw.functions.channels.GetMessages: self._on_channels_get_messages,
            raw.functions.channels.GetChannels: self._on_get_channels,
            raw.functions.messages.ForwardMessages: self._on_forward_messages,
            raw.functions.messages.DeleteMessages: self._on_delete_messages,
            raw.functions.messages.SetBotCallbackAnswer: self._on_set_bot_callback_answer,
            raw.functions.messages.SetTyping: self._on_true,
            raw.functions.bots.SetBotCommands: self._on_true,
            raw.functions.bots.ResetBotCommands: self._on_true,
            raw.functions.upload.GetFile: self._on_get_file,
            raw.functions.upload.SaveFilePart: self._on_save_file_part,
            raw.functions.upload.SaveBigFilePart: self._on_save_big_file_part,
        }

    # ---- clients -----------------------------------------------------------------------------

    def make_client(self, name: str = "mistrelay-test", **kwargs: Any) -> pyrogram.Client:
        """A real Client wired to this fake. Build it inside the loop that will run it."""
        _install_edge()
        options: dict[str, Any] = {
            "api_id": 1,
            "api_hash": "x" * 32,
            "bot_token": "1:x",
            "in_memory": True,
        }
        options.update(kwargs)
        client = pyrogram.Client(name, **options)
        _CLIENT_FAKES[client] = self
        return client

    # ---- users, files, messages ----------------------------------------------------------------

    def make_user(
        self,
        *,
        user_id: int | None = None,
        first_name: str = "Ada",
        last_name: str | None = None,
        username: str | None = None,
        language_code: str | None = "en",
    ) -> raw.types.User:
        if user_id is None:
            user_id = 100_000 + len(self.users)
        user = raw.types.User(
            id=user_id,
            access_hash=self._random.getrandbits(63),
            first_name=first_name,
            last_name=last_name,
            username=username,
            lang_code=language_code,
        )
        self.users[user_id] = user
        return user

    @property
    def default_user(self) -> raw.types.User:
        if self._default_user is None:
            self._default_user = self.make_user(user_id=424_242, username="ada")
        return self._default_user

    def add_bot(self, username: str | None = None) -> str:
        """Register another bot; its token (``<bot id>:<secret>``)."""
        bot_id = 7_100_001 + len(self.bots)
        self.bots[bot_id] = raw.types.User(
            id=bot_id,
            is_self=True,
            bot=True,
            access_hash=self._random.getrandbits(63),
            first_name="Worker",
            username=username or f"mistrelay_worker_{bot_id}_bot",
            bot_info_version=1,
        )
        return f"{bot_id}:worker-secret-{bot_id}"

    def add_channel(self, members: Iterable[int], *, title: str = "storage") -> FakeChannel:
        """A channel with these bots (ids) as members; ``peer_id`` is its Bot API chat id."""
        channel = FakeChannel(
            id=1_500_000_000 + len(self.channels),
            access_hash=self._random.getrandbits(63),
            title=title,
            members=set(members),
        )
        self.channels[channel.id] = channel
        return channel

    def bot_id_of(self, token: str) -> int:
        return int(token.partition(":")[0])

    def add_file(
        self,
        data: bytes,
        *,
        kind: str = "document",
        file_name: str | None = None,
        mime_type: str | None = None,
        dc_id: int = MAIN_DC,
        duration: float | None = None,
        width: int | None = None,
        height: int | None = None,
        title: str | None = None,
        performer: str | None = None,
    ) -> FakeFile:
        if kind not in FILE_KINDS:
            raise ValueError(f"kind must be one of {FILE_KINDS}")
        if kind in ("video", "animation", "photo"):
            width = width if width is not None else 1280
            height = height if height is not None else 720
        if kind in ("video", "animation", "audio", "voice") and duration is None:
            duration = 10
        file = FakeFile(
            id=self._random.getrandbits(62),
            access_hash=self._random.getrandbits(63),
            file_reference=self._new_reference(),
            dc_id=dc_id,
            data=bytes(data),
            kind=kind,
            file_name=file_name if kind != "photo" else None,
            mime_type=mime_type or _DEFAULT_MIME[kind],
            date=int(time.time()),
            duration=duration,
            width=width,
            height=height,
            title=title,
            performer=performer,
        )
        self.files[file.id] = file
        return file

    def expire_file_reference(self, file: FakeFile) -> None:
        """Telegram-style expiry: the reference clients hold stops working until the message
        carrying the file is read again (that answer carries a fresh reference)."""
        file.reference_valid = False

    def message(self, message_id: int) -> FakeMessage:
        return self.messages[message_id]

    # ---- updates in ---------------------------------------------------------------------------

    def message_update(
        self,
        user: raw.types.User | None = None,
        text: str = "",
        *,
        file: FakeFile | None = None,
        entities: list[raw.base.MessageEntity] | None = None,
        grouped_id: int | None = None,
        reply_to_message_id: int | None = None,
    ) -> raw.types.UpdateNewMessage:
        """A user's message to the bot in their private chat; with ``file`` the text is the
        caption. A leading ``/command`` gets its bot-command entity."""
        user = user or self.default_user
        self.users.setdefault(user.id, user)
        if entities is None and text.startswith("/"):
            command = text.split(maxsplit=1)[0]
            entities = [raw.types.MessageEntityBotCommand(offset=0, length=len(command))]
        message = self._new_message(
            chat_id=user.id,
            sender_id=user.id,
            out=False,
            text=text,
            entities=entities,
            file=file,
            grouped_id=grouped_id,
            reply_to_message_id=reply_to_message_id,
        )
        return raw.types.UpdateNewMessage(
            message=self._raw_message(message), pts=self._next_pts(), pts_count=1
        )

    def album_updates(
        self,
        files: Sequence[FakeFile],
        *,
        user: raw.types.User | None = None,
        caption: str = "",
    ) -> list[raw.types.UpdateNewMessage]:
        """An album: one message per file, all with the same grouped_id, caption on the first."""
        grouped_id = self._random.getrandbits(62)
        return [
            self.message_update(
                user, caption if index == 0 else "", file=file, grouped_id=grouped_id
            )
            for index, file in enumerate(files)
        ]

    def callback_query_update(
        self, user: raw.types.User | None, message_id: int, data: bytes
    ) -> raw.types.UpdateBotCallbackQuery:
        """A press on an inline button of the bot's message ``message_id`` in the user's chat."""
        user = user or self.default_user
        self.users.setdefault(user.id, user)
        query_id = self._random.getrandbits(63)
        self._callback_queries[query_id] = False
        return raw.types.UpdateBotCallbackQuery(
            query_id=query_id,
            user_id=user.id,
            peer=raw.types.PeerUser(user_id=user.id),
            msg_id=message_id,
            chat_instance=self._random.getrandbits(63),
            data=data,
        )

    async def feed(
        self,
        client: pyrogram.Client,
        updates: raw.base.Update | Iterable[raw.base.Update],
        *,
        users: Iterable[raw.types.User] | None = None,
        chats: Iterable[raw.base.Chat] | None = None,
    ) -> None:
        """Deliver updates the way the real session does: ``client.handle_updates(Updates)``,
        which stores the peers and puts ``(update, users, chats)`` on the dispatcher's queue."""
        # Handlers added to a running client register in a task of their own: let it land.
        await asyncio.sleep(0)
        update_list = [updates] if isinstance(updates, TLObject) else list(updates)
        if users is None:
            user_ids = {self.bot_user.id}
            for update in update_list:
                user_ids.update(_user_ids_of(update))
            users = [self.users[i] for i in sorted(user_ids) if i in self.users]
        container = raw.types.Updates(
            updates=update_list,
            users=list(users),
            chats=list(chats or []),
            date=int(time.time()),
            seq=0,
        )
        if self.wire_check:
            container = _roundtrip(container)
        await client.handle_updates(container)

    # ---- what the bot did ---------------------------------------------------------------------

    def sent_messages(self) -> list[SentMessage]:
        return list(self._sent_messages)

    def edits(self) -> list[Edit]:
        return list(self._edits)

    def callback_answers(self) -> list[CallbackAnswer]:
        return list(self._callback_answers)

    def sent_documents(self) -> list[SentDocument]:
        return list(self._sent_documents)

    def requests_of(self, target: str | type[TLObject], *, after: int = 0) -> list[TLObject]:
        name = _qualname(target)
        return [q for q in self.requests[after:] if _matches(q, name)]

    def mark(self) -> int:
        """A position in ``requests``, for ``wait_for_requests(after=...)``."""
        return len(self.requests)

    async def wait_for_requests(
        self,
        count: int,
        *,
        of_type: str | type[TLObject] | None = None,
        after: int = 0,
        timeout: float = 5.0,
    ) -> list[TLObject]:
        """Wait (at most ``timeout`` s) until ``count`` requests (of a type) arrived after
        position ``after``; returns them, or raises TimeoutError naming what did arrive."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if of_type is None:
                found = self.requests[after:]
            else:
                found = self.requests_of(of_type, after=after)
            if len(found) >= count:
                return found
            remaining = deadline - loop.time()
            if remaining <= 0:
                seen = [_qualname(type(q)) for q in self.requests[after:]]
                raise TimeoutError(
                    f"{len(found)} of {count} requests arrived within {timeout} s; saw {seen}"
                )
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                pass
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    # ---- fault injection ----------------------------------------------------------------------

    def inject(
        self,
        target: str | type[TLObject],
        error: BaseException | type[BaseException],
        times: int = 1,
        *,
        bot_id: int | None = None,
    ) -> None:
        """Answer the next ``times`` requests of ``target`` (a raw function class or a name such
        as "upload.GetFile" or "GetFile") with ``error``: Telegram RPC errors (FloodWait(value=3),
        FileReferenceExpired(), ...) travel as RPC errors; others (TimeoutError, OSError) are
        raised by the transport. With ``bot_id``, only that bot's requests are answered so."""
        self._injections.append(_Injection(_qualname(target), error, times, bot_id))

    # ---- server internals ---------------------------------------------------------------------

    def _new_auth_key(self, dc_id: int) -> bytes:
        key = self._random.randbytes(256)
        self._auth_keys[key] = dc_id
        return key

    def _new_reference(self) -> bytes:
        return b"\x02" + self._random.randbytes(20)

    def _next_pts(self) -> int:
        self._pts += 1
        return self._pts

    def _session_started(self, session: FakeSession) -> None:
        self.open_sessions.add(session)
        self.sessions_opened[(session.dc_id, session.is_media)] += 1
        if session.is_media:
            self.media_sessions_opened[session.dc_id] += 1

    def _session_stopped(self, session: FakeSession) -> None:
        self.open_sessions.discard(session)

    def _record(self, session: FakeSession, query: TLObject) -> None:
        self.requests.append(query)
        self.request_log.append(
            RecordedRequest(query, session.dc_id, session.is_media, time.monotonic())
        )
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _serve(
        self, session: FakeSession, data: TLObject, wait_response: bool, timeout: float
    ) -> Any:
        if session.state in (SessionState.STOPPED, SessionState.STOPPING):
            raise ConnectionError("the session's connection is closed")
        if self.wire_check:
            # A request must serialise; it is not parsed back, because Pyrogram's reader guesses
            # the item type of vectors (as a client never reads functions) and would misread it.
            data.write()
        query = _unwrap(data)
        self._record(session, query)
        if isinstance(query, raw.functions.upload.GetFile):
            self.get_file_calls += 1
            self.get_file_calls_by_bot[self._owner(session)] += 1
        if not wait_response:
            return None
        failure: _RpcFailure | None = None
        try:
            self._raise_injected(query, self._owner(session))
            result = await self._answer(_Call(session, query, timeout))
        except _RpcFailure as error:
            failure = error
        if failure is not None:
            RPCError.raise_it(
                raw.types.RpcError(error_code=failure.code, error_message=failure.message),
                type(query),
            )
        if (
            self.wire_check
            and isinstance(query, raw.functions.upload.GetFile)
            and isinstance(query.location, _SERVED_LOCATIONS)
            and isinstance(result, raw.types.upload.File)
        ):
            # The client parses every part from the wire; the server writes each part once (its
            # writing is Telegram's work, not the client's, and would cost this loop ~1 ms a part).
            key = (query.location.id, query.offset, len(result.bytes))
            wire = self._part_wire.get(key)
            if wire is None:
                wire = self._part_wire[key] = result.write()
            return TLObject.read(BytesIO(wire))
        return _roundtrip(result) if self.wire_check else result

    def _owner(self, session: FakeSession) -> int:
        """The bot whose authorization the session's auth key carries (the main bot if none)."""
        return self._key_owner.get(session.auth_key, self.bot_user.id)

    def _raise_injected(self, query: TLObject, bot_id: int) -> None:
        for injection in self._injections:
            if (
                injection.remaining > 0
                and _matches(query, injection.target)
                and injection.bot_id in (None, bot_id)
            ):
                injection.remaining -= 1
                error = injection.error
                if isinstance(error, type):
                    error = error()
                if isinstance(error, RPCError) and error.ID and error.CODE:
                    message = error.ID
                    if "_X" in message and isinstance(error.value, int):
                        message = message.replace("_X", f"_{error.value}", 1)
                    raise _RpcFailure(error.CODE, message)
                raise copy.copy(error)

    async def _answer(self, call: _Call) -> Any:
        query = call.query
        if (
            not isinstance(query, _NO_AUTH_NEEDED)
            and call.session.auth_key not in self._authorized_keys
        ):
            raise _RpcFailure.of(errors.AuthKeyUnregistered)
        handler = self._handlers.get(type(query))
        if handler is None:
            raise FakeTelegramUnsupported(f"the fake does not answer {_qualname(type(query))}")
        return await handler(call)

    # ---- connection and auth ------------------------------------------------------------------

    async def _on_ping(self, call: _Call) -> raw.types.Pong:
        return raw.types.Pong(msg_id=0, ping_id=call.query.ping_id)

    async def _on_init_connection(self, call: _Call) -> Any:
        return await self._answer(_Call(call.session, call.query.query, call.timeout))

    async def _on_true(self, call: _Call) -> bool:
        return True

    async def _on_get_config(self, call: _Call) -> raw.types.Config:
        now = int(time.time())
        options = []
        for dc in range(1, 6):
            options.append(raw.types.DcOption(id=dc, ip_address="127.0.0.1", port=443))
            options.append(
                raw.types.DcOption(id=dc, ip_address="127.0.0.1", port=443, media_only=True)
            )
        return raw.types.Config(
            date=now,
            expires=now + 3600,
            test_mode=False,
            this_dc=call.session.dc_id,
            dc_options=options,
            dc_txt_domain_name="localhost",
            chat_size_max=200,
            megagroup_size_max=200_000,
            forwarded_count_max=100,
            online_update_period_ms=210_000,
            offline_blur_timeout_ms=5_000,
            offline_idle_timeout_ms=30_000,
            online_cloud_timeout_ms=300_000,
            notify_cloud_delay_ms=30_000,
            notify_default_delay_ms=1_500,
            push_chat_period_ms=60_000,
            push_chat_limit=2,
            edit_time_limit=172_800,
            revoke_time_limit=2_147_483_647,
            revoke_pm_time_limit=2_147_483_647,
            rating_e_decay=2_419_200,
            stickers_recent_limit=200,
            channels_read_media_period=604_800,
            call_receive_timeout_ms=20_000,
            call_ring_timeout_ms=90_000,
            call_connect_timeout_ms=30_000,
            call_packet_timeout_ms=10_000,
            me_url_prefix="https://t.me/",
            caption_length_max=1024,
            message_length_max=4096,
            webfile_dc_id=4,
        )

    async def _on_import_bot_authorization(self, call: _Call) -> raw.types.auth.Authorization:
        token = call.query.bot_auth_token
        bot_id, _, secret = token.partition(":")
        if not bot_id.isdigit() or not secret:
            raise _RpcFailure.of(errors.AccessTokenInvalid)
        if call.session.dc_id != self.main_dc:
            raise _RpcFailure.of(errors.UserMigrate, self.main_dc)
        # Tokens of unregistered bot ids stand for the main bot.
        bot = self.bots.get(int(bot_id), self.bot_user)
        if bot.id in self.revoked_bots:
            raise _RpcFailure.of(errors.AccessTokenExpired)
        self._authorized_keys.add(call.session.auth_key)
        self._key_owner[call.session.auth_key] = bot.id
        return raw.types.auth.Authorization(user=bot)

    async def _on_export_authorization(self, call: _Call) -> raw.types.auth.ExportedAuthorization:
        dc_id = call.query.dc_id
        if dc_id == call.session.dc_id or not 1 <= dc_id <= 5:
            raise _RpcFailure.of(errors.DcIdInvalid)
        export_id = self._random.getrandbits(63)
        token = self._random.randbytes(32)
        self._exported[export_id] = (dc_id, token, self._owner(call.session))
        return raw.types.auth.ExportedAuthorization(id=export_id, bytes=token)

    async def _on_import_authorization(self, call: _Call) -> raw.types.auth.Authorization:
        exported = self._exported.pop(call.query.id, None)
        if exported is None or exported[:2] != (call.session.dc_id, call.query.bytes):
            raise _RpcFailure.of(errors.AuthBytesInvalid)
        self._authorized_keys.add(call.session.auth_key)
        self._key_owner[call.session.auth_key] = exported[2]
        return raw.types.auth.Authorization(user=self.bots[exported[2]])

    # ---- users and state ----------------------------------------------------------------------

    async def _on_get_full_user(self, call: _Call) -> raw.types.users.UserFull:
        user = self._input_user(call.query.id, self._owner(call.session))
        return raw.types.users.UserFull(
            full_user=raw.types.UserFull(
                id=user.id,
                settings=raw.types.PeerSettings(),
                notify_settings=raw.types.PeerNotifySettings(),
                common_chats_count=0,
            ),
            chats=[],
            users=[user],
        )

    async def _on_get_users(self, call: _Call) -> list[raw.types.User]:
        found = []
        for input_user in call.query.id:
            try:
                found.append(self._input_user(input_user, self._owner(call.session)))
            except _RpcFailure:
                continue
        return found

    def _input_user(self, input_user: raw.base.InputUser, me: int) -> raw.types.User:
        if isinstance(input_user, raw.types.InputUserSelf):
            return self.bots[me]
        if isinstance(input_user, raw.types.InputUser):
            user = self.users.get(input_user.user_id)
            # A bot may name a user it has seen with access_hash 0.
            if user is not None and input_user.access_hash in (0, user.access_hash):
                return user
        raise _RpcFailure.of(errors.UserIdInvalid)

    async def _on_get_state(self, call: _Call) -> raw.types.updates.State:
        return raw.types.updates.State(
            pts=self._pts, qts=0, date=int(time.time()), seq=0, unread_count=0
        )

    async def _on_get_difference(self, call: _Call) -> raw.types.updates.DifferenceEmpty:
        return raw.types.updates.DifferenceEmpty(date=int(time.time()), seq=0)

    # ---- messages -----------------------------------------------------------------------------

    def _chat_of(self, peer: raw.base.InputPeer) -> int:
        if isinstance(peer, raw.types.InputPeerUser):
            user = self.users.get(peer.user_id)
            if user is not None and peer.access_hash == user.access_hash:
                return user.id
        raise _RpcFailure.of(errors.PeerIdInvalid)

    def _new_message(
        self,
        *,
        chat_id: int,
        sender_id: int,
        out: bool,
        text: str = "",
        entities: list[raw.base.MessageEntity] | None = None,
        file: FakeFile | None = None,
        reply_markup: raw.base.ReplyMarkup | None = None,
        grouped_id: int | None = None,
        reply_to_message_id: int | None = None,
    ) -> FakeMessage:
        self._last_message_id += 1
        message = FakeMessage(
            id=self._last_message_id,
            chat_id=chat_id,
            sender_id=sender_id,
            out=out,
            date=int(time.time()),
            text=text,
            entities=entities or None,
            file=file,
            reply_markup=reply_markup,
            grouped_id=grouped_id,
            reply_to_message_id=reply_to_message_id,
        )
        self.messages[message.id] = message
        return message

    def _issue(self, file: FakeFile, bot_id: int | None = None) -> bytes:
        """The reference handed out with the file now (to ``bot_id``, the main bot by default): a
        fresh one if the last one expired."""
        if bot_id not in (None, self.bot_user.id):
            return file.bot_references.setdefault(bot_id, self._new_reference())
        if not file.reference_valid:
            file.past_references.add(file.file_reference)
            file.file_reference = self._new_reference()
            file.reference_valid = True
        return file.file_reference

    def _raw_media(self, file: FakeFile, bot_id: int | None = None) -> raw.base.MessageMedia:
        reference = self._issue(file, bot_id)
        if file.kind == "photo":
            return raw.types.MessageMediaPhoto(
                photo=raw.types.Photo(
                    id=file.id,
                    access_hash=file.access_hash,
                    file_reference=reference,
                    date=file.date,
                    sizes=[
                        raw.types.PhotoSize(
                            type=PHOTO_SIZE_TYPE,
                            w=file.width or 0,
                            h=file.height or 0,
                            size=file.size,
                        )
                    ],
                    dc_id=file.dc_id,
                )
            )
        return raw.types.MessageMediaDocument(
            document=raw.types.Document(
                id=file.id,
                access_hash=file.access_hash,
                file_reference=reference,
                date=file.date,
                mime_type=file.mime_type,
                size=file.size,
                dc_id=file.dc_id,
                attributes=_document_attributes(file),
            ),
            video=True if file.kind == "video" else None,
            voice=True if file.kind == "voice" else None,
        )

    def _raw_message(self, message: FakeMessage, bot_id: int | None = None) -> raw.base.Message:
        if message.deleted:
            return raw.types.MessageEmpty(id=message.id)
        if message.channel_id is not None:
            return raw.types.Message(
                id=message.id,
                peer_id=raw.types.PeerChannel(channel_id=message.channel_id),
                date=message.date,
                message=message.text,
                post=True,
                media=self._raw_media(message.file, bot_id) if message.file is not None else None,
            )
        return raw.types.Message(
            id=message.id,
            peer_id=raw.types.PeerUser(user_id=message.chat_id),
            from_id=raw.types.PeerUser(user_id=message.sender_id),
            date=message.date,
            message=message.text,
            out=message.out or None,
            entities=message.entities,
            media=self._raw_media(message.file) if message.file is not None else None,
            reply_markup=message.reply_markup,
            grouped_id=message.grouped_id,
            reply_to=raw.types.MessageReplyHeader(reply_to_msg_id=message.reply_to_message_id)
            if message.reply_to_message_id
            else None,
            edit_date=message.edit_date,
        )

    def _updates(self, updates: list[raw.base.Update], chat_id: int) -> raw.types.Updates:
        users: list[raw.base.User] = [self.bot_user]
        if chat_id != self.bot_user.id and chat_id in self.users:
            users.append(self.users[chat_id])
        return raw.types.Updates(
            updates=updates, users=users, chats=[], date=int(time.time()), seq=0
        )

    def _reply_to(self, chat_id: int, reply_to: raw.base.InputReplyTo | None) -> int | None:
        if isinstance(reply_to, raw.types.InputReplyToMessage):
            replied = self.messages.get(reply_to.reply_to_msg_id)
            if replied is not None and replied.chat_id == chat_id and not replied.deleted:
                return replied.id
        return None

    def _echo_markup(self, markup: raw.base.ReplyMarkup | None) -> raw.base.ReplyMarkup | None:
        """The markup as the server stores it on the message (input button types resolved)."""
        if not isinstance(markup, raw.types.ReplyInlineMarkup):
            return markup if isinstance(markup, raw.types.ReplyKeyboardMarkup) else None
        rows = []
        for row in markup.rows:
            buttons: list[raw.base.KeyboardInlineButton] = []
            for button in row.buttons:
                kind = button.type
                if isinstance(kind, raw.types.InputInlineButtonTypeUserProfile):
                    user_id = getattr(kind.user_id, "user_id", 0)
                    kind = raw.types.InlineButtonTypeUserProfile(user_id=user_id)
                elif isinstance(kind, raw.types.InputInlineButtonTypeUrlAuth):
                    kind = raw.types.InlineButtonTypeUrlAuth(
                        url=kind.url, button_id=len(buttons), fwd_text=kind.fwd_text
                    )
                buttons.append(
                    raw.types.KeyboardInlineButton(text=button.text, type=kind, style=button.style)
                )
            rows.append(raw.types.KeyboardInlineButtonRow(buttons=buttons))
        return raw.types.ReplyInlineMarkup(rows=rows)

    def _check_text(self, text: str, *, caption: bool) -> None:
        limit = 1024 if caption else 4096
        if not caption and not text.strip():
            raise _RpcFailure.of(errors.MessageEmpty)
        if len(text) > limit:
            raise _RpcFailure.of(errors.MediaCaptionTooLong if caption else errors.MessageTooLong)

    async def _on_send_message(self, call: _Call) -> raw.types.Updates:
        query = call.query
        chat_id = self._chat_of(query.peer)
        self._check_text(query.message, caption=False)
        message = self._new_message(
            chat_id=chat_id,
            sender_id=self.bot_user.id,
            out=True,
            text=query.message,
            entities=query.entities,
            reply_markup=self._echo_markup(query.reply_markup),
            reply_to_message_id=self._reply_to(chat_id, query.reply_to),
        )
        self._sent_messages.append(
            SentMessage(
                chat_id=chat_id,
                message_id=message.id,
                text=message.text,
                buttons=_buttons(message.reply_markup),
                reply_to_message_id=message.reply_to_message_id,
                request=query,
            )
        )
        return self._updates(
            [
                raw.types.UpdateMessageID(id=message.id, random_id=query.random_id),
                raw.types.UpdateNewMessage(
                    message=self._raw_message(message), pts=self._next_pts(), pts_count=1
                ),
            ],
            chat_id,
        )

    async def _on_edit_message(self, call: _Call) -> raw.types.Updates:
        query = call.query
        chat_id = self._chat_of(query.peer)
        message = self.messages.get(query.id)
        if message is None or message.chat_id != chat_id or message.deleted:
            raise _RpcFailure.of(errors.MessageIdInvalid)
        if not message.out:
            raise _RpcFailure.of(errors.MessageAuthorRequired)
        text = query.message if query.message is not None else message.text
        entities = query.entities if query.message is not None else message.entities
        markup = self._echo_markup(query.reply_markup)
        if query.message is not None:
            self._check_text(text, caption=message.file is not None or query.media is not None)
        new_file: FakeFile | None = None
        if query.media is not None:
            new_file, _ = self._file_from_input_media(query.media)
        elif (
            text == message.text
            and _tl_equal(entities, message.entities)
            and _tl_equal(markup, message.reply_markup)
        ):
            raise _RpcFailure.of(errors.MessageNotModified)
        message.text = text
        message.entities = entities or None
        message.reply_markup = markup
        message.edit_date = int(time.time())
        document = None
        if new_file is not None:
            message.file = new_file
            document = self._sent_document(message, query.media, new_file)
            self._sent_documents.append(document)
        self._edits.append(
            Edit(
                chat_id=chat_id,
                message_id=message.id,
                text=message.text,
                buttons=_buttons(message.reply_markup),
                document=document,
                request=query,
            )
        )
        return self._updates(
            [
                raw.types.UpdateEditMessage(
                    message=self._raw_message(message), pts=self._next_pts(), pts_count=1
                )
            ],
            chat_id,
        )

    async def _on_send_media(self, call: _Call) -> raw.types.Updates:
        query = call.query
        chat_id = self._chat_of(query.peer)
        self._check_text(query.message, caption=True)
        file, _ = self._file_from_input_media(query.media)
        message = self._new_message(
            chat_id=chat_id,
            sender_id=self.bot_user.id,
            out=True,
            text=query.message,
            entities=query.entities,
            file=file,
            reply_markup=self._echo_markup(query.reply_markup),
            reply_to_message_id=self._reply_to(chat_id, query.reply_to),
        )
        self._sent_documents.append(self._sent_document(message, query.media, file))
        return self._updates(
            [
                raw.types.UpdateMessageID(id=message.id, random_id=query.random_id),
                raw.types.UpdateNewMessage(
                    message=self._raw_message(message), pts=self._next_pts(), pts_count=1
                ),
            ],
            chat_id,
        )

    async def _on_upload_media(self, call: _Call) -> raw.base.MessageMedia:
        self._chat_of(call.query.peer)
        file, _ = self._file_from_input_media(call.query.media)
        return self._raw_media(file)

    async def _on_send_multi_media(self, call: _Call) -> raw.types.Updates:
        query = call.query
        chat_id = self._chat_of(query.peer)
        if not 1 <= len(query.multi_media) <= 10:
            raise _RpcFailure.of(errors.MultiMediaTooLong)
        grouped_id = self._random.getrandbits(62)
        reply_to = self._reply_to(chat_id, query.reply_to)
        updates: list[raw.base.Update] = []
        for single in query.multi_media:
            self._check_text(single.message, caption=True)
            file, _ = self._file_from_input_media(single.media)
            message = self._new_message(
                chat_id=chat_id,
                sender_id=self.bot_user.id,
                out=True,
                text=single.message,
                entities=single.entities,
                file=file,
                grouped_id=grouped_id,
                reply_to_message_id=reply_to,
            )
            self._sent_documents.append(self._sent_document(message, single.media, file))
            updates.append(raw.types.UpdateMessageID(id=message.id, random_id=single.random_id))
            updates.append(
                raw.types.UpdateNewMessage(
                    message=self._raw_message(message), pts=self._next_pts(), pts_count=1
                )
            )
        return self._updates(updates, chat_id)

    def _sent_document(
        self, message: FakeMessage, media: raw.base.InputMedia, file: FakeFile
    ) -> SentDocument:
        return SentDocument(
            chat_id=message.chat_id,
            message_id=message.id,
            kind=file.kind,
            file_name=file.file_name,
            mime_type=file.mime_type,
            data=file.data,
            caption=message.text,
            duration=file.duration,
            width=file.width,
            height=file.height,
            grouped_id=message.grouped_id,
            uploaded=isinstance(
                media, (raw.types.InputMediaUploadedDocument, raw.types.InputMediaUploadedPhoto)
            ),
            attributes=_document_attributes(file) if file.kind != "photo" else [],
            file=file,
        )

    def _file_from_input_media(self, media: raw.base.InputMedia) -> tuple[FakeFile, bool]:
        """The stored file an InputMedia names, or a new one built from uploaded parts."""
        if isinstance(media, raw.types.InputMediaUploadedDocument):
            data = self._assemble(media.file)
            kind, fields = _kind_from_attributes(media.attributes)
            return (
                self.add_file(
                    data,
                    kind=kind,
                    mime_type=media.mime_type,
                    dc_id=self.main_dc,
                    **fields,
                ),
                True,
            )
        if isinstance(media, raw.types.InputMediaUploadedPhoto):
            data = self._assemble(media.file)
            return self.add_file(data, kind="photo", dc_id=self.main_dc), True
        if isinstance(media, (raw.types.InputMediaDocument, raw.types.InputMediaPhoto)):
            ref = media.id
            if not isinstance(ref, (raw.types.InputDocument, raw.types.InputPhoto)):
                raise _RpcFailure.of(errors.MediaInvalid)
            file = self.files.get(ref.id)
            if file is None or file.access_hash != ref.access_hash:
                raise _RpcFailure.of(errors.MediaInvalid)
            if (file.kind == "photo") != isinstance(media, raw.types.InputMediaPhoto):
                raise _RpcFailure.of(errors.MediaInvalid)
            return file, False
        raise FakeTelegramUnsupported(f"the fake does not send {_qualname(type(media))}")

    def _assemble(self, input_file: raw.base.InputFile) -> bytes:
        if not isinstance(input_file, (raw.types.InputFile, raw.types.InputFileBig)):
            raise FakeTelegramUnsupported(f"the fake does not take {_qualname(type(input_file))}")
        upload = self._uploads.get(input_file.id)
        if upload is None:
            raise _RpcFailure.of(errors.FilePartMissing, 0)
        big = isinstance(input_file, raw.types.InputFileBig)
        if big != upload.big:
            raise _RpcFailure.of(errors.FilePartsInvalid)
        for part in range(input_file.parts):
            if part not in upload.parts:
                raise _RpcFailure.of(errors.FilePartMissing, part)
        if set(upload.parts) != set(range(input_file.parts)):
            raise _RpcFailure.of(errors.FilePartsInvalid)
        sizes = [len(upload.parts[i]) for i in range(input_file.parts)]
        # Every part but the last has one size, a divisor of 512 KiB that is a multiple of 1 KiB.
        if any(size != sizes[0] for size in sizes[:-1]) or sizes[-1] > sizes[0]:
            raise _RpcFailure.of(errors.FilePartSizeInvalid)
        if len(sizes) > 1 and (sizes[0] % 1024 or UPLOAD_PART_MAX % sizes[0]):
            raise _RpcFailure.of(errors.FilePartSizeInvalid)
        data = b"".join(upload.parts[i] for i in range(input_file.parts))
        if (
            isinstance(input_file, raw.types.InputFile)
            and input_file.md5_checksum
            and hashlib.md5(data).hexdigest() != input_file.md5_checksum
        ):
            raise _RpcFailure.of(errors.Md5ChecksumInvalid)
        return data

    async def _on_get_messages(self, call: _Call) -> raw.types.messages.Messages:
        found: list[raw.base.Message] = []
        chat_ids: set[int] = set()
        for input_message in call.query.id:
            message = None
            if isinstance(input_message, raw.types.InputMessageID):
                message = self.messages.get(input_message.id)
                wanted = input_message.id
            elif isinstance(input_message, raw.types.InputMessageReplyTo):
                replying = self.messages.get(input_message.id)
                wanted = input_message.id
                if replying is not None and replying.reply_to_message_id:
                    message = self.messages.get(replying.reply_to_message_id)
            else:
                raise FakeTelegramUnsupported(
                    f"the fake does not resolve {_qualname(type(input_message))}"
                )
            if message is None:
                found.append(raw.types.MessageEmpty(id=wanted))
                continue
            chat_ids.add(message.chat_id)
            found.append(self._raw_message(message))
        users: list[raw.base.User] = [self.bot_user]
        users += [self.users[i] for i in sorted(chat_ids) if i in self.users]
        return raw.types.messages.Messages(messages=found, topics=[], chats=[], users=users)

    def _member_channel(self, input_channel: Any, bot_id: int) -> FakeChannel:
        """The channel named, if this bot is a member (access hash 0 stands for a known one)."""
        if isinstance(input_channel, raw.types.InputPeerChannel | raw.types.InputChannel):
            channel = self.channels.get(input_channel.channel_id)
            if channel is None or input_channel.access_hash not in (0, channel.access_hash):
                raise _RpcFailure.of(errors.ChannelInvalid)
            if bot_id not in channel.members:
                raise _RpcFailure.of(errors.ChannelPrivate)
            return channel
        raise _RpcFailure.of(errors.ChannelInvalid)

    def _raw_channel(self, channel: FakeChannel) -> raw.types.Channel:
        return raw.types.Channel(
            id=channel.id,
            title=channel.title,
            photo=raw.types.ChatPhotoEmpty(),
            date=0,
            broadcast=True,
            access_hash=channel.access_hash,
        )

    async def _on_get_channels(self, call: _Call) -> raw.types.messages.Chats:
        bot_id = self._owner(call.session)
        found = [self._member_channel(item, bot_id) for item in call.query.id]
        return raw.types.messages.Chats(chats=[self._raw_channel(c) for c in found])

    async def _on_channels_get_messages(self, call: _Call) -> raw.types.messages.ChannelMessages:
        bot_id = self._owner(call.session)
        channel = self._member_channel(call.query.channel, bot_id)
        found: list[raw.base.Message] = []
        for input_message in call.query.id:
            if not isinstance(input_message, raw.types.InputMessageID):
                raise FakeTelegramUnsupported(
                    f"the fake does not resolve {_qualname(type(input_message))} in channels"
                )
            message = channel.messages.get(input_message.id)
            found.append(
                self._raw_message(message, bot_id)
                if message is not None
                else raw.types.MessageEmpty(id=input_message.id)
            )
        return raw.types.messages.ChannelMessages(
            pts=self._pts,
            count=len(found),
            messages=found,
            topics=[],
            chats=[self._raw_channel(channel)],
            users=[],
        )

    async def _on_forward_messages(self, call: _Call) -> raw.types.Updates:
        query = call.query
        bot_id = self._owner(call.session)
        from_chat = self._chat_of(query.from_peer)
        channel = self._member_channel(query.to_peer, bot_id)
        updates: list[raw.base.Update] = []
        for message_id in query.id:
            source = self.messages.get(message_id)
            if source is None or source.deleted or source.chat_id != from_chat:
                raise _RpcFailure.of(errors.MessageIdInvalid)
            channel.last_message_id += 1
            post = FakeMessage(
                id=channel.last_message_id,
                chat_id=channel.peer_id,
                sender_id=bot_id,
                out=True,
                date=int(time.time()),
                text="" if query.drop_media_captions and source.file else source.text,
                entities=None if query.drop_media_captions and source.file else source.entities,
                file=source.file,
                channel_id=channel.id,
            )
            channel.messages[post.id] = post
            updates.append(
                raw.types.UpdateNewChannelMessage(
                    message=self._raw_message(post, bot_id), pts=self._next_pts(), pts_count=1
                )
            )
        return raw.types.Updates(
            updates=updates,
            users=[self.bots[bot_id]],
            chats=[self._raw_channel(channel)],
            date=int(time.time()),
            seq=0,
        )

    async def _on_delete_messages(self, call: _Call) -> raw.types.messages.AffectedMessages:
        count = 0
        for message_id in call.query.id:
            message = self.messages.get(message_id)
            if message is not None and not message.deleted:
                message.deleted = True
                count += 1
        return raw.types.messages.AffectedMessages(pts=self._next_pts(), pts_count=count)

    async def _on_set_bot_callback_answer(self, call: _Call) -> bool:
        query = call.query
        if self._callback_queries.get(query.query_id, True):
            raise _RpcFailure.of(errors.QueryIdInvalid)
        self._callback_queries[query.query_id] = True
        self._callback_answers.append(
            CallbackAnswer(
                query_id=query.query_id,
                text=query.message,
                show_alert=bool(query.alert),
                url=query.url,
            )
        )
        return True

    # ---- files ----------------------------------------------------------------------------------

    async def _on_save_file_part(self, call: _Call) -> bool:
        query = call.query
        if len(query.bytes) > UPLOAD_PART_MAX:
            raise _RpcFailure.of(errors.FilePartTooBig)
        if not query.bytes:
            raise _RpcFailure.of(errors.FilePartEmpty)
        upload = self._uploads.setdefault(query.file_id, _Upload())
        upload.parts[query.file_part] = query.bytes
        return True

    async def _on_save_big_file_part(self, call: _Call) -> bool:
        query = call.query
        if len(query.bytes) > UPLOAD_PART_MAX:
            raise _RpcFailure.of(errors.FilePartTooBig)
        if not 0 <= query.file_part < query.file_total_parts:
            raise _RpcFailure.of(errors.FilePartInvalid)
        upload = self._uploads.setdefault(query.file_id, _Upload(big=True))
        if upload.total_parts not in (None, query.file_total_parts):
            raise _RpcFailure.of(errors.FilePartsInvalid)
        upload.big = True
        upload.total_parts = query.file_total_parts
        upload.parts[query.file_part] = query.bytes
        return True

    async def _bot_part_slot(self, bot_id: int) -> None:
        """Take one of the bot's part slots (``part_limit_per_bot``): wait for a free one, or
        answer FLOOD_WAIT in "flood" mode."""
        limit = self.part_limit_per_bot
        while limit is not None and self._bot_parts_in_flight[bot_id] >= limit:
            if self.part_limit_mode == "flood":
                raise _RpcFailure.of(errors.FloodWait, self.part_limit_flood_wait)
            if self._bot_slot_freed is None:
                self._bot_slot_freed = asyncio.Event()
            await self._bot_slot_freed.wait()
        self._bot_parts_in_flight[bot_id] += 1
        self.get_file_max_in_flight_by_bot[bot_id] = max(
            self.get_file_max_in_flight_by_bot[bot_id], self._bot_parts_in_flight[bot_id]
        )

    def _free_bot_part_slot(self, bot_id: int) -> None:
        self._bot_parts_in_flight[bot_id] -= 1
        freed, self._bot_slot_freed = self._bot_slot_freed, None
        if freed is not None:
            freed.set()

    async def _on_get_file(self, call: _Call) -> raw.types.upload.File:
        bot_id = self._owner(call.session)
        await self._bot_part_slot(bot_id)
        try:
            return await self._get_file_in_slot(call)
        finally:
            self._free_bot_part_slot(bot_id)

    async def _get_file_in_slot(self, call: _Call) -> raw.types.upload.File:
        self.get_file_in_flight += 1
        self.get_file_max_concurrency = max(self.get_file_max_concurrency, self.get_file_in_flight)
        try:
            if self.delay_get_file > 0:
                if self.delay_get_file > call.timeout:
                    await asyncio.sleep(call.timeout)
                    raise TimeoutError("Request timed out")
                await asyncio.sleep(self.delay_get_file)
            return self._serve_file_part(call)
        finally:
            self.get_file_in_flight -= 1

    def _serve_file_part(self, call: _Call) -> raw.types.upload.File:
        query = call.query
        location = query.location
        if isinstance(location, raw.types.InputDocumentFileLocation):
            file = self.files.get(location.id)
            if file is not None and (file.kind == "photo" or location.thumb_size):
                raise _RpcFailure.of(errors.LocationInvalid)
        elif isinstance(location, raw.types.InputPhotoFileLocation):
            file = self.files.get(location.id)
            if file is not None and (
                file.kind != "photo" or location.thumb_size != PHOTO_SIZE_TYPE
            ):
                raise _RpcFailure.of(errors.LocationInvalid)
        else:
            raise FakeTelegramUnsupported(f"the fake does not serve {_qualname(type(location))}")
        if file is None or file.access_hash != location.access_hash:
            raise _RpcFailure.of(errors.FileIdInvalid)
        if call.session.dc_id != file.dc_id:
            raise _RpcFailure.of(errors.FileMigrate, file.dc_id)
        reference = location.file_reference
        bot_id = self._owner(call.session)
        if bot_id != self.bot_user.id:
            # Another bot's reference (or none issued to this bot) is refused.
            if reference != file.bot_references.get(bot_id):
                raise _RpcFailure.of(errors.FileReferenceInvalid)
        elif reference != file.file_reference or not file.reference_valid:
            if reference == file.file_reference or reference in file.past_references:
                raise _RpcFailure.of(errors.FileReferenceExpired)
            raise _RpcFailure.of(errors.FileReferenceInvalid)
        offset, limit = query.offset, query.limit
        # Telegram's rules for upload.GetFile ("precise" relaxes the 4 KiB alignment to 1 KiB).
        align = 1024 if query.precise else GET_FILE_ALIGN
        if offset < 0 or offset % align:
            raise _RpcFailure.of(errors.OffsetInvalid)
        if limit <= 0 or limit > MIB or limit % align:
            raise _RpcFailure.of(errors.LimitInvalid)
        if not query.precise and MIB % limit:
            raise _RpcFailure.of(errors.LimitInvalid)
        if offset // MIB != (offset + limit - 1) // MIB:
            raise _RpcFailure.of(errors.LimitInvalid)
        return raw.types.upload.File(
            type=raw.types.storage.FilePartial(),
            mtime=0,
            bytes=file.data[offset : offset + limit],
        )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _document_attributes(file: FakeFile) -> list[raw.base.DocumentAttribute]:
    attributes: list[raw.base.DocumentAttribute] = []
    if file.kind == "video":
        attributes.append(
            raw.types.DocumentAttributeVideo(
                duration=float(file.duration or 0),
                w=file.width or 0,
                h=file.height or 0,
                supports_streaming=True,
            )
        )
    elif file.kind == "animation":
        attributes.append(raw.types.DocumentAttributeAnimated())
        attributes.append(
            raw.types.DocumentAttributeVideo(
                duration=float(file.duration or 0), w=file.width or 0, h=file.height or 0
            )
        )
    elif file.kind == "audio":
        attributes.append(
            raw.types.DocumentAttributeAudio(
                duration=int(file.duration or 0), title=file.title, performer=file.performer
            )
        )
    elif file.kind == "voice":
        attributes.append(
            raw.types.DocumentAttributeAudio(duration=int(file.duration or 0), voice=True)
        )
    if file.file_name:
        attributes.append(raw.types.DocumentAttributeFilename(file_name=file.file_name))
    return attributes


def _kind_from_attributes(
    attributes: list[raw.base.DocumentAttribute],
) -> tuple[str, dict[str, Any]]:
    def first(kind: type[Any]) -> Any:
        return next((a for a in attributes if isinstance(a, kind)), None)

    fields: dict[str, Any] = {}
    filename = first(raw.types.DocumentAttributeFilename)
    if filename is not None:
        fields["file_name"] = filename.file_name
    video = first(raw.types.DocumentAttributeVideo)
    audio = first(raw.types.DocumentAttributeAudio)
    if video is not None:
        fields.update(duration=video.duration, width=video.w, height=video.h)
        animated = first(raw.types.DocumentAttributeAnimated) is not None
        kind = "animation" if animated else "video"
    elif audio is not None:
        fields.update(duration=audio.duration)
        if audio.voice:
            kind = "voice"
            fields.pop("file_name", None)
        else:
            kind = "audio"
            fields.update(title=audio.title, performer=audio.performer)
    else:
        kind = "document"
    return kind, fields


def _buttons(markup: raw.base.ReplyMarkup | None) -> list[list[InlineButton]]:
    if not isinstance(markup, raw.types.ReplyInlineMarkup):
        return []
    rows = []
    for row in markup.rows:
        buttons = []
        for button in row.buttons:
            kind = button.type
            buttons.append(
                InlineButton(
                    text=button.text,
                    callback_data=kind.data
                    if isinstance(kind, raw.types.InlineButtonTypeCallback)
                    else None,
                    url=kind.url if isinstance(kind, raw.types.InlineButtonTypeUrl) else None,
                )
            )
        rows.append(buttons)
    return rows


def _tl_equal(left: Any, right: Any) -> bool:
    def wire(value: Any) -> Any:
        if isinstance(value, TLObject):
            return value.write()
        if isinstance(value, list):
            return [wire(v) for v in value] or None
        return value

    return bool(wire(left) == wire(right))


def _user_ids_of(update: raw.base.Update) -> set[int]:
    ids: set[int] = set()
    message = getattr(update, "message", None)
    for peer in (getattr(message, "from_id", None), getattr(message, "peer_id", None)):
        if isinstance(peer, raw.types.PeerUser):
            ids.add(peer.user_id)
    user_id = getattr(update, "user_id", None)
    if isinstance(user_id, int):
        ids.add(user_id)
    peer = getattr(update, "peer", None)
    if isinstance(peer, raw.types.PeerUser):
        ids.add(peer.user_id)
    return ids


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture
def fake_telegram() -> FakeTelegram:
    return FakeTelegram()


@pytest_asyncio.fixture
async def tg_client(fake_telegram: FakeTelegram) -> AsyncIterator[pyrogram.Client]:
    """A started bot Client wired to ``fake_telegram``; stopped at teardown."""
    client = fake_telegram.make_client()
    await client.start()
    try:
        yield client
    finally:
        if client.is_initialized:
            await client.stop()
        elif client.is_connected:
            await client.disconnect()
