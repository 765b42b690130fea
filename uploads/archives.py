"""Extracting a downloaded archive, or zipping a folder, before it is uploaded.

Extraction runs Debian's ``unar`` (with ``lsar`` to read the listing first): one tool for zip
(ZipCrypto and AES passwords), 7z, rar (RAR5 too), tar, tar.gz, tar.xz and tar.bz2. A .tar.zst
is first decompressed with ``zstd`` into a plain tar, streamed and capped. Nothing runs on the
event loop: the tools are subprocesses, the walks and the zip writer run in threads.

The archive is refused, before anything is written, when its listing holds an absolute path or
a ``..`` step, a symbolic or hard link, more than `max_size` bytes in all, or more than
`max_ratio` bytes out per byte in. The listing is the archive's own claim, so the extraction is
watched too: the tool is killed when what it wrote passes the cap, and what it left is walked
for links before it is accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from loguru import logger

from configer import child_environment
from files import discard

# Archive names extraction understands, longest first ("x.tar.gz" before "x.gz").
ARCHIVE_SUFFIXES = (
    ".tar.gz",
    ".tar.xz",
    ".tar.bz2",
    ".tar.zst",
    ".tgz",
    ".txz",
    ".tbz2",
    ".tzst",
    ".zip",
    ".7z",
    ".rar",
    ".tar",
)
ZSTD_SUFFIXES = (".tar.zst", ".tzst")
LIST_TIMEOUT = 120.0
WATCH_INTERVAL = 0.25
# Extraction and zipping run at disk speed; allow 10 MiB/s plus two minutes.
_SECONDS_PER_BYTE = 1 / (10 * 1024 * 1024)
_CHUNK = 1024 * 1024


class ArchiveError(Exception):
    """An archive refused or a tool failed; the message says which and why."""


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps of one extraction: bytes out in all, and bytes out per byte of archive."""

    max_size: int
    max_ratio: float


def archive_stem(name: str) -> str | None:
    """`name` without its archive suffix, or None when it is no archive extraction knows."""
    lowered = name.lower()
    for suffix in ARCHIVE_SUFFIXES:
        if lowered.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


async def extract(
    archive: Path, dest: Path, limits: ArchiveLimits, *, password: str | None = None
) -> Path:
    """Extract `archive` into the new folder `dest` (removed again on any failure)."""
    log = logger.bind(file=archive.name)
    if archive_stem(archive.name) is None:
        raise ArchiveError(f"{archive.name} is not an archive that can be extracted")
    if await asyncio.to_thread(dest.exists):
        raise ArchiveError(f"{dest.name} exists already next to the archive")
    await asyncio.to_thread(dest.mkdir, parents=True)
    plain = dest.parent / f".{dest.name}.tar"  # a .tar.zst's tar, decompressed first
    source = plain if archive.name.lower().endswith(ZSTD_SUFFIXES) else archive
    try:
        if source == plain:
            await asyncio.to_thread(_unzstd, archive, plain, limits.max_size)
        size_in = (await asyncio.to_thread(archive.stat)).st_size
        entries = await _listing(source, password)
        _check(entries, size_in, limits)
        await _unar(source, dest, password, limits.max_size)
        await asyncio.to_thread(_check_written, dest, limits.max_size)
    except BaseException:
        await asyncio.to_thread(discard, dest)
        raise
    finally:
        await asyncio.to_thread(discard, plain)
    log.info("archive extracted: {} entries", len(entries))
    return dest


def _unzstd(archive: Path, out: Path, cap: int) -> None:
    """Decompress a .tar.zst into `out`, stopping as soon as it passes `cap` bytes."""
    written = 0
    with (
        out.open("wb") as sink,
        subprocess.Popen(
            ["zstd", "-d", "-c", "-q", "--", str(archive)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_environment(),
        ) as process,
    ):
        assert process.stdout is not None
        while chunk := process.stdout.read(_CHUNK):
            written += len(chunk)
            if written > cap:
                process.kill()
                raise ArchiveError(f"{archive.name} unpacks to more than {cap} bytes")
            sink.write(chunk)
        assert process.stderr is not None
        error = process.stderr.read().decode("utf-8", "replace").strip()
        if process.wait() != 0:
            raise ArchiveError(f"zstd cannot read {archive.name}: {error or 'damaged'}")


async def _run(
    command: Sequence[str], timeout: float, *, watch: Path | None = None, cap: int = 0
) -> tuple[int, bytes, bytes]:
    """Run a tool without a shell; with `watch`, kill it once that folder holds over `cap`."""
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_environment(),
        )
    except OSError as exc:
        raise ArchiveError(f"cannot run {command[0]} ({exc}): is it installed?") from exc
    talk = asyncio.ensure_future(process.communicate())
    try:
        async with asyncio.timeout(timeout):
            while not talk.done():
                await asyncio.wait([talk], timeout=WATCH_INTERVAL)
                if watch is not None and await asyncio.to_thread(_tree_size, watch) > cap:
                    raise ArchiveError(f"the archive unpacks to more than {cap} bytes")
    except TimeoutError:
        raise ArchiveError(
            f"{Path(command[0]).name} did not finish within {timeout:.0f} s"
        ) from None
    finally:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(process.wait())
        if not talk.done():
            talk.cancel()
    stdout, stderr = talk.result()
    assert process.returncode is not None
    return process.returncode, stdout, stderr


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


async def _listing(archive: Path, password: str | None) -> list[dict[str, Any]]:
    command = ["lsar", "-j", *(["-p", password] if password else []), "--", str(archive)]
    code, stdout, stderr = await _run(command, LIST_TIMEOUT)
    said = (stdout + stderr).decode("utf-8", "replace")
    if "password" in said.lower() and code != 0:
        raise ArchiveError(f"{archive.name} needs a password (none or a wrong one was given)")
    try:
        entries = json.loads(stdout)["lsarContents"]
    except (ValueError, KeyError, TypeError):
        raise ArchiveError(f"{archive.name} cannot be read as an archive") from None
    if code != 0 or not isinstance(entries, list):
        raise ArchiveError(f"{archive.name} cannot be read as an archive")
    return [entry for entry in entries if isinstance(entry, dict)]


def _check(entries: list[dict[str, Any]], size_in: int, limits: ArchiveLimits) -> None:
    """Refuse paths leaving the folder, links, and sizes over the caps, naming the entry."""
    total = 0
    for entry in entries:
        name = str(entry.get("XADFileName", ""))
        path = PurePosixPath(name.replace("\\", "/"))
        climbs = path.is_absolute() or ".." in path.parts or PureWindowsPath(name).drive
        if not name or climbs:
            raise ArchiveError(f"entry {name!r} would land outside the job folder")
        if entry.get("XADIsLink") or entry.get("XADIsHardLink") or "XADLinkDestination" in entry:
            raise ArchiveError(f"entry {name!r} is a link; archives with links are refused")
        size = entry.get("XADFileSize", 0)
        total += size if isinstance(size, int) and size > 0 else 0
    if total > limits.max_size:
        raise ArchiveError(
            f"the archive unpacks to {total} bytes, more than the cap of {limits.max_size}"
        )
    if total > limits.max_ratio * max(size_in, 1):
        raise ArchiveError(
            f"the archive unpacks to {total / max(size_in, 1):.0f}× its size, "
            f"more than the cap of {limits.max_ratio:g}×"
        )


async def _unar(archive: Path, dest: Path, password: str | None, cap: int) -> None:
    # -D: no folder of its own; -k skip: no resource forks; -f: write into `dest`, which we made.
    command = ["unar", "-q", "-D", "-f", "-k", "skip", "-o", str(dest)]
    command += [*(["-p", password] if password else []), "--", str(archive)]
    size = (await asyncio.to_thread(archive.stat)).st_size
    timeout = 120 + (size + cap) * _SECONDS_PER_BYTE
    code, stdout, stderr = await _run(command, timeout, watch=dest, cap=cap)
    if code != 0:
        said = (stderr or stdout).decode("utf-8", "replace").strip().splitlines()
        detail = said[-1] if said else f"exit code {code}"
        if "password" in detail.lower():
            raise ArchiveError(f"{archive.name} needs a password (none or a wrong one was given)")
        raise ArchiveError(f"extracting {archive.name} failed: {detail}")


def _check_written(dest: Path, cap: int) -> None:
    """What the tool left: no links of any kind, nothing over the cap."""
    total = 0
    for root, dirs, names in os.walk(dest):
        for name in [*dirs, *names]:
            path = Path(root, name)
            stat = path.lstat()
            if path.is_symlink() or (not path.is_dir() and stat.st_nlink > 1):
                raise ArchiveError(f"{path.relative_to(dest)} came out as a link; refused")
            total += 0 if path.is_dir() else stat.st_size
    if total > cap:
        raise ArchiveError(f"the archive unpacked to {total} bytes, more than the cap of {cap}")


async def zip_folder(folder: Path, out: Path) -> Path:
    """`folder` as one zip `out` (stored, not compressed), links left out; in a thread."""
    try:
        await asyncio.to_thread(_write_zip, folder, out)
    except BaseException:
        await asyncio.to_thread(discard, out)
        raise
    logger.bind(file=out.name).info("folder zipped")
    return out


def _write_zip(folder: Path, out: Path) -> None:
    # Stored: downloads are mostly compressed already (video, audio, archives), and storing runs
    # at disk speed; ZIP64 is on for files over 4 GiB.
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            entry = zipfile.ZipInfo.from_file(path, f"{folder.name}/{path.relative_to(folder)}")
            if path.is_dir():
                archive.writestr(entry, b"")
                continue
            with path.open("rb") as source, archive.open(entry, "w", force_zip64=True) as sink:
                shutil.copyfileobj(source, sink, _CHUNK)
