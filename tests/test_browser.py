"""The dashboard in a real headless Chromium, driven over the DevTools protocol.

Sign in through the form, add a slow link through the add box, cut the list API off so only
WebSocket pushes can move the row, and watch the row reach "completed" in the DOM with the
buttons its pushed JSON allows (its `actions`, its copy-link and watch links) and no fetch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.http_files import MIB, FileServer
from tests.support.rclone_cloud import RcloneCloud
from tests.support.service import ServiceFactory
from tests.test_engine_api import wait_until
from tests.test_uploads import all_in, make_video, rclone_target, upload_overrides, wait_uploads
from tests.test_web_page import Site, serve_site

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = shutil.which("chromium")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The row's buttons that are not one of its `actions`, in the order the page puts them after.
LINK_AND_PANEL_BUTTONS = ("copy", "watch", "details", "delete")


class DevToolsError(Exception):
    pass


class PageSession:
    """One page target over the DevTools WebSocket: commands by id, events to listeners."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            payload = json.loads(message.data)
            if "id" in payload:
                future = self._waiting.pop(payload["id"], None)
                if future is not None and not future.done():
                    future.set_result(payload)
            elif "method" in payload:
                for listener in list(self._listeners):
                    listener(payload["method"], payload.get("params", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(DevToolsError("the DevTools connection closed"))

    def on_event(self, listener: Callable[[str, dict[str, Any]], None]) -> None:
        self._listeners.append(listener)

    async def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        number = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[number] = future
        await self.ws.send_str(json.dumps({"id": number, "method": method, "params": params or {}}))
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise DevToolsError(f"{method}: {reply['error']}")
        return dict(reply.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise DevToolsError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float, what: str) -> Any:
        """Poll a page expression until it is truthy (bounded)."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await self.evaluate(expression)
            except DevToolsError as exc:  # e.g. the page is still loading
                last = exc
            else:
                if last:
                    return last
            await asyncio.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; last value {last!r}")

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


def _launch(command: list[str], profile: Path, log_path: Path) -> subprocess.Popen[bytes]:
    profile.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        # Its own session: the renderers and helpers can be killed with it by its PID.
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


async def sign_in(page: PageSession, base_url: str, token: str) -> None:
    """Open the page at `base_url`, sign in through the form with `token`, and wait for the
    live dashboard with its first list."""
    await page.send("Page.navigate", {"url": base_url + "/"})
    await page.wait_for(
        "!document.getElementById('login-view').hidden"
        " && !document.documentElement.classList.contains('boot')",
        20,
        "the sign-in form",
    )
    await page.evaluate("document.getElementById('token').focus()")
    await page.send("Input.insertText", {"text": token})
    await page.evaluate("document.getElementById('login-submit').click()")
    await page.wait_for(
        "document.getElementById('conn').dataset.state === 'live'"
        " && document.body.dataset.synced === '1'",
        20,
        "the live dashboard",
    )


@contextlib.asynccontextmanager
async def chromium(profile: Path, log_path: Path) -> AsyncIterator[PageSession]:
    """A headless Chromium with its own profile, killed by PID however the test ends."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-default-apps",
        "--lang=en-US",
        "--window-size=1280,1000",
        f"--user-data-dir={profile}",
        "--remote-debugging-port=0",
        "about:blank",
    ]
    process = await asyncio.to_thread(_launch, command, profile, log_path)
    http = aiohttp.ClientSession()
    session: PageSession | None = None
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or len(port_file.read_text().splitlines()) < 2:
            if process.poll() is not None:
                raise DevToolsError(f"chromium exited with {process.returncode}")
            if time.monotonic() > deadline:
                raise DevToolsError("chromium never wrote DevToolsActivePort")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().splitlines()[0])
        async with http.get(f"http://127.0.0.1:{port}/json/list") as response:
            targets = await response.json()
        page_target = next(t for t in targets if t.get("type") == "page")
        ws = await http.ws_connect(page_target["webSocketDebuggerUrl"], max_msg_size=0)
        session = PageSession(ws)
        yield session
    finally:
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()
        await http.close()
        if process.poll() is None:
            process.terminate()
            try:
                await asyncio.to_thread(process.wait, 5)
            except subprocess.TimeoutExpired:
                process.kill()
                await asyncio.to_thread(process.wait, 5)
        # Renderer and helper processes share the browser's session: none may outlive the test.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
async def browser_site(service_factory: ServiceFactory) -> AsyncIterator[Site]:
    running = await service_factory()
    async with serve_site(running) as served:
        yield served


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)
async def test_dashboard_follows_a_download_over_the_websocket(
    browser_site: Site, file_server: FileServer, tmp_path: Path
) -> None:
    site = browser_site
    size = 3 * MIB
    file_server.add_file("slow clip.mp4", size=size)
    link = file_server.url("slow clip.mp4", route="slow", rate=MIB)

    console_errors: list[str] = []
    blocked: list[str] = []
    pushed_rows: list[dict[str, Any]] = []  # download_update data the page received
    replies: set[asyncio.Future[dict[str, Any]]] = set()
    page: PageSession
    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:

        def on_event(method: str, params: dict[str, Any]) -> None:
            if method == "Runtime.exceptionThrown":
                console_errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif method == "Log.entryAdded":
                entry = params.get("entry", {})
                if entry.get("level") == "error":
                    console_errors.append(f"{entry.get('url', '')} {entry.get('text', '')}")
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                console_errors.append(json.dumps(params.get("args", []))[:500])
            elif method == "Network.webSocketFrameReceived" and params["response"]["opcode"] == 1:
                message = json.loads(params["response"]["payloadData"])
                if message.get("type") == "download_update":
                    pushed_rows.append(message["data"])
            elif method == "Fetch.requestPaused":
                request = params["request"]
                if request["method"] == "GET":
                    blocked.append(request["url"])
                    reply = asyncio.ensure_future(
                        page.send(
                            "Fetch.failRequest",
                            {"requestId": params["requestId"], "errorReason": "Failed"},
                        )
                    )
                else:
                    reply = asyncio.ensure_future(
                        page.send("Fetch.continueRequest", {"requestId": params["requestId"]})
                    )
                replies.add(reply)
                reply.add_done_callback(replies.discard)

        page.on_event(on_event)
        await page.send("Runtime.enable")
        await page.send("Log.enable")
        await page.send("Page.enable")
        await page.send("Network.enable")
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
        )
        await page.send("Page.navigate", {"url": site.base_url + "/"})

        # Signed out: the form is the page.
        await page.wait_for(
            "!document.getElementById('login-view').hidden"
            " && !document.documentElement.classList.contains('boot')",
            20,
            "the sign-in form",
        )
        assert await page.evaluate("document.getElementById('dashboard').hidden") is True
        assert await page.evaluate("document.getElementById('conn').dataset.state") == "signed-out"

        # A wrong token is refused in place.
        await page.evaluate("document.getElementById('token').focus()")
        await page.send("Input.insertText", {"text": "not-the-token"})
        await page.evaluate("document.getElementById('login-submit').click()")
        await page.wait_for(
            "document.body.dataset.loginState === 'failed'", 10, "the refusal of a wrong token"
        )
        assert await page.evaluate("document.getElementById('dashboard').hidden") is True

        # The right token: the dashboard, live over the WebSocket, with one list load.
        await page.evaluate("document.getElementById('token').select()")
        await page.send("Input.insertText", {"text": site.token})
        await page.evaluate("document.getElementById('login-submit').click()")
        await page.wait_for(
            "document.getElementById('conn').dataset.state === 'live'"
            " && document.body.dataset.synced === '1'",
            20,
            "the live dashboard",
        )
        assert await page.evaluate("document.cookie") == ""  # HttpOnly: not readable by script
        # One node on SQLite: no nodes panel (and below, no node label on the row).
        await page.wait_for(
            "document.getElementById('nodes').dataset.enabled === 'false'", 10, "/api/cluster"
        )
        assert await page.evaluate("document.getElementById('nodes').hidden") is True

        # From now on the list API fails: only pushes can move the row.
        await page.send(
            "Fetch.enable",
            {"patterns": [{"urlPattern": "*/api/downloads*", "requestStage": "Request"}]},
        )

        await page.evaluate("document.getElementById('add-links').focus()")
        await page.send("Input.insertText", {"text": link})
        await page.evaluate("document.getElementById('add-submit').click()")
        row_id = await page.wait_for(
            "document.querySelector('article.item') &&"
            " document.querySelector('article.item').dataset.downloadId",
            20,
            "the new row",
        )
        row = f"document.querySelector('article.item[data-download-id=\"{row_id}\"]')"
        assert await page.evaluate(f"{row}.querySelector('.name').textContent") == "slow clip.mp4"
        assert await page.evaluate(f"{row}.querySelector('.badge.node').hidden") is True
        row_buttons = (
            f"Array.from({row}.querySelectorAll(':scope > .actions > [data-action]'),"
            " (b) => b.dataset.action)"
        )

        seen_statuses: set[str] = set()
        shown_buttons: set[tuple[str, tuple[str, ...]]] = set()
        seen_partial = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status, percent, buttons = await page.evaluate(
                f"[{row}.dataset.status, {row}.querySelector('.percent').textContent,"
                f" {row_buttons}]"
            )
            seen_statuses.add(status)
            shown_buttons.add((status, tuple(buttons)))
            value = float(percent.rstrip("%"))
            if status == "downloading" and 0 < value < 100:
                seen_partial = True
            if status == "completed":
                break
            await asyncio.sleep(0.1)
        assert "completed" in seen_statuses, seen_statuses
        assert seen_partial, "no partial progress was ever shown"
        assert await page.evaluate(f"{row}.querySelector('.badge.state').textContent") == (
            "Completed"
        )
        assert await page.evaluate(f"{row}.querySelector('.percent').textContent") == "100.0%"
        await page.wait_for(
            "document.querySelector('[data-stat=\"completed\"] .value').textContent === '1'",
            10,
            "the completed count pushed by statistics_update",
        )

        # Every state shown had the buttons of the row's pushed `actions`, then its links.
        own_pushes = [d for d in pushed_rows if d.get("id") == int(row_id)]
        pushed_actions = {(d["status"], tuple(d["actions"])) for d in own_pushes}
        assert {"downloading", "completed"} <= {status for status, _ in pushed_actions}
        for status, buttons in shown_buttons:
            verbs = tuple(b for b in buttons if b not in LINK_AND_PANEL_BUTTONS)
            if status in {pushed for pushed, _ in pushed_actions}:
                assert (status, verbs) in pushed_actions, (status, buttons, pushed_actions)
        assert ("downloading", ("pause", "cancel", "details", "delete")) in shown_buttons
        completed = [d for d in own_pushes if d["status"] == "completed"][-1]
        assert completed["stream_url"] and completed["watch_url"]
        expected_buttons = json.dumps([*completed["actions"], *LINK_AND_PANEL_BUTTONS])
        await page.wait_for(
            f"JSON.stringify({row_buttons}) === JSON.stringify({expected_buttons})",
            5,
            "the completed row's copy-link and watch buttons",
        )
        watch_href = await page.evaluate(
            f"{row}.querySelector(':scope > .actions > a[data-action=\"watch\"]').href"
        )
        assert watch_href == completed["watch_url"]
        # Not one list or detail request: the pushed rows carried the links and the actions.
        assert blocked == [], blocked
        await page.evaluate("document.getElementById('toasts').replaceChildren()")

        # The language switch re-renders in Chinese.
        await page.evaluate("document.getElementById('lang-switch').click()")
        assert await page.evaluate(f"{row}.querySelector('.badge.state').textContent") == "已完成"
        await page.evaluate("document.getElementById('lang-switch').click()")

        await asyncio.sleep(1.2)  # one chart sample after the download
        shot = await page.send("Page.captureScreenshot", {"format": "png"})
        png = base64.b64decode(shot["data"])
        screenshot = tmp_path / "dashboard.png"
        screenshot.write_bytes(png)
        assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000

    # Expected: the refused list requests, the signed-out probe (/api/me) and the wrong
    # token's 401.
    unexpected = [
        error
        for error in console_errors
        if "/api/downloads" not in error
        and not ("/api/me " in error and "401" in error)
        and not ("/login " in error and "401" in error)
    ]
    assert unexpected == [], unexpected


def _make_clip(path: Path) -> None:
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=duration=4:size=160x120:rate=10",
            "-c:v",
            "libvpx",
            "-b:v",
            "100k",
            str(path),
        ],
        check=True,
        timeout=60,
    )


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="ffmpeg is not installed")
async def test_player_page_plays_and_seeks_through_the_signed_stream(
    browser_site: Site, file_server: FileServer, tmp_path: Path
) -> None:
    site = browser_site
    clip = tmp_path / "clip.webm"
    await asyncio.to_thread(_make_clip, clip)
    file_server.add_file("clip.webm", data=await asyncio.to_thread(clip.read_bytes))
    download = await site.add_and_complete(file_server.url("clip.webm"))
    watch_path = "/" + download["watch_url"].split("://", 1)[1].split("/", 1)[1]
    console_errors: list[str] = []
    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:

        def on_event(method: str, params: dict[str, Any]) -> None:
            if method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                console_errors.append(params["entry"].get("text", ""))

        page.on_event(on_event)
        await page.send("Log.enable")
        await page.send("Page.navigate", {"url": site.base_url + watch_path})
        duration = await page.wait_for(
            "(() => { const v = document.querySelector('video.player');"
            " return v && v.readyState >= 1 && v.duration; })()",
            20,
            "the video's metadata",
        )
        assert 3.5 < duration < 4.5
        await page.evaluate("document.querySelector('video.player').currentTime = 3")
        await page.wait_for(
            "(() => { const v = document.querySelector('video.player');"
            " return !v.seeking && v.currentTime >= 2.9 && v.readyState >= 2; })()",
            20,
            "the seek to 3 s",
        )
        title = await page.evaluate("document.querySelector('h1.name').textContent")
        assert title == "clip.webm"
    assert console_errors == []


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)
async def test_the_add_box_chooses_the_upload_targets(
    tmp_path: Path,
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(
            rclone_config,
            [
                rclone_target("everything", "testdav", "/all"),
                rclone_target("videos", "testdav", "/videos", match={"extensions": ["mkv"]}),
            ],
        )
    )
    data = file_server.add_file("picked.txt", size=3000, seed=2)
    file_server.add_file("kept.txt", size=2000, seed=3)
    store = svc.service.parts.store
    select = "document.getElementById('add-targets')"

    async def add(choice: str, name: str) -> int:
        before = {row.id for row in await store.fetch_recent_downloads(10)}
        await page.evaluate(f"{select}.value = {json.dumps(choice)}")
        await page.evaluate("document.getElementById('add-links').focus()")
        await page.send("Input.insertText", {"text": file_server.url(name)})
        await page.evaluate("document.getElementById('add-submit').click()")
        await page.wait_for(
            "document.getElementById('add-links').value === ''", 10, f"{name} added"
        )
        (row,) = [r for r in await store.fetch_recent_downloads(10) if r.id not in before]
        return row.id

    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        await page.send("Runtime.enable")
        await sign_in(page, svc.base_url, svc.token)
        await page.wait_for(
            "!document.getElementById('add-targets-box').hidden", 10, "the target selector"
        )
        options = await page.evaluate(
            f"Array.from({select}.options, (o) => [o.value, o.textContent])"
        )
        assert options == [
            ["", "the targets' rules"],
            ["=everything", "everything only"],
            ["=videos", "videos only"],
            ["-", "keep here only"],
        ]
        assert await page.evaluate(f"{select}.value") == ""  # the rules stay the default
        picked = await add("=videos", "picked.txt")
        kept = await add("-", "kept.txt")

    assert await store.get_download_targets(picked) == ["videos"]
    assert await store.get_download_targets(kept) == []
    (upload,) = await wait_uploads(svc, picked, all_in("completed"))
    assert upload.upload_target == "videos"  # chosen, though its match takes only .mkv
    assert (webdav_cloud.root / "videos" / "picked.txt").read_bytes() == data


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)
async def test_the_page_finds_downloads_and_deletes_a_ticked_rows_file(
    tmp_path: Path,
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    svc = await service_factory(
        upload_overrides(
            rclone_config,
            [rclone_target("betas", "testdav", "/b", match={"extensions": ["txt"]})],
        )
    )
    ids = []
    for name in ("alpha-one.bin", "alpha-two.bin", "beta.txt"):
        file_server.add_file(name, size=2000)
        status, answer = await svc.api(
            "POST", "/api/downloads", json={"url": file_server.url(name)}
        )
        assert status == 201, answer
        ids.append(answer["downloads"][0]["id"])
    video = await asyncio.to_thread(make_video, tmp_path / "clip.mp4")
    file_server.add_file("clip.mp4", data=await asyncio.to_thread(video.read_bytes))
    status, answer = await svc.api(
        "POST", "/api/downloads", json={"url": file_server.url("clip.mp4")}
    )
    clip_id = answer["downloads"][0]["id"]
    rows = [await svc.wait_download(i, ["completed"]) for i in ids]

    async def probed() -> bool:  # ffprobe has seen the picture
        return (await svc.wait_download(clip_id, ["completed"]))["thumbnail_url"] is not None

    await wait_until(probed, 60, "the video probed")
    (upload,) = await wait_uploads(svc, ids[2], all_in("completed"))
    body = "document.getElementById('find-body')"

    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        await page.send("Runtime.enable")
        await sign_in(page, svc.base_url, svc.token)
        await page.evaluate("document.getElementById('find-q').focus()")
        await page.send("Input.insertText", {"text": "ALPHA"})
        await page.evaluate("document.getElementById('find-submit').click()")
        await page.wait_for(f"{body}.children.length === 2", 10, "two rows found")
        shown = await page.evaluate(
            f"Array.from({body}.children, (tr) => [Number(tr.dataset.id),"
            " tr.querySelector('.name').textContent])"
        )
        assert shown == [[ids[1], "alpha-two.bin"], [ids[0], "alpha-one.bin"]]
        # only the jobs uploaded to a target, and that target's latest uploads
        await page.wait_for(
            "document.getElementById('find-target').options.length === 2", 10, "the targets"
        )
        await page.evaluate(
            "document.getElementById('find-q').value = '';"
            " document.getElementById('find-target').value = 'betas';"
            " document.getElementById('find-submit').click()"
        )
        await page.wait_for(
            f"{body}.children.length === 1 && {body}.children[0].dataset.id === '{ids[2]}'",
            10,
            "the job uploaded to betas",
        )
        await page.evaluate("document.getElementById('uploads-show').click()")
        await page.wait_for(
            "document.getElementById('uploads-body').children.length === 1", 10, "the uploads"
        )
        cells = await page.evaluate(
            "Array.from(document.querySelectorAll('#uploads-body td'), (td) => td.textContent)"
        )
        assert cells[:4] == [str(upload.id), str(ids[2]), "betas", "Uploaded"]
        await page.evaluate(
            "document.getElementById('find-q').value = 'alpha';"
            " document.getElementById('find-target').value = '';"
            " document.getElementById('find-submit').click()"
        )
        await page.wait_for(f"{body}.children.length === 2", 10, "the alpha rows again")
        # a video's row shows its frame (made on the first request) and its media facts
        await page.evaluate(
            "document.getElementById('find-q').value = 'clip';"
            " document.getElementById('find-submit').click()"
        )
        await page.wait_for(
            f"{body}.querySelector('img.thumb') && {body}.querySelector('img.thumb').complete"
            f" && {body}.querySelector('img.thumb').naturalWidth > 0",
            20,
            "the thumbnail shown",
        )
        facts = await page.evaluate(f"{body}.querySelector('.media').textContent")
        assert "320×240" in facts and "h264" in facts
        await page.evaluate(
            "document.getElementById('find-q').value = 'alpha';"
            " document.getElementById('find-submit').click()"
        )
        await page.wait_for(f"{body}.children.length === 2", 10, "the alpha rows once more")
        await page.evaluate(f"{body}.querySelector('.find-pick').click()")
        await page.evaluate(
            "document.querySelector('#find-bulk [data-action=delete_file]').click()"
        )
        await page.wait_for(
            "document.getElementById('find-result').textContent.startsWith('1 of 1 done')",
            10,
            "the bulk answer",
        )

    # the ticked row's file is gone, its record kept; the other row's file stays
    assert not await asyncio.to_thread(Path(rows[1]["local_path"]).exists)
    assert await asyncio.to_thread(Path(rows[0]["local_path"]).is_file)
    status, kept = await svc.api("GET", f"/api/downloads/{ids[1]}")
    assert status == 200 and kept["status"] == "completed"
