"""The throwaway PostgreSQL server the store's tests run against (tests/support/postgres.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest

from tests.support.postgres import PostgresServer, child_pids
from tests.support.processes import pid_alive


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(url, timeout=10)
    try:
        yield connection
    finally:
        await connection.close()


async def test_the_server_runs_on_loopback(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    assert postgres_server.host == "127.0.0.1"
    assert postgres_url.startswith(f"postgresql://postgres@127.0.0.1:{postgres_server.port}/")
    async with connected(postgres_url) as connection:
        assert await connection.fetchval("SELECT host(inet_server_addr())") == "127.0.0.1"
        assert await connection.fetchval("SELECT inet_server_port()") == postgres_server.port
        assert await connection.fetchval("SHOW listen_addresses") == "127.0.0.1"
        assert await connection.fetchval("SHOW fsync") == "off"
        name = await connection.fetchval("SELECT current_database()")
        tables = await connection.fetchval(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        )
    assert postgres_url == postgres_server.dsn(name)
    assert tables == 0  # a fresh, empty database
    assert postgres_server.pid is not None and pid_alive(postgres_server.pid)


async def test_created_databases_are_independent(postgres_server: PostgresServer) -> None:
    first, second = await asyncio.gather(
        asyncio.to_thread(postgres_server.create_database),
        asyncio.to_thread(postgres_server.create_database),
    )
    assert first != second
    async with connected(postgres_server.dsn(first)) as one:
        await one.execute("CREATE TABLE jobs (id integer PRIMARY KEY)")
        await one.execute("INSERT INTO jobs VALUES (1)")
        async with connected(postgres_server.dsn(second)) as other:
            assert await other.fetchval("SELECT to_regclass('public.jobs')") is None
            await other.execute("CREATE TABLE jobs (id integer PRIMARY KEY)")
            assert await other.fetchval("SELECT count(*) FROM jobs") == 0
        assert await one.fetchval("SELECT count(*) FROM jobs") == 1
        # Dropping ends the sessions still connected to the database.
        await asyncio.to_thread(postgres_server.drop_database, first)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await one.fetchval("SELECT 1")
    await asyncio.to_thread(postgres_server.drop_database, second)
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(postgres_server.dsn(second), timeout=10)


async def test_a_restart_keeps_committed_rows_and_stop_leaves_no_process(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with connected(postgres_url) as connection:
        await connection.execute("CREATE TABLE kept (value text)")
        await connection.execute("INSERT INTO kept VALUES ('committed')")
        postmaster = postgres_server.pid
        assert postmaster is not None
        processes = [postmaster, *child_pids(postmaster)]
        assert len(processes) > 2  # the postmaster, its helpers and this session's backend
        await asyncio.to_thread(postgres_server.stop)
        assert postgres_server.pid is None
        assert [pid for pid in processes if pid_alive(pid)] == []
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, ConnectionError)):
            await connection.fetchval("SELECT 1")
    with pytest.raises(OSError):
        await asyncpg.connect(postgres_url, timeout=10)
    await asyncio.to_thread(postgres_server.start)
    assert postgres_server.pid not in (None, postmaster)
    async with connected(postgres_url) as connection:
        assert await connection.fetchval("SELECT value FROM kept") == "committed"
