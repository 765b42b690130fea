"""Every allowed Telegram user on the dashboard, seeing only their own jobs: the bot's one-time
sign-in link (used once, expiring), the API scoped to the user's jobs (others' answer 404), admin
routes refused, and the WebSocket sending a user nothing of another user's jobs."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from configer import ConfigError, Quotas, load_config
from tests.support.http_files import FileServer
from tests.support.processes import free_port
from tests.support.rclone_cloud import add_remote
from tests.support.sessions import cookie_header
from tests.support.torrents import make_torrent
from tests.test_bot import (  # noqa: F401
    ADMIN,
    OTHER,
    USER,
    Relay,
    RelayFactory,
    eventually,
    relay_factory,
    telegram_section,
)
from tests.test_browser import CHROMIUM, PageSession, chromium
from tests.test_web_page import session_cookie_from
from webstreamer.routes.ws import WS_SETTINGS, WsSettings
from webstreamer.server import Listener, WebServer
from webstreamer.signing import SESSION_COOKIE

LINK = re.compile(r"https?://\S+/signin\?\S+")


class _Form(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "input" and found.get("type") == "hidden":
            self.fields[found["name"] or ""] = found["value"] or ""


class Web:
    """The relay's web server, asked without any cookie kept between requests."""

    def __init__(self, relay: Relay, http: aiohttp.ClientSession) -> None:
        self.relay = relay
        self.base = relay.running.base_url
        self.http = http

    async def call(
        self, method: str, path: str, cookie: dict[str, str] | None = None, **kwargs: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        bearer = {"Authorization": f"Bearer {self.relay.running.token}"}
        headers = dict(bearer if cookie is None else cookie)
        if cookie is not None and method != "GET":
            headers["Origin"] = self.base
        headers |= kwargs.pop("headers", {})
        async with self.http.request(
            method, self.base + path, headers=headers, allow_redirects=False, **kwargs
        ) as response:
            body = await response.read()
            try:
                return response.status, json.loads(body), response
            except ValueError:
                return response.status, body.decode("utf-8", "replace"), response

    async def link_of(self, user_id: int) -> str:
        """The sign-in link the bot answers /web with, on this server."""
        [answer] = await self.relay.chat(user_id).say("/web")
        match = LINK.search(answer.text)
        assert match is not None, answer.text
        return self.base + match.group(0)[match.group(0).index("/signin") :]

    async def use(self, link: str) -> tuple[int, Any, aiohttp.ClientResponse]:
        """Open the link's page (which spends nothing) and press its button."""
        async with self.http.get(link, allow_redirects=False) as page:
            assert page.status == 200, await page.text()
            form = _Form()
            form.feed(await page.text())
        return await self.call("POST", "/signin", cookie={}, data=form.fields)

    async def sign_in(self, user_id: int) -> dict[str, str]:
        status, body, response = await self.use(await self.link_of(user_id))
        assert status == 303, body
        return cookie_header(session_cookie_from(response)[SESSION_COOKIE].value)

    async def add(self, cookie: dict[str, str], name: str) -> int:
        url = f"http://127.0.0.1:{free_port()}/{name}"
        status, body, _ = await self.call("POST", "/api/downloads", cookie, json={"url": url})
        assert status == 201, body
        return int(body["downloads"][0]["id"])


@contextlib.asynccontextmanager
async def web_of(relay: Relay) -> AsyncIterator[Web]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield Web(relay, http)


# The jobs here point at this machine, which users may not reach unless allowed.
PRIVATE = {"aria2": {"allow_private_addresses": True}}


@pytest.fixture
async def web(relay_factory: RelayFactory) -> AsyncIterator[Web]:  # noqa: F811
    async with web_of(await relay_factory(PRIVATE)) as served:
        yield served


async def test_a_sign_in_link_works_once_and_not_after_its_expiry(web: Web) -> None:
    link = await web.link_of(USER)
    status, _, response = await web.use(link)
    assert status == 303 and SESSION_COOKIE in session_cookie_from(response)
    status, body, _ = await web.use(link)
    assert status == 403 and "used already" in body
    # A link whose signature is good but whose time has passed.
    signer = web.relay.running.service.parts.links.signer
    expired = f"{web.base}/signin?{signer.sign_in_query(USER, -5)}"
    async with web.http.get(expired) as page:
        assert page.status == 403 and "expired" in await page.text()
    # A link changed to name another user is forged.
    forged = link.replace(f"user={USER}", f"user={ADMIN}")
    async with web.http.get(forged) as page:
        assert page.status == 403 and "forged" in await page.text()


async def test_a_user_sees_and_controls_only_their_own_jobs(web: Web) -> None:
    mine, theirs = await web.sign_in(USER), await web.sign_in(OTHER)
    own = await web.add(mine, "mine.bin")
    other = await web.add(theirs, "theirs.bin")
    status, body, _ = await web.call("GET", "/api/downloads", mine)
    assert status == 200 and [d["id"] for d in body["downloads"]] == [own]
    status, body, _ = await web.call("GET", "/api/downloads?q=theirs", mine)  # a search too
    assert status == 200 and body["downloads"] == []
    status, body, _ = await web.call("GET", "/api/downloads?q=theirs", theirs)
    assert [d["id"] for d in body["downloads"]] == [other]
    status, body, _ = await web.call("GET", "/api/downloads?grouped=true", mine)
    assert [d["id"] for g in body["groups"] for d in g["downloads"]] == [own]
    assert (await web.call("GET", f"/api/downloads/{own}", mine))[0] == 200
    # Another user's job answers as no job at all, for reading and for every action.
    for method, path in (
        ("GET", f"/api/downloads/{other}"),
        ("GET", f"/api/downloads/{other}/files"),
        ("POST", f"/api/downloads/{other}/cancel"),
        ("PATCH", f"/api/downloads/{other}"),
        ("DELETE", f"/api/downloads/{other}"),
    ):
        status, body, _ = await web.call(method, path, mine, json={})
        assert status == 404, (method, path)
        assert body == {"error": "not_found", "detail": f"no download {other}"}, (method, path)
    assert (await web.call("GET", f"/api/downloads/{other}", theirs))[0] == 200
    # Everyone's settings and sessions stay with the admins.
    for method, path in (
        ("GET", "/api/config"),
        ("GET", "/api/settings"),
        ("GET", "/api/sessions"),
    ):
        status, body, _ = await web.call(method, path, mine)
        assert status == 403 and "only an admin" in body["detail"], path
    # The admin's link and the web token see both.
    admin = await web.sign_in(ADMIN)
    for credential in (admin, None):
        status, body, _ = await web.call("GET", "/api/downloads", credential)
        assert {d["id"] for d in body["downloads"]} == {own, other}


async def test_the_websocket_sends_a_user_nothing_of_another_users_job(web: Web) -> None:
    mine, theirs = await web.sign_in(USER), await web.sign_in(OTHER)
    headers = {**mine, "Origin": web.base}
    url = web.base.replace("http://", "ws://", 1) + "/api/ws"
    async with web.http.ws_connect(url, headers=headers) as ws:
        hello = json.loads((await ws.receive(timeout=10)).data)
        assert hello["type"] == "hello"
        assert hello["data"]["statistics"]["downloads"]["total"] == 0  # their own: none yet
        other = await web.add(theirs, "secret-of-other.bin")
        own = await web.add(mine, "mine.bin")
        seen: list[dict[str, Any]] = []

        def own_totals_seen() -> bool:
            return any(
                m["type"] == "statistics_update" and m["data"]["downloads"]["total"] == 1
                for m in seen
            )

        while not (
            any(m["type"] == "download_update" and m["data"]["id"] == own for m in seen)
            and own_totals_seen()
        ):
            message = await ws.receive(timeout=10)
            assert message.type == aiohttp.WSMsgType.TEXT, message
            assert "secret-of-other" not in message.data
            seen.append(json.loads(message.data))
    assert all(m["data"].get("id") != other for m in seen)
    # The totals pushed are the user's own: their one job, never the other's too.
    totals = [m["data"] for m in seen if m["type"] == "statistics_update"]
    assert all(t["downloads"]["total"] <= 1 for t in totals)


async def test_quotas_refuse_a_users_new_job_in_chat_and_on_the_api(
    relay_factory: RelayFactory,  # noqa: F811
    tmp_path: Path,
) -> None:
    section = telegram_section(quotas={"active_jobs": 1, "bytes_per_day": "1MiB"})
    relay = await relay_factory(PRIVATE, telegram=section)
    async with web_of(relay) as web:
        mine = await web.sign_in(USER)
        # A torrent nobody seeds stays unfinished: it takes the user's one active job.
        torrent = make_torrent(b"x" * 4096, tmp_path, "http://127.0.0.1:9/announce", "a.bin")
        form = aiohttp.FormData()
        form.add_field("file", torrent.torrent_bytes, filename="a.torrent")
        status, body, _ = await web.call("POST", "/api/downloads/torrent", mine, data=form)
        assert status == 201, body
        link = f"http://127.0.0.1:{free_port()}/more.bin"
        status, body, _ = await web.call("POST", "/api/downloads", mine, json={"url": link})
        assert status == 429 and body["error"] == "quota_exceeded", body
        assert "1 unfinished job(s), at most 1 at once" in body["detail"]
        [answer] = await relay.chat(USER).say(link)
        assert "1 unfinished job(s), at most 1 at once" in answer.text
        # Admins have no quota.
        [answer] = await relay.chat(ADMIN).say(link)
        assert "quota" not in answer.text
        assert len(await relay.downloads()) == 2


async def test_a_personal_token_is_shown_once_acts_as_its_user_and_can_be_revoked(
    web: Web,
) -> None:
    mine, theirs = await web.sign_in(USER), await web.sign_in(OTHER)
    own = await web.add(mine, "mine.bin")
    other = await web.add(theirs, "theirs.bin")
    status, made, _ = await web.call("POST", "/api/tokens", mine, json={"name": "phone"})
    assert status == 201 and made["name"] == "phone" and made["token"].startswith("mrt_")
    bearer = {"Authorization": f"Bearer {made['token']}"}
    # Listed without the token; the store keeps only its hash.
    status, listed, _ = await web.call("GET", "/api/tokens", mine)
    assert listed["tokens"] == [
        {k: v for k, v in made.items() if k != "token"} | {"last_used_at": None}
    ]
    [kept] = await web.relay.db.list_api_tokens(USER)
    assert made["token"] not in kept and kept.user_id == USER
    # It sees what its user sees: their own job, 404 for another's, 403 for admin routes.
    status, body, _ = await web.call("GET", "/api/downloads", bearer)
    assert status == 200 and [d["id"] for d in body["downloads"]] == [own]
    assert (await web.call("GET", f"/api/downloads/{other}", bearer))[0] == 404
    assert (await web.call("GET", "/api/config", bearer))[0] == 403
    # Another user can neither list nor revoke it.
    assert (await web.call("GET", "/api/tokens", theirs))[1] == {"tokens": []}
    assert (await web.call("DELETE", f"/api/tokens/{made['id']}", theirs, json={}))[0] == 404
    assert (await web.call("DELETE", "/api/tokens/not-an-id", mine, json={}))[0] == 404
    status, body, _ = await web.call("DELETE", f"/api/tokens/{made['id']}", mine, json={})
    assert (status, body) == (200, {"revoked": made["id"]})
    assert (await web.call("GET", "/api/downloads", bearer))[0] == 401
    # A name that is not printable text is refused, saying so.
    status, body, _ = await web.call("POST", "/api/tokens", mine, json={"name": "a\nb"})
    assert status == 400 and "printable" in body["detail"]


@pytest.mark.parametrize(
    ("quotas", "problem"),
    [
        ({"active_jobs": -1}, "telegram.quotas.active_jobs: must be an integer"),
        ({"bytes_per_day": "lots"}, "telegram.quotas.bytes_per_day: must be a size"),
        ({"jobs": 3}, "telegram.quotas.jobs: 'jobs' is no quota"),
        ([3], "telegram.quotas: must be a mapping"),
    ],
)
def test_bad_quotas_are_refused_naming_the_key(
    tmp_path: Path, quotas: object, problem: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"telegram": {"quotas": quotas}}))
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    assert problem in str(refused.value)


def test_quotas_are_read_with_sizes(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"telegram": {"quotas": {"bytes_per_day": "2GiB"}}}))
    assert load_config(path, env={}).telegram.quotas == Quotas(0, 2 * 1024**3)


async def sign_in_on_the_page(page: PageSession, link: str) -> None:
    """Open a user's one-time link, press its button, and wait for the live dashboard."""
    await page.send("Page.navigate", {"url": link})
    await page.wait_for("!!document.querySelector('form button')", 20, "the link's page")
    await page.evaluate("document.querySelector('form button').click()")
    await page.wait_for(
        "document.getElementById('conn').dataset.state === 'live'"
        " && document.body.dataset.synced === '1'",
        20,
        "the live dashboard",
    )


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_a_user_opens_the_link_in_a_browser_and_sees_only_their_jobs(
    web: Web, tmp_path: Path
) -> None:
    mine, theirs = await web.sign_in(USER), await web.sign_in(OTHER)
    own = await web.add(mine, "mine.bin")
    other = await web.add(theirs, "theirs.bin")
    link = await web.link_of(USER)
    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        await sign_in_on_the_page(page, link)
        await page.wait_for(
            f"!!document.querySelector('[data-download-id=\"{own}\"]')", 20, "the user's job"
        )
        shown = await page.evaluate(
            "[...document.querySelectorAll('[data-download-id]')]"
            ".map(e => Number(e.dataset.downloadId))"
        )
    assert own in shown and other not in shown


async def test_a_duplicate_names_the_job_only_to_its_owner_and_admins(
    relay_factory: RelayFactory,  # noqa: F811
    file_server: FileServer,
    tmp_path: Path,
) -> None:
    relay = await relay_factory(PRIVATE)
    owner, other, admin = relay.chat(USER), relay.chat(OTHER), relay.chat(ADMIN)
    # A link held by the server and a torrent nobody seeds: both stay active, so a second send
    # of either is a duplicate.
    file_server.add_file("held.bin", size=4 * 1024 * 1024)
    link = file_server.url("held.bin", route="hold", bytes=65536)
    await owner.say(link)
    [job] = await relay.jobs(1)
    torrent = make_torrent(b"t" * 4096, tmp_path, "http://127.0.0.1:9/announce", "t.bin")
    torrent_file = relay.fake.add_file(torrent.torrent_bytes, file_name="t.torrent")
    await owner.say(file=torrent_file)
    [_, seeded] = await relay.jobs(2)
    for existing, send in ((job, {"text": link}), (seeded, {"file": torrent_file})):
        for chat in (owner, admin):
            [answer] = await chat.say(**send)
            assert f"#{existing.id}" in answer.text, answer.text
        [answer] = await other.say(**send)
        assert "#" not in answer.text and "someone else" in answer.text, answer.text
        assert "wait until it is done" in answer.text or "once that is done" in answer.text
    # Neither job can be reached by the other user, who is told there is none.
    for command in (f"/cancel {job.id}", f"/pause {seeded.id}"):
        [answer] = await other.say(command)
        assert "There is no download" in answer.text, answer.text
    # Their /stats counts their own jobs (none), not everyone's.
    [stats] = await other.say("/stats")
    [everyone] = await admin.say("/stats")
    assert "Downloads: 0" in stats.text and "Downloads: 2" in everyone.text, stats.text
    assert len(await relay.downloads()) == 2


async def test_a_websocket_opened_with_a_token_closes_once_revoked_or_its_user_changes_role(
    web: Web,
) -> None:
    # A server of the same service whose sockets look at their credential often.
    server = WebServer(web.relay.running.service.parts.web.ctx, Listener("127.0.0.1", 0))
    server.app[WS_SETTINGS] = WsSettings(session_check_interval=0.2)
    await server.start()
    try:
        url = f"ws://127.0.0.1:{server.port}/api/ws"
        mine = await web.sign_in(USER)
        bearers = []
        for name in ("revoked", "kept"):
            status, made, _ = await web.call("POST", "/api/tokens", mine, json={"name": name})
            assert status == 201, made
            bearers.append((made["id"], {"Authorization": f"Bearer {made['token']}"}))
        (revoked_id, revoked), (_, kept) = bearers
        sockets = [await web.http.ws_connect(url, headers=b) for b in (revoked, kept)]
        for ws in sockets:
            hello = json.loads((await ws.receive(timeout=10)).data)
            assert hello["type"] == "hello"
        first, second = sockets
        status, _, _ = await web.call("DELETE", f"/api/tokens/{revoked_id}", mine, json={})
        assert status == 200
        message = await first.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        assert first.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        await second.send_str("ping")  # the other token's socket lives on
        assert json.loads((await second.receive(timeout=10)).data)["type"] == "pong"
        # Its user made an admin (config.yaml edited, then reloaded): the socket saw only
        # their jobs, so it ends too.
        path = web.relay.running.config_path
        document = yaml.safe_load(path.read_text())
        document["telegram"]["admins"] = [ADMIN, USER]
        path.write_text(yaml.safe_dump(document))
        status, body, _ = await web.call("POST", "/api/config/reload", json={})
        assert status == 200, body
        message = await second.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        assert second.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        # Connecting again, the same token now sees what an admin sees.
        async with web.http.ws_connect(url, headers=kept) as again:
            hello = json.loads((await again.receive(timeout=10)).data)
            assert hello["type"] == "hello"
        status, me, _ = await web.call("GET", "/api/me", kept)
        assert (status, me) == (200, {"role": "admin", "user_id": USER})
    finally:
        await server.stop()


async def test_api_me_and_a_users_uploads_and_totals(web: Web) -> None:
    mine, theirs = await web.sign_in(USER), await web.sign_in(OTHER)
    own = await web.add(mine, "mine.bin")
    other = await web.add(theirs, "theirs.bin")
    store = web.relay.db
    own_upload = await store.create_upload(own, "cloud", None, 3)
    other_upload = await store.create_upload(other, "cloud", None, 3)
    assert (await web.call("GET", "/api/me", mine))[1] == {"role": "user", "user_id": USER}
    assert (await web.call("GET", "/api/me"))[1] == {"role": "admin", "user_id": None}
    status, body, _ = await web.call("GET", "/api/uploads", mine)
    assert status == 200 and [u["id"] for u in body["uploads"]] == [own_upload]
    status, body, _ = await web.call("GET", "/api/uploads")
    assert {u["id"] for u in body["uploads"]} >= {own_upload, other_upload}
    [listed] = await web.relay.chat(USER).say("/uploads")  # the bot's list alike
    assert f"↑{own_upload}" in listed.text and f"↑{other_upload}" not in listed.text
    for path in ("/api/downloads/statistics", "/api/uploads/statistics"):
        status, body, _ = await web.call("GET", path, mine)
        assert status == 200 and body["total"] == 1, (path, body)
        assert (await web.call("GET", path))[1]["total"] == 2, path
    # Another user's upload, and another user's job in a bulk action, are none at all.
    status, body, _ = await web.call("POST", f"/api/uploads/{other_upload}/cancel", mine, json={})
    assert (status, body) == (
        404,
        {"error": "not_found", "detail": f"upload {other_upload} not found"},
    )
    status, body, _ = await web.call(
        "POST", "/api/downloads/bulk", mine, json={"action": "cancel", "ids": [other]}
    )
    assert status == 200 and body["results"][0]["error"] == "not_found", body
    assert (await store.get_download_by_id(other)).status != "cancelled"
    status, body, _ = await web.call("POST", f"/api/uploads/{own_upload}/cancel", mine, json={})
    assert status == 200 and body["status"] == "cancelled", body


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_a_users_page_shows_their_own_figures_and_manages_their_tokens(
    relay_factory: RelayFactory,  # noqa: F811
    rclone_config: Path,
    tmp_path: Path,
) -> None:
    cloud = tmp_path / "cloud"
    cloud.mkdir()
    add_remote(rclone_config, "localdisk", {"type": "local"})
    target = {"name": "disk", "type": "rclone", "remote": "localdisk", "path": str(cloud)}
    upload = {"targets": [target], "rclone_config": str(rclone_config)}
    relay = await relay_factory({**PRIVATE, "upload": upload})
    # One job of the user's and two of another's, each downloaded and uploaded.
    for user_id, name in ((USER, "mine.bin"), (OTHER, "theirs-1.bin"), (OTHER, "theirs-2.bin")):
        await relay.chat(user_id).say(file=relay.fake.add_file(b"p" * 5000, file_name=name))

    async def all_uploaded() -> bool:
        uploads = await relay.db.fetch_recent_uploads(10)
        return len(uploads) == 3 and all(u.status == "completed" for u in uploads)

    await eventually(all_uploaded, 60, "three uploads")
    [own] = [r for r in await relay.downloads() if r.owner_id == USER]
    async with web_of(relay) as web:
        link = await web.link_of(USER)
        failed: list[str] = []
        async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:

            def watch(method: str, params: dict[str, Any]) -> None:
                if method == "Network.responseReceived" and params["response"]["status"] >= 400:
                    failed.append(f"{params['response']['status']} {params['response']['url']}")
                elif method == "Runtime.consoleAPICalled" and params["type"] == "error":
                    failed.append(f"console: {params['args']}")
                elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                    failed.append(f"log: {params['entry']['text']}")

            page.on_event(watch)
            for domain in ("Network", "Runtime", "Log"):
                await page.send(f"{domain}.enable")
            await sign_in_on_the_page(page, link)
            stat = "document.querySelector('[data-stat=\"{}\"] .value').textContent"
            # Their own figures: one job done, one upload done (everyone's are 3 and 3).
            await page.wait_for(
                f"{stat.format('completed')} === '1' && {stat.format('uploads_completed')} === '1'",
                20,
                "the user's own totals",
            )
            hidden = await page.evaluate(
                "['settings', 'nodes', 'logout-all'].map(id => document.getElementById(id).hidden)"
            )
            assert hidden == [True, True, True]
            assert await page.evaluate("document.body.dataset.role") == "user"
            await page.evaluate("document.getElementById('uploads-show').click()")
            await page.wait_for(
                "!document.getElementById('uploads-table').hidden", 20, "the uploads table"
            )
            rows = await page.evaluate(
                "[...document.querySelectorAll('#uploads-body tr')]"
                ".map(r => Number(r.cells[1].textContent))"
            )
            assert rows == [own.id]

            # A token made on the page is shown once, acts as the user, and is revoked there.
            await page.evaluate("document.getElementById('token-name').value = 'laptop'")
            await page.evaluate("document.getElementById('token-create').click()")
            token = await page.wait_for(
                "!document.getElementById('token-made').hidden"
                " && document.getElementById('token-value').value",
                20,
                "the new token",
            )
            assert token.startswith("mrt_")
            await page.wait_for(
                "document.querySelectorAll('#tokens-body tr').length === 1", 20, "the token's row"
            )
            listed = await page.evaluate("document.getElementById('tokens-body').textContent")
            assert "laptop" in listed and token not in listed
            bearer = {"Authorization": f"Bearer {token}"}
            status, body, _ = await web.call("GET", "/api/downloads", bearer)
            assert status == 200 and [d["id"] for d in body["downloads"]] == [own.id]
            # Shown once: the page opened again lists the token without it.
            await page.send("Page.reload")
            await page.wait_for(
                "document.querySelectorAll('#tokens-body tr').length === 1", 20, "the list again"
            )
            shown = await page.evaluate(
                "document.getElementById('token-made').hidden"
                " && document.getElementById('token-value').value"
            )
            assert shown == "" and token not in await page.evaluate("document.body.innerText")
            await page.evaluate(
                "document.querySelector('#tokens-body button[data-action=\"revoke\"]').click()"
            )
            await page.wait_for(
                "document.getElementById('revoke-dialog').open", 20, "the revoke question"
            )
            await page.evaluate("document.getElementById('revoke-confirm').click()")
            await page.wait_for(
                "document.querySelectorAll('#tokens-body tr').length === 0"
                " && document.getElementById('token-made').hidden",
                20,
                "the token gone",
            )
            assert (await web.call("GET", "/api/downloads", bearer))[0] == 401
    assert failed == []
