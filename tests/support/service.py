"""A real MistRelay service for tests: its own aria2c, SQLite file and web server in tmp_path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from app import Service
from configer import Config, load_config
from tests.support.processes import free_port

LOOPBACK_ARIA2_OPTIONS = {
    "bt-enable-lpd": "false",
    "enable-peer-exchange": "false",
    "disable-ipv6": "true",
}


def service_config(root: Path, overrides: dict[str, Any] | None = None) -> Path:
    """Write a config.yaml for a test service under `root` and return its path."""
    document: dict[str, Any] = {
        "aria2": {
            "enable_dht": False,
            "options": dict(LOOPBACK_ARIA2_OPTIONS),
            "poll_interval": 0.2,
            "idle_poll_interval": 0.5,
        },
        "web": {"host": "127.0.0.1", "port": free_port()},
        "database": {"path": "data/mistrelay.db"},
        "logging": {"level": "DEBUG"},
    }
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(document.get(section), dict):
            merged = dict(document[section])
            for key, value in values.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key] = {**merged[key], **value}
                else:
                    merged[key] = value
            document[section] = merged
        else:
            document[section] = values
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@dataclass
class RunningService:
    service: Service
    config_path: Path
    http: aiohttp.ClientSession
    root: Path
    token: str = ""
    extra_headers: dict[str, str] = field(default_factory=dict)

    @property
    def config(self) -> Config:
        return self.service.config

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.service.parts.web.port}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def api(
        self, method: str, path: str, *, auth: bool = True, **kwargs: Any
    ) -> tuple[int, Any]:
        headers = {**(self.auth if auth else {}), **kwargs.pop("headers", {})}
        async with self.http.request(
            method, self.base_url + path, headers=headers, **kwargs
        ) as response:
            body = await response.read()
            try:
                return response.status, await response.json(content_type=None)
            except ValueError:
                return response.status, body

    async def wait_download(
        self, download_id: int, statuses: Iterable[str], timeout: float = 60
    ) -> dict[str, Any]:
        """Poll the API until the download reaches one of `statuses` (bounded)."""
        wanted = set(statuses)
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            status, last = await self.api("GET", f"/api/downloads/{download_id}")
            if status == 200 and last["status"] in wanted:
                return dict(last)
            await asyncio.sleep(0.1)
        raise AssertionError(f"download {download_id} never reached {wanted}; last: {last}")

    async def stop(self) -> None:
        await self.service.stop()


ServiceFactory = Callable[..., Awaitable[RunningService]]


@pytest.fixture
async def service_factory(tmp_path: Path) -> AsyncIterator[ServiceFactory]:
    """Start real services: `await service_factory(overrides={...}, name="a")`."""
    started: list[RunningService] = []
    http = aiohttp.ClientSession()

    async def start(
        overrides: dict[str, Any] | None = None,
        *,
        name: str = "svc",
        config_path: Path | None = None,
        **service_kwargs: Any,
    ) -> RunningService:
        path = config_path or service_config(tmp_path / name, overrides)
        service = Service(load_config(path, env={}), **service_kwargs)
        running = RunningService(service, path, http, path.parent)
        started.append(running)
        await service.start()
        await service.wait_bot()
        running.token = service.parts.secrets.web_token
        return running

    try:
        yield start
    finally:
        for running in reversed(started):
            await running.stop()
        await http.close()
