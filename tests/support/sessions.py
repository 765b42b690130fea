"""Dashboard sessions made straight in the store, for tests of how the web treats them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from db import Store
from webstreamer.signing import SESSION_COOKIE, SESSION_LIFETIME, new_session_secret, session_key


async def stored_session(
    store: Store,
    web_token: str,
    *,
    lifetime: float = SESSION_LIFETIME,
    revoked: bool = False,
) -> str:
    """A session the store holds for `web_token` (expired when `lifetime` <= 0, ended when
    `revoked`): the secret its cookie carries."""
    secret = new_session_secret()
    key = session_key(secret, web_token)
    assert key is not None
    expires = datetime.now(UTC) + timedelta(seconds=lifetime)
    await store.create_web_session(
        key, expires.isoformat(timespec="milliseconds"), "127.0.0.1", "tests"
    )
    if revoked:
        assert await store.revoke_web_session(key)
    return secret


def cookie_header(secret: str) -> dict[str, str]:
    return {"Cookie": f"{SESSION_COOKIE}={secret}"}
