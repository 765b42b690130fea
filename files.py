"""The download folder on disk: the only code that creates job folders and deletes files.

Everything here is confined to one root (the download directory): a path that resolves outside
it, or the root itself, is refused. The functions are synchronous file system work; async
callers use the ``*_async`` forms (or `asyncio.to_thread`) so the event loop never blocks.
`discard` removes the service's own bookkeeping files (pid files, partial copies, scratch
folders), which live outside the download root.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from loguru import logger

ARIA2_CONTROL_SUFFIX = ".aria2"


def confined_path(root: Path, candidate: str | Path) -> Path | None:
    """`candidate` resolved, if it lies strictly inside `root` (symlinks followed); else None."""
    root_resolved = root.resolve()
    path = Path(candidate)
    if not path.is_absolute():
        path = root_resolved / path
    resolved = path.resolve()
    if resolved == root_resolved or root_resolved not in resolved.parents:
        return None
    return resolved


def remove_confined(root: Path, candidate: str | Path) -> bool:
    """Delete a file or folder inside `root`, then its emptied parent folders up to `root`.

    Refuses (returns False) for anything outside `root` or `root` itself. Also removes aria2's
    control file beside it.
    """
    path = confined_path(root, candidate)
    if path is None or not path.exists():
        return False
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
    aria2_control = path.with_name(path.name + ARIA2_CONTROL_SUFFIX)
    if aria2_control.is_file():
        aria2_control.unlink()
    _remove_empty_parents(root.resolve(), path.parent)
    return True


def remove_empty_tree(root: Path, candidate: str | Path) -> None:
    """Remove the folder `candidate` inside `root` and its subfolders if they hold no files."""
    path = confined_path(root, candidate)
    if path is None or not path.is_dir():
        return
    for folder, _subdirs, _files in sorted(os.walk(path), key=lambda w: -len(w[0])):
        try:
            os.rmdir(folder)
        except OSError:
            return


def rename_confined(root: Path, candidate: str | Path, new_name: str) -> Path | None:
    """Give the file `candidate` inside `root` the name `new_name` in its own folder, never over
    another file (``name.1.ext``, ``name.2.ext``… when taken); the new path, or None when the
    file is not inside `root` or is gone."""
    path = confined_path(root, candidate)
    if path is None or not path.is_file():
        return None
    stem, dot, suffix = new_name.rpartition(".")
    if not stem:
        stem, dot, suffix = new_name, "", ""
    target = path.with_name(new_name)
    number = 0
    while target.exists():
        number += 1
        target = path.with_name(f"{stem}.{number}{dot}{suffix}")
    path.rename(target)
    return target


def _remove_empty_parents(root: Path, parent: Path) -> None:
    while parent != root and root in parent.parents:
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent


def discard(path: Path) -> None:
    """Remove one of the service's own bookkeeping files or scratch folders, if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class DownloadFiles:
    """The download directory: job folders in it, and confined deletion of what lies in it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def job_dir(self, download_id: int) -> Path:
        """Where aria2 puts the files of one download (aria2 creates it on first write)."""
        return self.root / str(download_id)

    def job_ids(self) -> list[int]:
        """The ids of the job folders present (blocking: call it in a thread)."""
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return []
        return sorted(int(e.name) for e in entries if e.name.isdigit() and e.is_dir())

    def confined(self, candidate: str | Path) -> Path | None:
        return confined_path(self.root, candidate)

    async def ensure_root(self) -> None:
        """Create the download folder (for the service's user only) if it is missing."""
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True, mode=0o700)

    async def remove(self, candidate: str | Path, *, job: int | None = None) -> bool:
        """Delete a download's file or folder (inside the root only); True if it was removed."""
        removed = await asyncio.to_thread(remove_confined, self.root, candidate)
        if removed and job is not None:
            logger.bind(job=job).info("local file of download {} deleted", job)
        return removed

    async def rename(self, candidate: str | Path, new_name: str, *, job: int) -> Path | None:
        """Rename a downloaded file in its folder (inside the root only); its new path."""
        renamed = await asyncio.to_thread(rename_confined, self.root, candidate, new_name)
        if renamed is not None:
            logger.bind(job=job).info("file of download {} renamed to {}", job, renamed.name)
        return renamed

    async def remove_job_dir_if_empty(self, download_id: int) -> None:
        await asyncio.to_thread(remove_empty_tree, self.root, self.job_dir(download_id))
