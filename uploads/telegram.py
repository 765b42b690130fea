"""Sending a finished download back to Telegram: parts, video metadata, read-back of sizes.

A bot may send at most 2000 MiB per file, so a bigger file goes as several documents
(``name.001``, ``name.002``, … — ``cat`` joins them again). Each part is read straight from the
file through a window (:class:`FileWindow`); nothing is copied to disk. A torrent folder sends
each of its files this way. A single-part video is sent as a streamable video with its duration,
size and a thumbnail, which ffprobe and ffmpeg work out in subprocesses.

Verification: Telegram answers each send with the stored message; the size of its document
(or video) must equal the bytes sent for that part.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loguru import logger

MIB = 1024 * 1024
TELEGRAM_PART_SIZE = 2000 * MIB  # a bot's upload limit per file
CAPTION_LIMIT = 1024
VIDEO_EXTENSIONS = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm"})
FFPROBE_TIMEOUT = 30.0
FFMPEG_TIMEOUT = 60.0
THUMB_MAX_SIDE = 320

# Failure reasons of the Telegram target.
TELEGRAM_ERROR = "telegram_error"
TELEGRAM_REFUSED = "telegram_refused"
TELEGRAM_FLOOD_WAIT = "telegram_flood_wait"
NETWORK = "network"
LOCAL_FILE_MISSING = "local_file_missing"
VERIFY_SIZE_MISMATCH = "verify_size_mismatch"


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
class MediaInfo:
    duration: int
    width: int
    height: int
    has_video: bool
    has_audio: bool


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


def plan_parts(source: Path, name: str, part_size: int) -> list[TelegramPart]:
    """The messages a file or folder becomes. Synchronous (walks the folder): use a thread.

    Empty files are left out (Telegram refuses them); symlinks too (they may point anywhere).
    """
    if part_size <= 0:
        raise ValueError("part_size must be positive")
    if source.is_dir():
        files = sorted(
            (path for path in source.rglob("*") if path.is_file() and not path.is_symlink()),
            key=lambda path: path.relative_to(source).as_posix(),
        )
        labelled = [(path, f"{name}/{path.relative_to(source).as_posix()}") for path in files]
    else:
        labelled = [(source, name)]
    parts: list[TelegramPart] = []
    for path, label in labelled:
        size = path.stat().st_size
        if size == 0:
            continue
        file_name = label.rsplit("/", 1)[-1]
        if size <= part_size:
            parts.append(TelegramPart(path, 0, size, file_name, _caption(label), True))
            continue
        count = -(-size // part_size)
        for index in range(count):
            offset = index * part_size
            parts.append(
                TelegramPart(
                    path,
                    offset,
                    min(part_size, size - offset),
                    f"{file_name}.{index + 1:03d}",
                    _caption(f"{label} — part {index + 1}/{count}"),
                    False,
                )
            )
    return parts


def _caption(text: str) -> str:
    return text if len(text) <= CAPTION_LIMIT else text[: CAPTION_LIMIT - 1] + "…"


async def _run_tool(command: list[str], timeout: float) -> tuple[int, bytes]:
    """Run ffprobe/ffmpeg without a shell; (-1, b"") when it is missing or too slow."""
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return -1, b""
    try:
        async with asyncio.timeout(timeout):
            stdout, _ = await process.communicate()
    except TimeoutError:
        return -1, b""
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode or 0, stdout


async def probe_media(path: Path) -> MediaInfo | None:
    """Duration and size of a video through ffprobe (a subprocess); None if it is not one."""
    # "file:" keeps a name like "x:y" from being read as a protocol or "-x" as an option.
    code, stdout = await _run_tool(
        [
            "ffprobe",
            "-v",
            "error",
            "-print_format",
            "json",
            "-show_format",
            "-show_streams",
            f"file:{path}",
        ],
        FFPROBE_TIMEOUT,
    )
    if code != 0:
        return None
    try:
        report = json.loads(stdout)
    except ValueError:
        return None
    streams = report.get("streams") or []
    video = next((s for s in streams if s.get("codec_type") == "video"), None)
    has_audio = any(s.get("codec_type") == "audio" for s in streams)
    try:
        duration = float((report.get("format") or {}).get("duration") or 0)
    except (TypeError, ValueError):
        duration = 0.0
    return MediaInfo(
        duration=round(duration),
        width=int(video.get("width") or 0) if video else 0,
        height=int(video.get("height") or 0) if video else 0,
        has_video=video is not None,
        has_audio=has_audio,
    )


async def make_thumbnail(path: Path, out: Path, duration: int) -> Path | None:
    """A JPEG frame (at most 320 px a side) for the video's preview; None when ffmpeg fails."""
    out.parent.mkdir(parents=True, exist_ok=True)
    at = min(2.0, duration / 2) if duration > 0 else 0.0
    code, _ = await _run_tool(
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-ss",
            f"{at:.2f}",
            "-i",
            f"file:{path}",
            "-frames:v",
            "1",
            "-vf",
            f"scale={THUMB_MAX_SIDE}:{THUMB_MAX_SIDE}:force_original_aspect_ratio=decrease",
            str(out),
        ],
        FFMPEG_TIMEOUT,
    )
    return out if code == 0 and await asyncio.to_thread(_non_empty_file, out) else None


def _non_empty_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


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


def _sent_size(message: Any) -> int | None:
    for kind in ("document", "video", "audio", "animation"):
        media = getattr(message, kind, None)
        size = getattr(media, "file_size", None)
        if isinstance(size, int):
            return size
    return None


class TelegramSender:
    """Sends one upload (a file or a folder) to `chat_id` through a started Pyrogram client."""

    def __init__(self, client: Any, chat_id: int, *, part_size: int, work_dir: Path) -> None:
        self.client = client
        self.chat_id = chat_id
        self.part_size = part_size
        self.work_dir = work_dir

    async def send(
        self, source: Path, name: str, *, on_progress: Callable[[int], None]
    ) -> TelegramResult:
        """Send every part; raises TelegramUploadError (cancel: CancelledError)."""
        try:
            parts = await asyncio.to_thread(plan_parts, source, name, self.part_size)
        except FileNotFoundError as exc:
            raise TelegramUploadError(
                LOCAL_FILE_MISSING, f"nothing to upload at {source.name}", retryable=False
            ) from exc
        if not parts:
            raise TelegramUploadError(
                TELEGRAM_REFUSED, f"{name} holds no bytes to send", retryable=False
            )
        log = logger.bind(chat=self.chat_id)
        log.info("sending {} to Telegram as {} message(s)", name, len(parts))
        sent_before = 0
        message_ids: list[int] = []
        try:
            for part in parts:
                message_ids.append(await self._send_part(part, sent_before, on_progress))
                sent_before += part.length
                on_progress(sent_before)
        finally:
            await asyncio.to_thread(shutil.rmtree, self.work_dir, True)
        if len(message_ids) == 1:
            where = str(message_ids[0])
        else:
            where = f"{message_ids[0]}..{message_ids[-1]}"
        return TelegramResult(
            size=sent_before,
            message_ids=tuple(message_ids),
            remote_path=f"telegram:{self.chat_id}/{where}",
        )

    async def _send_part(
        self, part: TelegramPart, sent_before: int, on_progress: Callable[[int], None]
    ) -> int:
        async def progress(current: int, _total: int) -> None:
            on_progress(sent_before + current)

        media: MediaInfo | None = None
        if part.whole_file and part.path.suffix.lower() in VIDEO_EXTENSIONS:
            media = await probe_media(part.path)
        window: FileWindow | None = None
        try:
            if media is not None and media.has_video:
                thumb = await make_thumbnail(part.path, self.work_dir / "thumb.jpg", media.duration)
                message = await self.client.send_video(
                    self.chat_id,
                    video=str(part.path),
                    file_name=part.name,
                    caption=part.caption,
                    duration=media.duration,
                    width=media.width,
                    height=media.height,
                    thumb=str(thumb) if thumb else None,
                    supports_streaming=True,
                    no_sound=not media.has_audio,
                    progress=progress,
                )
            else:
                if part.whole_file:
                    document: Any = str(part.path)
                else:
                    window = await asyncio.to_thread(
                        FileWindow, part.path, part.offset, part.length, part.name
                    )
                    document = window
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
        return int(message.id)
