"""Signed links for /stream and /watch (HMAC-SHA256), and the secret in the dashboard's session
cookie with the key the store keeps for it (SHA-256)."""

from __future__ import annotations

import binascii
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field
from urllib.parse import quote

SESSION_COOKIE = "mistrelay_session"
SESSION_LIFETIME = 30 * 24 * 3600
_SESSION_SECRET = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 random bytes, URL-safe base64
_NONCE = re.compile(r"[A-Za-z0-9_-]{22}")  # a sign-in link's 16 random bytes
SIGN_IN_LIFETIME = 10 * 60  # seconds a one-time sign-in link works
SIGN_IN_PATH = "/signin"  # where a sign-in link leads


_BLOCK = hashlib.sha256().block_size
_URLSAFE = bytes.maketrans(b"+/", b"-_")


def _b64(digest: bytes) -> str:
    return binascii.b2a_base64(digest, newline=False).translate(_URLSAFE).rstrip(b"=").decode()


@dataclass(frozen=True)
class LinkSigner:
    """Signs (download id, file index, expiry). The key lives in the data folder, so links and
    aria2's loopback links for Telegram files stay valid across restarts."""

    key: bytes
    default_lifetime: int = 0  # seconds; 0 = links never expire
    # HMAC-SHA256 (RFC 2104) with the key's inner and outer pads hashed once: a link's MAC
    # starts from copies of these two states instead of keying a new HMAC each time.
    _pads: tuple[hashlib._Hash, hashlib._Hash] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        key = hashlib.sha256(self.key).digest() if len(self.key) > _BLOCK else self.key
        key = key.ljust(_BLOCK, b"\0")
        inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        object.__setattr__(self, "_pads", (inner, outer))

    def _mac(self, scope: str, download_id: int, index: int, expires: int) -> str:
        return self._mac_text(f"{scope}:{download_id}:{index}:{expires}")

    def _mac_text(self, text: str) -> str:
        inner, outer = self._pads[0].copy(), self._pads[1].copy()
        inner.update(text.encode())
        outer.update(inner.digest())
        return _b64(outer.digest())

    def sign_in_query(self, user_id: int, lifetime: int, *, now: float | None = None) -> str:
        """The query of a one-time sign-in link for Telegram user `user_id`: a fresh nonce
        (the store records it once used), the expiry and their signature."""
        nonce = secrets.token_urlsafe(16)
        expires = int((now or time.time()) + lifetime)
        sig = self._mac_text(f"sign-in:{user_id}:{nonce}:{expires}")
        return f"user={user_id}&nonce={nonce}&exp={expires}&sig={sig}"

    def verify_sign_in(
        self, user: str | None, nonce: str | None, exp: str | None, sig: str | None
    ) -> tuple[int, str, int] | str:
        """(user id, nonce, expiry) of a good sign-in link, else why it is refused."""
        if not (user and nonce and exp and sig):
            return "incomplete sign-in link"
        if not (user.isascii() and nonce.isascii() and exp.isascii() and sig.isascii()):
            return "malformed sign-in link (not ASCII)"
        if not (_NONCE.fullmatch(nonce) and user.isdigit() and exp.isdigit()):
            return "malformed sign-in link"
        if len(user) > 20 or len(exp) > 12:
            return "malformed sign-in link"
        if not hmac.compare_digest(sig, self._mac_text(f"sign-in:{user}:{nonce}:{exp}")):
            return "forged sign-in link"
        if int(exp) < time.time():
            return "expired sign-in link"
        return int(user), nonce, int(exp)

    def query(
        self,
        download_id: int,
        index: int = 0,
        *,
        lifetime: int | None = None,
        now: float | None = None,
        expires: int | None = None,
    ) -> str:
        """`sig` (and `exp`) for a link that lives `lifetime` seconds, or until `expires` (an
        absolute time, 0 = never) when that is given."""
        if expires is None:
            lifetime = self.default_lifetime if lifetime is None else lifetime
            expires = int((now or time.time()) + lifetime) if lifetime > 0 else 0
        sig = self._mac("stream", download_id, index, expires)
        return f"sig={sig}&exp={expires}" if expires else f"sig={sig}"

    def stream_path(self, download_id: int, name: str, index: int | None = None, **kw: int) -> str:
        quoted = quote(name or "file", safe="")
        middle = f"{index}/" if index is not None else ""
        return f"/stream/{download_id}/{middle}{quoted}?{self.query(download_id, index or 0, **kw)}"

    def watch_path(self, download_id: int, index: int | None = None, **kw: int) -> str:
        suffix = f"/{index}" if index is not None else ""
        return f"/watch/{download_id}{suffix}?{self.query(download_id, index or 0, **kw)}"

    def verify(
        self,
        download_id: int,
        index: int,
        sig: str | None,
        exp: str | None,
        *,
        now: float | None = None,
    ) -> str | None:
        """None when the link is good, else why it is refused ("missing", "forged", "expired")."""
        if not sig:
            return "missing signature"
        if not sig.isascii() or not (exp or "").isascii():
            return "malformed signature (not ASCII)"
        try:
            expires = int(exp) if exp else 0
        except ValueError:
            return "forged signature"
        if expires < 0 or not hmac.compare_digest(
            sig, self._mac("stream", download_id, index, expires)
        ):
            return "forged signature"
        if expires and expires < (now or time.time()):
            return "expired link"
        return None


# --- dashboard sessions ---------------------------------------------------------------------------


def new_session_secret() -> str:
    """The secret a new session cookie holds: 32 random bytes, URL-safe."""
    return secrets.token_urlsafe(32)


def session_key(secret: str | None, web_token: str) -> str | None:
    """What the store keeps of a session cookie's secret: the hex SHA-256 of the secret and of
    the web token's own digest, so that a new web.token ends every session. None for a value
    that is no secret of ours (never looked up)."""
    if secret is None or not _SESSION_SECRET.fullmatch(secret):
        return None
    token_digest = hashlib.sha256(web_token.encode("utf-8", "surrogateescape")).hexdigest()
    return hashlib.sha256(f"session:{token_digest}:{secret}".encode()).hexdigest()
