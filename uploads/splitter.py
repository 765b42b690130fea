"""Cutting a video that is over Telegram's size limit into playable parts, by time.

ffmpeg's segment muxer copies the streams (no re-encoding) into parts that each start on a
keyframe, so every part opens and plays on its own and the parts neither overlap nor leave a gap.
The first cut aims at 90 % of the limit by bitrate; the bitrate is rarely even, so every part is
weighed, and a part still over the limit is cut again, shorter, in proportion to how much it is
over. A part that cannot be cut below the limit (one keyframe interval bigger than the limit), a
file ffmpeg cannot cut, or a disk without room for the parts gives None: the caller then sends
the file as raw byte parts instead.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from loguru import logger

from files import discard
from uploads.media import VIDEO_EXTENSIONS, probe, run_tool

# The first cut aims below the limit by this share: bitrates vary from part to part.
FIRST_CUT_SHARE = 0.9
# A too-big part is cut again at most this many times (each cut is shorter than the last).
MAX_RECUTS = 6
# Room left on the disk beyond the parts themselves.
DISK_MARGIN = 64 * 1024 * 1024
# ffmpeg copies at disk speed; allow 10 MiB/s plus a minute before giving up on it.
_COPY_SECONDS_PER_BYTE = 1 / (10 * 1024 * 1024)


def is_video_name(path: Path) -> bool:
    """A file whose name says video (ffprobe then confirms it has a picture and a duration)."""
    return path.suffix.lower().lstrip(".") in VIDEO_EXTENSIONS


async def split_video(
    source: Path, out_dir: Path, limit: int, *, ffmpeg: str = "ffmpeg"
) -> list[Path] | None:
    """Playable parts of `source`, each under `limit` bytes, written in `out_dir`, in order.

    None (and `out_dir` removed) when `source` is not a video ffmpeg can cut under the limit.
    """
    log = logger.bind(file=source.name)
    facts = await probe(source)
    if facts is None or not facts["width"] or not facts["duration"]:
        log.info("not a video ffmpeg can read: sent as raw parts")
        return None
    size = (await asyncio.to_thread(source.stat)).st_size
    await asyncio.to_thread(out_dir.mkdir, parents=True, exist_ok=True)
    free = (await asyncio.to_thread(shutil.disk_usage, out_dir)).free
    if free < size + DISK_MARGIN:
        log.warning("{} bytes free, {} needed to cut the video: sent as raw parts", free, size)
        await asyncio.to_thread(discard, out_dir)
        return None
    seconds = facts["duration"] * limit * FIRST_CUT_SHARE / size
    parts = await _cut(source, out_dir, "cut", limit, seconds, size, ffmpeg, 0)
    if parts is None:
        await asyncio.to_thread(discard, out_dir)
        return None
    log.info("video cut into {} playable part(s) under {} bytes", len(parts), limit)
    return parts


async def _cut(
    source: Path,
    out_dir: Path,
    prefix: str,
    limit: int,
    seconds: float,
    size: int,
    ffmpeg: str,
    depth: int,
) -> list[Path] | None:
    """`source` (`size` bytes) cut every `seconds` into `prefix`-NNNN pieces under `limit`.

    ffmpeg cuts at the first keyframe after each multiple of `seconds`: no keyframe there means
    no cut, which is tried again at half the time; a piece over the limit is cut again, shorter.
    """
    suffix = source.suffix.lower()
    command = [
        ffmpeg,
        "-v",
        "error",
        "-nostdin",
        "-i",
        f"file:{source}",
        # Every picture, sound and subtitle stream; cover pictures stay out (not cuttable).
        *("-map", "0:V", "-map", "0:a?", "-map", "0:s?"),
        *("-c", "copy", "-f", "segment", "-segment_time", f"{seconds:.3f}"),
        *("-reset_timestamps", "1", "-avoid_negative_ts", "make_zero"),
    ]
    if suffix in (".mp4", ".m4v", ".mov"):
        command += ["-segment_format_options", "movflags=+faststart"]
    command.append(f"file:{out_dir / f'{prefix}-%04d{suffix}'}")
    log = logger.bind(file=source.name)
    run = await run_tool(command, timeout=60 + size * _COPY_SECONDS_PER_BYTE, log=log)
    if run is None or run.returncode != 0:
        log.warning("ffmpeg could not cut the video: {}", run.last_error_line() if run else "")
        return None
    pieces = sorted(await asyncio.to_thread(lambda: list(out_dir.glob(f"{prefix}-*{suffix}"))))
    if len(pieces) == 1 and size >= limit:
        await asyncio.to_thread(pieces[0].unlink)
        if depth >= MAX_RECUTS:
            log.warning("no keyframe to cut at: a part stays {} bytes, over {}", size, limit)
            return None
        return await _cut(source, out_dir, prefix, limit, seconds / 2, size, ffmpeg, depth + 1)
    result: list[Path] = []
    for index, piece in enumerate(pieces):
        piece_size = (await asyncio.to_thread(piece.stat)).st_size
        if piece_size < limit:
            result.append(piece)
            continue
        facts = await probe(piece)
        if depth >= MAX_RECUTS or facts is None or not facts["duration"]:
            log.warning("a part stays {} bytes, over the limit of {}", piece_size, limit)
            return None
        shorter = facts["duration"] * limit * FIRST_CUT_SHARE / piece_size
        sub = await _cut(
            piece, out_dir, f"{prefix}-{index:04d}", limit, shorter, piece_size, ffmpeg, depth + 1
        )
        if sub is None:
            return None
        await asyncio.to_thread(piece.unlink)
        result.extend(sub)
    return result
