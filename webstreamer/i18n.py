"""The shared message catalogue (English and Chinese) of the page, the player and the bot.

Every ``static/i18n/*.json`` file is ``{"en": {key: text}, "zh": {key: text}}``; the files are
merged in name order. A key missing in one language falls back to English, and a key missing
everywhere shows itself, so a gap is visible instead of crashing a handler.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any, Literal

from loguru import logger

Language = Literal["en", "zh"]
LANGUAGES: tuple[Language, ...] = ("en", "zh")
DEFAULT_LANGUAGE: Language = "en"
CATALOGUE_DIR = Path(__file__).resolve().parent / "static" / "i18n"


class _KeepMissing(dict[str, Any]):
    """Leaves a placeholder that has no value as it is instead of raising."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


@cache
def catalogue() -> dict[str, dict[str, str]]:
    """All catalogue files merged: language → key → text (read once, then cached)."""
    merged: dict[str, dict[str, str]] = {language: {} for language in LANGUAGES}
    for path in sorted(CATALOGUE_DIR.glob("*.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            logger.error("message catalogue {} is unreadable: {}", path.name, exc)
            continue
        if not isinstance(document, dict):
            logger.error("message catalogue {} is not a JSON object", path.name)
            continue
        for language, entries in document.items():
            if not isinstance(entries, dict):
                continue
            table = merged.setdefault(str(language), {})
            for key, text in entries.items():
                if key in table and table[key] != text:
                    logger.warning("message {!r} ({}) is defined twice", key, language)
                table[str(key)] = str(text)
    return merged


def reload_catalogue() -> None:
    """Forget the cached catalogue (after its files changed)."""
    catalogue.cache_clear()


def language_for(code: str | None) -> Language:
    """The language to answer in for a Telegram ``language_code`` ("zh-hans", "en") or an HTTP
    Accept-Language value ("zh-CN,zh;q=0.9,en;q=0.8"): the most preferred one we speak."""
    if not code:
        return DEFAULT_LANGUAGE
    ranked: list[tuple[float, int, Language]] = []
    for position, item in enumerate(code.split(",")):
        tag, _, parameters = item.strip().partition(";")
        quality = 1.0
        for parameter in parameters.split(";"):
            name, _, value = parameter.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        primary = tag.strip().lower().replace("_", "-").split("-", 1)[0]
        if quality > 0 and primary in LANGUAGES:
            ranked.append((-quality, position, "zh" if primary == "zh" else "en"))
    return min(ranked)[2] if ranked else DEFAULT_LANGUAGE


def translate(lang: str, key: str, **values: Any) -> str:
    """The text of ``key`` in ``lang`` (falling back to English, then to the key itself),
    with ``{name}`` placeholders filled from ``values``."""
    messages = catalogue()
    template = messages.get(lang, {}).get(key) or messages[DEFAULT_LANGUAGE].get(key) or key
    if not values:
        return template
    try:
        return template.format_map(_KeepMissing(values))
    except (IndexError, ValueError, AttributeError):
        return template


def has_key(key: str) -> bool:
    return key in catalogue()[DEFAULT_LANGUAGE]


__all__ = [
    "CATALOGUE_DIR",
    "DEFAULT_LANGUAGE",
    "LANGUAGES",
    "Language",
    "catalogue",
    "has_key",
    "language_for",
    "reload_catalogue",
    "translate",
]
