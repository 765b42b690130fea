"""What the service leaves on disk is its user's only: the data folder 0700 and everything in it
(database, secrets, aria2's session and configuration, logs, downloads) closed to other users,
whatever the umask it was started with."""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.http_files import FileServer
from tests.support.service_process import ServiceProcess, ServiceProcessFactory

# The folders and files a run with one download must have left, relative to the data folder.
EXPECTED_FOLDERS = ("", "downloads")
EXPECTED_FILES = (
    "mistrelay.db",
    "mistrelay.lock",
    "web_token",
    "link_key",
    "aria2_secret",
    "aria2.conf",
    "aria2.session",
    "aria2.log",
    "aria2.console.log",
)


def with_umask(umask: str) -> Callable[[list[str]], list[str]]:
    """A command wrapper that starts the service with `umask` (exec: the PID stays its own)."""

    def wrap(command: list[str]) -> list[str]:
        return ["/bin/sh", "-c", f'umask {umask} && exec "$@"', "sh", *command]

    return wrap


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def open_to_others(root: Path) -> list[str]:
    """Every folder or file under `root` (itself included) that group or others may use."""
    found = [f"{root} {mode(root):04o}"] if mode(root) & 0o077 else []
    for folder, folders, files in os.walk(root):
        for name in [*folders, *files]:
            path = Path(folder) / name
            if mode(path) & 0o077:
                found.append(f"{path.relative_to(root)} {mode(path):04o}")
    return found


async def run_one_download(svc: ServiceProcess, file_server: FileServer) -> Path:
    """Start the service, download one file through it; the downloaded file's path."""
    await svc.start()
    data = file_server.add_file("private.bin", size=300_000, seed=4)
    [download_id] = await svc.add(file_server.url("private.bin"))
    row = await svc.wait_download(download_id, ["completed"], timeout=60)
    path = Path(row["local_path"])
    assert await asyncio.to_thread(path.read_bytes) == data
    return path


@pytest.mark.slow
@pytest.mark.attack(
    "another local user reads the data folder (database, secrets, aria2's session with its "
    "stream links, logs, downloads)",
    promise="the data and download folders are 0700 and every file in them 0600, whatever the "
    "umask the service was started with",
)
async def test_a_fresh_data_folder_and_everything_in_it_is_private(
    service_process: ServiceProcessFactory, file_server: FileServer
) -> None:
    # Started with a usual login shell's umask, which makes files 0644 and folders 0755.
    svc = service_process(wrapper=with_umask("022"))
    assert not svc.data_dir.exists()
    downloaded = await run_one_download(svc, file_server)

    data_dir = svc.data_dir
    assert mode(data_dir) == 0o700
    assert mode(svc.download_dir) == 0o700
    assert mode(downloaded.parent) == 0o700
    assert mode(downloaded) == 0o600
    # While it runs: the database with its write-ahead log and shared memory index.
    for name in ("mistrelay.db", "mistrelay.db-wal", "mistrelay.db-shm"):
        assert mode(data_dir / name) == 0o600, name
    running = open_to_others(data_dir)

    assert await svc.stop() == 0
    for name in EXPECTED_FOLDERS:
        assert (data_dir / name).is_dir(), name
    for name in EXPECTED_FILES:
        assert (data_dir / name).is_file(), name
    assert running == []
    assert open_to_others(data_dir) == []


@pytest.mark.slow
async def test_a_data_folder_open_to_others_is_closed_at_start(
    service_process: ServiceProcessFactory,
) -> None:
    svc = service_process()
    svc.data_dir.mkdir(parents=True)
    svc.data_dir.chmod(0o755)  # as an earlier version left it
    await svc.start()
    assert mode(svc.data_dir) == 0o700
    assert "set to 0700" in svc.log_text()
