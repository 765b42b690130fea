"""The jobs of Telegram users who are not admins reach no blocked address, on any hop.

What counts as private is declared by the tests: `aria2.blocked_networks` is 127.0.0.2/32, where
a "private" site listens, while the "public" sites (files, redirects, the tracker) are on
127.0.0.1. Jobs of a user are added as the bot adds them (a Requester with the user's id).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import torf
from aiohttp import web
from loguru import logger

from aria2_client.download_handler import Requester
from aria2_client.egress import EgressProxy
from aria2_client.sources import AddressPolicy, BlockedAddress, magnet_sources
from tests.support.ftp_server import running_ftp_server
from tests.support.http_files import MIB, FileServer
from tests.support.service import RunningService, ServiceFactory
from tests.support.torrents import Tracker
from tests.test_engine_api import FINAL, settled, wait_until
from tests.test_engine_restart import wait_bytes

PRIVATE_HOST = "127.0.0.2"
BLOCKED = {"aria2": {"blocked_networks": [f"{PRIVATE_HOST}/32"]}}
USER = 5001  # a Telegram user who is not an admin
SECRET = b"internal only\n" * 500
PUBLIC = b"public bytes\n" * 700
WAIT = 60.0


# --- two small sites: a public one on 127.0.0.1 and a private one on 127.0.0.2 -------------------


@dataclass
class Site:
    """An HTTP site on one loopback address: /file (its bytes), /to?url= (a 302 there), and any
    other path answered 200 and recorded (trackers and web seeds are not contacted)."""

    host: str
    body: bytes
    hits: list[str] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits.append(request.path_qs)
        if request.path == "/to":
            raise web.HTTPFound(request.query["url"])
        return web.Response(body=self.body, content_type="application/octet-stream")


@pytest.fixture
async def sites() -> AsyncIterator[tuple[Site, Site]]:
    public, private = Site("127.0.0.1", PUBLIC), Site(PRIVATE_HOST, SECRET)
    await public.start()
    await private.start()
    try:
        yield public, private
    finally:
        await public.stop()
        await private.stop()


@contextlib.contextmanager
def warnings_logged() -> Any:
    """The WARNING records logged meanwhile, with their bound context."""
    records: list[Any] = []
    sink = logger.add(lambda message: records.append(message.record), level="WARNING")
    try:
        yield records
    finally:
        logger.remove(sink)


async def as_user(svc: RunningService, url: str) -> int:
    row = await svc.service.parts.engine.downloads.add_link(
        url, Requester(owner_id=USER, chat_id=USER)
    )
    return row.id


async def option(svc: RunningService, download_id: int, name: str) -> str:
    status, row = await svc.api("GET", f"/api/downloads/{download_id}")
    assert status == 200 and row["gid"], row
    return (await svc.service.parts.engine.aria2.get_option(row["gid"])).get(name, "")


async def no_file_holds(svc: RunningService, data: bytes) -> bool:
    def scan() -> bool:
        root = svc.config.aria2.download_dir
        return all(p.read_bytes() != data for p in root.rglob("*") if p.is_file())

    return await asyncio.to_thread(scan)


# --- the proxy on its own: real sockets, a resolver injected at the edge --------------------------


class Resolutions:
    """A resolver seam: each lookup of a name takes the next answer (the last one repeats)."""

    def __init__(self, answers: dict[str, Sequence[Sequence[str]]]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.calls.append(host)
        if host not in self.answers:
            return [host]  # an address stands for itself
        answers = self.answers[host]
        return list(answers[min(self.calls.count(host), len(answers)) - 1])


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[..., Awaitable[EgressProxy]]]:
    started: list[EgressProxy] = []

    async def start(resolve: Resolutions, refusals: list[tuple[int, str]]) -> EgressProxy:
        async def refused(download_id: int, reason: str) -> None:
            refusals.append((download_id, reason))

        proxy = EgressProxy(
            lambda: AddressPolicy([f"{PRIVATE_HOST}/32"]),
            b"test key",
            on_refused=refused,
            resolve=resolve,
        )
        await proxy.start()
        started.append(proxy)
        return proxy

    try:
        yield start
    finally:
        for proxy in started:
            await proxy.stop()


def credentials(proxy: EgressProxy, download_id: int) -> str:
    options = proxy.options(download_id)
    pair = f"{options['all-proxy-user']}:{options['all-proxy-passwd']}"
    return "Basic " + base64.b64encode(pair.encode()).decode()


async def exchange(proxy: EgressProxy, head: str, then: bytes = b"") -> tuple[bytes, bytes]:
    """Send a request head to the proxy (and `then` once it answered 200 to a CONNECT); the
    proxy's answer head and everything after it, until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        writer.write(head.encode())
        await writer.drain()
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        if then and answer.startswith(b"HTTP/1.1 200"):
            writer.write(then)
            await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 10)
        return answer, rest
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


@pytest.mark.attack(
    "DNS changes between the check and the connect",
    promise="the proxy resolves once and connects only to the address it checked",
)
async def test_the_proxy_connects_only_to_the_address_it_checked(
    sites: tuple[Site, Site], proxy_factory: Callable[..., Awaitable[EgressProxy]]
) -> None:
    public, private = sites
    # files.test moves from the public address to the private one after its first lookup.
    resolve = Resolutions({"files.test": [["127.0.0.1"], [PRIVATE_HOST]]})
    refusals: list[tuple[int, str]] = []
    proxy = await proxy_factory(resolve, refusals)
    target = f"http://files.test:{public.port}/file"
    auth = credentials(proxy, 7)

    head, body = await exchange(
        proxy,
        f"GET {target} HTTP/1.1\r\nHost: files.test:{public.port}\r\n"
        f"Proxy-Authorization: {auth}\r\nConnection: Keep-Alive\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 200"), head
    assert b"connection: close" in head.lower(), head  # one request per proxy connection
    assert body == PUBLIC
    # Looked up once, and the connection went to the very address that was checked.
    assert resolve.calls == ["files.test"]
    assert public.hits == ["/file"] and private.hits == []

    head, body = await exchange(
        proxy, f"GET {target} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"
    )
    assert head.startswith(b"HTTP/1.1 403"), head
    assert b"blocked address 127.0.0.2" in body, body
    assert private.hits == [] and public.hits == ["/file"]
    assert refusals == [(7, body.decode().strip())]


async def test_connect_tunnels_to_allowed_addresses_and_refuses_blocked_ones(
    sites: tuple[Site, Site], proxy_factory: Callable[..., Awaitable[EgressProxy]]
) -> None:
    public, private = sites
    refusals: list[tuple[int, str]] = []
    proxy = await proxy_factory(Resolutions({}), refusals)
    auth = credentials(proxy, 9)
    inner = b"GET /file HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"

    head, rest = await exchange(
        proxy,
        f"CONNECT 127.0.0.1:{public.port} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n",
        then=inner,
    )
    assert head.startswith(b"HTTP/1.1 200"), head
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(PUBLIC), rest[:200]

    # IPv4-mapped and IPv4-compatible forms are judged by their IPv4 address.
    for authority in (f"{PRIVATE_HOST}:{private.port}", f"[::ffff:{PRIVATE_HOST}]:443"):
        head, rest = await exchange(
            proxy, f"CONNECT {authority} HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n"
        )
        assert head.startswith(b"HTTP/1.1 403"), (authority, head)
        assert b"blocked address" in rest, rest
    assert private.hits == []
    assert [download_id for download_id, _ in refusals] == [9, 9]


async def test_requests_without_the_jobs_credentials_are_refused(
    sites: tuple[Site, Site], proxy_factory: Callable[..., Awaitable[EgressProxy]]
) -> None:
    public, _ = sites
    proxy = await proxy_factory(Resolutions({}), [])
    target = f"http://127.0.0.1:{public.port}/file"
    wrong = "Basic " + base64.b64encode(b"job-7:not-its-token").decode()
    for extra in ("", f"Proxy-Authorization: {wrong}\r\n", "Proxy-Authorization: Bearer x\r\n"):
        head, _ = await exchange(proxy, f"GET {target} HTTP/1.1\r\n{extra}\r\n")
        assert head.startswith(b"HTTP/1.1 407"), (extra, head)
    auth = credentials(proxy, 7)
    for request, status in (
        (f"POST {target} HTTP/1.1\r\nContent-Length: 1\r\n", b"405"),
        ("GET ftp://127.0.0.1/x HTTP/1.1\r\n", b"400"),
        ("GET /relative HTTP/1.1\r\n", b"400"),
        ("nonsense\r\n", b"400"),
    ):
        head, _ = await exchange(proxy, f"{request}Proxy-Authorization: {auth}\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status), (request, head)
    assert public.hits == []


# --- through the service: aria2 follows redirects, trackers and web seeds -------------------------


@pytest.fixture
async def svc(service_factory: ServiceFactory) -> RunningService:
    return await settled(await service_factory(BLOCKED))


@pytest.mark.slow
@pytest.mark.attack(
    "a user's public link redirects to a private address",
    promise="the job fails naming the blocked address; the private server is never reached",
)
async def test_a_redirect_to_a_blocked_address_fails_the_job_and_fetches_nothing(
    svc: RunningService, sites: tuple[Site, Site]
) -> None:
    public, private = sites
    secret_url = f"{private.base_url}/secret.bin"
    with pytest.raises(BlockedAddress, match=r"blocked address 127\.0\.0\.2"):
        await as_user(svc, secret_url)  # the first hop is checked when the link comes in
    with warnings_logged() as warnings:
        download_id = await as_user(svc, f"{public.base_url}/to?url={quote(secret_url)}")
        done = await svc.wait_download(download_id, FINAL, timeout=WAIT)
    assert done["status"] == "failed", done
    assert "blocked address 127.0.0.2" in done["error_message"], done
    assert private.hits == []
    assert await no_file_holds(svc, SECRET)
    assert any(
        r["extra"].get("job") == download_id and "blocked address" in r["message"] for r in warnings
    ), [r["message"] for r in warnings]


@pytest.mark.slow
async def test_a_users_public_link_and_its_redirects_go_through_the_proxy(
    svc: RunningService, sites: tuple[Site, Site]
) -> None:
    public, _ = sites
    download_id = await as_user(svc, f"{public.base_url}/to?url={quote(public.base_url)}/file")
    proxy_url = await option(svc, download_id, "all-proxy")
    done = await svc.wait_download(download_id, FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert await asyncio.to_thread(Path(done["local_path"]).read_bytes) == PUBLIC
    assert proxy_url.rstrip("/") == f"http://127.0.0.1:{svc.service.parts.engine.egress.port}"
    assert public.hits == [f"/to?url={quote(public.base_url)}/file", "/file"]


@pytest.mark.slow
async def test_a_users_ftp_link_goes_through_the_proxy_as_a_tunnel(svc: RunningService) -> None:
    async with running_ftp_server(PUBLIC) as ftp:
        download_id = await as_user(svc, ftp.url("pub/film.bin"))
        assert await option(svc, download_id, "proxy-method") == "tunnel"
        assert await option(svc, download_id, "all-proxy") != ""
        done = await svc.wait_download(download_id, FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert await asyncio.to_thread(Path(done["local_path"]).read_bytes) == PUBLIC
    assert any(command.startswith("RETR") for command in ftp.commands), ftp.commands


@pytest.mark.slow
async def test_jobs_of_the_page_and_with_private_addresses_allowed_are_not_proxied(
    service_factory: ServiceFactory, sites: tuple[Site, Site]
) -> None:
    _, private = sites
    svc = await settled(await service_factory(BLOCKED))
    status, answer = await svc.api("POST", "/api/downloads", json={"url": private.base_url})
    assert status == 201, answer
    page_job = answer["downloads"][0]["id"]
    assert await option(svc, page_job, "all-proxy") == ""
    assert (await svc.wait_download(page_job, FINAL, timeout=WAIT))["status"] == "completed"

    allowed = {"aria2": {**BLOCKED["aria2"], "allow_private_addresses": True}}
    svc = await settled(await service_factory(allowed, name="allowed"))
    user_job = await as_user(svc, f"{private.base_url}/x.bin")
    assert await option(svc, user_job, "all-proxy") == ""
    assert (await svc.wait_download(user_job, FINAL, timeout=WAIT))["status"] == "completed"


@pytest.mark.slow
async def test_an_admins_jobs_are_not_proxied(
    service_factory: ServiceFactory, sites: tuple[Site, Site]
) -> None:
    _, private = sites
    admin = USER + 1
    svc = await settled(await service_factory({**BLOCKED, "telegram": {"admins": [admin]}}))
    row = await svc.service.parts.engine.downloads.add_link(
        f"{private.base_url}/x.bin", Requester(owner_id=admin, chat_id=admin)
    )
    assert await option(svc, row.id, "all-proxy") == ""
    assert (await svc.wait_download(row.id, FINAL, timeout=WAIT))["status"] == "completed"


def blocked_and_public_torrent(
    tmp_path: Path, tracker: Tracker, public: Site, private: Site
) -> bytes:
    content = tmp_path / "seed" / "film.bin"
    content.parent.mkdir(parents=True, exist_ok=True)
    content.write_bytes(PUBLIC)
    torrent = torf.Torrent(
        path=content,
        # The private tracker comes first: aria2 would ask it before the public one.
        trackers=[[f"{private.base_url}/announce"], [tracker.announce_url]],  # type: ignore[list-item]
        webseeds=[f"{private.base_url}/seed/film.bin", f"{public.base_url}/seed/film.bin"],
        created_by=None,
    )
    torrent.generate()
    return bytes(torrent.dump())


async def aria2_view(svc: RunningService, download_id: int) -> tuple[dict[str, Any], list[str]]:
    """aria2's BitTorrent facts of the job, and the URIs (web seeds) of its first file."""
    status, row = await svc.api("GET", f"/api/downloads/{download_id}")
    assert status == 200 and row["gid"], row
    call = svc.service.parts.engine.aria2.transport.call
    facts = await call("aria2.tellStatus", row["gid"], ["bittorrent", "infoHash", "files"])
    return facts, sorted({entry["uri"] for entry in facts["files"][0]["uris"]})


@pytest.mark.slow
@pytest.mark.attack(
    "a user's torrent names private trackers and web seeds",
    promise="they are dropped before aria2 sees the torrent; the info hash is unchanged",
)
async def test_blocked_trackers_and_web_seeds_of_a_users_torrent_are_dropped(
    svc: RunningService, sites: tuple[Site, Site], tracker: Tracker, tmp_path: Path
) -> None:
    public, private = sites
    data = blocked_and_public_torrent(tmp_path, tracker, public, private)
    downloads = svc.service.parts.engine.downloads
    row = await downloads.add_torrent(data, Requester(owner_id=USER, chat_id=USER))
    facts, uris = await aria2_view(svc, row.id)
    assert facts["bittorrent"]["announceList"] == [[tracker.announce_url]]
    assert facts["infoHash"] == row.info_hash  # the info dictionary went unchanged
    assert uris == [f"{public.base_url}/seed/film.bin"], uris
    await wait_until(_announced(tracker), timeout=WAIT, what="an announce to the public tracker")
    assert not any(hit.startswith("/announce") for hit in private.hits), private.hits

    # The same torrent from the page keeps every tracker and web seed.
    await downloads.delete(row.id)
    page_row = await downloads.add_torrent(data)
    facts, uris = await aria2_view(svc, page_row.id)
    assert len(facts["bittorrent"]["announceList"]) == 2
    assert len(uris) == 2


def _announced(tracker: Tracker) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return tracker.announces > 0

    return check


@pytest.mark.slow
@pytest.mark.attack(
    "a user's magnet names private trackers and web seeds",
    promise="they are dropped before aria2 sees the magnet",
)
async def test_blocked_trackers_and_web_seeds_of_a_users_magnet_are_dropped(
    svc: RunningService, sites: tuple[Site, Site], tracker: Tracker
) -> None:
    _, private = sites
    info_hash = "c12fe1c06bba254a9dc9f519b335aa7c1367a88a"
    blocked_tracker, seed = f"{private.base_url}/announce", f"{private.base_url}/seed"
    magnet = (
        f"magnet:?xt=urn:btih:{info_hash}&dn=film&tr={quote(blocked_tracker, safe='')}"
        f"&tr={quote(tracker.announce_url, safe='')}&ws={quote(seed, safe='')}"
    )
    assert magnet_sources(magnet) == [blocked_tracker, tracker.announce_url, seed]
    download_id = await as_user(svc, magnet)
    facts, _ = await aria2_view(svc, download_id)
    assert facts["bittorrent"]["announceList"] == [[tracker.announce_url]]
    await wait_until(_announced(tracker), timeout=WAIT, what="an announce to the public tracker")
    assert private.hits == []


@pytest.mark.slow
async def test_a_users_job_goes_on_through_the_proxy_after_a_restart(
    service_factory: ServiceFactory, file_server: FileServer
) -> None:
    data = file_server.add_file("long.bin", size=3 * MIB, seed=31)
    first = await settled(await service_factory(BLOCKED))
    download_id = await as_user(first, file_server.url("long.bin", route="slow", rate=768 * 1024))
    await wait_bytes(first, download_id, 256 * 1024)
    port = first.service.parts.engine.egress.port
    await first.stop()

    # aria2's session names the proxy's port: the proxy comes back on it.
    second = await service_factory(config_path=first.config_path)
    assert second.service.parts.engine.egress.port == port
    done = await second.wait_download(download_id, FINAL, timeout=WAIT)
    assert done["status"] == "completed", done
    assert await asyncio.to_thread(Path(done["local_path"]).read_bytes) == data
    assert "failed" not in [step["to"] for step in done["history"]]
