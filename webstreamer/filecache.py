"""Completed downloads' files kept open for /stream, so that a request for a few bytes of one
costs neither a store read nor a thread hop: by (download id, file index), the open file and
what its answer needs (size, name, type, entity-tag, modification time).

An entry is never served stale:
- every committed change of a download, its removal, and an upload's cleanup of its file drop the
  download's entries at once (a hub watcher, called before the change's publisher goes on), on
  this node or, in a cluster, as soon as the change is heard of;
- each use re-reads the open file's status (`fstat`, no path lookup): a file whose size,
  modification time or identity changed, or that was deleted or replaced (no link left to it), is
  dropped and looked up anew;
- a file opened while its download changed is served to that one request only, never kept.

A dropped file is closed as soon as no response is sending from it, so a deleted file's disk
space is not held longer than the answers already under way; entries idle for
`IDLE_SECONDS`, or beyond `capacity`, are dropped too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from loguru import logger

from events import Event, EventHub
from files import DownloadFiles
from records import DownloadRemoved, DownloadRow, UploadRow
from webstreamer.byteserve import LocalFileSource
from webstreamer.links import file_name_of

IDLE_SECONDS = 60.0  # an entry unused for this long is closed
SWEEP_SECONDS = 10.0  # how often idle and deleted files are looked for

Key = tuple[int, int | None]  # (download id, file index; None = the whole download)


def _whole_file_of(
    files: DownloadFiles, row: DownloadRow, index: int | None
) -> tuple[Path, int, str] | None:
    """(path, recorded size, display name) of a completed download's file (or of one file of a
    completed torrent) inside the download folder, else None. Resolves links: blocking."""
    if row.status != "completed" or not row.local_path:
        return None
    if index is None:
        if row.files and len(row.files) > 1:
            return None
        candidate, expected, name = row.local_path, row.total_length, file_name_of(row)
    else:
        entry = next((f for f in row.files if f.index == index), None)
        if entry is None or not entry.selected:  # a file left out of the choice is not fetched
            return None
        base = os.path.dirname(row.local_path) if len(row.files) > 1 else None
        candidate = row.local_path if base is None else os.path.join(base, entry.path)
        expected, name = entry.length, os.path.basename(entry.path)
    path = files.confined(candidate)
    if path is None:
        return None
    return path, expected, name


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass(eq=False)
class OpenFile:
    """One whole file, open, as it was when opened; `users` responses are sending from it."""

    key: Key
    file: IO[bytes]
    source: LocalFileSource
    identity: tuple[int, int, int, int]
    used: float = 0.0  # loop time of the last use
    users: int = 0
    dropped: bool = False

    def unchanged(self) -> bool:
        """Whether the file is still the one described, and still has a name on disk."""
        try:
            st = os.fstat(self.file.fileno())
        except OSError:
            return False
        return st.st_nlink > 0 and _identity(st) == self.identity

    def close_if_unused(self) -> None:
        if self.dropped and self.users == 0 and not self.file.closed:
            self.file.close()


@dataclass(eq=False)
class _Load:
    """A look-up under way for one download: spoiled if the download changes meanwhile."""

    download_id: int
    spoiled: bool = False


def _open_whole(files: DownloadFiles, row: DownloadRow, index: int | None) -> OpenFile | None:
    """Open the whole file (blocking). None when it is missing, not a regular file, or not of
    the recorded size (aria2 preallocates: only a file of exactly that size is whole)."""
    found = _whole_file_of(files, row, index)
    if found is None:
        return None
    path, expected, name = found
    try:
        # Non-blocking: a FIFO put in place of the file must not hold the thread.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size != expected:
            os.close(fd)
            return None
    except OSError:
        os.close(fd)
        raise
    file = os.fdopen(fd, "rb", buffering=0)
    return OpenFile(
        (row.id, index), file, LocalFileSource.from_stat(path, st, name=name), _identity(st)
    )


@dataclass(eq=False)
class FileCache:
    """The open files, least recently used first; `watch(hub)` keeps them fresh."""

    files: DownloadFiles
    capacity: int = 64  # open files at most (each holds a descriptor)
    _entries: OrderedDict[Key, OpenFile] = field(default_factory=OrderedDict)
    _keys: dict[int, set[Key]] = field(default_factory=dict)  # by download id
    _loads: dict[int, list[_Load]] = field(default_factory=dict)
    _unwatch: Callable[[], None] | None = None
    _sweeper: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def watch(self, hub: EventHub) -> None:
        self._unwatch = hub.watch(self._changed)

    def get(self, key: Key) -> OpenFile | None:
        """The open file for `key`, checked against the disk, or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not entry.unchanged():
            logger.bind(job=key[0]).debug("stream cache: file changed on disk, dropped")
            self._drop(entry)
            return None
        self._entries.move_to_end(key)
        return entry

    @contextlib.contextmanager
    def loading(self, download_id: int) -> Iterator[_Load]:
        """Mark a look-up of `download_id` (begun before its row is read) as under way."""
        load = _Load(download_id)
        self._loads.setdefault(download_id, []).append(load)
        try:
            yield load
        finally:
            loads = self._loads[download_id]
            loads.remove(load)
            if not loads:
                del self._loads[download_id]

    async def open(self, load: _Load, row: DownloadRow, index: int | None) -> OpenFile | None:
        """Open the row's whole file in a thread and keep it, unless the row changed meanwhile
        (then the file serves one request and closes after it)."""
        entry = await asyncio.to_thread(_open_whole, self.files, row, index)
        if entry is None:
            return None
        if load.spoiled or self.capacity <= 0:
            entry.dropped = True
            return entry
        old = self._entries.get(entry.key)
        if old is not None:
            self._drop(old)
        self._entries[entry.key] = entry
        self._keys.setdefault(entry.key[0], set()).add(entry.key)
        while len(self._entries) > self.capacity:
            self._drop(next(iter(self._entries.values())))
        self._start_sweeping()
        return entry

    def acquire(self, entry: OpenFile) -> None:
        entry.users += 1
        entry.used = asyncio.get_running_loop().time()

    def release(self, entry: OpenFile) -> None:
        entry.users -= 1
        entry.close_if_unused()

    def forget(self, download_id: int | None) -> None:
        """Drop the entries of one download (None: of every download), and spoil its look-ups."""
        keys = self._entries if download_id is None else self._keys.get(download_id, ())
        for key in list(keys):
            self._drop(self._entries[key])
        for loads in (
            self._loads.values() if download_id is None else [self._loads.get(download_id, [])]
        ):
            for load in loads:
                load.spoiled = True

    def _changed(self, events: Sequence[Event]) -> None:
        for event in events:
            data = event.data
            if event.kind == "download":
                if isinstance(data, DownloadRemoved):
                    self.forget(data.download_id)
                elif event.item_id is not None:
                    self.forget(event.item_id)
            elif event.kind == "cleanup" and isinstance(data, UploadRow):
                self.forget(data.download_id)

    def _drop(self, entry: OpenFile) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            keys = self._keys[entry.key[0]]
            keys.discard(entry.key)
            if not keys:
                del self._keys[entry.key[0]]
        entry.dropped = True
        entry.close_if_unused()

    def _start_sweeping(self) -> None:
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)

    def _sweep(self) -> None:
        """Drop the entries idle too long and those whose file was deleted or changed."""
        self._sweeper = None
        cutoff = asyncio.get_running_loop().time() - IDLE_SECONDS
        for entry in list(self._entries.values()):
            if entry.users == 0 and (entry.used < cutoff or not entry.unchanged()):
                self._drop(entry)
        if self._entries:
            self._start_sweeping()

    def close(self) -> None:
        """Stop watching and close every file no response is sending from (the rest close as
        their responses end)."""
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.forget(None)
