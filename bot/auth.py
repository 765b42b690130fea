"""Who may use the bot: admins do everything; allowed users send jobs and control their own."""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

from configer import TelegramConfig
from records import DownloadRow

NO_ONE_SERVED = (
    "the Telegram bot serves no one: put your Telegram user id in telegram.admins in config.yaml "
    "(or MISTRELAY_TELEGRAM_ADMINS=<id>) and restart"
)


class Role(Enum):
    ADMIN = "admin"
    USER = "user"


class Gatekeeper:
    """Reads the lists live from the configuration, so a reload applies at once."""

    def __init__(
        self, config: Callable[[], TelegramConfig], refusal_interval: float = 60.0
    ) -> None:
        self._config = config
        self._refusal_interval = refusal_interval
        self._last_refusal: dict[int, float] = {}

    def role(self, user_id: int | None) -> Role | None:
        if user_id is None:
            return None
        config = self._config()
        if user_id in config.admins:
            return Role.ADMIN
        if user_id in config.allowed_users:
            return Role.USER
        return None

    @property
    def serves_no_one(self) -> bool:
        config = self._config()
        return not config.admins and not config.allowed_users

    def may_control(self, user_id: int | None, row: DownloadRow) -> bool:
        """Admins control every job; allowed users only their own."""
        role = self.role(user_id)
        if role is Role.ADMIN:
            return True
        return role is Role.USER and row.owner_id is not None and row.owner_id == user_id

    def should_tell_refusal(self, user_id: int) -> bool:
        """One refusal per user per `refusal_interval`, so a stranger cannot make the bot spam."""
        now = time.monotonic()
        last = self._last_refusal.get(user_id)
        if last is not None and now - last < self._refusal_interval:
            return False
        if len(self._last_refusal) > 10_000:
            self._last_refusal.clear()
        self._last_refusal[user_id] = now
        return True
