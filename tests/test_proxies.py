"""The three proxies (`telegram.proxy`, `aria2.proxy`, `upload.proxy`), each against a counting
proxy on 127.0.0.1 (tests/support/proxies.py), and FTP downloads with a user and a password from
a real FTP server (pyftpdlib, tests/support/ftp_accounts.py) through the API.

Host names ending in `.test` stand for 127.0.0.1 at the counting proxy: aria2 and rclone hand
such a name to the proxy as it is, so what reaches the file server passed through the proxy.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from loguru import logger
from pyrogram.connection.proxy import SOCKS5Proxy
from pyrogram.connection.transport.tcp import TCP

from aria2_client.egress import EgressProxy
from aria2_client.sources import AddressPolicy
from bot.session import TelegramSession
from configer import (
    ConfigError,
    Secrets,
    load_config,
    log_secrets,
    masked_settings,
    proxy_parts,
)
from db import open_store
from tests.support.ftp_accounts import running_ftp_account_server
from tests.support.http_files import FileServer, deterministic_bytes
from tests.support.proxies import running_proxy
from tests.support.rclone_cloud import RcloneCloud, add_remote
from tests.support.service import ServiceFactory, service_config
from tests.test_bot import RelayFactory, relay_factory
from tests.test_browser import CHROMIUM, chromium
from tests.test_engine_api import FINAL, settled
from tests.test_ssrf import (
    BLOCKED,
    PRIVATE_HOST,
    Resolutions,
    Site,
    as_user,
    credentials,
    exchange,
    option,
    sites,
)
from uploads.rclone import Rclone, RcloneError

__all__ = ["relay_factory", "sites"]  # fixtures of other test modules

PROXY_USER = "relay"
PROXY_PASSWORD = "pr0xy-PASS"
WAIT = 60.0


def _config(tmp_path: Path, text: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    load_config(path, env={})


# --- the keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("aria2.proxy", "socks5://u:SECRETPW@h:1080", "must be empty or http://"),
        ("telegram.proxy", "https://u:SECRETPW@h:443", "socks5:// or socks4:// or http://"),
        ("upload.proxy", "ftp://u:SECRETPW@h:21", "http:// or https:// or socks5://"),
        ("upload.proxy", "http://u:SECRETPW@h", "the port is missing"),
        ("aria2.proxy", "http://u:SECRETPW@h:3128/path", "nothing may follow the port"),
        ("telegram.proxy", "socks5://:SECRETPW@h:1080", "a password needs a user"),
        ("telegram.proxy", "socks5://u:SECRETPW@h:99999", "must be empty or socks5://"),
    ],
)
def test_a_bad_proxy_is_refused_naming_the_key_and_never_the_password(
    tmp_path: Path, key: str, value: str, problem: str
) -> None:
    section, name = key.split(".")
    with pytest.raises(ConfigError) as caught:
        _config(tmp_path, f"{section}:\n  {name}: {json.dumps(value)}\n")
    assert key in str(caught.value) and problem in str(caught.value), caught.value
    assert "SECRETPW" not in str(caught.value)


def test_proxy_passwords_are_masked_in_settings_and_known_to_the_log_filter(
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "telegram:\n  proxy: socks5://tg:TG%40PW@proxy.example:1080\n"
        "aria2:\n  proxy: http://a2:A2PW@proxy.example:3128\n"
        "upload:\n  proxy: https://up:UPPW@proxy.example:8443\n"
    )
    config = load_config(path, env={})
    shown = masked_settings(config)
    assert shown["telegram.proxy"] == "socks5://tg:***@proxy.example:1080"
    assert shown["aria2.proxy"] == "http://a2:***@proxy.example:3128"
    assert shown["upload.proxy"] == "https://up:***@proxy.example:8443"
    secrets = log_secrets(config, Secrets("t" * 32, b"k" * 32, "s" * 32))
    assert {"TG@PW", "TG%40PW", "A2PW", "UPPW"} <= set(secrets)
    assert "UPPW" not in repr(config)


# --- telegram.proxy ---------------------------------------------------------------------------


async def _echo_server() -> tuple[asyncio.Server, list[bytes]]:
    heard: list[bytes] = []

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.read(1024)
        heard.append(data)
        writer.write(data)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(echo, "127.0.0.1", 0), heard


async def test_the_telegram_client_connects_through_the_socks5_proxy(tmp_path: Path) -> None:
    """The fake Telegram replaces Pyrogram's session at the transport, with no TCP endpoint: so
    the proxy is checked in two halves. The session builds its client (the real code path, no
    factory) with the proxy; that client's proxy then carries a real connection of Pyrogram's
    own TCP transport through a SOCKS5 proxy with user and password."""
    async with running_proxy(PROXY_USER, PROXY_PASSWORD) as proxy:
        path = service_config(
            tmp_path / "tg",
            {"telegram": {"api_id": 1, "api_hash": "a" * 32, "bot_token": "1:" + "b" * 35}},
        )
        config = load_config(path, env={"MISTRELAY_TELEGRAM_PROXY": proxy.url("socks5")})
        store = await open_store(config.database)
        try:
            client = TelegramSession(config.telegram, workdir=tmp_path, store=store)._client
        finally:
            await store.close()
        assert client.proxy == SOCKS5Proxy(
            hostname="127.0.0.1", port=proxy.port, username=PROXY_USER, password=PROXY_PASSWORD
        )
        server, heard = await _echo_server()
        port = int(server.sockets[0].getsockname()[1])
        try:
            transport = TCP(proxy=client.proxy)
            await transport.connect(("127.0.0.1", port))
            assert transport.writer is not None and transport.reader is not None
            transport.writer.write(b"mtproto bytes")
            await transport.writer.drain()
            assert await transport.reader.read(1024) == b"mtproto bytes"
            await transport.close()

            wrong = TCP(proxy=SOCKS5Proxy("127.0.0.1", proxy.port, PROXY_USER, "wrong"))
            with pytest.raises(Exception, match=r"(?i)auth"):
                await wrong.connect(("127.0.0.1", port))
        finally:
            server.close()
            await server.wait_closed()
    assert proxy.passed == [("socks5", "127.0.0.1", port)]
    assert heard == [b"mtproto bytes"]
    assert proxy.refused == 1


# --- aria2.proxy ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_an_admins_http_and_ftp_jobs_go_through_aria2_proxy(
    service_factory: ServiceFactory, file_server: FileServer, tmp_path: Path
) -> None:
    data = deterministic_bytes(300_000, seed=12)
    file_server.add_file("film.bin", data=data)
    async with (
        running_proxy(PROXY_USER, PROXY_PASSWORD) as proxy,
        running_ftp_account_server(tmp_path / "ftp") as ftp,
    ):
        (ftp.root / "pub").mkdir()
        (ftp.root / "pub" / "film.bin").write_bytes(data)
        svc = await settled(await service_factory({"aria2": {"proxy": proxy.url()}}))
        http_url = file_server.url("film.bin").replace("127.0.0.1", "files.test")
        status, answer = await svc.api("POST", "/api/downloads", json={"url": http_url})
        assert status == 201, answer
        http_job = answer["downloads"][0]["id"]
        status, answer = await svc.api(
            "POST", "/api/downloads", json={"url": ftp.url("pub/film.bin", host="ftp.test")}
        )
        assert status == 201, answer
        ftp_job = answer["downloads"][0]["id"]
        assert await option(svc, ftp_job, "proxy-method") == "tunnel"
        assert await option(svc, http_job, "all-proxy") == f"http://127.0.0.1:{proxy.port}/"
        for job in (http_job, ftp_job):
            done = await svc.wait_download(job, FINAL, timeout=WAIT)
            assert done["status"] == "completed", done
            assert await asyncio.to_thread(Path(done["local_path"]).read_bytes) == data
    assert ("http", "files.test", file_server.port) in proxy.passed
    assert ("connect", "ftp.test", ftp.port) in proxy.passed  # the control connection
    assert proxy.refused == 0
    assert proxy.bytes_down >= 2 * len(data)


@pytest.mark.slow
async def test_a_wrong_aria2_proxy_password_fails_the_job_saying_so(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    file_server.add_file("refused.bin", size=10_000)
    async with running_proxy(PROXY_USER, PROXY_PASSWORD) as proxy:
        aria2 = {"proxy": proxy.url(password="wrong"), "options": {"max-tries": "1"}}
        svc = await settled(await service_factory({"aria2": aria2}))
        url = file_server.url("refused.bin").replace("127.0.0.1", "files.test")
        status, answer = await svc.api("POST", "/api/downloads", json={"url": url})
        assert status == 201, answer
        failed = await svc.wait_download(answer["downloads"][0]["id"], FINAL, timeout=WAIT)
    assert failed["status"] == "failed", failed
    assert failed["error_message"].startswith("a proxy refused the credentials"), failed
    assert proxy.refused >= 1 and proxy.passed == []
    assert file_server.requests == []


@pytest.mark.slow
async def test_a_users_jobs_leave_the_egress_proxy_through_aria2_proxy(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    """The egress proxy checks the address, then asks aria2.proxy for a tunnel to that address
    (never the name, which the upstream would resolve again)."""
    data = deterministic_bytes(200_000, seed=13)
    file_server.add_file("user.bin", data=data)
    async with running_proxy(PROXY_USER, PROXY_PASSWORD) as proxy:
        aria2 = {**BLOCKED["aria2"], "proxy": proxy.url()}
        svc = await settled(await service_factory({"aria2": aria2}))
        job = await as_user(svc, file_server.url("user.bin"))
        egress = svc.service.parts.engine.egress
        assert await option(svc, job, "all-proxy") == f"http://127.0.0.1:{egress.port}/"
        done = await svc.wait_download(job, FINAL, timeout=WAIT)
        assert done["status"] == "completed", done
        assert await asyncio.to_thread(Path(done["local_path"]).read_bytes) == data
    assert proxy.passed == [("connect", "127.0.0.1", file_server.port)]
    assert proxy.refused == 0


# --- upload.proxy -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["http", "socks5"])
async def test_rclone_uploads_through_upload_proxy(
    scheme: str, webdav_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    add_remote(
        rclone_config,
        "proxied",
        {"type": "webdav", "url": f"http://cloud.test:{webdav_cloud.port}", "vendor": "other"},
    )
    source = tmp_path / "song.flac"
    source.write_bytes(deterministic_bytes(150_000, seed=14))
    async with running_proxy(PROXY_USER, PROXY_PASSWORD) as proxy:
        rclone = Rclone(
            config_path=rclone_config, pid_dir=tmp_path / "pids", proxy=proxy.url(scheme)
        )
        await rclone.transfer(source, "proxied:/music/song.flac", on_progress=_ignore, job_key="p")
        assert (await rclone.verify(source, "proxied:/music/song.flac")).size == 150_000

        wrong = Rclone(
            config_path=rclone_config,
            pid_dir=tmp_path / "pids-wrong",
            proxy=proxy.url(scheme, password="wrong"),
            extra_args=["--retries", "1", "--low-level-retries", "1"],
        )
        with pytest.raises(RcloneError):
            await wrong.transfer(source, "proxied:/other.flac", on_progress=_ignore, job_key="w")
    assert (webdav_cloud.root / "music" / "song.flac").read_bytes() == source.read_bytes()
    assert not (webdav_cloud.root / "other.flac").exists()
    kind = "http" if scheme == "http" else "socks5"
    assert (kind, "cloud.test", webdav_cloud.port) in proxy.passed
    assert {host for _, host, _ in proxy.passed} == {"cloud.test"}
    assert proxy.refused >= 1


def _ignore(*_: object) -> None:
    return None


# --- FTP with a user and a password -------------------------------------------------------------


@pytest.mark.slow
async def test_ftp_downloads_with_user_and_password_end_to_end(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    data = deterministic_bytes(400_000, seed=15)
    lines: list[str] = []
    async with running_ftp_account_server(tmp_path / "ftp") as ftp:
        (ftp.root / "pub").mkdir()
        (ftp.root / "pub" / "film.bin").write_bytes(data)
        (ftp.root / "pub" / "other.bin").write_bytes(data)
        svc = await settled(await service_factory())
        sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
        try:
            status, answer = await svc.api(
                "POST", "/api/downloads", json={"url": ftp.url("pub/film.bin")}
            )
            assert status == 201, answer
            good = answer["downloads"][0]["id"]
            # The same file with another password is the same job; the answer masks it.
            status, duplicate = await svc.api(
                "POST",
                "/api/downloads",
                json={"url": ftp.url("pub/film.bin", password="not-the-password")},
            )
            assert status == 409, duplicate
            assert duplicate["detail"]["url"].startswith(f"ftp://{ftp.user}:***@"), duplicate
            status, answer = await svc.api(
                "POST",
                "/api/downloads",
                json={"url": ftp.url("pub/other.bin", password="not-the-password")},
            )
            assert status == 201, answer
            bad = answer["downloads"][0]["id"]
            status, answer = await svc.api(
                "POST", "/api/downloads", json={"url": ftp.url("pub/missing.bin")}
            )
            assert status == 201, answer
            missing = await svc.wait_download(answer["downloads"][0]["id"], FINAL, timeout=WAIT)
            done = await svc.wait_download(good, FINAL, timeout=WAIT)
            failed = await svc.wait_download(bad, FINAL, timeout=WAIT)
            status, listing = await svc.api("GET", "/api/downloads")
            assert status == 200
        finally:
            logger.remove(sink)
    assert done["status"] == "completed", done
    assert await asyncio.to_thread(Path(done["local_path"]).read_bytes) == data
    assert done["source_url"] == f"ftp://{ftp.user}:***@127.0.0.1:{ftp.port}/pub/film.bin"
    assert failed["status"] == "failed", failed
    assert failed["error_message"].startswith("the FTP server refused the user or password"), failed
    assert missing["status"] == "failed", missing
    assert missing["error_message"].startswith("not found on the server"), missing
    shown = json.dumps([done, failed, listing, duplicate]) + "\n".join(lines)
    for secret in (ftp.password, "s3cret%3A%2F%40pass", "not-the-password"):
        assert secret not in shown


@pytest.mark.slow
async def test_an_ftp_link_with_a_password_through_the_bot(
    relay_factory: RelayFactory, tmp_path: Path
) -> None:
    """Through the real dispatcher: the job completes, and no message of the bot shows the
    password (the job's progress and completion name its file; the link is masked)."""
    relay = await relay_factory()
    data = deterministic_bytes(250_000, seed=16)
    async with running_ftp_account_server(tmp_path / "ftp") as ftp:
        (ftp.root / "film.mkv").write_bytes(data)
        [ack] = await relay.chat().say(ftp.url("film.mkv"))
        [row] = await relay.jobs(1)
        await relay.wait_status(row.id, "completed")
    done = await relay.db.get_download_by_id(row.id)
    assert await asyncio.to_thread(Path(done.local_path).read_bytes) == data
    texts = [m.text for m in relay.fake.sent_messages()] + [e.text for e in relay.fake.edits()]
    assert ack.text and len(texts) >= 2
    assert not [text for text in texts if "s3cret" in text or "%40pass" in text], texts


@pytest.mark.slow
@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
async def test_the_page_shows_an_ftp_job_without_its_password(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    """In Chromium: a link with a password typed into the add box becomes a completed row,
    and nothing on the page (nor any WebSocket message it got) holds the password."""
    data = deterministic_bytes(120_000, seed=17)
    frames: list[str] = []
    async with running_ftp_account_server(tmp_path / "ftp") as ftp:
        (ftp.root / "clip.mp4").write_bytes(data)
        running = await settled(await service_factory())
        async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
            page.on_event(
                lambda method, params: (
                    frames.append(params["response"]["payloadData"])
                    if method == "Network.webSocketFrameReceived"
                    else None
                )
            )
            for domain in ("Runtime", "Page", "Network"):
                await page.send(f"{domain}.enable")
            await page.send("Page.navigate", {"url": running.base_url + "/"})
            await page.wait_for(
                "!document.getElementById('login-view').hidden"
                " && !document.documentElement.classList.contains('boot')",
                20,
                "the sign-in form",
            )
            await page.evaluate("document.getElementById('token').focus()")
            await page.send("Input.insertText", {"text": running.token})
            await page.evaluate("document.getElementById('login-submit').click()")
            await page.wait_for(
                "document.getElementById('conn').dataset.state === 'live'", 20, "the dashboard"
            )
            await page.evaluate("document.getElementById('add-links').focus()")
            await page.send("Input.insertText", {"text": ftp.url("clip.mp4")})
            await page.evaluate("document.getElementById('add-submit').click()")
            row = "document.querySelector('article.item')"
            await page.wait_for(
                f"{row} && {row}.dataset.status === 'completed'", 60, "the completed row"
            )
            name = await page.evaluate(f"{row}.querySelector('.name').textContent")
            html = await page.evaluate("document.documentElement.outerHTML")
    assert name == "clip.mp4"
    assert frames, "the page got no WebSocket message"
    for text in (html, *frames):
        assert ftp.password not in text and "s3cret%3A" not in text


async def test_the_egress_proxy_asks_its_upstream_for_the_checked_address(
    sites: tuple[Site, Site],
) -> None:
    """A name the egress proxy resolved itself goes upstream as the address it checked; an
    upstream that refuses the credentials is answered 502 naming it; a blocked name never
    reaches the upstream."""
    public, _ = sites
    resolve = Resolutions({"files.example": [["127.0.0.1"]], "inside.example": [[PRIVATE_HOST]]})
    async with running_proxy(PROXY_USER, PROXY_PASSWORD) as upstream:
        for password, expected in ((PROXY_PASSWORD, b" 200 "), ("wrong", b" 502 ")):
            egress = EgressProxy(
                lambda: AddressPolicy([f"{PRIVATE_HOST}/32"]),
                b"test key",
                on_refused=_no_refusal,
                resolve=resolve,
                upstream=proxy_parts(upstream.url(password=password)),
            )
            await egress.start()
            try:
                target = f"files.example:{public.port}"
                answer, rest = await exchange(
                    egress,
                    f"GET http://{target}/file HTTP/1.1\r\nHost: {target}\r\n"
                    f"Proxy-Authorization: {credentials(egress, 7)}\r\n\r\n",
                )
                blocked, _ = await exchange(
                    egress,
                    f"CONNECT inside.example:443 HTTP/1.1\r\n"
                    f"Proxy-Authorization: {credentials(egress, 7)}\r\n\r\n",
                )
            finally:
                await egress.stop()
            assert expected in answer.split(b"\r\n")[0], answer
            assert blocked.startswith(b"HTTP/1.1 403"), blocked
        assert rest.startswith(b"the upstream proxy refused the tunnel: HTTP/1.1 407"), rest
    assert upstream.passed == [("connect", "127.0.0.1", public.port)]
    assert upstream.refused == 1
    assert public.hits == ["/file"]


async def _no_refusal(download_id: int, reason: str) -> None:
    return None
