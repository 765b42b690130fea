"""The web's defences, each against a real service: another site's page using the session cookie
(forged requests, WebSocket hijacking), sessions kept and ended on the server, passwords inside
URL values, token guessing, malformed credentials and bodies, slow and greedy clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from loguru import logger

from configer import ConfigError, load_config, masked_settings
from tests.support.cluster import node_overrides
from tests.support.http_files import FileServer
from tests.support.processes import free_port
from tests.support.service import RunningService, ServiceFactory, service_config
from tests.support.sessions import cookie_header, stored_session
from tests.test_browser import CHROMIUM, chromium, sign_in
from tests.test_web_page import Site, serve_site, session_cookie_from
from webstreamer.routes.ws import WS_SETTINGS, WsSettings
from webstreamer.server import Listener, WebServer
from webstreamer.signing import SESSION_COOKIE, new_session_secret

WAIT = 30.0


@pytest.fixture
async def site(service_factory: ServiceFactory) -> AsyncIterator[Site]:
    running = await service_factory()
    async with serve_site(running) as served:
        yield served


@contextlib.asynccontextmanager
async def site_with(
    service_factory: ServiceFactory, overrides: dict[str, Any], name: str = "svc"
) -> AsyncIterator[Site]:
    running = await service_factory(overrides, name=name)
    async with serve_site(running) as served:
        yield served


def page_headers(site: Site) -> dict[str, str]:
    """What the dashboard's own script sends with a change: its origin and a JSON type."""
    return {"Origin": site.base_url, "Content-Type": "application/json"}


async def cookie_of(site: Site, **headers: str) -> dict[str, str]:
    status, _, response = await site.request(
        "POST", "/login", auth=False, json={"token": site.token}, headers=headers
    )
    assert status == 200
    return cookie_header(session_cookie_from(response)[SESSION_COOKIE].value)


async def row_count(site: Site) -> int:
    return len(await site.running.service.parts.store.fetch_recent_downloads(limit=-1))


class Lines:
    """Every log line (message and bound values) written while it is open."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._sink: int | None = None

    def __enter__(self) -> Lines:
        # Added after the service started: the service replaces every sink when it starts.
        self._sink = logger.add(
            self.lines.append, level="DEBUG", format="{level} {message} {extra} {exception}"
        )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._sink is not None
        logger.remove(self._sink)

    def warnings(self, pattern: str) -> list[str]:
        return [line for line in self.lines if line.startswith("WARNING") and pattern in line]


async def exchange(
    port: int, head: bytes, body: bytes = b"", *, timeout: float = 15
) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP/1.1 request (request line and headers as bytes, exactly as given):
    (status, lower-cased headers, body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = head.rstrip(b"\r\n") + b"\r\nConnection: close"
        if body:
            lines += b"\r\nContent-Length: " + str(len(body)).encode()
        writer.write(lines + b"\r\n\r\n" + body)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    raw_head, _, answer = data.partition(b"\r\n\r\n")
    status_line, *header_lines = raw_head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers, answer


# --- forged requests ----------------------------------------------------------------------------


@pytest.mark.attack(
    "cross-site request forgery with the session cookie (text/plain form, no-cors fetch, "
    "another port's page)",
    promise="403 naming what was missing; nothing is added",
)
async def test_a_foreign_page_cannot_add_downloads_with_the_cookie(
    site: Site, file_server: FileServer
) -> None:
    cookie = await cookie_of(site)
    for name in ("forged.bin", "page.bin", "metadata.bin", "bearer.bin"):
        file_server.add_file(name, data=b"x" * 1000)
    forged_body = json.dumps({"url": file_server.url("forged.bin")}).encode()
    ours = site.base_url
    another_port = f"http://127.0.0.1:{free_port()}"
    forged: dict[str, tuple[dict[str, str], str]] = {
        "text/plain form": ({"Content-Type": "text/plain", "Origin": ours}, "Content-Type"),
        "urlencoded form": (
            {"Content-Type": "application/x-www-form-urlencoded", "Origin": ours},
            "Content-Type",
        ),
        "multipart form": (
            {"Content-Type": "multipart/form-data; boundary=x", "Origin": ours},
            "Content-Type",
        ),
        "no type": ({"Content-Type": "application/octet-stream", "Origin": ours}, "Content-Type"),
        "another port's page": (
            {"Content-Type": "application/json", "Origin": another_port},
            "Origin",
        ),
        "another host's page": (
            {"Content-Type": "application/json", "Origin": "http://evil.test"},
            "Origin",
        ),
        "a sandboxed page": ({"Content-Type": "application/json", "Origin": "null"}, "Origin"),
        "no origin": ({"Content-Type": "application/json"}, "Origin"),
        "cross-site fetch": (
            {"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
            "Origin",
        ),
        "same-site fetch": (
            {"Content-Type": "application/json", "Sec-Fetch-Site": "same-site"},
            "Origin",
        ),
    }
    for label, (headers, named) in forged.items():
        status, answer, response = await site.request(
            "POST", "/api/downloads", auth=False, data=forged_body, headers={**cookie, **headers}
        )
        assert status == 403, (label, status, answer)
        assert response.content_type == "application/json"
        assert answer["error"] == "forbidden" and named in answer["detail"], (label, answer)
    assert await row_count(site) == 0
    # The dashboard's own requests: JSON from its origin, or fetch metadata saying so.
    status, answer, _ = await site.request(
        "POST",
        "/api/downloads",
        auth=False,
        json={"url": file_server.url("page.bin")},
        headers={**cookie, "Origin": ours},
    )
    assert status == 201, answer
    status, answer, _ = await site.request(
        "POST",
        "/api/downloads",
        auth=False,
        json={"url": file_server.url("metadata.bin")},
        headers={**cookie, "Sec-Fetch-Site": "same-origin"},
    )
    assert status == 201, answer
    # A bearer token is no cookie a browser sends on its own: neither check applies.
    status, answer, _ = await site.request(
        "POST",
        "/api/downloads",
        data=json.dumps({"url": file_server.url("bearer.bin")}).encode(),
        headers={"Content-Type": "text/plain", "Origin": "http://evil.test"},
    )
    assert status == 201, answer
    assert await row_count(site) == 3


def _concrete(canonical: str) -> str:
    """A path a route matches: ids 1, an action its first choice."""
    path = re.sub(r"\{action:([a-z-]+)[^}]*\}", r"\1", canonical)
    return re.sub(r"\{[^}]+\}", "1", path)


async def test_every_state_changing_route_checks_where_a_cookie_request_comes_from(
    site: Site,
) -> None:
    app = site.running.service.parts.web.app
    routes = sorted(
        {
            (route.method, _concrete(route.resource.canonical))
            for route in app.router.routes()
            if route.resource is not None
            and route.method in ("POST", "PUT", "PATCH", "DELETE")
            and (
                route.resource.canonical.startswith("/api/")
                or route.resource.canonical == "/logout"
            )
        }
    )
    assert ("POST", "/logout") in routes and ("POST", "/api/sessions/revoke-all") in routes
    assert len(routes) >= 8, routes
    cookie = await cookie_of(site)
    for method, path in routes:
        for headers in (
            {"Content-Type": "application/json"},
            {"Content-Type": "application/json", "Origin": "http://evil.test"},
            {"Content-Type": "text/plain", "Origin": site.base_url},
        ):
            status, answer, _ = await site.request(
                method, path, auth=False, data=b"{}", headers={**cookie, **headers}
            )
            assert status == 403, (method, path, headers, status, answer)
            assert answer["error"] == "forbidden"
    # Nothing above ended the session (sign-out and sign-out-everywhere were refused too).
    status, _, _ = await site.request("GET", "/api/downloads", auth=False, headers=cookie)
    assert status == 200


@pytest.mark.attack(
    "cross-site WebSocket hijacking with the session cookie",
    promise="the upgrade is refused (403) unless it comes from the dashboard's own origin",
)
async def test_the_websocket_opens_with_the_cookie_only_from_the_page_itself(site: Site) -> None:
    cookie = await cookie_of(site)
    for headers in (
        {},
        {"Origin": "http://evil.test"},
        {"Origin": f"http://127.0.0.1:{free_port()}"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await site.http.ws_connect(site.ws_url, headers={**cookie, **headers})
        assert refused.value.status == 403, headers
    for headers in ({**cookie, "Origin": site.base_url}, site.auth):
        ws = await site.http.ws_connect(site.ws_url, headers=headers)
        try:
            message = await ws.receive(timeout=10)
            assert json.loads(message.data)["type"] == "hello"
        finally:
            await ws.close()


# --- sessions on the server ---------------------------------------------------------------------


@pytest.mark.attack(
    "replaying a session cookie after signing out",
    promise="the old cookie gets 401; other sessions go on",
)
async def test_signing_out_ends_the_session_on_the_server(site: Site) -> None:
    first, second = await cookie_of(site), await cookie_of(site)
    status, _, _ = await site.request("GET", "/api/downloads", auth=False, headers=first)
    assert status == 200
    status, body, response = await site.request(
        "POST",
        "/logout",
        auth=False,
        headers={**first, **page_headers(site), "Accept": "application/json"},
    )
    assert status == 200 and body == {"ok": True}
    assert session_cookie_from(response)[SESSION_COOKIE].value == ""
    status, body, _ = await site.request("GET", "/api/downloads", auth=False, headers=first)
    assert status == 401 and body["error"] == "unauthorized"
    status, _, _ = await site.request("GET", "/api/downloads", auth=False, headers=second)
    assert status == 200


async def test_sessions_are_listed_without_their_secret(site: Site) -> None:
    cookie = await cookie_of(site, **{"User-Agent": "Hostile Browser/1.0"})
    secret = cookie["Cookie"].split("=", 1)[1]
    status, body, _ = await site.request("GET", "/api/sessions", auth=False, headers=cookie)
    assert status == 200, body
    [shown] = body["sessions"]
    assert shown["current"] is True
    assert shown["address"] == "127.0.0.1"
    assert shown["user_agent"] == "Hostile Browser/1.0"
    assert shown["created_at"] and shown["last_used_at"] and len(shown["id"]) >= 8
    store = site.running.service.parts.store
    [stored] = await store.list_web_sessions()
    text = json.dumps(body)
    assert secret not in text and stored.token_hash not in text
    assert secret not in stored.token_hash
    expires = datetime.fromisoformat(stored.expires_at) - datetime.now(UTC)
    assert timedelta(days=29, hours=23) < expires <= timedelta(days=30)
    # Nothing the service wrote to its data folder holds the secret.
    data_dir = site.running.config.data_dir
    written = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    assert secret.encode() not in written
    status, body, _ = await site.request("GET", "/api/sessions")
    assert status == 200 and [s["current"] for s in body["sessions"]] == [False]


@pytest.mark.attack(
    "a stolen session cookie after 'sign out everywhere'",
    promise="every session ends (401), whether asked with a bearer token or a cookie",
)
async def test_signing_out_everywhere_ends_every_session(site: Site) -> None:
    first, second = await cookie_of(site), await cookie_of(site)
    status, body, _ = await site.request("POST", "/api/sessions/revoke-all")
    assert status == 200 and body == {"revoked": 2}
    for cookie in (first, second):
        status, _, _ = await site.request("GET", "/api/downloads", auth=False, headers=cookie)
        assert status == 401
    third, fourth = await cookie_of(site), await cookie_of(site)
    status, body, response = await site.request(
        "POST", "/api/sessions/revoke-all", auth=False, headers={**third, **page_headers(site)}
    )
    assert status == 200 and body == {"revoked": 2}
    assert session_cookie_from(response)[SESSION_COOKIE].value == ""
    for cookie in (third, fourth):
        status, _, _ = await site.request("GET", "/api/sessions", auth=False, headers=cookie)
        assert status == 401
    status, body, _ = await site.request("GET", "/api/sessions")
    assert body == {"sessions": []}


async def test_an_open_websocket_closes_once_its_session_has_ended(site: Site) -> None:
    server = WebServer(site.running.service.parts.web.ctx, Listener("127.0.0.1", 0))
    server.app[WS_SETTINGS] = WsSettings(session_check_interval=0.2)
    await server.start()
    try:
        origin = f"http://127.0.0.1:{server.port}"
        url = origin.replace("http://", "ws://") + "/api/ws"
        cookie = await cookie_of(site)
        by_cookie = await site.http.ws_connect(url, headers={**cookie, "Origin": origin})
        by_token = await site.http.ws_connect(url, headers=site.auth)
        for ws in (by_cookie, by_token):
            assert json.loads((await ws.receive(timeout=10)).data)["type"] == "hello"
        status, body, _ = await site.request("POST", "/api/sessions/revoke-all")
        assert status == 200 and body == {"revoked": 1}
        message = await by_cookie.receive(timeout=10)
        assert message.type == aiohttp.WSMsgType.CLOSE, message
        assert by_cookie.close_code == aiohttp.WSCloseCode.POLICY_VIOLATION
        await by_token.send_str("ping")
        assert json.loads((await by_token.receive(timeout=10)).data)["type"] == "pong"
        await by_token.close()
    finally:
        await server.stop()


async def test_unknown_expired_and_revoked_sessions_are_refused(site: Site) -> None:
    store = site.running.service.parts.store
    token = site.token
    refused = {
        "never stored": new_session_secret(),
        "expired": await stored_session(store, token, lifetime=-1),
        "revoked": await stored_session(store, token, revoked=True),
        "made for another web token": await stored_session(store, token + "-before"),
        "not a secret of ours": "1.forged",
    }
    for label, secret in refused.items():
        status, _, _ = await site.request(
            "GET", "/api/downloads", auth=False, headers=cookie_header(secret)
        )
        assert status == 401, label
    good = await stored_session(store, token)
    status, _, _ = await site.request(
        "GET", "/api/downloads", auth=False, headers=cookie_header(good)
    )
    assert status == 200


async def test_a_new_web_token_ends_every_session(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    path = service_config(tmp_path / "svc", {"web": {"token": "first-token-0123456789abcdef"}})
    running = await service_factory(config_path=path)
    async with serve_site(running) as site:
        cookie = await cookie_of(site)
    await running.stop()
    document = yaml.safe_load(path.read_text())
    document["web"]["token"] = "second-token-0123456789abcdef"
    path.write_text(yaml.safe_dump(document))
    again = await service_factory(config_path=path)
    async with serve_site(again) as site:
        status, _, _ = await site.request("GET", "/api/downloads", auth=False, headers=cookie)
        assert status == 401
        status, _, _ = await site.request(
            "GET", "/api/downloads", auth=False, headers=await cookie_of(site)
        )
        assert status == 200


@pytest.mark.slow
async def test_a_session_works_on_every_node_and_ends_on_every_node(
    service_factory: ServiceFactory, postgres_url: str
) -> None:
    nodes: list[RunningService] = []
    for name in ("node-a", "node-b"):
        overrides = node_overrides(name, free_port(), postgres_url, telegram=False)
        nodes.append(await service_factory(overrides, name=name))
    async with serve_site(nodes[0]) as a, serve_site(nodes[1]) as b:
        cookie = await cookie_of(a)
        for site in (a, b):
            status, _, _ = await site.request("GET", "/api/downloads", auth=False, headers=cookie)
            assert status == 200, site.base_url
        status, _, _ = await b.request(
            "POST", "/logout", auth=False, headers={**cookie, **page_headers(b)}
        )
        assert status in (200, 303)
        for site in (a, b):
            status, _, _ = await site.request("GET", "/api/downloads", auth=False, headers=cookie)
            assert status == 401, site.base_url


# --- passwords inside values --------------------------------------------------------------------


def test_masked_settings_hide_the_password_of_every_url(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "aria2": {
                    "options": {
                        "all-proxy": "http://user:PROXYPASS@proxy.example:3128",
                        "ftp-proxy": "socks5://u:p%40ss@127.0.0.1:1080/",
                    }
                },
                "web": {"public_url": "https://relay.example"},
            }
        )
    )
    settings = masked_settings(load_config(path, env={}))
    options = json.loads(settings["aria2.options"])
    assert options["all-proxy"] == "http://user:***@proxy.example:3128"
    assert options["ftp-proxy"] == "socks5://u:***@127.0.0.1:1080/"
    assert "PROXYPASS" not in json.dumps(settings) and "p%40ss" not in json.dumps(settings)
    assert settings["web.public_url"] == "https://relay.example"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("header_timeout", 0),
        ("header_timeout", "soon"),
        ("max_connections_per_client", 0),
        ("login_attempts", -1),
        ("login_attempts", 2.5),
    ],
)
def test_the_web_limits_refuse_values_that_make_no_sense(
    tmp_path: Path, key: str, value: object
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"web": {key: value}}))
    with pytest.raises(ConfigError) as refused:
        load_config(path, env={})
    assert refused.value.key == f"web.{key}"


@pytest.fixture
async def basic_auth_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A server that gives `/secret.bin` only to user `fetcher` with password `LINKPASS`; its
    origin and the Authorization headers it saw."""
    seen: list[str] = []
    expected = "Basic " + base64.b64encode(b"fetcher:LINKPASS-9f1c").decode()

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != expected:
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="x"'})
        return web.Response(body=b"guarded bytes " * 100)

    app = web.Application()
    app.router.add_get("/secret.bin", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        await runner.cleanup()


@pytest.mark.attack(
    "reading a link's or a proxy's password from the API, the WebSocket or the log",
    promise="shown as *** everywhere; the store keeps it and the download uses it",
)
async def test_passwords_in_urls_never_reach_answers_or_logs(
    service_factory: ServiceFactory, basic_auth_server: tuple[str, list[str]]
) -> None:
    origin, seen = basic_auth_server
    overrides = {"aria2": {"options": {"ftp-proxy": "http://proxy:PROXYPASS-51d2@127.0.0.1:9/"}}}
    async with site_with(service_factory, overrides) as site:
        ws = await site.http.ws_connect(site.ws_url, headers=site.auth)
        pushed: list[str] = []
        with Lines() as log:
            url = f"http://fetcher:LINKPASS-9f1c@{origin}/secret.bin"
            status, added, _ = await site.request("POST", "/api/downloads", json={"url": url})
            assert status == 201, added
            download_id = added["downloads"][0]["id"]
            row = await site.running.wait_download(download_id, {"completed", "failed"}, WAIT)
            assert row["status"] == "completed", row
            answers = [json.dumps(added), json.dumps(row)]
            for path in ("/api/downloads", "/api/downloads?grouped=true", "/api/config"):
                status, body, _ = await site.request("GET", path)
                assert status == 200
                answers.append(json.dumps(body))
            options = json.loads(body["settings"]["aria2.options"])
            with contextlib.suppress(TimeoutError):
                while (message := await ws.receive(timeout=1)).type == aiohttp.WSMsgType.TEXT:
                    pushed.append(str(message.data))
            await ws.close()
        stored = await site.running.service.parts.store.get_download_by_id(download_id)
        aria2_log = site.running.config.data_dir / "aria2.log"
        aria2_text = aria2_log.read_text(errors="replace") if aria2_log.exists() else ""
    assert stored is not None and stored.source_url == url  # kept for the download itself
    assert seen  # the guarded server was asked (and answered only to the right password)
    assert row["source_url"] == f"http://fetcher:***@{origin}/secret.bin"
    assert any('"download_update"' in m and "fetcher:***@" in m for m in pushed), pushed[:3]
    everything = {
        "answers": "\n".join(answers),
        "pushes": "\n".join(pushed),
        "service log": "\n".join(log.lines),
        "aria2's log": aria2_text,
    }
    assert any(f"download {download_id} completed" in line for line in log.lines)
    for where, text in everything.items():
        for password in ("LINKPASS-9f1c", "PROXYPASS-51d2"):
            assert password not in text, f"{password} in {where}"
    assert options["ftp-proxy"] == "http://proxy:***@127.0.0.1:9/"


# --- guessing the token -------------------------------------------------------------------------


@pytest.mark.attack(
    "guessing the web token at full speed",
    promise="429 with Retry-After after web.login_attempts failures a minute, per client; "
    "one warning line per client a minute",
)
async def test_failed_sign_ins_are_limited_per_client_and_logged_as_a_summary(
    service_factory: ServiceFactory,
) -> None:
    async with site_with(service_factory, {"web": {"login_attempts": 5}}) as site:
        with Lines() as log:
            for _ in range(5):
                status, _, _ = await site.request(
                    "POST", "/login", auth=False, json={"token": "guess"}
                )
                assert status == 401
            for token in ["guess"] * 30 + [site.token]:
                status, body, response = await site.request(
                    "POST", "/login", auth=False, json={"token": token}
                )
                assert status == 429, (token == site.token, status)
                assert body["error"] == "too_many_requests"
                assert 1 <= int(response.headers["Retry-After"]) <= 60
                assert "Set-Cookie" not in response.headers
            # Another client is not held up by this one.
            connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with aiohttp.ClientSession(connector=connector) as elsewhere:
                async with elsewhere.post(
                    site.base_url + "/login", json={"token": "guess"}
                ) as response:
                    assert response.status == 401
                async with elsewhere.post(
                    site.base_url + "/login", json={"token": site.token}
                ) as response:
                    assert response.status == 200
            during = log.warnings("sign-in")
            await site.running.stop()  # reports what is still counted
        summaries = log.warnings("sign-in")
    assert len(during) <= 2, during
    counts = [
        int(m.group(1))
        for line in summaries
        if (m := re.search(r"(\d+) dashboard sign-in\(s\) refused for 127\.0\.0\.1\b", line))
    ]
    assert sum(counts) == 5 + 31, summaries
    assert len(summaries) <= 3, summaries


# --- malformed input ----------------------------------------------------------------------------


def _utf8(text: str) -> str:
    """`text`'s UTF-8 bytes as latin-1 characters, to put raw into a request head."""
    return text.encode().decode("latin-1")


@pytest.mark.attack(
    "malformed signatures, cookies, tokens, ids and JSON bodies (non-ASCII, 100k deep, "
    "100k digits, lone surrogates)",
    promise="a 4xx JSON error naming what was wrong, never a 500",
)
async def test_malformed_credentials_and_bodies_get_a_4xx_json_error(site: Site) -> None:
    port = site.running.service.parts.web.port
    bearer = f"Authorization: Bearer {site.token}"
    deep = b"[" * 100_000 + b"]" * 100_000
    deep_object = b'{"url": ' * 50_000 + b"1" + b"}" * 50_000
    digits = b'{"url": ' + b"7" * 100_000 + b"}"
    login_digits = b'{"token": ' + b"7" * 5000 + b"}"
    fresh = int(time.time())  # a cookie that looks freshly issued, with a non-ASCII rest
    cases: list[tuple[str, list[str], bytes, int, str]] = [
        ("GET /stream/1/x?sig=%C3%A9", [], b"", 403, "signature"),
        ("GET /stream/1/0/x?sig=%E2%82%AC&exp=1", [], b"", 403, "signature"),
        ("GET /watch/1?sig=abc&exp=%D9%A1%D9%A2", [], b"", 403, "signature"),
        ("GET /api/downloads", [f"Cookie: {SESSION_COOKIE}={_utf8('séssion')}"], b"", 401, ""),
        ("GET /api/downloads", [f"Cookie: {SESSION_COOKIE}={fresh}.{_utf8('mäc')}"], b"", 401, ""),
        ("GET /api/downloads", [f"Cookie: {SESSION_COOKIE}={'x' * 4000}"], b"", 401, ""),
        ("GET /api/downloads", [_utf8("Authorization: Bearer jeton-é")], b"", 401, ""),
        ("GET /api/downloads", ["Authorization: Bearer \x85\xff"], b"", 401, ""),
        ("GET /api/downloads/%C2%B2", [bearer], b"", 404, ""),
        ("POST /api/uploads/%C2%B9/retry", [bearer], b"", 404, ""),
        ("POST /api/downloads", [bearer, "Content-Type: application/json"], deep, 400, "nests"),
        (
            "POST /api/downloads",
            [bearer, "Content-Type: application/json"],
            deep_object,
            400,
            "nests",
        ),
        ("DELETE /api/downloads", [bearer, "Content-Type: application/json"], deep, 400, "nests"),
        ("POST /api/downloads", [bearer, "Content-Type: application/json"], digits, 400, "digits"),
        (
            "POST /api/downloads",
            [bearer, "Content-Type: application/json"],
            b'{"url": "http://127.0.0.1:1/\\ud800.bin"}',
            400,
            "surrogate",
        ),
        (
            "POST /api/downloads",
            [bearer, "Content-Type: application/json"],
            b'{"urls": ["http://127.0.0.1:1/a", "\\udfff"]}',
            400,
            "surrogate",
        ),
        (
            "POST /api/downloads",
            [bearer, "Content-Type: application/json"],
            b'{"\\ud83d": 1}',
            400,
            "surrogate",
        ),
        (
            "POST /api/downloads",
            [bearer, "Content-Type: application/json; charset=no-such"],
            b'{"url": 5}',
            400,
            "",
        ),
        (
            "POST /api/downloads",
            [bearer, "Content-Type: application/json"],
            b"\xff\xfe{}",
            400,
            "UTF-8",
        ),
        ("POST /login", ["Content-Type: application/json"], b"[" * 8000, 400, "nests"),
        ("POST /login", ["Content-Type: application/json"], login_digits, 400, "digits"),
        (
            "POST /login",
            ["Content-Type: application/json"],
            b'{"token": "\\udc80"}',
            400,
            "surrogate",
        ),
    ]
    for target, headers, body, expected, named in cases:
        head = "\r\n".join([f"{target} HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers])
        status, answer_headers, answer = await exchange(port, head.encode("latin-1"), body)
        label = (target, headers[-1:] if headers else None, body[:30])
        assert status == expected, (label, status, answer[:300])
        assert answer_headers.get("content-type", "").startswith("application/json"), label
        document = json.loads(answer)
        assert document["error"], label
        assert named in json.dumps(document["detail"]), (label, document)
    assert await row_count(site) == 0


# --- slow and greedy clients --------------------------------------------------------------------


async def _closed(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, send: bool
) -> bool:
    """Whether the server has closed this connection; with `send`, after one more header byte."""
    try:
        if send:
            writer.write(b"a")
            await writer.drain()
        return await asyncio.wait_for(reader.read(1024), 0.05) == b""
    except TimeoutError:
        return False
    except (ConnectionError, OSError):
        return True


@pytest.mark.attack(
    "20 slowloris connections sending a header byte a second",
    promise="each closed within web.header_timeout (+ a margin); /api/health keeps answering",
)
async def test_slow_headers_are_cut_off_while_the_api_keeps_answering(
    service_factory: ServiceFactory,
) -> None:
    header_timeout = 2.0
    async with site_with(service_factory, {"web": {"header_timeout": header_timeout}}) as site:
        port = site.running.service.parts.web.port
        slow = []
        for number in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow-{number}: ".encode())
            slow.append((reader, writer))
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        deadline = time.monotonic() + header_timeout + 6.0
        open_slow, open_idle = set(range(len(slow))), set(range(len(idle)))
        health: list[int] = []
        try:
            while (open_slow or open_idle) and time.monotonic() < deadline:
                for index in list(open_slow):
                    if await _closed(*slow[index], send=True):
                        open_slow.discard(index)
                for index in list(open_idle):
                    if await _closed(*idle[index], send=False):
                        open_idle.discard(index)
                async with site.http.get(site.base_url + "/api/health") as response:
                    health.append(response.status)
                await asyncio.sleep(1.0)
        finally:
            for _reader, writer in slow + idle:
                writer.close()
    assert open_slow == set(), f"{len(open_slow)} slow connections still open"
    assert open_idle == set(), f"{len(open_idle)} idle connections still open"
    assert health and set(health) == {200}, health


async def _refused(port: int) -> tuple[int, dict[str, str], bytes]:
    """What the server says to a connection it does not take: it answers before any request."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        data = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split(" ")[1]), headers, body


@pytest.mark.attack(
    "one client opening connections without end",
    promise="beyond web.max_connections_per_client each is answered 503 JSON and closed; other "
    "clients are served",
)
async def test_one_client_holds_at_most_its_cap_of_connections(
    service_factory: ServiceFactory,
) -> None:
    cap = 8
    overrides = {"web": {"max_connections_per_client": cap, "header_timeout": 60}}
    async with site_with(service_factory, overrides) as site:
        port = site.running.service.parts.web.port
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        try:
            status, headers, body = await _refused(port)
            assert status == 503
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["error"] == "too_many_connections"
            # Another address is another client.
            connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
            async with (
                aiohttp.ClientSession(connector=connector) as elsewhere,
                elsewhere.get(site.base_url + "/api/health") as response,
            ):
                assert response.status == 200
            # One closed: this client may connect again.
            _reader, writer = held.pop()
            writer.close()
            await writer.wait_closed()
            answered = 0
            for _ in range(50):
                with contextlib.suppress(ConnectionError):
                    answered, _, _ = await exchange(port, b"GET /api/health HTTP/1.1\r\nHost: x")
                if answered == 200:
                    break
                await asyncio.sleep(0.1)
            assert answered == 200
        finally:
            for _reader, writer in held:
                writer.close()


# --- the page -----------------------------------------------------------------------------------


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)
async def test_the_page_changes_things_and_signs_out_here_and_everywhere(
    site: Site, file_server: FileServer, tmp_path: Path
) -> None:
    file_server.add_file("held.bin", size=4 * 1024 * 1024)
    status, added, _ = await site.request(
        "POST", "/api/downloads", json={"url": file_server.url("held.bin", route="slow", rate=4096)}
    )
    assert status == 201, added
    download_id = added["downloads"][0]["id"]
    await site.running.wait_download(download_id, {"downloading"}, WAIT)
    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        await page.send("Page.enable")
        await sign_in(page, site.base_url, site.token)
        # A change without a body, as the page's buttons send it, passes the forgery checks.
        paused = await page.evaluate(
            "import('/static/js/api.js').then((m) =>"
            f" m.api('POST', '/api/downloads/{download_id}/pause')).then((row) => row.status)"
        )
        assert paused == "paused"
        other = await cookie_of(site)
        status, body, _ = await site.request("GET", "/api/sessions")
        assert len(body["sessions"]) == 2
        await page.evaluate("document.getElementById('logout-all').click()")
        await page.wait_for(
            "!document.getElementById('login-view').hidden", 10, "the sign-in form again"
        )
        status, body, _ = await site.request("GET", "/api/sessions")
        assert body == {"sessions": []}
        status, _, _ = await site.request("GET", "/api/downloads", auth=False, headers=other)
        assert status == 401
        # Signed in again, then out: the server forgets this session too.
        await sign_in(page, site.base_url, site.token)
        status, body, _ = await site.request("GET", "/api/sessions")
        assert len(body["sessions"]) == 1
        await page.evaluate("document.getElementById('logout').click()")
        await page.wait_for(
            "!document.getElementById('login-view').hidden", 10, "the sign-in form again"
        )
        deadline = time.monotonic() + 10
        while body["sessions"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            status, body, _ = await site.request("GET", "/api/sessions")
        assert body == {"sessions": []}
