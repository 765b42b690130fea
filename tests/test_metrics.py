"""GET /metrics scraped from a real service (its own aria2c, a real HTTP peer) during and after a
download, parsed with the Prometheus library's own parser; and the logs as JSON lines in a
rotated file."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from loguru import logger
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from app import configure_logging
from configer import ConfigError, LoggingConfig, load_config
from tests.support.http_files import MIB, FileServer
from tests.support.rclone_cloud import RcloneCloud
from tests.support.service import RunningService, ServiceFactory
from tests.support.sessions import cookie_header, stored_session

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
METRICS_TOKEN = "scrape-only-0123456789abcdef"
WAIT = 60.0


def samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float:
    """The one sample `name` with (at least) `labels`; 0 when there is none."""
    found = [
        s.value
        for s in samples(text)
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else 0.0


async def scrape(svc: RunningService, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with svc.http.get(
        svc.base_url + "/metrics", headers=svc.auth if headers is None else headers
    ) as response:
        text = await response.text()
        if response.status == 200:
            assert response.headers["Content-Type"] == "text/plain; version=1.0.0; charset=utf-8"
        return response.status, text


async def downloading(svc: RunningService, download_id: int) -> dict[str, Any]:
    """The row once aria2 has fetched some of its bytes (bounded)."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while asyncio.get_running_loop().time() < deadline:
        status, row = await svc.api("GET", f"/api/downloads/{download_id}")
        assert status == 200, row
        if row["status"] == "downloading" and 0 < row["completed_length"] < row["total_length"]:
            return dict(row)
        await asyncio.sleep(0.05)
    raise AssertionError(f"download {download_id} never showed progress")


async def scraped_until(svc: RunningService, name: str, wanted: float, **labels: str) -> str:
    """Scrape until sample `name` reaches `wanted` (bounded); the last scrape."""
    deadline = asyncio.get_running_loop().time() + WAIT
    while True:
        status, text = await scrape(svc)
        assert status == 200, text
        if value(text, name, **labels) >= wanted:
            return text
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{name}{labels} never reached {wanted}")
        await asyncio.sleep(0.1)


@pytest.mark.slow
async def test_metrics_move_during_and_after_a_real_download(
    service_factory: ServiceFactory,
    file_server: FileServer,
    tmp_path: Path,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    log_file = tmp_path / "logs" / "mistrelay.log"
    svc = await service_factory(
        {
            "web": {"metrics_token": METRICS_TOKEN},
            "logging": {"level": "DEBUG", "format": "json", "file": str(log_file)},
            "upload": {
                "targets": [{"name": "dav", "type": "rclone", "remote": "testdav", "path": "/up"}],
                "rclone_config": str(rclone_config),
            },
        }
    )
    data = file_server.add_file("big.bin", size=4 * MIB, seed=7)
    async with svc.http.post(
        svc.base_url + "/api/downloads",
        headers=svc.auth,
        json={"url": file_server.url("big.bin", route="slow", rate=2 * MIB)},
    ) as response:
        assert response.status == 201
        row = (await response.json())["downloads"][0]

    await downloading(svc, row["id"])
    async with svc.http.ws_connect(svc.base_url + "/api/ws", headers=svc.auth) as ws:
        assert json.loads((await ws.receive()).data)["type"] == "hello"
        status, during = await scrape(svc, {"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert status == 200, during
    assert value(during, "mistrelay_downloads", status="downloading") == 1
    assert value(during, "mistrelay_websocket_clients") == 1
    assert value(during, "mistrelay_aria2_up") == 1
    assert 0 < value(during, "mistrelay_downloaded_bytes_total") < len(data)
    assert value(during, "mistrelay_download_speed_bytes") > 0
    assert value(during, "mistrelay_aria2_rpc_duration_seconds_count", method="aria2.addUri") == 1
    assert value(during, "mistrelay_poll_cycle_duration_seconds_count") > 0
    assert value(during, "mistrelay_db_write_duration_seconds_count") > 0
    assert value(during, "mistrelay_downloads_finished_total", status="completed") == 0

    done = await svc.wait_download(row["id"], ("completed", "failed"), timeout=WAIT)
    assert done["status"] == "completed", done
    after = await scraped_until(
        svc, "mistrelay_uploads_finished_total", 1, target="dav", status="completed"
    )
    assert value(after, "mistrelay_uploaded_bytes_total") == len(data)
    assert value(after, "mistrelay_uploads", status="completed") == 1
    assert value(after, "mistrelay_queue_depth", queue="uploads") == 0
    assert value(after, "mistrelay_downloads", status="completed") == 1
    assert value(after, "mistrelay_downloads", status="downloading") == 0
    assert (
        value(after, "mistrelay_downloads_finished_total", source="http", status="completed") == 1
    )
    assert value(after, "mistrelay_downloaded_bytes_total") == len(data)
    assert value(after, "mistrelay_websocket_clients") == 0
    assert value(after, "mistrelay_event_loop_lag_seconds_count") > 0
    for name in (
        "mistrelay_poll_cycle_duration_seconds_count",
        "mistrelay_db_write_duration_seconds_count",
    ):
        assert value(after, name) > value(during, name), name

    # The dashboard shipped in docs/ is built on these names (a labelled family that has seen
    # nothing yet, like upload retries, has no sample but its names all the same).
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {
        family.name + suffix
        for family in text_string_to_metric_families(after)
        for suffix in suffixes[family.type]
    }
    used = set(re.findall(r"mistrelay_[a-z0-9_]+", DASHBOARD.read_text(encoding="utf-8")))
    assert used, "the dashboard names no metric"
    assert used <= names, sorted(used - names)

    # The log file: one JSON object a line, with the job's context, no secret.
    logger.info("a line that names the web token {}", svc.token)
    await logger.complete()
    text = log_file.read_text(encoding="utf-8")
    lines = [json.loads(line) for line in text.splitlines()]
    assert {"time", "level", "logger", "function", "line", "message"} <= set(lines[0])
    assert any(line.get("job") == row["id"] for line in lines), "no line carries the job"
    assert lines[-1]["message"] == "a line that names the web token ***"
    assert svc.token not in text and METRICS_TOKEN not in text


async def test_metrics_need_a_credential_and_the_scrape_token_opens_nothing_else(
    service_factory: ServiceFactory,
) -> None:
    svc = await service_factory({"web": {"metrics_token": METRICS_TOKEN}})
    for headers in ({}, {"Authorization": "Bearer " + METRICS_TOKEN[:-1] + "x"}):
        status, body = await scrape(svc, headers)
        assert status == 401, body
        assert json.loads(body)["error"] == "unauthorized"
        assert METRICS_TOKEN not in body and svc.token not in body
    scraper = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    assert (await scrape(svc, scraper))[0] == 200
    assert (await scrape(svc))[0] == 200  # the web token
    cookie = await stored_session(svc.service.parts.store, svc.token)
    assert (await scrape(svc, cookie_header(cookie)))[0] == 200
    # The scrape token is no web token.
    status, _ = await svc.api("GET", "/api/downloads", auth=False, headers=scraper)
    assert status == 401
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await svc.http.ws_connect(svc.base_url + "/api/ws", headers=scraper)
    assert refused.value.status == 401
    # Every metric family is there before anything happened, counters at 0.
    status, text = await scrape(svc)
    families = {family.name for family in text_string_to_metric_families(text)}
    assert {
        "mistrelay_downloads_finished",
        "mistrelay_uploads_finished",
        "mistrelay_aria2_restarts",
        "mistrelay_websocket_clients_dropped",
        "mistrelay_telegram_flood_wait_seconds",
        "mistrelay_upload_retries",
        "mistrelay_queue_depth",
    } <= families
    assert value(text, "mistrelay_aria2_restarts_total") == 0


@pytest.fixture
def restore_logging() -> Iterator[None]:
    yield
    configure_logging("INFO")


def test_the_log_file_rotates_keeps_its_retention_and_masks_secrets(
    tmp_path: Path, restore_logging: None
) -> None:
    secret = "s3cret-value-never-logged"
    path = tmp_path / "mistrelay.log"
    configure_logging(
        LoggingConfig(format="json", file=str(path), rotation="2 KB", retention="2"), [secret]
    )
    for number in range(60):
        logger.bind(job=number, gid=f"g{number:04d}").info("line {} holds {}", number, secret)
    logger.complete()  # the file's writer thread has written every line
    files = sorted(tmp_path.glob("mistrelay*.log"))
    assert path in files and 2 <= len(files) <= 3  # the live file and at most 2 rotated
    lines = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert lines and all(line["message"].endswith("holds ***") for line in lines)
    assert max(line["job"] for line in lines) == 59
    assert all(line["gid"] == f"g{line['job']:04d}" for line in lines)
    assert all(secret not in f.read_text() for f in files)


@pytest.mark.parametrize(
    ("key", "text", "problem"),
    [
        ("FORMAT", "xml", "logging.format: must be one of text, json"),
        ("ROTATION", "often", "logging.rotation: must be a size like 50 MB or an age"),
        ("ROTATION", "0 days", "logging.rotation: must be a size"),
        ("RETENTION", "-1", "logging.retention: must be a number of files"),
    ],
)
def test_bad_log_settings_are_named(key: str, text: str, problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={f"MISTRELAY_LOGGING_{key}": text})
    assert problem in str(caught.value)


def test_the_metrics_token_is_a_secret() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, env={"MISTRELAY_WEB_METRICS_TOKEN": f"two {METRICS_TOKEN}"})
    assert "web.metrics_token: invalid value" in str(caught.value)
    assert METRICS_TOKEN not in str(caught.value)
