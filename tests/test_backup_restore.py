"""`python app.py backup PATH` and `restore PATH` against a real service process.

Backups are taken while the service writes; restore must refuse while the service runs and any
file that is not a MistRelay database it understands, and otherwise put the backup in place,
keep the replaced file aside, and let the service start on the restored data.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from db import APPLICATION_ID, SCHEMA_VERSION
from tests.support.http_files import FileServer
from tests.support.service_process import (
    APP_SCRIPT,
    PROJECT_ROOT,
    ServiceProcess,
    ServiceProcessFactory,
    read_only_db,
    wait_until,
)


@dataclass(frozen=True)
class CommandResult:
    returncode: int
    output: str


async def app_command(svc: ServiceProcess, *args: str, timeout: float = 60) -> CommandResult:
    """Run `python app.py --config <svc's config> ARGS...` to the end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(APP_SCRIPT),
        "--config",
        str(svc.config_path),
        *args,
        cwd=PROJECT_ROOT,
        env=svc.env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return CommandResult(process.returncode, output.decode(errors="replace"))


@dataclass(frozen=True)
class DatabaseFacts:
    application_id: int
    user_version: int
    integrity: str
    download_ids: tuple[int, ...]


def database_facts(path: Path) -> DatabaseFacts:
    conn = read_only_db(path)
    try:
        return DatabaseFacts(
            application_id=int(conn.execute("PRAGMA application_id").fetchone()[0]),
            user_version=int(conn.execute("PRAGMA user_version").fetchone()[0]),
            integrity=str(conn.execute("PRAGMA integrity_check").fetchone()[0]),
            download_ids=tuple(r[0] for r in conn.execute("SELECT id FROM downloads ORDER BY id")),
        )
    finally:
        conn.close()


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replaced_files(svc: ServiceProcess) -> list[Path]:
    return sorted(svc.data_dir.glob(f"{svc.db_path.name}.replaced-*"))


async def add_tiny(svc: ServiceProcess, file_server: FileServer, name: str) -> int:
    file_server.add_file(name, data=f"{name}\n".encode() * 10)
    [download_id] = await svc.add(file_server.url(name))
    return download_id


@pytest.mark.slow
async def test_backup_while_the_service_writes(
    service_process: ServiceProcessFactory, file_server: FileServer, tmp_path: Path
) -> None:
    svc = service_process()
    await svc.start()
    added: list[int] = []
    stop = asyncio.Event()

    async def writer() -> None:
        n = 0
        while not stop.is_set():
            added.append(await add_tiny(svc, file_server, f"w/{n}.txt"))
            n += 1

    writing = asyncio.create_task(writer())
    try:
        await wait_until(lambda: len(added) >= 10, 30, what="10 downloads added")
        before = len(added)
        backups = [tmp_path / "backups" / f"copy-{i}.db" for i in range(3)]
        results = [await app_command(svc, "backup", str(path)) for path in backups]
        after = len(added)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await writing
    assert after > before, "the service kept writing during the backups"
    for path, result in zip(backups, results, strict=True):
        assert result.returncode == 0, result.output
        facts = await asyncio.to_thread(database_facts, path)
        assert facts.application_id == APPLICATION_ID
        assert facts.user_version == SCHEMA_VERSION
        assert facts.integrity == "ok"
        assert len(facts.download_ids) >= before
        assert set(facts.download_ids) <= set(added)
        assert not path.with_name(path.name + ".partial").exists()
    # The service is unharmed and still has everything.
    status, health = await svc.api("GET", "/api/health", auth=False)
    assert status == 200 and health["status"] == "ok"
    for download_id in added:
        assert (await svc.download(download_id))["id"] == download_id


def write_foreign_files(folder: Path, good_backup: Path) -> dict[str, Path]:
    """Files restore must refuse: not SQLite, SQLite but not ours, ours but from the future."""
    folder.mkdir(parents=True, exist_ok=True)
    not_sqlite = folder / "not-sqlite.db"
    not_sqlite.write_bytes(b"this is not a database\n" * 100)
    foreign = folder / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
    conn.execute("INSERT INTO notes (text) VALUES ('hello')")
    conn.commit()
    conn.close()
    newer = folder / "newer.db"
    newer.write_bytes(good_backup.read_bytes())
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    empty = folder / "empty.db"
    empty.write_bytes(b"")
    return {
        "not an SQLite file": not_sqlite,
        "SQLite but not MistRelay's": foreign,
        "a newer schema version": newer,
        "an empty file": empty,
        "a missing file": folder / "missing.db",
    }


@pytest.mark.slow
async def test_restore_refuses_what_it_must_and_restores_a_backup(
    service_process: ServiceProcessFactory, file_server: FileServer, tmp_path: Path
) -> None:
    svc = service_process()
    await svc.start()
    kept_ids = [await add_tiny(svc, file_server, f"a/{i}.txt") for i in range(3)]
    for download_id in kept_ids:
        await svc.wait_download(download_id, {"completed"}, timeout=30)
    backup = tmp_path / "backups" / "good.db"
    result = await app_command(svc, "backup", str(backup))
    assert result.returncode == 0, result.output
    later_ids = [await add_tiny(svc, file_server, f"b/{i}.txt") for i in range(2)]

    # While the service runs: refused (it holds the instance lock), nothing touched.
    running = await app_command(svc, "restore", str(backup))
    assert running.returncode == 2, running.output
    assert "running" in running.output.lower() or "stop" in running.output.lower()
    assert replaced_files(svc) == []
    status, listed = await svc.api("GET", "/api/downloads?limit=100")
    assert status == 200
    assert sorted(d["id"] for d in listed["downloads"]) == sorted(kept_ids + later_ids)

    assert await svc.stop() == 0
    live_digest = await asyncio.to_thread(file_digest, svc.db_path)
    foreign = await asyncio.to_thread(write_foreign_files, tmp_path / "foreign", backup)
    for label, path in foreign.items():
        refused = await app_command(svc, "restore", str(path))
        assert refused.returncode == 2, (label, refused.output)
        assert "refused" in refused.output.lower(), (label, refused.output)
        assert await asyncio.to_thread(file_digest, svc.db_path) == live_digest, label
        assert replaced_files(svc) == [], label

    restored = await app_command(svc, "restore", str(backup))
    assert restored.returncode == 0, restored.output
    [aside] = replaced_files(svc)
    aside_facts = await asyncio.to_thread(database_facts, aside)
    assert aside_facts.integrity == "ok"
    assert aside_facts.download_ids == tuple(sorted(kept_ids + later_ids))
    facts = await asyncio.to_thread(database_facts, svc.db_path)
    assert facts.download_ids == tuple(sorted(kept_ids))
    assert facts.user_version == SCHEMA_VERSION and facts.integrity == "ok"

    await svc.start()
    status, listed = await svc.api("GET", "/api/downloads?limit=100")
    assert status == 200
    assert sorted(d["id"] for d in listed["downloads"]) == sorted(kept_ids)
    for download_id in kept_ids:
        row = await svc.download(download_id)
        assert row["status"] == "completed"
