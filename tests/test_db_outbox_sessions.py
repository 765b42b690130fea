"""Dashboard sessions kept on the server, and the bot's outbox written with each final status, on
both backends."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from db import TransitionError
from records import NewDownload
from tests.support.stores import Peek, StoreBackend


def later(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat(timespec="milliseconds")


async def test_a_session_lives_until_it_expires_or_is_revoked(store_backend: StoreBackend) -> None:
    async with store_backend.database() as db:
        await db.create_web_session("a" * 64, later(3600), "127.0.0.1", "browser")
        await db.create_web_session("b" * 64, later(3600), None, None)
        await db.create_web_session("c" * 64, later(-1), None, None)
        used = await db.use_web_session("a" * 64)
        assert used is not None and (used.address, used.user_agent) == ("127.0.0.1", "browser")
        assert await db.use_web_session("c" * 64) is None  # expired
        assert await db.use_web_session("d" * 64) is None  # never made
        assert {s.token_hash for s in await db.list_web_sessions()} == {"a" * 64, "b" * 64}
        assert await db.revoke_web_session("a" * 64)
        assert not await db.revoke_web_session("a" * 64)
        assert await db.use_web_session("a" * 64) is None
        assert await db.revoke_all_web_sessions() == 1  # b; a was already revoked
        assert await db.use_web_session("b" * 64) is None
        assert await db.list_web_sessions() == []


async def test_a_final_status_owes_the_asking_chat_one_notice(
    store_backend: StoreBackend, peek: Peek
) -> None:
    async with store_backend.database() as db:
        from_chat = await db.create_download(
            NewDownload("http", "http://h/a", "http://h/a", chat_id=-100, message_id=7)
        )
        from_api = await db.create_download(NewDownload("http", "http://h/b", "http://h/b"))
        await db.mark_download_queued_by_id(from_chat, "g1", status="waiting")
        await db.mark_download_started("g1")
        await db.mark_download_completed("g1", "/d/1/a", 5)
        await db.mark_download_failed_by_id(from_api, "boom")
        [notice] = await db.fetch_undelivered_notices()
        assert (notice.download_id, notice.chat_id, notice.kind) == (from_chat, -100, "completed")
        assert await db.mark_notice_delivered(notice.id)
        assert not await db.mark_notice_delivered(notice.id)
        assert await db.fetch_undelivered_notices() == []
        # The transition and its notice are one transaction: a refused change owes nothing.
        with pytest.raises(TransitionError):
            await db.mark_download_cancelled_by_id(from_chat, "too late")
    assert peek.count("bot_notices") == 1
