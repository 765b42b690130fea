"""Live settings changed while the service runs (the page, ``PATCH /api/settings``, the bot).

A change names dotted keys of config.yaml among :data:`SETTINGS_KEYS`, the ones an admin tunes
while jobs run (the other live keys change by editing config.yaml and reloading). Every value is
checked as the file's key is; then all of them are written to config.yaml in one atomic
replacement that keeps its comments, the running service takes them over through the same path
as a reload (SIGHUP), and each key that changed is recorded: who, when, old → new (secrets as
``***``). Nothing is written or applied unless every value is valid.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from loguru import logger

from configer import (
    ENV_VARS,
    KNOWN_KEYS,
    LIVE_KEYS,
    Config,
    ConfigDiff,
    ConfigError,
    masked_settings,
    parse_setting,
    set_values_in_file,
    shown_values,
)
from db import Store
from records import SettingsChange

# What the page, the API and the bot change, in the order the page shows them.
SETTINGS_KEYS: tuple[str, ...] = (
    "limits.download",
    "limits.upload",
    "aria2.max_concurrent_downloads",
    "upload.max_concurrent",
    "telegram.progress_interval",
    "telegram.language",
    "upload.auto_delete",
    "upload.targets",
)
assert set(SETTINGS_KEYS) <= LIVE_KEYS, "only keys a running service takes over"


class SettingsEditor:
    """Reads and changes the live settings of the running service.

    `config` returns the configuration in force, `reload` re-reads config.yaml and applies its
    live keys (``Service.reload``), `env` is the environment the configuration was loaded with
    (a key set there wins over the file, so it cannot be changed here).
    """

    def __init__(
        self,
        config: Callable[[], Config],
        reload: Callable[[], Awaitable[ConfigDiff]],
        store: Store,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._config = config
        self._reload = reload
        self._store = store
        self._env = os.environ if env is None else env
        self._lock = asyncio.Lock()  # one change at a time: each reads the file the last wrote

    def current(self) -> dict[str, Any]:
        """Every key of SETTINGS_KEYS with its value in force (secrets as ``***``)."""
        return shown_values(self._config(), SETTINGS_KEYS)

    async def history(self, limit: int = 100) -> list[SettingsChange]:
        """The latest recorded changes, newest first."""
        return await self._store.list_settings_changes(limit)

    def check(self, values: Mapping[str, Any]) -> None:
        """Each value checked as config.yaml's key; ConfigError naming the first bad key."""
        if not values:
            raise ConfigError("give at least one setting")
        config = self._config()
        base_dir = config.config_path.resolve().parent if config.config_path else None
        env_names = {dotted: name for name, dotted in ENV_VARS.items()}
        for key, value in values.items():
            if key in KNOWN_KEYS and key not in SETTINGS_KEYS:
                how = "reload" if key in LIVE_KEYS else "restart"
                raise ConfigError(f"is not changed here; edit config.yaml and {how}", key=key)
            parse_setting(key, value, base_dir or Path.cwd())
            if env_names[key] in self._env:
                raise ConfigError(
                    f"is set by the environment variable {env_names[key]}, which wins over"
                    " config.yaml",
                    key=key,
                )
        if base_dir is None:
            raise ConfigError("the service runs without a config file to write to")

    async def change(self, values: Mapping[str, Any], who: str) -> list[SettingsChange]:
        """Check every value, write them all to config.yaml, apply them live, record each that
        changed. All or nothing: ConfigError (naming the key) before anything is written."""
        async with self._lock:
            self.check(values)
            config = self._config()
            assert config.config_path is not None  # check() refused otherwise
            before = masked_settings(config)
            # The values as given (a size stays "2MiB" in the file); they were checked above.
            await asyncio.to_thread(set_values_in_file, config.config_path, dict(values))
            await self._reload()
            after = masked_settings(self._config())
            changed = [
                (key, before[key], after[key]) for key in values if before[key] != after[key]
            ]
            recorded = await self._store.record_settings_changes(who, changed) if changed else []
        logger.bind(who=who, keys=[c[0] for c in changed]).info(
            "settings changed by {}: {}", who, ", ".join(c[0] for c in changed) or "nothing"
        )
        return recorded


__all__ = ["SETTINGS_KEYS", "SettingsEditor"]
