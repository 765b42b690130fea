"""Sending a finished download back to Telegram: parts, video metadata, read-back of sizes.

A message carries at most ``telegram.max_upload_size`` bytes (2000 MiB for a bot, 4000 MiB for a
premium account). A bigger video is cut by time into parts that each play on their own
(:mod:`uploads.splitter`: ffmpeg, stream copy); any other bigger file goes as raw parts
(``name.001``, ``name.002``, …) whose captions carry the ``cat`` line that joins them again. Raw
parts are read straight from the file through a window (:class:`FileWindow`); nothing is copied
to disk. A torrent folder sends each of its files this way. A video sent whole, or a cut video's
part, goes as a streamable video with its duration, size and a thumbnail, which ffprobe and
ffmpeg work out in subprocesses (:mod:`uploads.media`).

Verification: Telegram answers each send with the stored message; the size of its document
(or video) must equal the bytes sent for that part.
"""

from __future__ import annotations

import asyncio
import io
import os
import shlex
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol, cast

from loguru import logger

from files import discard
from uploads.media import make_thumbnail, probe
from uploads.splitter import is_video_name, split_video

MIB = 1024 * 1024
TELEGRAM_PART_SIZE = 2000 * MIB  # a bot's upload limit per file (telegram.max_upload_size)
CAPTION_LIMIT = 1024
# Containers Telegram plays as a streamable video.
STREAMABLE_VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm"})

# Failure reasons of the Telegram target.
TELEGRAM_ERROR = "telegram_error"
TELEGRAM_REFUSED = "telegram_refused"
TELEGRAM_FLOOD_WAIT = "telegram_flood_wait"
NETWORK = "network"
LOCAL_FILE_MISSING = "local_file_missing"
VERIFY_SIZE_MISMATCH = "verify_size_mismatch"


SendProgress = Callable[[int, int], Awaitable[None]]


class SentMessage(Protocol):
    """The stored message Telegram answers a send with (a Pyrogram ``Message``)."""

    @property
    def id(self) -> int: ...


class TelegramClient(Protocol):
    """The calls of a started Pyrogram client that sending an upload makes."""

    async def send_document(
        self,
        chat_id: int,
        document: str | BinaryIO,
        *,
        file_name: str,
        caption: str,
        force_document: bool,
        progress: SendProgress,
    ) -> SentMessage | None: ...

    async def send_video(
        self,
        chat_id: int,
        video: str,
        *,
        file_name: str,
        caption: str,
        duration: int,
        width: int,
        height: int,
        thumb: str | None,
        supports_streaming: bool,
        no_sound: bool,
        progress: SendProgress,
    ) -> SentMessage | None: ...


class TelegramUploadError(Exception):
    """A failed send, classified like rclone's failures (reason, retryable, code)."""

    def __init__(
        self, reason: str, message: str, *, retryable: bool, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.code = code or reason


@dataclass(frozen=True)
class TelegramPart:
    """`length` bytes of `path` from `offset`, sent as one message called `name`."""

    path: Path
    offset: int
    length: int
    name: str
    caption: str
    whole_file: bool


@dataclass(frozen=True)
class TelegramResult:
    size: int
    message_ids: tuple[int, ...]
    remote_path: str


class FileWindow(io.RawIOBase):
    """A read-only file object over `length` bytes of `path` from `offset` (one part)."""

    def __init__(self, path: Path, offset: int, length: int, name: str) -> None:
        super().__init__()
        self._file = path.open("rb")
        self._offset = offset
        self._length = length
        self._position = 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}[whence]
        self._position = max(0, min(self._length, base + offset))
        return self._position

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        wanted = min(len(view), self._length - self._position)
        if wanted <= 0:
            return 0
        self._file.seek(self._offset + self._position)
        data = self._file.read(wanted)
        view[: len(data)] = data
        self._position += len(data)
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


@dataclass(frozen=True)
class PlannedFile:
    """One file of an upload: its path and its label (``name`` or ``name/inner/path``)."""

    path: Path
    label: str
    size: int


def plan_files(source: Path, name: str) -> list[PlannedFile]:
    """The files a file or folder upload sends. Synchronous (walks the folder): use a thread.

    Empty files are left out (Telegram refuses them); symlinks too (they may point anywhere).
    """
    if source.is_dir():
        files = sorted(
            (path for path in source.rglob("*") if path.is_file() and not path.is_symlink()),
            key=lambda path: path.relative_to(source).as_posix(),
        )
        labelled = [(path, f"{name}/{path.relative_to(source).as_posix()}") for path in files]
    else:
        labelled = [(source, name)]
    planned = [PlannedFile(path, label, path.stat().st_size) for path, label in labelled]
    return [file for file in planned if file.size > 0]


def byte_parts(file: PlannedFile, part_size: int) -> list[TelegramPart]:
    """`file` as one message, or as raw parts ``name.001``… each captioned with the join line."""
    if part_size <= 0:
        raise ValueError("part_size must be positive")
    file_name = file.label.rsplit("/", 1)[-1]
    if file.size <= part_size:
        return [TelegramPart(file.path, 0, file.size, file_name, _caption(file.label), True)]
    count = -(-file.size // part_size)
    width = max(3, len(str(count)))
    join = join_command(file_name, width)
    return [
        TelegramPart(
            file.path,
            index * part_size,
            min(part_size, file.size - index * part_size),
            f"{file_name}.{index + 1:0{width}d}",
            _caption(f"{file.label} — part {index + 1}/{count}", join),
            False,
        )
        for index in range(count)
    ]


def join_command(file_name: str, width: int) -> str:
    """The shell line that joins raw parts back into `file_name` (the glob sorts them in order)."""
    quoted = shlex.quote(file_name)
    return f"join: cat {quoted}.{'[0-9]' * width} > {quoted}"


def video_parts(file: PlannedFile, pieces: list[Path]) -> list[TelegramPart]:
    """The playable parts of a cut video as messages ``stem.partN.ext``, captioned "part i/n"."""
    file_name = file.label.rsplit("/", 1)[-1]
    stem, suffix = Path(file_name).stem, Path(file_name).suffix
    count = len(pieces)
    width = max(2, len(str(count)))
    parts = []
    for index, piece in enumerate(pieces, start=1):
        parts.append(
            TelegramPart(
                piece,
                0,
                piece.stat().st_size,
                f"{stem}.part{index:0{width}d}{suffix}",
                _caption(f"{file.label} — part {index}/{count}"),
                True,
            )
        )
    return parts


def _caption(text: str, tail: str = "") -> str:
    """`text` cut to fit one caption; `tail` (a join command) goes on its own last line whole."""
    room = CAPTION_LIMIT - (len(tail) + 1 if tail else 0)
    head = text if len(text) <= room else text[: room - 1] + "…"
    return f"{head}\n{tail}" if tail else head


def classify(exc: BaseException, part: TelegramPart) -> TelegramUploadError:
    """A Pyrogram or OS failure as a TelegramUploadError."""
    from pyrogram import errors

    if isinstance(exc, errors.FloodWait):
        return TelegramUploadError(
            TELEGRAM_FLOOD_WAIT,
            f"Telegram asks to wait {exc.value} s before sending more",
            retryable=True,
            code=f"FLOOD_WAIT_{exc.value}",
        )
    if isinstance(exc, errors.BadRequest | errors.Forbidden | errors.Unauthorized):
        return TelegramUploadError(
            TELEGRAM_REFUSED,
            f"Telegram refused {part.name}: {exc.ID or type(exc).__name__}",
            retryable=False,
            code=str(exc.ID or exc.CODE),
        )
    if isinstance(exc, errors.RPCError):
        return TelegramUploadError(
            TELEGRAM_ERROR,
            f"Telegram failed on {part.name}: {exc.ID or type(exc).__name__}",
            retryable=True,
            code=str(exc.ID or exc.CODE),
        )
    if isinstance(exc, FileNotFoundError) or not part.path.exists():
        return TelegramUploadError(
            LOCAL_FILE_MISSING, f"the local file went away: {part.path.name}", retryable=False
        )
    if isinstance(exc, ConnectionError | TimeoutError | OSError):
        return TelegramUploadError(
            NETWORK, f"connection to Telegram failed: {type(exc).__name__}", retryable=True
        )
    return TelegramUploadError(
        TELEGRAM_ERROR, f"sending {part.name} failed: {type(exc).__name__}: {exc}", retryable=True
    )


def _sent_size(message: SentMessage) -> int | None:
    for kind in ("document", "video", "audio", "animation"):
        media = getattr(message, kind, None)
        size = getattr(media, "file_size", None)
        if isinstance(size, int):
            return size
    return None


def _source_progress(
    on_progress: Callable[[int], None], base: int, start: int, size: int, scale: float
) -> Callable[[int], None]:
    """Bytes of a part sent, reported as bytes of the source (`size` bytes from `base`).

    `start` bytes of the file's parts went before; `scale` is source bytes per part byte.
    """

    def report(current: int) -> None:
        on_progress(base + min(size, round((start + current) * scale)))

    return report


class TelegramSender:
    """Sends one upload (a file or a folder) to `chat_id` through a started Pyrogram client."""

    def __init__(
        self, client: TelegramClient, chat_id: int, *, part_size: int, work_dir: Path
    ) -> None:
        self.client = client
        self.chat_id = chat_id
        self.part_size = part_size
        self.work_dir = work_dir

    async def send(
        self, source: Path, name: str, *, on_progress: Callable[[int], None]
    ) -> TelegramResult:
        """Send every file, part by part; raises TelegramUploadError (cancel: CancelledError).

        `on_progress` counts bytes of the source; the result's size counts the bytes Telegram
        stored, which for a cut video differs a little from the source's.
        """
        try:
            files = await asyncio.to_thread(plan_files, source, name)
        except FileNotFoundError as exc:
            raise TelegramUploadError(
                LOCAL_FILE_MISSING, f"nothing to upload at {source.name}", retryable=False
            ) from exc
        if not files:
            raise TelegramUploadError(
                TELEGRAM_REFUSED, f"{name} holds no bytes to send", retryable=False
            )
        log = logger.bind(chat=self.chat_id)
        log.info("sending {} to Telegram: {} file(s)", name, len(files))
        done_before = 0
        stored = 0
        message_ids: list[int] = []
        try:
            for file in files:
                parts = await self._parts_of(file)
                scale = file.size / sum(part.length for part in parts)
                in_file = 0  # bytes of this file's parts already stored
                for part in parts:
                    report = _source_progress(on_progress, done_before, in_file, file.size, scale)
                    message_ids.append(await self._send_part(part, report))
                    in_file += part.length
                stored += in_file
                done_before += file.size
                on_progress(done_before)
                await asyncio.to_thread(discard, self.work_dir / "cut")
        finally:
            await asyncio.to_thread(discard, self.work_dir)
        if len(message_ids) == 1:
            where = str(message_ids[0])
        else:
            where = f"{message_ids[0]}..{message_ids[-1]}"
        return TelegramResult(
            size=stored,
            message_ids=tuple(message_ids),
            remote_path=f"telegram:{self.chat_id}/{where}",
        )

    async def _parts_of(self, file: PlannedFile) -> list[TelegramPart]:
        """A video over the limit as playable parts cut by time; anything else as byte parts."""
        if file.size > self.part_size and is_video_name(file.path):
            pieces = await split_video(file.path, self.work_dir / "cut", self.part_size)
            if pieces is not None:
                return await asyncio.to_thread(video_parts, file, pieces)
        return byte_parts(file, self.part_size)

    async def _send_part(self, part: TelegramPart, on_progress: Callable[[int], None]) -> int:
        async def progress(current: int, _total: int) -> None:
            on_progress(current)

        video = None
        if part.whole_file and part.path.suffix.lower() in STREAMABLE_VIDEO_EXTENSIONS:
            video = await probe(part.path)
        window: FileWindow | None = None
        message: SentMessage | None
        try:
            if video is not None and video["width"] and video["height"]:
                duration = round(video["duration"] or 0)
                thumb = await make_thumbnail(part.path, self.work_dir / "thumb.jpg", duration)
                message = await self.client.send_video(
                    self.chat_id,
                    video=str(part.path),
                    file_name=part.name,
                    caption=part.caption,
                    duration=duration,
                    width=video["width"],
                    height=video["height"],
                    thumb=str(thumb) if thumb else None,
                    supports_streaming=True,
                    no_sound=video["audio_codec"] is None,
                    progress=progress,
                )
            else:
                document: str | BinaryIO
                if part.whole_file:
                    document = str(part.path)
                else:
                    window = await asyncio.to_thread(
                        FileWindow, part.path, part.offset, part.length, part.name
                    )
                    # A raw binary file object, which Pyrogram reads as its typed BinaryIO.
                    document = cast(BinaryIO, window)
                message = await self.client.send_document(
                    self.chat_id,
                    document=document,
                    file_name=part.name,
                    caption=part.caption,
                    force_document=True,
                    progress=progress,
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise classify(exc, part) from exc
        finally:
            if window is not None:
                window.close()
        if message is None:
            raise TelegramUploadError(
                TELEGRAM_ERROR, f"Telegram returned no message for {part.name}", retryable=True
            )
        size = _sent_size(message)
        if size != part.length:
            raise TelegramUploadError(
                VERIFY_SIZE_MISMATCH,
                f"Telegram stored {size} bytes of {part.name}, {part.length} were sent",
                retryable=True,
            )
        return message.id
