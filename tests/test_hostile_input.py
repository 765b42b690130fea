"""Hostile input against a real MistRelay: no token, forged links, path traversal, secrets in
answers and logs, random JSON bodies, and file names built to escape or deceive.

Most tests run an in-process service (its own aria2c, SQLite file and web server); the secrets
test runs the service as a separate process so that every line it prints is captured.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import secrets
import signal
import time
import unicodedata
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

from tests.support.fake_telegram import FakeTelegram
from tests.support.http_files import FileServer
from tests.support.service import RunningService, ServiceFactory
from tests.support.service_process import (
    ServiceProcessFactory,
    wait_until,
)
from tests.support.sessions import cookie_header, stored_session
from webstreamer.routes.auth import PUBLIC_API_PATHS
from webstreamer.signing import SESSION_COOKIE, new_session_secret

# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class RawAnswer:
    status: int
    headers: str
    body: bytes


async def raw_request(
    port: int, method: str, target: str, headers: dict[str, str] | None = None
) -> RawAnswer:
    """One HTTP/1.1 request with the target sent exactly as given (no client normalisation of
    `..`, percent-escapes or NUL escapes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=15)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    status = int(status_line.split(" ")[1]) if status_line.startswith("HTTP/") else 0
    return RawAnswer(status, head.decode("latin-1"), body)


def route_table(svc: RunningService) -> list[tuple[str, str, Any]]:
    """(method, canonical path, resource) of every route the running app serves."""
    table = []
    for route in svc.service.parts.web.app.router.routes():
        resource = route.resource
        if resource is None:
            continue
        table.append((route.method, resource.canonical, resource))
    return table


_PARAM = re.compile(r"\{([^}:]+)\}")
# Values tried for a route's parameters, in order: the first that the route accepts is used.
_CANDIDATES = ("1", "pause", "retry", "file.bin", "app.js", "0")


def fill_route(canonical: str, resource: Any, values: dict[str, str] | None = None) -> str | None:
    """A concrete path the resource matches, its parameters filled from `values` or guessed."""
    names = _PARAM.findall(canonical)
    free = [n for n in names if not (values and n in values)]
    pattern = resource.get_info().get("pattern")
    for combination in itertools.product(_CANDIDATES, repeat=len(free)):
        chosen = {**(values or {}), **dict(zip(free, combination, strict=True))}
        path = _PARAM.sub(lambda m, c=chosen: c[m.group(1)], canonical)  # type: ignore[misc]
        if pattern is None or pattern.fullmatch(path):
            return path
    return None


async def completed_download(
    svc: RunningService, file_server: FileServer, name: str, data: bytes
) -> dict[str, Any]:
    file_server.add_file(name, data=data)
    status, body = await svc.api("POST", "/api/downloads", json={"url": file_server.url(name)})
    assert status == 201, body
    return await svc.wait_download(body["downloads"][0]["id"], {"completed"}, timeout=30)


def relative_to(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def command_lines(pids: list[int]) -> bytes:
    """The command lines of `pids`, concatenated (a gone process adds nothing)."""
    found = b""
    for pid in pids:
        with contextlib.suppress(OSError):
            found += Path(f"/proc/{pid}/cmdline").read_bytes()
    return found


def path_and_query(url: str) -> str:
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


# --------------------------------------------------------------------------- authentication


async def test_every_api_route_refuses_requests_without_a_valid_token(
    service_factory: ServiceFactory,
) -> None:
    svc = await service_factory()
    store = svc.service.parts.store
    token = svc.token
    bad_credentials: dict[str, dict[str, str]] = {
        "none": {},
        "wrong bearer": {
            "Authorization": "Bearer " + token[:-1] + ("A" if token[-1] != "A" else "B")
        },
        "empty bearer": {"Authorization": "Bearer "},
        "basic": {"Authorization": "Basic " + base64.b64encode(f"admin:{token}".encode()).decode()},
        "token as query": {},
        "forged cookie": {"Cookie": f"{SESSION_COOKIE}={int(time.time())}.forged"},
        "cookie never issued": cookie_header(new_session_secret()),
        "cookie for another token": cookie_header(
            await stored_session(store, "another-token-" + token)
        ),
        "expired cookie": cookie_header(await stored_session(store, token, lifetime=-60)),
        "revoked cookie": cookie_header(await stored_session(store, token, revoked=True)),
    }
    api_routes = [(m, c, r) for m, c, r in route_table(svc) if c.startswith("/api")]
    assert len(api_routes) >= 10, api_routes
    port = svc.service.parts.web.port
    checked = 0
    for method, canonical, resource in api_routes:
        path = fill_route(canonical, resource)
        assert path is not None, f"cannot build a path for {canonical}"
        for label, headers in bad_credentials.items():
            target = path + (f"?token={token}" if label == "token as query" else "")
            answer = await raw_request(port, method, target, headers)
            if canonical in PUBLIC_API_PATHS:  # the health check and the API's description
                assert answer.status == 200, (method, path, label)
                continue
            assert answer.status == 401, (method, path, label, answer.status, answer.body[:200])
            if method != "HEAD":
                assert json.loads(answer.body)["error"] == "unauthorized"
            checked += 1
        # The control: the right token gets past authentication on the same route.
        good = await raw_request(port, method, path, {"Authorization": f"Bearer {token}"})
        assert good.status != 401, (method, path)
        good_cookie = cookie_header(await stored_session(store, token))  # each route may end one
        assert (await raw_request(port, method, path, good_cookie)).status != 401, (method, path)
    public = [route for route in api_routes if route[1] in PUBLIC_API_PATHS]
    assert checked >= 10 * (len(api_routes) - len(public))


async def test_websocket_refuses_a_handshake_without_a_valid_token(
    service_factory: ServiceFactory,
) -> None:
    svc = await service_factory()
    url = svc.base_url.replace("http://", "ws://") + "/api/ws"
    for headers in ({}, {"Authorization": "Bearer not-the-token"}):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with svc.http.ws_connect(url, headers=headers):
                pass
        assert refused.value.status == 401
    assert any(c == "/api/ws" for _m, c, _r in route_table(svc))
    async with svc.http.ws_connect(url, headers=svc.auth) as ws:
        assert not ws.closed


# --------------------------------------------------------------------------- signed links


async def test_forged_or_expired_stream_and_watch_links_get_403(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    svc = await service_factory()
    signer = svc.service.parts.web.ctx.links.signer
    first = await completed_download(svc, file_server, "signed-1.bin", b"first file " * 100)
    second = await completed_download(svc, file_server, "signed-2.bin", b"second file " * 100)
    one, two = int(first["id"]), int(second["id"])
    good = path_and_query(first["stream_url"])
    status, body = await svc.api("GET", good, auth=False)
    assert status == 200 and body == b"first file " * 100  # the control

    sig = dict(p.split("=", 1) for p in urlsplit(good).query.split("&"))["sig"]
    flipped = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    other_sig = dict(p.split("=", 1) for p in urlsplit(second["stream_url"]).query.split("&"))[
        "sig"
    ]
    expired = signer.stream_path(one, "signed-1.bin", lifetime=60, now=int(time.time()) - 3600)
    expired_query = urlsplit(expired).query
    exp_value = dict(p.split("=", 1) for p in expired_query.split("&"))["exp"]
    stretched = expired_query.replace(f"exp={exp_value}", f"exp={int(time.time()) + 3600}")
    queries = {
        "no signature": "",
        "flipped signature": f"sig={flipped}",
        "another download's signature": f"sig={other_sig}",
        "expired": expired_query,
        "expiry moved forward": stretched,
        "negative expiry": f"sig={sig}&exp=-1",
        "garbage expiry": f"sig={sig}&exp=soon",
    }
    targets = [f"/stream/{one}/signed-1.bin", f"/stream/{one}/0/signed-1.bin"]
    routes = {c for _m, c, _r in route_table(svc)}
    watch_served = "/watch/{id}" in routes
    if watch_served:
        targets.append(f"/watch/{one}")
    for target in targets:
        for label, query in queries.items():
            status, body = await svc.api("GET", f"{target}?{query}", auth=False)
            assert status == 403, (target, label, status)
            assert isinstance(body, dict) and body["error"] == "forbidden", (target, label)
    # A good signature does not carry over to another download.
    status, _ = await svc.api("GET", f"/stream/{two}/signed-2.bin?sig={sig}", auth=False)
    assert status == 403
    assert watch_served


# --------------------------------------------------------------------------- path traversal


def traversal_payloads(canary: Path) -> list[str]:
    absolute = str(canary)
    payloads = ["..", "%2e%2e", "%2E%2E%2F", "%00", "..%00", f"{canary.name}%00.bin"]
    for depth in range(1, 9):
        payloads += [
            "../" * depth + canary.name,
            "..%2F" * depth + canary.name,
            "%2e%2e%2f" * depth + canary.name,
            "%2e%2e/" * depth + canary.name,
            "..%5C" * depth + canary.name,
            "%252e%252e%252f" * depth + canary.name,
            "....//" * depth + canary.name,
        ]
    payloads += [
        absolute,
        "/" + absolute,
        quote(absolute, safe=""),
        "%2F" + quote(absolute.lstrip("/"), safe="/"),
        quote(absolute, safe="") + "%00",
    ]
    return payloads


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """A file outside the service's data folder whose bytes must never be served or deleted."""
    secret = secrets.token_hex(24).encode()
    path = tmp_path / "canary-outside.txt"
    path.write_bytes(b"CANARY " + secret)
    yield path, secret
    assert path.read_bytes() == b"CANARY " + secret


@pytest.mark.slow
async def test_path_traversal_never_reads_or_deletes_outside(
    service_factory: ServiceFactory,
    file_server: FileServer,
    canary: tuple[Path, bytes],
) -> None:
    canary_path, canary_secret = canary
    svc = await service_factory()
    port = svc.service.parts.web.port
    assert port is not None
    row = await completed_download(svc, file_server, "inside.bin", b"inside bytes " * 50)
    download_id = int(row["id"])
    signed = urlsplit(row["stream_url"]).query
    auth = {"Authorization": f"Bearer {svc.token}"}

    answers: list[tuple[str, str, RawAnswer]] = []
    payloads = traversal_payloads(canary_path)
    # Every route with a name-like parameter gets every payload in that parameter.
    named = [
        (m, c, r)
        for m, c, r in route_table(svc)
        if set(_PARAM.findall(c)) - {"id", "action"} and m in ("GET", "HEAD", "DELETE")
    ]
    assert any(c.startswith("/stream") for _m, c, _r in named), named
    for method, canonical, _resource in named:
        for param in set(_PARAM.findall(canonical)) - {"id", "action"}:
            for payload in payloads:
                values = {"id": str(download_id), "index": "0", param: payload}
                path = _PARAM.sub(lambda m, v=values: v.get(m.group(1), "x"), canonical)  # type: ignore[misc]
                query = signed if canonical.startswith(("/stream", "/watch")) else ""
                target = path + (f"?{query}" if query else "")
                answers.append((method, target, await raw_request(port, method, target, auth)))
    # Routes taking an id get the payloads in the id, DELETE with delete_file included.
    for payload in payloads:
        for method, template in (
            ("GET", "/api/downloads/{p}"),
            ("DELETE", "/api/downloads/{p}?delete_file=true"),
            ("POST", "/api/downloads/{p}/cancel"),
            ("GET", "/stream/{p}/x?" + signed),
            ("GET", "/watch/{p}?" + signed),
        ):
            target = template.replace("{p}", payload)
            answers.append((method, target, await raw_request(port, method, target, auth)))

    for method, target, answer in answers:
        assert canary_secret not in answer.body, (method, target)
        assert answer.status < 500 or answer.status == 0, (method, target, answer.status)
    assert canary_path.exists()

    # A row that names a file outside (a hostile or tampered record): never served, never
    # deleted. Relative and absolute paths, and a symlink inside the download folder.
    job_dir = Path(row["local_path"]).parent
    link = job_dir / "link-to-canary"
    link.symlink_to(canary_path)
    for hostile in (
        str(canary_path),
        relative_to(canary_path, svc.config.aria2.download_dir),
        str(link),
        str(job_dir / ".." / ".." / ".." / canary_path.name),
    ):
        await svc.service.parts.store.update_download_details_by_id(download_id, local_path=hostile)
        status, body = await svc.api("GET", path_and_query(row["stream_url"]), auth=False)
        assert status != 200 and canary_secret not in (
            body if isinstance(body, bytes) else json.dumps(body).encode()
        ), hostile
    status, body = await svc.api("DELETE", f"/api/downloads/{download_id}?delete_file=true")
    assert status == 200, body
    assert canary_path.read_bytes() == b"CANARY " + canary_secret
    assert link.is_symlink() or not link.exists()


# --------------------------------------------------------------------------- aria2 on loopback


def _listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket `pid` listens on, read from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found: list[tuple[str, int]] = []
    for table, family in (("tcp", 4), ("tcp6", 6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A = LISTEN
                continue
            address_hex, port_hex = local.split(":")
            found.append((_decode_address(address_hex, family), int(port_hex, 16)))
    return found


def _decode_address(hex_text: str, family: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hex_text)
    if family == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # /proc/net/tcp6 prints the address as four 32-bit words in host (little-endian) order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return str(ipaddress.IPv6Address(words))


async def test_embedded_aria2_rpc_listens_on_loopback_only(
    service_factory: ServiceFactory,
) -> None:
    # The product's own options (IPv6 enabled), not the test defaults.
    svc = await service_factory({"aria2": {"options": {"disable-ipv6": "false"}}})
    embedded = svc.service.parts.engine.embedded
    assert embedded is not None and embedded.pid is not None
    sockets = _listening_sockets(embedded.pid)
    rpc = [(address, port) for address, port in sockets if port == embedded.port]
    assert rpc, sockets
    assert all(address in ("127.0.0.1", "::1") for address, _ in rpc), rpc
    assert all(address in ("127.0.0.1", "::1") for address, _ in sockets), sockets
    # The RPC secret is not on aria2c's command line either (any local user can read that).
    assert embedded.secret.encode() not in command_lines([embedded.pid])


# --------------------------------------------------------------------------- secrets

LINK_PASSWORD = "link-password-" + secrets.token_hex(8)


@pytest.mark.slow
async def test_no_answer_and_no_log_line_holds_a_secret(
    service_process: ServiceProcessFactory, file_server: FileServer
) -> None:
    # Telegram stays off here (the bot would try to reach Telegram); the bot's own secrets are
    # checked with the offline Telegram in the next test.
    svc = service_process({"logging": {"level": "DEBUG"}})
    await svc.start()
    answers: list[bytes] = []

    async def call(method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        headers = {**svc.auth, **kwargs.pop("headers", {})}
        async with svc.http().request(
            method, svc.base_url + path, headers=headers, **kwargs
        ) as response:
            body = await response.read()
            answers.append(str(response.status).encode() + str(response.headers).encode() + body)
            try:
                return response.status, json.loads(body)
            except ValueError:
                return response.status, body

    file_server.add_file("plain.bin", data=b"plain " * 1000)
    await call("GET", "/api/health")
    await call("GET", "/api/config")
    status, added = await call("POST", "/api/downloads", json={"url": file_server.url("plain.bin")})
    assert status == 201
    download_id = added["downloads"][0]["id"]
    row = await svc.wait_download(download_id, {"completed"}, timeout=30)
    await call("GET", path_and_query(row["stream_url"]))
    await call("GET", f"/api/downloads/{download_id}")
    await call("GET", "/api/downloads?grouped=true")
    await call("GET", "/api/downloads/statistics")
    # Errors of every kind.
    await call("GET", "/api/downloads", headers={"Authorization": "Bearer wrong"})
    await call(
        "POST", "/api/downloads", data=b"{not json", headers={"Content-Type": "application/json"}
    )
    await call("POST", "/api/downloads", json={"url": "file:///etc/passwd"})
    await call("POST", "/api/downloads", json={"url": file_server.url("plain.bin")})
    status, failing = await call(
        "POST", "/api/downloads", json={"url": file_server.status_url(500)}
    )
    assert status == 201
    await svc.wait_download(failing["downloads"][0]["id"], {"failed"}, timeout=30)
    # Links with a password in their user info: one that completes, one that fails.
    file_server.add_file("guarded.bin", data=b"guarded " * 500)
    for url in (
        file_server.url("guarded.bin").replace("http://", f"http://user:{LINK_PASSWORD}@"),
        file_server.status_url(500).replace("http://", f"http://user:{LINK_PASSWORD}@"),
    ):
        status, added = await call("POST", "/api/downloads", json={"url": url})
        assert status == 201, added
        await svc.wait_download(added["downloads"][0]["id"], {"completed", "failed"}, timeout=30)
    await call("GET", "/api/downloads?grouped=true")
    await call("POST", f"/api/downloads/{download_id}/pause")
    await call("GET", "/api/downloads/999999")
    await call("GET", f"/stream/{download_id}/x?sig=forged")
    await call("POST", "/api/config/reload")
    svc.kill(signal.SIGHUP)
    await asyncio.sleep(0.5)
    aria2_pids = svc.child_pids("aria2c")
    cmdlines = command_lines(aria2_pids)
    assert await svc.stop() == 0

    data_dir = svc.data_dir
    link_key_hex = (data_dir / "link_key").read_text().strip()
    link_key = bytes.fromhex(link_key_hex)
    secret_values = {
        "web token": svc.token,
        "aria2 secret": (data_dir / "aria2_secret").read_text().strip(),
        "link key (hex)": link_key_hex,
        "link key (base64)": base64.urlsafe_b64encode(link_key).decode().rstrip("="),
    }
    logs = {
        "service output": svc.log_text(),
        "aria2.log": _read(data_dir / "aria2.log"),
        "aria2 console": _read(data_dir / "aria2.console.log"),
    }
    assert len(logs["service output"].splitlines()) > 20  # the run was really logged
    everything = b"\n".join(answers)
    # A link's password: aria2 gets it as an option, not in the link it logs.
    assert LINK_PASSWORD.encode() not in everything, "a link's password in an HTTP answer"
    for where, text in logs.items():
        assert LINK_PASSWORD not in text, f"a link's password in {where}"
    for label, value in secret_values.items():
        assert value.encode() not in everything, f"{label} in an HTTP answer"
        assert value.encode() not in cmdlines, f"{label} on aria2c's command line"
        for where, text in logs.items():
            assert value not in text, f"{label} in {where}"


async def test_bot_credentials_never_reach_answers_logs_or_chats(
    service_factory: ServiceFactory,
    fake_telegram: FakeTelegram,
    file_server: FileServer,
) -> None:
    bot_token = f"{secrets.randbelow(10**9) + 10**8}:{secrets.token_urlsafe(26)}"
    api_hash = secrets.token_hex(16)
    svc = await service_factory(
        {
            "telegram": {
                "api_id": 12345,
                "api_hash": api_hash,
                "bot_token": bot_token,
                "admins": [fake_telegram.default_user.id],
            },
            "logging": {"level": "DEBUG"},
        },
        telegram_client_factory=lambda: fake_telegram.make_client(),
    )
    lines: list[str] = []
    # Added after the start: the service replaces every sink when it configures logging.
    sink = logger.add(lines.append, level="DEBUG", format="{message} {extra} {exception}")
    try:
        file_server.add_file("bot.bin", data=b"bot bytes " * 100)
        user = fake_telegram.default_user
        for text in (
            "/start",
            file_server.url("bot.bin"),
            file_server.status_url(500),
            "gopher://nowhere/x and some words",
            "/status",
        ):
            await fake_telegram.feed(
                svc.service.parts.telegram.client, fake_telegram.message_update(user, text)
            )
        db = svc.service.parts.store

        async def settled() -> bool:
            rows = await db.fetch_recent_downloads(limit=-1)
            return len(rows) == 2 and all(r.status in ("completed", "failed") for r in rows)

        await wait_until(settled, 30, what="both links settled")
        answers = [await svc.api("GET", "/api/config"), await svc.api("GET", "/api/downloads")]
    finally:
        logger.remove(sink)
    chats = "\n".join(m.text or "" for m in fake_telegram.sent_messages())
    chats += "\n".join(e.text or "" for e in fake_telegram.edits())
    assert chats.strip(), "the bot answered nothing"
    assert len(lines) > 5
    text_out = json.dumps([body for _status, body in answers], default=str) + "\n".join(lines)
    for label, value in {
        "bot token": bot_token,
        "bot token secret part": bot_token.split(":", 1)[1],
        "api hash": api_hash,
        "web token": svc.token,
    }.items():
        assert value not in text_out, f"{label} in an answer or a log line"
        assert value not in chats, f"{label} in a chat message"


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------- random bodies

URLISH = st.sampled_from(
    [
        "http://127.0.0.1:1/x",
        "https://127.0.0.1:1/a.bin",
        "ftp://127.0.0.1:1/f",
        "magnet:?xt=urn:btih:" + "a" * 40,
        "magnet:?xt=urn:btih:zz",
        "javascript:alert(1)",
        "file:///etc/passwd",
        "http://",
        "http://[::1",
        "http://127.0.0.1:0/",
        "",
        " ",
        "http://127.0.0.1:1/" + "a" * 9000,
        "http://127.0.0.1:1/\x00",
        "HTTP://127.0.0.1:1/%00%2F..%2F",
    ]
)
# A string with a lone surrogate: valid JSON (as a \\udXXX escape), but no text.
LONE_SURROGATES = st.builds(
    lambda head, point, tail: head + chr(point) + tail,
    st.text(max_size=8),
    st.integers(0xD800, 0xDFFF),
    st.sampled_from(["", ".bin", "/x"]),
)
JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | URLISH
    | LONE_SURROGATES
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# Fresh links aria2 accepts (nothing listens on port 1: they fail fast, on loopback only).
FRESH_LINKS = st.builds("http://127.0.0.1:1/file-{}.bin".format, st.integers(0, 10**9))
ADD_BODIES = (
    JSON_VALUES
    | st.dictionaries(
        st.sampled_from(["url", "urls", "confirm", "extra"]),
        URLISH | st.lists(URLISH | JSON_SCALARS, max_size=5) | JSON_SCALARS,
        max_size=3,
    )
    | st.fixed_dictionaries({"url": FRESH_LINKS | URLISH})
    # Good and bad links mixed: a 400 must add none of them.
    | st.fixed_dictionaries({"urls": st.lists(FRESH_LINKS | URLISH | JSON_SCALARS, max_size=6)})
)
DELETE_BODIES = JSON_VALUES | st.dictionaries(
    st.sampled_from(["confirm", "delete_files", "extra"]),
    st.sampled_from(["delete-all", "delete_all", "yes", True, False, None, 1, "true"]),
    max_size=3,
)
BODY_KEYS = st.sampled_from(["url", "urls", "confirm", "delete_files"])


def _nested(depth: int, opener: bytes, closer: bytes, key: str) -> bytes:
    """A JSON document `depth` arrays or objects deep around one scalar."""
    inner = b'"http://127.0.0.1:1/deep.bin"'
    if opener == b"{":
        return f'{{"{key}": '.encode() * depth + inner + b"}" * depth
    return opener * depth + inner + closer * depth


# Bodies built to break a parser: nesting far beyond any body the API takes (up to 100k deep),
# integers with more digits than a string may convert (up to 100k), lone surrogates in keys
# and values; each must get a 4xx JSON error.
HOSTILE_JSON_BODIES = st.one_of(
    st.builds(
        _nested,
        st.integers(33, 100_000),
        st.sampled_from([b"[", b"{"]),
        st.just(b"]"),
        BODY_KEYS,
    ),
    st.builds(
        lambda key, digits, sign: f'{{"{key}": {sign}{"7" * digits}}}'.encode(),
        BODY_KEYS,
        st.integers(4301, 100_000),
        st.sampled_from(["", "-"]),
    ),
    st.builds(
        lambda key, text: json.dumps({key: text}).encode(),
        BODY_KEYS | LONE_SURROGATES,
        LONE_SURROGATES | st.lists(LONE_SURROGATES, min_size=1, max_size=3),
    ),
)


@pytest.mark.slow
async def test_random_json_and_bytes_never_break_the_api(
    service_factory: ServiceFactory,
) -> None:
    svc = await service_factory()
    db = svc.service.parts.store
    assert db is not None
    loop = asyncio.get_running_loop()
    expected_rows = 0
    seen: dict[str, int] = {}

    async def send(method: str, body: bytes) -> tuple[int, str, bytes]:
        async with svc.http.request(
            method,
            svc.base_url + "/api/downloads",
            data=body,
            headers={**svc.auth, "Content-Type": "application/json"},
        ) as response:
            return response.status, response.headers.get("Content-Type", ""), await response.read()

    async def row_count() -> int:
        return len(await db.fetch_recent_downloads(limit=-1))

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    def check(method: str, raw: bytes) -> None:
        nonlocal expected_rows
        status, content_type, body = run(send(method, raw))
        key = f"{method} {status}"
        seen[key] = seen.get(key, 0) + 1
        assert status < 500, (method, raw[:200], body[:300])
        assert content_type.startswith("application/json"), (method, status, content_type)
        document = json.loads(body)
        if method == "POST" and status == 201:
            expected_rows += len(document["downloads"])
        elif method == "DELETE" and status == 200:
            expected_rows = 0
        else:
            assert 400 <= status < 500 and "error" in document, (method, status, document)
        assert run(row_count()) == expected_rows, (method, raw[:200], status, document)

    common = settings(
        max_examples=120,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )

    @common
    @given(ADD_BODIES)
    def post_json(value: Any) -> None:
        check("POST", json.dumps(value).encode())

    @common
    @given(DELETE_BODIES)
    def delete_json(value: Any) -> None:
        check("DELETE", json.dumps(value).encode())

    @common
    @given(st.sampled_from(["POST", "DELETE"]), st.binary(max_size=600))
    def random_bytes(method: str, raw: bytes) -> None:
        check(method, raw)

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.sampled_from(["POST", "DELETE"]), HOSTILE_JSON_BODIES)
    def hostile_json(method: str, raw: bytes) -> None:
        hostile_before = seen.get(f"{method} 400", 0)
        check(method, raw)
        assert seen.get(f"{method} 400", 0) == hostile_before + 1, (method, raw[:80])

    for runner in (post_json, delete_json, random_bytes, hostile_json):
        await asyncio.to_thread(runner)
    assert sum(seen.values()) >= 3 * 100 + 50, seen
    assert seen.get("POST 201", 0) > 0 and seen.get("POST 400", 0) > 0, seen
    print(seen)


# --------------------------------------------------------------------------- hostile file names

ANY_PATH_BODY = b"same bytes for any path\n" * 400
BIDI_CONTROLS = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")


@pytest.fixture
async def any_path_server() -> AsyncIterator[str]:
    """An HTTP server answering ANY_PATH_BODY for every path (so any last segment works); a
    `cd` query parameter becomes the Content-Disposition file name."""

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/octet-stream"}
        if "cd" in request.query:
            headers["Content-Disposition"] = f'attachment; filename="{request.query["cd"]}"'
        return web.Response(body=ANY_PATH_BODY, headers=headers)

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


HOSTILE_NAMES = [
    pytest.param("a" * 300 + ".bin", id="very long"),
    pytest.param("é" * 200 + ".bin", id="very long multibyte"),
    pytest.param("..%2F..%2F..%2Fescape.bin", id="encoded slash"),
    pytest.param("dir%2Fname.bin", id="encoded slash inside"),
    pytest.param("name%00.bin", id="encoded NUL"),
    pytest.param("%00", id="only NUL"),
    pytest.param(quote("invoice\u202egpj.exe"), id="right-to-left override"),
    pytest.param(quote("🎬 movie 😀.mp4"), id="emoji"),
    pytest.param("%2e%2e", id="dot dot"),
    pytest.param("..%5C..%5Cescape.bin", id="backslashes"),
    pytest.param("plain.bin?cd=../../cd-escape.bin", id="content-disposition traversal"),
]


def unsafe_characters(name: str) -> list[str]:
    """Characters that have no place in a file name shown to people or sent to clouds."""
    return [
        ascii(ch)
        for ch in name
        if ch in "/\\\x00" or ch in BIDI_CONTROLS or unicodedata.category(ch) == "Cc"
    ]


@pytest.mark.parametrize("last_segment", HOSTILE_NAMES)
async def test_hostile_file_names_stay_in_their_job_folder(
    last_segment: str,
    service_factory: ServiceFactory,
    any_path_server: str,
    tmp_path: Path,
) -> None:
    svc = await service_factory()
    url = f"{any_path_server}/files/{last_segment}"
    status, body = await svc.api("POST", "/api/downloads", json={"url": url})
    assert status == 201, body
    download_id = int(body["downloads"][0]["id"])
    row = await svc.wait_download(download_id, {"completed", "failed"}, timeout=30)
    assert row["status"] == "completed", row
    download_dir = svc.config.aria2.download_dir.resolve()
    job_dir = download_dir / str(download_id)
    local = Path(row["local_path"])
    placed, content = await asyncio.to_thread(lambda: (local.resolve(), local.read_bytes()))
    assert placed.parent == job_dir, (local, job_dir)
    assert content == ANY_PATH_BODY
    name = row["file_name"]
    assert name and unsafe_characters(name) == [], ascii(name)
    assert len(name.encode()) <= 255
    # The name on disk is what uploads are called in the clouds.
    assert unsafe_characters(local.name.replace("\\", "")) == [], ascii(local.name)
    # Nothing was written anywhere but inside the job folder.
    stray, outside_jobs = await asyncio.to_thread(strays, tmp_path, download_dir, job_dir)
    assert stray == [], stray
    assert outside_jobs == [], outside_jobs


def strays(root: Path, download_dir: Path, job_dir: Path) -> tuple[list[Path], list[Path]]:
    """Files named like an escape anywhere outside the job folder, and files lying directly in
    the download folder (outside every job folder)."""
    escaped = [
        p
        for p in root.rglob("*")
        if p.is_file() and "escape" in p.name and job_dir not in p.parents
    ]
    loose = [p for p in download_dir.iterdir() if p.is_file()]
    return escaped, loose
