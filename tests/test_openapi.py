"""The API's contract: the OpenAPI document at /api/openapi.json names exactly the routes the
server has, and the running service keeps it (schemathesis against a real service)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiohttp
import hypothesis
import pytest
import schemathesis
from aiohttp import web
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy
from jsonschema_rs import Draft202012Validator
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode, HookContext, Response
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    ignored_auth,
    response_schema_conformance,
    status_code_conformance,
)

from tests.support.http_files import FileServer
from tests.support.processes import free_port
from tests.support.rclone_cloud import RcloneCloud
from tests.support.service import ServiceFactory
from tests.test_browser import CHROMIUM, chromium

# A route's variable part that is a plain choice of words, as in {action:pause|resume}.
_CHOICE_GROUP = re.compile(r"\(\?P<(\w+)>([\w-]+(?:\|[\w-]+)*)\)")


def routed_operations(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path) of every route, in the document's spelling: `{name}` for a variable part,
    one path per word of a choice (`{action:pause|resume}` → `.../pause`, `.../resume`)."""
    found: set[tuple[str, str]] = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        if "path" in info:
            paths = [str(info["path"])]
        else:
            paths = [str(info["formatter"])]
            for name, choices in _CHOICE_GROUP.findall(info["pattern"].pattern):
                paths = [
                    p.replace(f"{{{name}}}", word) for p in paths for word in choices.split("|")
                ]
        found.update((route.method, path) for path in paths)
    return found


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "head", "post", "put", "patch", "delete")
    }


async def test_the_document_names_every_route_and_only_those(
    service_factory: ServiceFactory,
) -> None:
    running = await service_factory()
    status, document = await running.api("GET", "/api/openapi.json", auth=False)
    assert status == 200
    assert document["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(document).validate()  # a well-formed OpenAPI document

    routed = routed_operations(running.service.parts.web.app)
    documented = documented_operations(document)
    # aiohttp answers HEAD for every GET route; the document names HEAD only where it matters.
    implied_heads = {("HEAD", path) for method, path in routed if method == "GET"}
    undocumented = routed - documented - implied_heads
    absent = documented - routed
    assert not undocumented, f"routes missing from the document: {sorted(undocumented)}"
    assert not absent, f"documented but not routed: {sorted(absent)}"
    assert ("POST", "/api/downloads/{id}/pause") in documented  # choices were expanded


async def test_the_document_and_its_page_need_no_token(service_factory: ServiceFactory) -> None:
    running = await service_factory()
    async with running.http.get(running.base_url + "/api/docs") as response:
        page = await response.text()
        assert response.status == 200
        assert response.content_type == "text/html"
        assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    assert '<script type="module" src="/static/js/apidocs.js">' in page
    status, script = await running.api("GET", "/static/js/apidocs.js", auth=False)
    assert status == 200 and b"/api/openapi.json" in script
    status, _ = await running.api("GET", "/api/config", auth=False)
    assert status == 401, "the rest of /api still needs the token"


# --- schemathesis against the running service ----------------------------------------------------

CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, ignored_auth]
EXAMPLES = 12  # generated cases per operation (plus one per seeded download)
STATEFUL_RUNS = 8  # sequences of linked calls
STATEFUL_STEPS = 6  # calls per sequence at most
BUDGET = 45.0  # seconds for the generated cases; later operations get one case each after it
# Run last: they wipe what the others read (every download; every session, this one's cookie;
# the settings: auto-delete removes the files the streams serve).
LAST = {
    ("PATCH", "/api/settings"),
    ("DELETE", "/api/downloads/{id}"),
    ("POST", "/logout"),
    ("POST", "/api/sessions/revoke-all"),
    ("DELETE", "/api/downloads"),
}


@dataclass(frozen=True)
class Seed:
    """A download made before the run, and the signed link to it."""

    id: int
    name: str
    sig: str


@dataclass(frozen=True)
class Seeds:
    """What the run starts with: downloads (completed, failed, running) and uploads."""

    downloads: list[Seed]
    uploads: list[int]


def _seed(download: dict[str, Any]) -> Seed:
    url = urlsplit(download["stream_url"] or download["watch_url"] or "/stream/0/x?sig=x")
    name = unquote(url.path.rsplit("/", 1)[-1])
    return Seed(download["id"], name, parse_qs(url.query).get("sig", [""])[0])


def _strategy(operation: APIOperation, seeds: Seeds) -> SearchStrategy[Case]:
    """Cases from the schema alone (valid and invalid), and as many that name a seeded download
    or upload (with a download's valid signature on /stream and /watch), so that the answers
    with data are checked too."""
    strategies = [operation.as_strategy(), operation.as_strategy(GenerationMode.NEGATIVE)]
    names = {p["name"] for p in operation.definition.raw.get("parameters", []) if p["in"] == "path"}
    signed = operation.path.startswith(("/stream", "/watch"))
    if names == {"id"} and operation.path.startswith("/api/uploads/"):
        for upload_id in seeds.uploads:
            strategies.append(operation.as_strategy(path_parameters={"id": upload_id}))
    elif "id" in names and (signed or operation.path.startswith("/api/downloads/")):
        for seed in seeds.downloads:
            path: dict[str, Any] = {"id": seed.id, "name": seed.name, "index": 1}
            path = {name: value for name, value in path.items() if name in names}
            query = {"sig": seed.sig} if signed else None
            strategies.append(operation.as_strategy(path_parameters=path, query=query))
    return st.one_of(strategies)


def _run_operation(
    operation: APIOperation, seeds: Seeds, headers: dict[str, str], examples: int
) -> None:
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    @hypothesis.given(case=_strategy(operation, seeds))
    def exercise(case: Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS, timeout=30)

    exercise()


@dataclass
class Outcome:
    """What a run saw: its failures (operation: what schemathesis reported) and the statuses
    each operation answered, stateful steps included."""

    failures: list[str] = field(default_factory=list)
    statuses: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    linked: list[str] = field(default_factory=list)  # stateful steps that followed a link


def exercise_api(base_url: str, token: str, seeds: Seeds, links: list[str]) -> Outcome:
    """Every operation with generated cases, then linked sequences (queue a download, act on
    it), then the operations that wipe what the others read. A queued body is sometimes one of
    `links` (made unique), so that sequences have a real download to act on."""
    schema = schemathesis.openapi.from_url(f"{base_url}/api/openapi.json", timeout=30)
    headers = {"Authorization": f"Bearer {token}"}
    outcome = Outcome()
    numbers = itertools.count()

    @schema.hook
    def flatmap_body(context: HookContext, body: Any) -> SearchStrategy[Any]:
        if context.operation is None or context.operation.label != "POST /api/downloads":
            return st.just(body)
        local = st.sampled_from(links).map(
            lambda url: {"url": f"{url}{'&' if '?' in url else '?'}n={next(numbers)}"}
        )
        return st.one_of(st.just(body), local)

    @schema.hook
    def after_call(context: HookContext, case: Case, response: Response) -> None:
        outcome.statuses[case.operation.label].add(response.status_code)

    operations: list[APIOperation] = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise AssertionError(f"schemathesis cannot read an operation: {result.err()}")
        operations.append(result.ok())
    operations.sort(key=lambda op: (op.method.upper(), op.path) in LAST)
    deadline = time.monotonic() + BUDGET

    def record(label: str, run: Callable[[], None]) -> None:
        try:
            run()
        except (Exception, FailureGroup) as exc:  # a FailureGroup is no Exception
            outcome.failures.append(f"{label}: {exc}")

    first_last = next(i for i, op in enumerate(operations) if (op.method.upper(), op.path) in LAST)
    for position, operation in enumerate(operations):
        if position == first_last:
            record("stateful", partial(_run_stateful, schema, headers, outcome))
        examples = EXAMPLES if time.monotonic() < deadline else 1
        record(operation.label, partial(_run_operation, operation, seeds, headers, examples))
    return outcome


def _run_stateful(schema: BaseSchema, headers: dict[str, str], outcome: Outcome) -> None:
    class Links(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Case) -> None:
            if case.operation.label != "POST /api/downloads":
                outcome.linked.append(case.operation.label)

        def get_call_kwargs(self, case: Case) -> dict[str, Any]:
            return {"headers": headers, "timeout": 30}

        def validate_response(self, response: Response, case: Case, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)

    Links.run(
        settings=hypothesis.settings(
            max_examples=STATEFUL_RUNS,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[hypothesis.Phase.generate],
            suppress_health_check=list(hypothesis.HealthCheck),
        )
    )


async def _collect(socket: aiohttp.ClientWebSocketResponse, into: list[Any]) -> None:
    async for message in socket:
        if message.type == aiohttp.WSMsgType.TEXT:
            into.append(json.loads(message.data))


@pytest.mark.slow
async def test_the_running_service_keeps_its_contract(
    service_factory: ServiceFactory,
    file_server: FileServer,
    rclone_config: Path,
    webdav_cloud: RcloneCloud,
) -> None:
    """schemathesis sends generated requests to a real service (real aria2c, SQLite, rclone to
    a WebDAV cloud, a local file server): no answer is a 5xx, and every answer's status and
    JSON match the document, as does every WebSocket message pushed meanwhile. Links it queues
    that leave this machine go to a closed local proxy port (they fail)."""
    running = await service_factory(
        overrides={
            "aria2": {
                "options": {
                    "all-proxy": f"http://127.0.0.1:{free_port()}",
                    "no-proxy": "127.0.0.1,localhost",
                }
            },
            "upload": {
                "targets": [{"name": "dav", "type": "rclone", "remote": "testdav", "path": "/up"}],
                "rclone_config": str(rclone_config),
                "retry_backoff": 0.5,
            },
        }
    )
    socket = await running.http.ws_connect(
        running.base_url.replace("http", "ws", 1) + "/api/ws", headers=running.auth
    )
    pushed: list[Any] = []
    listener = asyncio.create_task(_collect(socket, pushed))
    file_server.add_file("seed.bin", size=64 * 1024)
    file_server.add_file("slow.bin", size=4 * 1024 * 1024)
    downloads = []
    for url, final in (
        (file_server.url("seed.bin"), {"completed"}),
        (file_server.status_url(404), {"failed"}),
        (file_server.url("slow.bin", route="slow", rate=16 * 1024), {"downloading"}),
    ):
        status, body = await running.api("POST", "/api/downloads", json={"url": url})
        assert status == 201, body
        downloads.append(_seed(await running.wait_download(body["downloads"][0]["id"], final)))
    uploads: list[dict[str, Any]] = []
    deadline = time.monotonic() + 60
    while not any(u["status"] == "completed" for u in uploads) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        _, listed = await running.api("GET", "/api/uploads")
        uploads = listed["uploads"]
    assert any(u["status"] == "completed" for u in uploads), uploads
    seeds = Seeds(downloads, [u["id"] for u in uploads])

    links = [
        file_server.url("slow.bin", route="slow", rate=16 * 1024),
        file_server.status_url(404),
        file_server.url("seed.bin"),
    ]
    outcome = await asyncio.to_thread(exercise_api, running.base_url, running.token, seeds, links)

    await socket.send_str("ping")
    for _ in range(100):  # the pong comes after every message pushed before it
        if pushed and pushed[-1].get("type") == "pong":
            break
        await asyncio.sleep(0.1)
    await socket.close()
    await listener

    assert not outcome.failures, "\n\n".join(outcome.failures)
    _, document = await running.api("GET", "/api/openapi.json")
    # Every WebSocket message of the run is a WsMessage of the document.
    messages = Draft202012Validator(
        {"$ref": "#/components/schemas/WsMessage", "components": document["components"]}
    )
    wrong = [
        (message, str(error)[:300]) for message in pushed for error in messages.iter_errors(message)
    ]
    assert not wrong, wrong[:3]
    kinds = {message["type"] for message in pushed}
    assert {"hello", "download_update", "upload_update", "statistics_update", "pong"} <= kinds
    # schemathesis leaves out the operation that served it the document
    expected = {f"{method} {path}" for method, path in documented_operations(document)}
    assert set(outcome.statuses) == expected - {"GET /api/openapi.json"}
    assert outcome.linked, "no sequence went past queueing a download"
    # The answers with data were checked too, not only refusals.
    for label, status in (
        ("POST /api/downloads", 201),
        ("GET /api/downloads/{id}", 200),
        ("GET /api/downloads/{id}/files", 200),
        ("POST /api/downloads/{id}/pause", 200),
        ("GET /stream/{id}/{name}", 200),
        ("GET /watch/{id}", 200),
        ("GET /api/uploads", 200),
        ("POST /api/uploads/{id}/retry", 409),  # a completed upload
    ):
        assert status in outcome.statuses[label], (label, outcome.statuses[label])


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)
async def test_the_docs_page_shows_every_operation_in_chromium(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    """The page renders every operation and schema of the document with its own script only
    (its CSP holds: no error, no blocked resource), without a token, and follows a link to a
    card."""
    running = await service_factory()
    _, document = await running.api("GET", "/api/openapi.json", auth=False)
    errors: list[str] = []

    def on_event(method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.exceptionThrown":
            errors.append(str(params.get("exceptionDetails", {}))[:300])
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            errors.append(str(params["entry"].get("text", ""))[:300])

    async with chromium(tmp_path / "profile", tmp_path / "chromium.log") as page:
        page.on_event(on_event)
        await page.send("Runtime.enable")
        await page.send("Log.enable")
        await page.send("Page.navigate", {"url": running.base_url + "/api/docs#schema-Upload"})
        shown = await page.wait_for(
            "document.querySelectorAll('.api-op').length", 20, "the cards on the page"
        )
        titles = await page.evaluate(
            "[...document.querySelectorAll('.api-op h3')].map(h => h.textContent)"
        )
        intro = await page.evaluate("document.getElementById('api-intro').textContent")
        fields = await page.evaluate(
            "[...document.querySelectorAll('#schema-Upload li code')].map(c => c.textContent)"
        )
        top = await page.evaluate(
            # `|| 0`: a -0 comes back over DevTools as no value at all
            "Math.round(document.getElementById('schema-Upload').getBoundingClientRect().top) || 0"
        )
    operations = documented_operations(document)
    assert shown == len(operations) + len(document["components"]["schemas"])
    assert {f"{method} {path}" for method, path in operations} <= set(titles)
    assert intro.startswith(f"MistRelay {document['info']['version']} — OpenAPI 3.1")
    assert fields == list(document["components"]["schemas"]["Upload"]["properties"])
    assert abs(top) < 5, "the page scrolled to the card the link names"
    assert not errors, errors
