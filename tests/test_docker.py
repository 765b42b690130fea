"""The Docker image, built from the project's Dockerfile and run on the host network.

It answers /api/health and turns healthy by its own HEALTHCHECK, runs every process as the
non-root user 10001, keeps no build secret, keeps its data in the volume across a new container,
and on `docker stop` saves aria2's session and ends aria2c before it exits with code 0.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from aria2_client.process import SESSION_NAME
from tests.support.docker import BuiltImage, DockerCli, remove_quietly
from tests.support.http_files import FileServer
from tests.support.processes import free_port
from tests.support.service import LOOPBACK_ARIA2_OPTIONS

pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE_UID = 10001


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, from the PPid lines of /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
                if line.startswith("PPid:"):
                    parents[int(entry.name)] = int(line.split()[1])
    found = [pid]
    for parent in found:
        found.extend(child for child, up in parents.items() if up == parent)
    return found


def proc_fact(pid: int, name: str) -> str:
    """One line of /proc/PID/status (Name, Uid, Gid...), without its label."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{name}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"/proc/{pid}/status has no {name}")


@dataclass
class Container:
    """One container of the image on the host network, its web server on `port`."""

    cli: DockerCli
    image: str
    volume: str
    port: int
    name: str = field(default_factory=lambda: f"mistrelay-test-{secrets.token_hex(4)}")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        environment = {
            "MISTRELAY_WEB_HOST": "127.0.0.1",  # the host network: keep it on loopback
            "MISTRELAY_WEB_PORT": str(self.port),
            "MISTRELAY_ARIA2_ENABLE_DHT": "false",
            "MISTRELAY_ARIA2_OPTIONS": json.dumps(LOOPBACK_ARIA2_OPTIONS),
            "MISTRELAY_ARIA2_POLL_INTERVAL": "0.2",
            "MISTRELAY_ARIA2_IDLE_POLL_INTERVAL": "0.5",
        }
        options = [arg for key, value in environment.items() for arg in ("-e", f"{key}={value}")]
        await self.cli.arun(
            "run",
            "--detach",
            "--network",
            "host",
            "--name",
            self.name,
            "--volume",
            f"{self.volume}:/data",
            # The image's own HEALTHCHECK command, probed often enough for a test.
            "--health-interval",
            "1s",
            *options,
            self.image,
        )

    async def state(self) -> dict[str, Any]:
        result = await self.cli.arun("inspect", "--format", "{{json .State}}", self.name)
        state: dict[str, Any] = json.loads(result.stdout)
        return state

    async def logs(self) -> str:
        result = await self.cli.arun("logs", self.name, check=False)
        return result.stdout + result.stderr

    async def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state()
            if state.get("Health", {}).get("Status") == "healthy":
                return
            if not state.get("Running") or time.monotonic() > deadline:
                raise AssertionError(f"{self.name} not healthy: {state}\n{await self.logs()}")
            await asyncio.sleep(0.5)

    async def exec(self, *command: str) -> str:
        return (await self.cli.arun("exec", self.name, *command)).stdout

    async def read_file(self, path: str) -> bytes:
        """A file of the container (running or stopped), through `docker cp`'s tar stream."""
        result = await asyncio.to_thread(
            subprocess.run,
            self.cli.command("cp", f"{self.name}:{path}", "-"),
            env=self.cli.env,
            capture_output=True,
            timeout=60,
            check=True,
        )
        with tarfile.open(fileobj=io.BytesIO(result.stdout)) as archive:
            member = archive.next()
            assert member is not None, f"{path} is empty in {self.name}"
            extracted = archive.extractfile(member)
            assert extracted is not None, f"{path} is not a file in {self.name}"
            return extracted.read()


@pytest.fixture
async def containers(docker_image: BuiltImage) -> AsyncIterator[list[Container]]:
    """Containers made by the test (append them); removed with their volume at the end."""
    made: list[Container] = []
    yield made
    names = [c.name for c in made]
    if names:
        await asyncio.to_thread(remove_quietly, docker_image.cli, "container", *names)
    volumes = sorted({c.volume for c in made})
    if volumes:
        await asyncio.to_thread(remove_quietly, docker_image.cli, "volume", *volumes)


def new_container(image: BuiltImage, made: list[Container], volume: str) -> Container:
    container = Container(image.cli, image.tag, volume, free_port())
    made.append(container)
    return container


async def api(
    http: aiohttp.ClientSession, container: Container, token: str, method: str, path: str, **kw: Any
) -> Any:
    headers = {"Authorization": f"Bearer {token}"}
    async with http.request(method, container.base_url + path, headers=headers, **kw) as response:
        body = await response.json(content_type=None)
        assert response.status < 300, (method, path, response.status, body)
        return body


async def wait_status(
    http: aiohttp.ClientSession, container: Container, token: str, job: int, wanted: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        row: dict[str, Any] = await api(http, container, token, "GET", f"/api/downloads/{job}")
        if row["status"] == wanted:
            return row
        assert time.monotonic() < deadline, f"download {job} stayed {row['status']}: {row}"
        await asyncio.sleep(0.3)


async def test_image_is_healthy_and_runs_as_non_root(
    docker_image: BuiltImage, containers: list[Container]
) -> None:
    container = new_container(docker_image, containers, f"mistrelay-test-{secrets.token_hex(4)}")
    await container.start()
    await container.wait_healthy()

    async with (
        aiohttp.ClientSession() as http,
        http.get(container.base_url + "/api/health") as response,
    ):
        assert response.status == 200
        health = await response.json()
    assert health["status"] == "ok"
    assert health["aria2"] == "connected"

    pids = descendants(int((await container.state())["Pid"]))
    names = {pid: proc_fact(pid, "Name") for pid in pids}
    assert {"tini", "python", "aria2c"} <= set(names.values()), names
    for pid in pids:
        # real, effective, saved and filesystem uid and gid: all the image's user
        assert proc_fact(pid, "Uid").split() == [str(IMAGE_UID)] * 4, names[pid]
        assert proc_fact(pid, "Gid").split() == [str(IMAGE_UID)] * 4, names[pid]
    assert (await container.exec("id", "-un")).strip() == "mistrelay"
    assert (await container.exec("stat", "-c", "%u %a", "/data")).split() == [str(IMAGE_UID), "700"]
    # The build's pip settings and CA bundle were build secrets: the image keeps none of them.
    assert (await container.exec("pip", "config", "list")).strip() == ""
    assert (await container.exec("sh", "-c", "ls -A /run/secrets 2>/dev/null || true")) == ""


async def test_data_survives_a_new_container_and_stop_saves_the_session(
    docker_image: BuiltImage, containers: list[Container], file_server: FileServer
) -> None:
    volume = f"mistrelay-test-{secrets.token_hex(4)}"
    done_bytes = file_server.add_file("done.bin", size=256 * 1024, seed=1)
    held_bytes = file_server.add_file("held.bin", size=1024 * 1024, seed=2)
    held_url = file_server.url("held.bin", route="hold", bytes=64 * 1024)

    first = new_container(docker_image, containers, volume)
    await first.start()
    await first.wait_healthy()
    token = (await first.exec("cat", "/data/web_token")).strip()
    async with aiohttp.ClientSession() as http:
        added = await api(
            http, first, token, "POST", "/api/downloads", json={"url": file_server.url("done.bin")}
        )
        done_id = int(added["downloads"][0]["id"])
        done = await wait_status(http, first, token, done_id, "completed")
        added = await api(http, first, token, "POST", "/api/downloads", json={"url": held_url})
        held_id = int(added["downloads"][0]["id"])
        await file_server.wait_held("held.bin", within_s=30)

    # docker stop: SIGTERM, then SIGKILL after its grace of 10 s; exit code 0 means the service
    # stopped by itself, aria2c first.
    await docker_image.cli.arun("stop", first.name, timeout=60)
    state = await first.state()
    logs = await first.logs()
    assert state["ExitCode"] == 0, (state, logs[-3000:])
    assert not state["OOMKilled"]
    assert re.search(r"aria2c \d+ exited with code", logs), logs[-3000:]
    assert "did not save its session" not in logs, logs[-3000:]
    assert "MistRelay stopped" in logs, logs[-3000:]
    session = (await first.read_file(f"/data/{SESSION_NAME}")).decode()
    assert held_url in session, session

    second = new_container(docker_image, containers, volume)
    await second.start()
    await second.wait_healthy()
    assert (await second.exec("cat", "/data/web_token")).strip() == token
    async with aiohttp.ClientSession() as http:
        again = await api(http, second, token, "GET", f"/api/downloads/{done_id}")
        assert again["status"] == "completed"
        assert again["local_path"] == done["local_path"]
        assert await second.read_file(done["local_path"]) == done_bytes
        # The download cut by the stop goes on in the new container and ends whole.
        file_server.release("held.bin")
        held = await wait_status(http, second, token, held_id, "completed")
        assert await second.read_file(held["local_path"]) == held_bytes
