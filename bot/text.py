"""The bot's words, from the message catalogue it shares with the web page (webstreamer.i18n).

Its own entries live in ``webstreamer/static/i18n/bot.json`` under ``bot.*``; status names come
from the shared ``common.json`` so the chat and the page call every state the same.
"""

from __future__ import annotations

from webstreamer.i18n import Language, has_key, language_for, translate


def language_of(language_code: str | None) -> Language:
    """Telegram's language_code → the reply language: zh, zh-hans, zh-TW … → Chinese, else
    English."""
    return language_for(language_code)


__all__ = ["Language", "has_key", "language_of", "translate"]
