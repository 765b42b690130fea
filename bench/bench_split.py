"""Cutting a video into playable parts (uploads.splitter) against copying the same file with `cp`.

The splitter copies the streams (no re-encoding), so its floor is a plain copy of the bytes: this
prints the time of both, alternating, and the ratio. The video is made first with ffmpeg (noise,
a keyframe a second, so a part can be cut anywhere) in a temporary folder, removed at the end.

    .venv/bin/python -m bench.bench_split --size-mib 200 --parts 4 --runs 3
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from uploads.splitter import split_video


def make_video(path: Path, size_mib: int) -> None:
    """About `size_mib` MiB of 640x360 noise at 25 fps and 8 Mbit/s, with a keyframe a second."""
    seconds = max(2, round(size_mib * 8 * 1024 * 1024 / 8_000_000))
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            *("-f", "lavfi", "-i", f"testsrc=duration={seconds}:size=640x360:rate=25"),
            *("-vf", "noise=alls=40:allf=t,format=yuv420p", "-g", "25"),
            *("-c:v", "libx264", "-preset", "ultrafast", "-b:v", "8M", "-maxrate", "8M"),
            *("-bufsize", "8M", str(path)),
        ],
        check=True,
    )


async def split_once(video: Path, out: Path, limit: int) -> tuple[float, int]:
    started = time.perf_counter()
    parts = await split_video(video, out, limit)
    elapsed = time.perf_counter() - started
    if parts is None:
        raise SystemExit("the splitter refused the video")
    count = len(parts)
    shutil.rmtree(out)
    return elapsed, count


def copy_once(video: Path, out: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", str(video), str(out)], check=True)
    subprocess.run(["sync", str(out)], check=True)
    elapsed = time.perf_counter() - started
    out.unlink()
    return elapsed


async def run(size_mib: int, parts: int, runs: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        video = root / "bench.mp4"
        await asyncio.to_thread(make_video, video, size_mib)
        size = video.stat().st_size
        limit = size // parts + 1
        await split_once(video, root / "warm", limit)  # warm-up: the file is in the page cache
        splits: list[float] = []
        copies: list[float] = []
        counts: set[int] = set()
        for _ in range(runs):
            elapsed, count = await split_once(video, root / "cut", limit)
            splits.append(elapsed)
            counts.add(count)
            copies.append(await asyncio.to_thread(copy_once, video, root / "copy.mp4"))
        split_median, copy_median = statistics.median(splits), statistics.median(copies)
        mib = size / 1024 / 1024
        print(f"video {mib:.0f} MiB, limit {limit / 1024 / 1024:.0f} MiB, parts {sorted(counts)}")
        print(f"  splitter (ffmpeg stream copy): median {split_median:.2f} s")
        print(f"  cp + sync of the same file:     median {copy_median:.2f} s")
        print(f"  ratio splitter / cp: {split_median / copy_median:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=200)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.size_mib, args.parts, args.runs))


if __name__ == "__main__":
    main()
