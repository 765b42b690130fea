"""The dashboard page, its static files, sign-in and the /watch player, against a real service."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.support.http_files import FileServer
from tests.support.service import RunningService, ServiceFactory
from tests.support.sessions import stored_session
from tests.support.torrents import SeederFactory, Tracker, make_torrent
from webstreamer.context import STATIC_DIR as STATIC
from webstreamer.i18n import catalogue, language_for, translate
from webstreamer.routes import auth
from webstreamer.server import Listener, WebServer
from webstreamer.signing import SESSION_COOKIE

# --- a served site on a real service (shared with the other web test modules) -------------------


@dataclass
class Site:
    """A real service plus the base URL where its page, WebSocket and API answer."""

    running: RunningService
    base_url: str
    http: aiohttp.ClientSession

    @property
    def token(self) -> str:
        return self.running.token

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://", 1) + "/api/ws"

    async def request(
        self, method: str, path: str, *, auth: bool = True, **kwargs: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        headers = {**(self.auth if auth else {}), **kwargs.pop("headers", {})}
        kwargs.setdefault("allow_redirects", False)
        async with self.http.request(
            method, self.base_url + path, headers=headers, **kwargs
        ) as response:
            body = await response.read()
            try:
                parsed: Any = json.loads(body)
            except ValueError:
                parsed = body
            return response.status, parsed, response

    async def add_and_complete(self, url: str, timeout: float = 60) -> dict[str, Any]:
        status, body, _ = await self.request("POST", "/api/downloads", json={"url": url})
        assert status == 201, body
        download_id = body["downloads"][0]["id"]
        return await self.running.wait_download(download_id, ["completed"], timeout=timeout)


@contextlib.asynccontextmanager
async def serve_site(running: RunningService) -> AsyncIterator[Site]:
    """The service's own server, with a client that keeps no cookies between requests."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        yield Site(running, running.base_url, http)


@pytest.fixture
async def site(service_factory: ServiceFactory) -> AsyncIterator[Site]:
    running = await service_factory()
    async with serve_site(running) as served:
        yield served


# --- helpers ------------------------------------------------------------------------------------


class _Markup(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.script_bodies: list[str] = []
        self.handlers: list[tuple[str, str]] = []
        self.forms: list[dict[str, str | None]] = []
        self.inputs: list[dict[str, str | None]] = []
        self.styles = 0
        self.style_attributes = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.handlers += [(tag, name) for name, _ in attrs if name.lower().startswith("on")]
        self.style_attributes += sum(1 for name, _ in attrs if name.lower() == "style")
        if tag == "script":
            self.scripts.append(attributes)
            self._in_script = True
        elif tag == "style":
            self.styles += 1
        elif tag == "form":
            self.forms.append(attributes)
        elif tag == "input":
            self.inputs.append(attributes)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.script_bodies.append(data)


def parse_markup(html: str) -> _Markup:
    parser = _Markup()
    parser.feed(html)
    return parser


def csp_directives(value: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def flip_first(text: str) -> str:
    """The same text with its first character changed (a forged signature)."""
    return ("B" if text[0] == "A" else "A") + text[1:]


def session_cookie_from(response: aiohttp.ClientResponse) -> SimpleCookie:
    jar: SimpleCookie = SimpleCookie()
    for header in response.headers.getall("Set-Cookie", []):
        jar.load(header)
    return jar


async def login_cookie(site: Site) -> str:
    status, _, response = await site.request(
        "POST", "/login", auth=False, json={"token": site.token}
    )
    assert status == 200
    return session_cookie_from(response)[SESSION_COOKIE].value


# --- the page -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/login"])
async def test_page_is_public_and_runs_no_inline_script(site: Site, path: str) -> None:
    status, body, response = await site.request("GET", path, auth=False)
    assert status == 200
    assert response.content_type == "text/html"
    csp = csp_directives(response.headers["Content-Security-Policy"])
    assert csp["script-src"] == ["'self'"]
    assert csp["default-src"] == ["'none'"]
    assert "'unsafe-inline'" not in csp.get("style-src", [])
    assert csp["frame-ancestors"] == ["'none'"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    markup = parse_markup(body.decode())
    assert markup.scripts and all(
        (s.get("src") or "").startswith("/static/") for s in markup.scripts
    )
    assert markup.script_bodies == []
    assert markup.handlers == []
    assert markup.styles == 0 and markup.style_attributes == 0
    login_forms = [f for f in markup.forms if f.get("action") == "/login"]
    assert login_forms and login_forms[0].get("method") == "post"
    assert any(i.get("name") == "token" and i.get("type") == "password" for i in markup.inputs)


async def test_static_files_have_fixed_types_and_policy(site: Site) -> None:
    expected = {
        **{f"/static/js/{m.name}": "text/javascript" for m in sorted((STATIC / "js").glob("*.js"))},
        "/static/app.css": "text/css",
        "/static/i18n/common.json": "application/json",
        "/static/watch.css": "text/css",
    }
    for path, content_type in expected.items():
        status, body, response = await site.request("GET", path, auth=False)
        assert status == 200, path
        assert response.content_type == content_type, path
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "script-src 'self'" in response.headers["Content-Security-Policy"]
        on_disk = (STATIC / path.removeprefix("/static/")).read_bytes()
        assert body == (json.loads(on_disk) if path.endswith(".json") else on_disk)
    for missing in ("/static/nothing.js", "/static/index.html.bak", "/static/i18n"):
        status, body, response = await site.request("GET", missing, auth=False)
        assert status == 404, missing
        assert response.content_type == "application/json"
        assert body["error"] == "not_found"


def test_script_builds_no_markup_from_strings() -> None:
    source = "\n".join(m.read_text(encoding="utf-8") for m in (STATIC / "js").glob("*.js"))
    for forbidden in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        'setAttribute("style"',
    ):
        assert forbidden not in source, forbidden


def test_every_message_the_page_uses_exists_in_both_languages() -> None:
    document = json.loads((STATIC / "i18n" / "common.json").read_text(encoding="utf-8"))
    assert set(document["en"]) == set(document["zh"])
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    script = "\n".join(m.read_text(encoding="utf-8") for m in (STATIC / "js").glob("*.js"))
    used = set(re.findall(r'data-i18n(?:-placeholder|-title)?="([^"]+)"', html))
    used |= set(re.findall(r'\bt\(\s*"([a-z_.]+)"', script))
    used |= set(re.findall(r'"(web\.[a-z_.]+)"', script))
    assert len(used) > 40
    missing = sorted(key for key in used if key not in document["en"])
    assert missing == []
    for prefix, names in (
        ("status", ["pending", "waiting", "downloading", "paused", "completed", "failed"]),
        ("upload_status", ["pending", "waiting_download", "uploading", "completed", "failed"]),
    ):
        for name in names:
            assert f"{prefix}.{name}" in document["zh"]


# --- sign-in ------------------------------------------------------------------------------------


async def test_json_login_sets_a_strict_http_only_cookie_the_api_accepts(site: Site) -> None:
    status, body, response = await site.request(
        "POST", "/login", auth=False, json={"token": site.token}
    )
    assert status == 200 and body == {"ok": True}
    assert response.headers["Cache-Control"] == "no-store"
    morsel = session_cookie_from(response)[SESSION_COOKIE]
    assert morsel["httponly"] is True
    assert morsel["samesite"] == "Strict"
    assert morsel["path"] == "/"
    assert int(morsel["max-age"]) > 0
    assert site.token not in morsel.value
    cookie = {"Cookie": f"{SESSION_COOKIE}={morsel.value}"}
    status, body, _ = await site.request("GET", "/api/downloads", auth=False, headers=cookie)
    assert status == 200 and body == {"next_cursor": None, "downloads": []}
    status, _, _ = await site.request("GET", "/api/downloads", auth=False)
    assert status == 401


async def test_form_login_redirects_to_the_dashboard(site: Site) -> None:
    status, _, response = await site.request(
        "POST", "/login", auth=False, data={"token": site.token}
    )
    assert status == 303
    assert response.headers["Location"] == "/"
    morsel = session_cookie_from(response)[SESSION_COOKIE]
    assert morsel["httponly"] is True and morsel["samesite"] == "Strict"
    cookie = {"Cookie": f"{SESSION_COOKIE}={morsel.value}"}
    status, _, _ = await site.request(
        "GET", "/api/downloads/statistics", auth=False, headers=cookie
    )
    assert status == 200


@pytest.mark.parametrize(
    "body",
    [
        {"json": {"token": "not-the-token"}},
        {"json": {"token": ""}},
        {"json": {"token": 12345}},
        {"json": {}},
        {"json": ["token"]},
        {"data": {"token": "not-the-token"}},
        {"data": {"other": "x"}},
    ],
)
async def test_wrong_token_is_refused_without_a_cookie(site: Site, body: dict[str, Any]) -> None:
    status, answer, response = await site.request("POST", "/login", auth=False, **body)
    assert status in (401, 403)
    assert "Set-Cookie" not in response.headers
    if "json" in body:
        assert answer["error"] == "unauthorized"
    else:
        assert b'data-login-state="failed"' in answer


async def test_a_token_prefix_or_extension_is_not_the_token(site: Site) -> None:
    for guess in (site.token[:-1], site.token + "x", site.token.upper()):
        if guess == site.token:
            continue
        status, _, response = await site.request(
            "POST", "/login", auth=False, json={"token": guess}
        )
        assert status == 401 and "Set-Cookie" not in response.headers


async def test_login_refuses_a_large_body_with_json_413(site: Site) -> None:
    status, body, response = await site.request(
        "POST", "/login", auth=False, json={"token": "x" * (auth.LOGIN_BODY_LIMIT + 10)}
    )
    assert status == 413
    assert response.content_type == "application/json"
    assert body["error"] == "request_entity_too_large"


async def test_logout_expires_the_cookie(site: Site) -> None:
    status, body, response = await site.request(
        "POST", "/logout", auth=False, headers={"Accept": "application/json"}
    )
    assert status == 200 and body == {"ok": True}
    morsel = session_cookie_from(response)[SESSION_COOKIE]
    assert morsel.value == ""
    assert morsel["max-age"] == "0"


async def test_forged_foreign_and_stale_cookies_are_refused(site: Site) -> None:
    store = site.running.service.parts.store
    good = await login_cookie(site)
    forged = [
        flip_first(good),
        good[:-1],
        good + "A",
        await stored_session(store, "another-token"),
        await stored_session(store, site.token, lifetime=-40 * 24 * 3600),
        "garbage",
        "",
    ]
    for value in forged:
        status, _, _ = await site.request(
            "GET", "/api/downloads", auth=False, headers={"Cookie": f"{SESSION_COOKIE}={value}"}
        )
        assert status == 401, value
    status, _, _ = await site.request(
        "GET", "/api/downloads", auth=False, headers={"Cookie": f"{SESSION_COOKIE}={good}"}
    )
    assert status == 200


def _concrete(path: str) -> str:
    return re.sub(r"\{action[^}]*\}", "pause", re.sub(r"\{id[^}]*\}", "1", path)).replace("{", "")


async def test_every_api_route_and_the_websocket_need_authentication(site: Site) -> None:
    app = site.running.service.parts.web.app
    routes: set[tuple[str, str]] = {("GET", "/api/ws")}
    for route in app.router.routes():
        canonical = getattr(route.resource, "canonical", "")
        public = canonical in auth.PUBLIC_API_PATHS or route.method == "HEAD"
        if canonical.startswith("/api") and not public:
            routes.add((route.method, _concrete(canonical)))
    assert len(routes) >= 10
    cookie = await login_cookie(site)
    for method, path in sorted(routes):
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Bearer {site.token}x"},
            {"Cookie": f"{SESSION_COOKIE}=1.forged"},
        ):
            status, body, response = await site.request(method, path, auth=False, headers=headers)
            assert status == 401, (method, path, headers)
            assert body["error"] == "unauthorized"
            assert "WWW-Authenticate" in response.headers
        status, _, _ = await site.request(
            method, path, auth=False, headers={"Cookie": f"{SESSION_COOKIE}={cookie}"}
        )
        assert status != 401, (method, path)
    status, body, _ = await site.request("GET", "/api/health", auth=False)
    assert status == 200 and body["status"] == "ok"


# --- the player ---------------------------------------------------------------------------------


async def test_watch_page_plays_the_signed_stream(site: Site, file_server: FileServer) -> None:
    data = file_server.add_file("clip.mp4", size=300_000, seed=3)
    download = await site.add_and_complete(file_server.url("clip.mp4"))
    watch_path = download["watch_url"].split("://", 1)[1].split("/", 1)[1]
    status, body, response = await site.request("GET", "/" + watch_path, auth=False)
    assert status == 200
    assert response.content_type == "text/html"
    csp = csp_directives(response.headers["Content-Security-Policy"])
    assert csp["default-src"] == ["'none'"] and "script-src" not in csp
    assert csp["media-src"] == ["'self'"]
    html = body.decode()
    match = re.search(r'<video class="player" controls preload="metadata" src="([^"]+)"', html)
    assert match is not None
    source = match.group(1).replace("&amp;", "&")
    assert source.startswith(f"/stream/{download['id']}/clip.mp4?sig=")
    status, streamed, response = await site.request(
        "GET", source, auth=False, headers={"Range": "bytes=100-199"}
    )
    assert status == 206 and streamed == data[100:200]
    assert parse_markup(html).scripts == []


def _player_source(html: str) -> str:
    match = re.search(r'<(?:video|audio) class="player"[^>]* src="([^"]+)"', html)
    assert match is not None, html
    return match.group(1).replace("&amp;", "&")


async def test_a_reloaded_link_expiry_reaches_api_links_and_the_player(
    site: Site, file_server: FileServer
) -> None:
    data = file_server.add_file("later.mp4", size=50_000, seed=5)
    download = await site.add_and_complete(file_server.url("later.mp4"))
    assert "exp=" not in download["stream_url"] and "exp=" not in download["watch_url"]
    document = yaml.safe_load(site.running.config_path.read_text())
    document["web"]["link_expiry"] = 3600
    site.running.config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    status, answer, _ = await site.request("POST", "/api/config/reload")
    assert status == 200 and "web.link_expiry" in answer["applied"], answer

    status, fresh, _ = await site.request("GET", f"/api/downloads/{download['id']}")
    assert status == 200
    expiry = int(fresh["stream_url"].rsplit("exp=", 1)[1])
    assert time.time() + 3500 < expiry < time.time() + 3700
    assert fresh["watch_url"].endswith(f"exp={expiry}")
    watch_path = "/" + fresh["watch_url"].split("://", 1)[1].split("/", 1)[1]
    status, body, _ = await site.request("GET", watch_path, auth=False)
    assert status == 200
    source = _player_source(body.decode())
    assert source.startswith(f"/stream/{download['id']}/later.mp4?sig=")
    assert source.endswith(f"exp={expiry}")
    status, streamed, _ = await site.request("GET", source, auth=False)
    assert status == 200 and streamed == data


async def test_watch_page_refuses_bad_signatures(site: Site, file_server: FileServer) -> None:
    file_server.add_file("a.mp4", size=1000)
    file_server.add_file("b.mp4", size=1000, seed=1)
    first = await site.add_and_complete(file_server.url("a.mp4"))
    second = await site.add_and_complete(file_server.url("b.mp4"))
    good_query = first["watch_url"].split("?", 1)[1]
    sig = good_query.split("sig=", 1)[1].split("&", 1)[0]
    for path in (
        f"/watch/{first['id']}",
        f"/watch/{first['id']}?sig=",
        f"/watch/{first['id']}?sig={flip_first(sig)}",
        f"/watch/{second['id']}?{good_query}",
        f"/watch/{first['id']}?{good_query}&exp=1",
        f"/watch/{first['id']}/1?{good_query}",
    ):
        status, body, response = await site.request("GET", path, auth=False)
        assert status == 403, path
        assert response.content_type == "application/json"
        assert body["error"] == "forbidden"
    status, _, _ = await site.request("GET", f"/watch/999999?{good_query}", auth=False)
    assert status == 403
    ctx = site.running.service.parts.web.ctx
    assert ctx is not None
    status, body, _ = await site.request("GET", ctx.links.signer.watch_path(999999), auth=False)
    assert status == 404 and body["error"] == "not_found"


async def test_watch_page_picks_the_player_and_escapes_the_name(
    site: Site, file_server: FileServer
) -> None:
    file_server.add_file("song.mp3", size=5000)
    file_server.add_file("notes.zip", size=5000, seed=2)
    hostile = "x\"'><img src=x onerror=alert(1)>&amp;.mp4"
    file_server.add_file(hostile, size=5000, seed=4)
    audio = await site.add_and_complete(file_server.url("song.mp3"))
    archive = await site.add_and_complete(file_server.url("notes.zip"))
    named = await site.add_and_complete(file_server.url(hostile))
    assert named["file_name"] == hostile

    async def page_of(download: dict[str, Any], language: str = "en") -> str:
        path = "/" + download["watch_url"].split("://", 1)[1].split("/", 1)[1]
        status, body, _ = await site.request(
            "GET", path, auth=False, headers={"Accept-Language": language}
        )
        assert status == 200
        return str(body.decode())

    html = await page_of(audio)
    assert '<audio class="player"' in html and "<video" not in html
    html = await page_of(archive)
    assert "<audio" not in html and "<video" not in html
    assert translate("en", "watch.not_playable") in html
    assert 'class="download"' in html and "download=1" in html
    html = await page_of(archive, "zh-CN,zh;q=0.9")
    assert translate("zh", "watch.not_playable") in html and 'lang="zh"' in html
    html = await page_of(named)
    assert "<img" not in html and hostile not in html
    assert "x&quot;&#x27;&gt;&lt;img src=x onerror=alert(1)&gt;&amp;amp;.mp4" in html
    markup = parse_markup(html)
    assert markup.scripts == [] and markup.handlers == []
    assert '<video class="player"' in html


# --- the message catalogue ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "language"),
    [
        (None, "en"),
        ("", "en"),
        ("en", "en"),
        ("zh", "zh"),
        ("zh-hans", "zh"),
        ("zh_TW", "zh"),
        ("ZH-CN", "zh"),
        ("fr", "en"),
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh"),
        ("en-US,en;q=0.9,zh;q=0.8", "en"),
        ("fr-FR,zh;q=0.5,en;q=0.4", "zh"),
        ("zh;q=0,en", "en"),
        ("de;q=oops,zh", "zh"),
    ],
)
def test_language_for(code: str | None, language: str) -> None:
    assert language_for(code) == language


def test_translate_falls_back_and_fills_placeholders() -> None:
    assert translate("en", "status.completed") == "Completed"
    assert translate("zh", "status.completed") == "已完成"
    assert translate("fr", "status.completed") == "Completed"
    assert translate("en", "no.such.key") == "no.such.key"
    assert translate("en", "web.add.added", count=3) == "3 added."
    assert translate("zh", "web.add.added", count=3) == "已添加 3 个。"
    assert translate("en", "web.add.invalid", url="u") == "Not accepted: u — {reason}"
    assert set(catalogue()) >= {"en", "zh"}


@pytest.mark.slow
async def test_watch_each_file_of_a_multi_file_torrent(
    site: Site, tracker: Tracker, seeder_factory: SeederFactory, tmp_path: Path
) -> None:
    files = {"Season 1/ep 1.mp4": b"v" * 40_000, "notes.txt": b"n" * 1000}
    torrent = await asyncio.to_thread(
        make_torrent, files, tmp_path / "seed", tracker.announce_url, "pack"
    )
    await seeder_factory(torrent)
    form = aiohttp.FormData()
    form.add_field("file", torrent.torrent_bytes, filename="pack.torrent")
    status, body, _ = await site.request("POST", "/api/downloads/torrent", data=form)
    assert status == 201, body
    download = await site.running.wait_download(
        body["downloads"][0]["id"], ["completed"], timeout=60
    )
    download_id = download["id"]
    assert download["watch_url"] is None and len(download["files"]) == 2
    ctx = site.running.service.parts.web.ctx
    assert ctx is not None
    # The whole download holds several files: the player points to them, it plays none.
    status, page_body, _ = await site.request(
        "GET", ctx.links.signer.watch_path(download_id), auth=False
    )
    assert status == 200
    assert translate("en", "watch.several_files").encode() in page_body
    assert b"<video" not in page_body
    for entry in download["files"]:
        name = entry["path"].rsplit("/", 1)[-1]
        path = ctx.links.signer.watch_path(download_id, entry["index"])
        status, page_body, _ = await site.request("GET", path, auth=False)
        assert status == 200
        html = page_body.decode()
        match = re.search(r'src="([^"]+)"', html)
        if name.endswith(".mp4"):
            assert match is not None and "<video" in html
            source = match.group(1).replace("&amp;", "&")
            assert source.startswith(f"/stream/{download_id}/{entry['index']}/")
            status, streamed, _ = await site.request("GET", source, auth=False)
            assert status == 200 and streamed == files["Season 1/ep 1.mp4"]
        else:
            assert match is None and translate("en", "watch.not_playable") in html
        # A file index signed for another file is refused.
        other = ctx.links.signer.watch_path(download_id, 1 - entry["index"]).split("?", 1)[1]
        status, _, _ = await site.request(
            "GET", f"/watch/{download_id}/{entry['index']}?{other}", auth=False
        )
        assert status == 403


# --- the listener -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "origin_host", "family"),
    [
        ("127.0.0.1", "127.0.0.1", socket.AF_INET),
        ("::1", "[::1]", socket.AF_INET6),
        ("0.0.0.0", "127.0.0.1", socket.AF_INET),
        ("::", "[::1]", socket.AF_INET6),
    ],
)
def test_listener_binds_at_construction_and_names_its_loopback(
    host: str, origin_host: str, family: socket.AddressFamily
) -> None:
    listener = Listener(host, 0)
    try:
        assert listener.port > 0
        assert [s.family for s in listener.sockets] == [family]
        assert listener.loopback_origin == f"http://{origin_host}:{listener.port}"
        # Connections are accepted into the backlog before any application serves them.
        address = "::1" if family == socket.AF_INET6 else "127.0.0.1"
        with socket.create_connection((address, listener.port), timeout=5):
            pass
    finally:
        listener.close()
    with pytest.raises(OSError):
        socket.create_connection((address, listener.port), timeout=5).close()


def test_listener_on_a_taken_port_fails_and_holds_nothing() -> None:
    first = Listener("127.0.0.1", 0)
    try:
        with pytest.raises(OSError):
            Listener("127.0.0.1", first.port)
    finally:
        first.close()
    Listener("127.0.0.1", first.port).close()  # the port is free again


async def test_a_second_server_serves_the_same_context_on_ipv6(site: Site) -> None:
    ctx = site.running.service.parts.web.ctx
    assert ctx is not None
    server = WebServer(ctx, Listener("::1", 0))
    url = f"http://[::1]:{server.port}/api/downloads"
    await server.start()
    try:
        async with site.http.get(url, headers=site.auth) as response:
            assert response.status == 200
            assert (await response.json())["downloads"] == []
    finally:
        await server.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with site.http.get(url, headers=site.auth):
            pass
