"""The command line's client: `app.py add …` and `app.py list …` talk to the running service
through its HTTP API, with the web token the service keeps (``web.token``, else the file it
generated in the data folder).

Exit codes: 0 all went well; 1 something was refused (or, with ``add --wait``, a job failed);
2 the service is not reachable or refused the token (one line on stderr); 130 Ctrl-C stopped
``add --wait`` (the jobs go on in the service).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import aiohttp
from loguru import logger

from configer import WEB_TOKEN_FILE, Config, mask_url_passwords
from db import DOWNLOAD_STATUSES, FINAL_DOWNLOAD_STATUSES
from webstreamer.context import MAX_LIST_LIMIT
from webstreamer.routes.api import MAX_URLS_PER_REQUEST

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_UNREACHABLE = 2
EXIT_INTERRUPTED = 130
POLL_INTERVAL = 0.5  # seconds between two looks at the followed jobs
BAR_WIDTH = 24
PLAIN_STEP = 10  # percent: a line per step when the output is not a terminal
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)


class ServiceUnreachable(Exception):
    """The service did not answer, or refused the token: the message is the one line shown."""


@dataclass(frozen=True)
class ServiceAddress:
    url: str
    token: str = field(repr=False)
    token_source: str  # where the token came from, for the message when it is refused


def service_address(config: Config, url: str | None) -> ServiceAddress:
    """Where the service listens (its web host and port, a wildcard → loopback; `url` wins) and
    its token (``web.token``, else the data folder's generated one, read and never created)."""
    base = url.rstrip("/") if url else replace(config.web, public_url="").base_url
    if config.web.token:
        return ServiceAddress(base, config.web.token, "web.token")
    path = config.data_dir / WEB_TOKEN_FILE
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ServiceUnreachable(
            f"no web token: {path} does not exist (start the service once, or set web.token)"
        ) from None
    except OSError as exc:
        raise ServiceUnreachable(f"cannot read the web token {path}: {exc.strerror}") from None
    if not token:
        raise ServiceUnreachable(f"the web token file {path} is empty")
    return ServiceAddress(base, token, str(path))


def check_url(text: str) -> str:
    """argparse type of `--url`: an http(s) address."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise argparse.ArgumentTypeError(f"not an http:// or https:// address: {text!r}")
    return text


def list_limit(text: str) -> int:
    """argparse type of `--limit`: a whole number from 1 to MAX_LIST_LIMIT."""
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIST_LIMIT:
        raise argparse.ArgumentTypeError(f"not a whole number from 1 to {MAX_LIST_LIMIT}: {text!r}")
    return int(text)


def add_parsers(sub: Any) -> None:
    """The `add` and `list` sub-commands on app.py's sub-parsers."""
    url_help = "the service's address (default: web.host and web.port of the config)"
    add = sub.add_parser("add", help="add links, magnets and .torrent files to the running service")
    add.add_argument("items", nargs="+", metavar="URL|MAGNET|FILE.torrent")
    add.add_argument(
        "--wait", action="store_true", help="follow the jobs until each completed or failed"
    )
    add.add_argument("--url", type=check_url, default=None, help=url_help)
    listing = sub.add_parser("list", help="list the running service's downloads")
    listing.add_argument("--status", choices=DOWNLOAD_STATUSES, default=None)
    listing.add_argument(
        "--limit",
        type=list_limit,
        default=50,
        metavar=f"1-{MAX_LIST_LIMIT}",
        help="how many of the newest downloads (default 50)",
    )
    listing.add_argument("--json", action="store_true", help="the downloads as JSON, for scripts")
    listing.add_argument("--url", type=check_url, default=None, help=url_help)


def run_command(config: Config, args: argparse.Namespace) -> int:
    """Run `add` or `list`; returns the exit code."""
    try:
        address = service_address(config, args.url)
        if args.command == "add":
            return asyncio.run(add_command(address, args.items, wait=args.wait))
        return asyncio.run(
            list_command(address, status=args.status, limit=args.limit, as_json=args.json)
        )
    except ServiceUnreachable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:  # Ctrl-C before `add --wait` follows: what was sent stays sent
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# --- talking to the service ---------------------------------------------------------------------


class Api:
    """The service's API through one aiohttp session; every failure to reach it, and a refused
    token, raise :class:`ServiceUnreachable`."""

    def __init__(self, address: ServiceAddress, session: aiohttp.ClientSession) -> None:
        self.address = address
        self.session = session

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        url = self.address.url + path
        headers = {"Authorization": f"Bearer {self.address.token}"}
        logger.bind(method=method, url=url).debug("API call")
        try:
            async with self.session.request(
                method, url, headers=headers, timeout=REQUEST_TIMEOUT, **kwargs
            ) as response:
                status = response.status
                text = await response.text(errors="replace")
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            why = str(exc) or type(exc).__name__
            raise ServiceUnreachable(
                f"the service at {self.address.url} is not reachable: {why}"
            ) from None
        try:
            body: Any = json.loads(text)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # the service answers every request with a JSON object
            raise ServiceUnreachable(
                f"{self.address.url} is not the service: {method} {path} answered HTTP {status} "
                "without a JSON object"
            )
        if status in (401, 403):
            raise ServiceUnreachable(
                f"the service at {self.address.url} refused the token "
                f"(from {self.address.token_source}): {reason_of(body)}"
            )
        return status, body


def reason_of(body: dict[str, Any]) -> str:
    """The server's reason in an error answer ({"error": code, "detail": …})."""
    detail = body.get("detail")
    if isinstance(detail, dict):
        if "existing_id" in detail:
            return f"already added as #{detail['existing_id']}"
        detail = detail.get("message")
    if isinstance(detail, str) and detail:
        return detail
    return str(body.get("error") or "no reason given")


@dataclass
class Outcome:
    added: list[dict[str, Any]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)


def is_torrent_file(item: str) -> bool:
    lowered = item.lower()
    return lowered.endswith(".torrent") and "://" not in item and not lowered.startswith("magnet:")


async def add_links(api: Api, links: list[str], outcome: Outcome) -> None:
    """POST the links in batches; the links the server names as bad are refused and the rest
    sent again, so that one bad link does not hold back the others."""
    for start in range(0, len(links), MAX_URLS_PER_REQUEST):
        batch = links[start : start + MAX_URLS_PER_REQUEST]
        while batch:
            status, body = await api.call("POST", "/api/downloads", json={"urls": batch})
            if status == 400 and body.get("error") == "invalid_urls":
                bad = {int(entry["index"]): str(entry["reason"]) for entry in body["detail"]}
                outcome.refused.extend((batch[i], reason) for i, reason in sorted(bad.items()))
                batch = [url for i, url in enumerate(batch) if i not in bad]
                continue
            if status == 201:
                outcome.added.extend(body["downloads"])
                outcome.refused.extend(
                    (d["url"], f"already added as #{d['existing_id']}") for d in body["duplicates"]
                )
            elif status == 409 and body.get("error") == "duplicate":
                detail = body["detail"]
                for entry in detail if isinstance(detail, list) else [detail]:
                    outcome.refused.append(
                        (entry["url"], f"already added as #{entry['existing_id']}")
                    )
            else:
                reason = f"{reason_of(body)} (HTTP {status})"
                outcome.refused.extend((url, reason) for url in batch)
            break


async def add_torrent_file(api: Api, item: str, outcome: Outcome) -> None:
    path = Path(item)
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except OSError as exc:
        outcome.refused.append((item, f"cannot read the file: {exc.strerror}"))
        return
    form = aiohttp.FormData()
    form.add_field("file", data, filename=path.name, content_type="application/x-bittorrent")
    status, body = await api.call("POST", "/api/downloads/torrent", data=form)
    if status == 201:
        outcome.added.extend(body["downloads"])
    else:
        outcome.refused.append((item, f"{reason_of(body)} (HTTP {status})"))


def printable(text: str) -> str:
    """`text` safe to print on a terminal: control characters (escape sequences in a hostile file
    name, line breaks) become "?"."""
    return "".join(c if c.isprintable() else "?" for c in text)


def display_name(row: dict[str, Any]) -> str:
    name = row.get("file_name") or row.get("source_url") or row.get("source_key") or ""
    return printable(mask_url_passwords(str(name)))


async def add_command(
    address: ServiceAddress, items: Sequence[str], *, wait: bool, out: TextIO = sys.stdout
) -> int:
    """Add every item (the links first, in batches; then the .torrent files, one by one); print
    each created id and name on stdout and each refusal with its reason on stderr."""
    outcome = Outcome()
    async with aiohttp.ClientSession() as session:
        api = Api(address, session)
        links = [item for item in items if not is_torrent_file(item)]
        if links:
            await add_links(api, links, outcome)
        for item in items:
            if is_torrent_file(item):
                await add_torrent_file(api, item, outcome)
        code = EXIT_REFUSED if outcome.refused else EXIT_OK
        if not (wait and outcome.added):
            print_outcome(outcome, out)
            return code
        with ctrl_c_sets() as stop:  # from the first id shown, Ctrl-C stops only the waiting
            print_outcome(outcome, out)
            waited = await follow(api, [int(row["id"]) for row in outcome.added], out, stop)
    return waited if waited == EXIT_INTERRUPTED else max(code, waited)


def print_outcome(outcome: Outcome, out: TextIO) -> None:
    for row in outcome.added:
        print(f"#{row['id']}\tadded\t{display_name(row)}", file=out, flush=True)
    for item, reason in outcome.refused:
        shown = printable(mask_url_passwords(item))
        print(f"refused\t{shown}: {printable(reason)}", file=sys.stderr, flush=True)


# --- add --wait ---------------------------------------------------------------------------------


@contextlib.contextmanager
def ctrl_c_sets() -> Iterator[asyncio.Event]:
    """While the block runs, Ctrl-C (SIGINT) sets the event instead of interrupting."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)
    try:
        yield stop
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def percent(row: dict[str, Any]) -> float | None:
    total = int(row.get("total_length") or 0)
    if total <= 0:
        return 100.0 if row.get("status") == "completed" else None
    return min(100.0, 100.0 * int(row.get("completed_length") or 0) / total)


def human_rate(rate: int) -> str:
    if rate < 1024:
        return f"{rate} B/s"
    value = rate / 1024
    for unit in ("KiB/s", "MiB/s"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB/s"


def bar_line(row: dict[str, Any]) -> str:
    """`#12 [#########...............]  37.5%  1.2 MiB/s  downloading  name`."""
    share = percent(row)
    filled = round(BAR_WIDTH * (share or 0) / 100)
    bar = "#" * filled + "." * (BAR_WIDTH - filled)
    shown = f"{share:5.1f}%" if share is not None else "    ?%"
    speed = (
        human_rate(int(row.get("download_speed") or 0)) if row["status"] == "downloading" else ""
    )
    return f"#{row['id']} [{bar}] {shown} {speed:>11}  {row['status']:<11} {display_name(row)}"


def final_line(row: dict[str, Any]) -> str:
    line = f"#{row['id']}\t{row['status']}\t{display_name(row)}"
    if row["status"] != "completed" and row.get("error_message"):
        line += f": {printable(str(row['error_message']))}"
    return line


class Progress:
    """Draws the followed jobs: on a terminal a block of bars redrawn in place; otherwise a plain
    line when a job changes status or crosses a 10 % step."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0
        self.last: dict[int, tuple[str, int]] = {}

    def show(self, rows: list[dict[str, Any]]) -> None:
        size = shutil.get_terminal_size()
        if self.tty and len(rows) < size.lines:  # a block taller than the screen: plain lines
            width = max(20, size.columns - 1)
            up = f"\x1b[{self.drawn}F" if self.drawn else ""
            lines = "".join(f"\x1b[2K{bar_line(row)[:width]}\n" for row in rows)
            self.out.write(up + lines)
            self.drawn = len(rows)
        else:
            for row in rows:
                step = int((percent(row) or 0) // PLAIN_STEP)
                mark = (str(row["status"]), step)
                if self.last.get(int(row["id"])) != mark:
                    self.last[int(row["id"])] = mark
                    share = percent(row)
                    shown = f"{share:.0f}%" if share is not None else "?%"
                    self.out.write(f"#{row['id']}\t{row['status']}\t{shown}\t{display_name(row)}\n")
        self.out.flush()


async def follow(api: Api, ids: list[int], out: TextIO, stop: asyncio.Event) -> int:
    """Poll the jobs until each is completed, failed, cancelled or deleted, or until `stop` is
    set (the jobs go on). Returns 0 all completed, 1 one did not, 130 stopped."""
    progress = Progress(out)
    rows: dict[int, dict[str, Any]] = {}
    while True:
        for download_id in ids:
            status, body = await api.call("GET", f"/api/downloads/{download_id}")
            if status == 404:
                body = {**rows.get(download_id, {"id": download_id}), "status": "deleted"}
            elif status != 200:
                raise ServiceUnreachable(
                    f"the service answered HTTP {status} for #{download_id}: {reason_of(body)}"
                )
            rows[download_id] = body
        current = [rows[i] for i in ids]
        progress.show(current)
        if all(row["status"] in (*FINAL_DOWNLOAD_STATUSES, "deleted") for row in current):
            break
        try:
            await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
        except TimeoutError:
            continue
        print(
            f"stopped waiting; the jobs go on in the service: {' '.join(f'#{i}' for i in ids)}",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_INTERRUPTED
    for row in current:
        print(final_line(row), file=out, flush=True)
    return EXIT_OK if all(row["status"] == "completed" for row in current) else EXIT_REFUSED


# --- list ---------------------------------------------------------------------------------------


def progress_text(row: dict[str, Any]) -> str:
    share = percent(row)
    return f"{share:.1f}%" if share is not None else "-"


def table(rows: list[dict[str, Any]]) -> str:
    cells = [("ID", "STATUS", "PROGRESS", "NAME")]
    cells += [(str(r["id"]), str(r["status"]), progress_text(r), display_name(r)) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    return "\n".join(
        f"{c[0]:>{widths[0]}}  {c[1]:<{widths[1]}}  {c[2]:>{widths[2]}}  {c[3]}".rstrip()
        for c in cells
    )


async def list_command(
    address: ServiceAddress,
    *,
    status: str | None,
    limit: int,
    as_json: bool,
    out: TextIO = sys.stdout,
) -> int:
    """Print the newest downloads (newest first) as a table, or as the API's JSON."""
    query: dict[str, str | int] = {"limit": limit}
    if status:
        query["status"] = status
    async with aiohttp.ClientSession() as session:
        code, body = await Api(address, session).call("GET", "/api/downloads", params=query)
    if code != 200:
        print(
            f"error: the service refused the list: {reason_of(body)} (HTTP {code})", file=sys.stderr
        )
        return EXIT_REFUSED
    rows = list(body["downloads"])
    if as_json:
        print(json.dumps(rows, indent=2, ensure_ascii=False), file=out)
    else:
        print(table(rows), file=out)
    return EXIT_OK
