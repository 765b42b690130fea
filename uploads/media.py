"""Media facts (duration, size, codecs) of finished downloads, and the one ffprobe/ffmpeg runner.

ffprobe and ffmpeg run only through :func:`run_tool`: a subprocess without a shell, never on the
event loop, with a deadline, killed when the deadline passes or the caller is cancelled. The
prober stores ffprobe's whole JSON answer next to the few fields the page shows, as an audit
copy: a later reader can find anything ffprobe said without probing the file again (which may be
gone by then). The Telegram target reads the same facts for a video and takes its thumbnail
with :func:`make_thumbnail`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mimetypes
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, TypedDict

from loguru import logger

from configer import child_environment
from db import Store
from files import DownloadFiles
from records import DownloadRow

if TYPE_CHECKING:
    from loguru import Logger

PROBE_TIMEOUT = 30.0
THUMBNAIL_TIMEOUT = 60.0
THUMBNAIL_MAX_SIDE = 320
_KILL_WAIT_SECONDS = 5.0
# A torrent may hold thousands of files; the facts of the first few dozen media files are enough.
MAX_FILES_PER_DOWNLOAD = 50

VIDEO_EXTENSIONS = frozenset(
    {"3gp", "avi", "flv", "m2ts", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "mts", "ogv", "ts"}
    | {"vob", "webm", "wmv"}
)
AUDIO_EXTENSIONS = frozenset(
    {"aac", "ac3", "aif", "aiff", "alac", "ape", "flac", "m4a", "mka", "mp3", "oga", "ogg"}
    | {"opus", "wav", "wma"}
)

# Formats ffprobe reads from files that are not media: "tty" renders any text as ANSI art.
NOT_MEDIA_FORMATS = frozenset({"tty"})

# Executables already reported missing: one warning each, not one per file.
_missing_reported: set[str] = set()


class MediaFacts(TypedDict):
    """The fields MistRelay uses from ffprobe's answer (seconds, pixels, names)."""

    duration: float | None
    width: int | None
    height: int | None
    video_codec: str | None
    audio_codec: str | None
    format: str | None


class ProbedMedia(MediaFacts):
    """:class:`MediaFacts` plus `ffprobe`, the raw JSON answer kept as the audit copy."""

    ffprobe: dict[str, Any]


@dataclass(frozen=True)
class ToolRun:
    """How a finished ffprobe/ffmpeg run ended."""

    returncode: int
    stdout: bytes
    stderr: bytes

    def last_error_line(self) -> str:
        lines = self.stderr.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"exit code {self.returncode}"


async def run_tool(
    command: Sequence[str], *, timeout: float, log: Logger = logger
) -> ToolRun | None:
    """Run ffprobe or ffmpeg (`command[0]`) without a shell and with stdin closed.

    None when it cannot be started (warned once per executable) or gave no answer within
    `timeout` seconds (killed, and warned on `log`). Cancelling the caller kills it too.
    """
    executable = command[0]
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_environment(),
        )
    except OSError as exc:
        if executable not in _missing_reported:
            _missing_reported.add(executable)
            logger.warning(
                "cannot run {} ({}): media facts and thumbnails are skipped", executable, exc
            )
        return None
    try:
        async with asyncio.timeout(timeout):
            stdout, stderr = await process.communicate()
    except TimeoutError:
        log.warning("{} gave no answer within {} s; killed", Path(executable).name, timeout)
        return None
    finally:
        if process.returncode is None:
            await asyncio.shield(_kill(process))
    assert process.returncode is not None
    return ToolRun(process.returncode, stdout, stderr)


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), _KILL_WAIT_SECONDS)


def is_media_name(name: str, mime_type: str | None = None) -> bool:
    """Audio or video, judging by the MIME type when known, else by the file name."""
    if mime_type and mime_type.split("/", 1)[0] in ("audio", "video"):
        return True
    suffix = PurePosixPath(name).suffix.lower().lstrip(".")
    if suffix in VIDEO_EXTENSIONS or suffix in AUDIO_EXTENSIONS:
        return True
    guessed, _ = mimetypes.guess_type(name, strict=False)
    return bool(guessed and guessed.split("/", 1)[0] in ("audio", "video"))


def _float(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number >= 0 and number == number else None  # drops NaN


def _int(value: Any) -> int | None:
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def summarize(raw: Mapping[str, Any]) -> MediaFacts:
    """The fields MistRelay uses, from ffprobe's `-show_format -show_streams` JSON."""
    streams = [s for s in raw.get("streams") or () if isinstance(s, Mapping)]
    fmt_value = raw.get("format")
    fmt: Mapping[str, Any] = fmt_value if isinstance(fmt_value, Mapping) else {}
    # Cover art in audio files is a "video" stream with the attached_pic disposition: not video.
    video = next(
        (
            s
            for s in streams
            if s.get("codec_type") == "video"
            and not (s.get("disposition") or {}).get("attached_pic")
        ),
        None,
    )
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    duration = _float(fmt.get("duration"))
    if duration is None:
        durations = [d for d in (_float(s.get("duration")) for s in streams) if d is not None]
        duration = max(durations) if durations else None
    return MediaFacts(
        duration=duration,
        width=_int(video.get("width")) if video else None,
        height=_int(video.get("height")) if video else None,
        video_codec=str(video["codec_name"]) if video and video.get("codec_name") else None,
        audio_codec=str(audio["codec_name"]) if audio and audio.get("codec_name") else None,
        format=str(fmt["format_name"]) if fmt.get("format_name") else None,
    )


async def probe(
    path: Path, ffprobe: str = "ffprobe", *, timeout: float = PROBE_TIMEOUT
) -> ProbedMedia | None:
    """ffprobe's view of one file, or None when it cannot read it (or is missing, or too slow)."""
    # "file:" keeps ffprobe from reading a name as a protocol ("http:…", "concat:…") or an option.
    target = "file:" + str(await asyncio.to_thread(Path(path).resolve))
    command = [ffprobe, "-v", "error", "-print_format", "json", "-show_format", "-show_streams"]
    log = logger.bind(file=Path(path).name)
    run = await run_tool([*command, "-i", target], timeout=timeout, log=log)
    if run is None:
        return None
    if run.returncode != 0:
        log.debug("ffprobe cannot read the file: {}", run.last_error_line())
        return None
    try:
        raw = json.loads(run.stdout)
    except ValueError:
        log.warning("ffprobe answered something that is not JSON")
        return None
    if not isinstance(raw, dict) or not raw.get("streams"):
        return None
    facts = summarize(raw)
    if facts["format"] in NOT_MEDIA_FORMATS:
        return None
    return ProbedMedia(**facts, ffprobe=raw)


async def make_thumbnail(
    path: Path,
    out: Path,
    duration: float,
    *,
    ffmpeg: str = "ffmpeg",
    timeout: float = THUMBNAIL_TIMEOUT,
) -> Path | None:
    """A JPEG frame of the video (at most 320 px a side) written to `out`; None when ffmpeg
    fails."""
    await asyncio.to_thread(out.parent.mkdir, parents=True, exist_ok=True)
    at = min(2.0, duration / 2) if duration > 0 else 0.0
    scale = f"scale={THUMBNAIL_MAX_SIDE}:{THUMBNAIL_MAX_SIDE}:force_original_aspect_ratio=decrease"
    source = ["-ss", f"{at:.2f}", "-i", f"file:{path}"]
    run = await run_tool(
        [ffmpeg, "-v", "error", "-y", *source, "-frames:v", "1", "-vf", scale, str(out)],
        timeout=timeout,
        log=logger.bind(file=path.name),
    )
    if run is None or run.returncode != 0:
        return None
    return out if await asyncio.to_thread(_non_empty_file, out) else None


def _non_empty_file(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


class MediaProber:
    """Completion listener: probes a finished download's audio/video files and stores the facts.

    Probing runs in background tasks (at most `concurrency` ffprobe processes at a time), so a
    completion never waits for ffprobe and the poller's cycle is not held up. Completions are
    taken between :meth:`start` and :meth:`stop`; only files inside the download directory are
    read.
    """

    def __init__(
        self,
        store: Store,
        *,
        files: DownloadFiles,
        ffprobe: str = "ffprobe",
        concurrency: int = 1,
        timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.store = store
        self.files = files
        self.ffprobe = ffprobe
        self.timeout = timeout
        self._slots = asyncio.Semaphore(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        """Stop taking completions and cancel the probes under way (their ffprobe is killed)."""
        self._running = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def on_download_completed(self, row: DownloadRow) -> None:
        if not self._running:
            return
        task = asyncio.create_task(self._probe_download(row), name=f"media-probe-{row.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self) -> None:
        """Wait until every probe started so far has finished (for tests and orderly stops)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def probe_download(self, row: DownloadRow) -> dict[str, Any] | None:
        """Probe `row`'s media files now and store the result; returns what was stored."""
        candidates = await self._media_files(row)
        if not candidates:
            return None
        results: list[tuple[str, int, ProbedMedia]] = []
        for relative, path, size in candidates:
            async with self._slots:
                info = await probe(path, self.ffprobe, timeout=self.timeout)
            if info is not None:
                results.append((relative, size, info))
        if not results:
            return None
        # The largest media file speaks for the download; the others are listed in short.
        results.sort(key=lambda item: item[1], reverse=True)
        relative, _size, main = results[0]
        media_info: dict[str, Any] = dict(main)
        if row.files:
            media_info["file"] = relative
        if len(results) > 1:
            media_info["files"] = [
                {"file": rel, **{k: v for k, v in info.items() if k != "ffprobe"}}
                for rel, _s, info in sorted(results, key=lambda item: item[0])
            ]
        await self.store.set_media_info(row.id, media_info)
        logger.bind(job=row.id).info(
            "media facts of download {} recorded ({} file(s))", row.id, len(results)
        )
        return media_info

    async def _probe_download(self, row: DownloadRow) -> None:
        try:
            await self.probe_download(row)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.bind(job=row.id).exception("media probe of download {} failed", row.id)

    async def _media_files(self, row: DownloadRow) -> list[tuple[str, Path, int]]:
        """(name relative to the download, path on disk, size) of each media file to probe."""
        if not row.local_path:
            return []
        mime_type: str | None = None
        if row.file_unique_id:
            media = await self.store.get_tg_media(row.file_unique_id)
            mime_type = media.mime_type if media else None
        local = Path(row.local_path)
        if row.files:
            wanted = [
                (f.path, local.parent / f.path, f.length)
                for f in row.files
                if f.selected and is_media_name(f.path)
            ]
            wanted.sort(key=lambda item: item[2], reverse=True)
            wanted = wanted[:MAX_FILES_PER_DOWNLOAD]
        elif is_media_name(row.file_name or local.name, mime_type):
            wanted = [(local.name, local, row.total_length)]
        else:
            return []
        return await asyncio.to_thread(self._existing, wanted)

    def _existing(self, wanted: list[tuple[str, Path, int]]) -> list[tuple[str, Path, int]]:
        found: list[tuple[str, Path, int]] = []
        for relative, path, size in wanted:
            confined = self.files.confined(path)
            if confined is not None and confined.is_file():
                found.append((relative, confined, size))
        return found
