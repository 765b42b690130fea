"""Reliability figures: fault tests record what happened; the session writes RELIABILITY.md.

A fault test asks for the `reliability` fixture and records one row per injected fault:

    reliability.record("aria2c killed mid-download", "no job lost: every job ends completed",
                       jobs_started=20, jobs_finished=20, rows_wrong=0, bytes_lost=0)

A test may also carry ``@pytest.mark.fault("name", promise="...")``: it then gets a row even when
it fails before recording anything. A hostile-input test carries
``@pytest.mark.attack("name", promise="...")`` and gets a row in the table of attacks (attack,
promise, result). At the end of a session in which any such row exists, the
table is written to RELIABILITY.md at the project root, rows sorted by fault name so that diffs
between runs stay small; the Result column is the test's own outcome. The committed file is the
evidence of a whole run, so a session that picked some tests (paths, ``-k``, ``-m``) leaves it
alone: ``--reliability-file=PATH`` writes any session's figures to PATH, and
``--reliability-file=`` writes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

FILE_NAME = "RELIABILITY.md"
_STORE = pytest.StashKey["ReliabilityStore"]()
_MISSING = "—"


@dataclass(frozen=True)
class FaultRecord:
    """The figures of one injected fault, as the test measured them."""

    fault: str
    promise: str
    nodeid: str
    jobs_started: int | None = None
    jobs_finished: int | None = None
    rows_wrong: int | None = None
    bytes_lost: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReliabilityStore:
    """Every record and every test outcome of one session."""

    records: list[FaultRecord] = field(default_factory=list)
    # Tests marked `fault` that recorded nothing (yet): (fault, promise) by node id.
    declared: dict[str, tuple[str, str]] = field(default_factory=dict)
    # Tests marked `attack`: (attack, promise) by node id.
    attacks: dict[str, tuple[str, str]] = field(default_factory=dict)
    outcomes: dict[str, str] = field(default_factory=dict)

    def add(self, record: FaultRecord) -> None:
        self.records.append(record)

    def note_outcome(self, nodeid: str, when: str, outcome: str) -> None:
        """The worst phase wins: a failed setup or teardown makes the test an error."""
        if self.outcomes.get(nodeid) in ("failed", "error"):
            return
        if outcome == "failed":
            self.outcomes[nodeid] = "failed" if when == "call" else "error"
        elif outcome == "skipped" or when == "call":
            self.outcomes[nodeid] = outcome

    def rows(self) -> list[tuple[FaultRecord, str]]:
        """(record, result) for the table, stable-sorted by fault name, then test."""
        recorded = {r.nodeid for r in self.records}
        rows = list(self.records)
        for nodeid, (fault, promise) in self.declared.items():
            if nodeid not in recorded:
                rows.append(FaultRecord(fault=fault, promise=promise, nodeid=nodeid))
        rows.sort(key=lambda r: (r.fault.casefold(), r.nodeid))
        return [(r, self.outcomes.get(r.nodeid, "not run")) for r in rows]

    def attack_rows(self) -> list[tuple[str, str, str, str]]:
        """(attack, promise, node id, result) of the attack tests, sorted like the faults."""
        rows = [
            (attack, promise, nodeid, self.outcomes.get(nodeid, "not run"))
            for nodeid, (attack, promise) in self.attacks.items()
        ]
        return sorted(rows, key=lambda r: (r[0].casefold(), r[2]))


class Recorder:
    """What a fault test gets from the `reliability` fixture."""

    def __init__(self, store: ReliabilityStore, nodeid: str) -> None:
        self._store = store
        self.nodeid = nodeid

    def record(
        self,
        fault: str,
        promise: str,
        *,
        jobs_started: int,
        jobs_finished: int,
        rows_wrong: int,
        bytes_lost: int,
        extra: dict[str, Any] | None = None,
    ) -> FaultRecord:
        for name, value in (
            ("jobs_started", jobs_started),
            ("jobs_finished", jobs_finished),
            ("rows_wrong", rows_wrong),
            ("bytes_lost", bytes_lost),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a count (int >= 0), not {value!r}")
        if not fault.strip() or not promise.strip():
            raise ValueError("a fault record needs a fault name and a promise")
        record = FaultRecord(
            fault=fault.strip(),
            promise=promise.strip(),
            nodeid=self.nodeid,
            jobs_started=jobs_started,
            jobs_finished=jobs_finished,
            rows_wrong=rows_wrong,
            bytes_lost=bytes_lost,
            extra=dict(extra or {}),
        )
        self._store.add(record)
        return record


# -- rendering ------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    if value is None:
        return _MISSING
    text = " ".join(str(value).split())  # one line
    return text.replace("\\", "\\\\").replace("|", "\\|")


def _count(value: int | None) -> str:
    return _MISSING if value is None else f"{value:,}"


def render(
    rows: list[tuple[FaultRecord, str]],
    *,
    when: datetime,
    command: str,
    attacks: list[tuple[str, str, str, str]] | None = None,
) -> str:
    """RELIABILITY.md's text for the given (record, result) rows and (attack, promise, node id,
    result) rows."""
    results = [result for _record, result in rows]
    failed = sum(1 for r in results if r in ("failed", "error"))
    summary = (
        f"{len(rows)} fault(s) injected; {len(rows) - failed} held their promise"
        + (f", {failed} did not" if failed else "")
        + "."
    )
    lines = [
        "# Reliability",
        "",
        "MistRelay promises that nothing is lost: every job it accepts ends in a final state that",
        "is true to the disk, to aria2 and to the clouds, whatever breaks on the way. This page is",
        "the evidence: each row is one fault injected by the test suite into a real running",
        "service (real aria2c, rclone, SQLite and HTTP servers on loopback), what MistRelay",
        "promises when it happens, and what the test measured afterwards.",
        "",
        "*Generated by the test suite (`tests/support/reliability.py`) — do not edit by hand;",
        "run the fault tests again to refresh it.*",
        "",
        f"- Run: {when.astimezone(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Command: `{command}`",
        f"- {summary}",
        "",
        "| Fault | What MistRelay promises | Test | Result | Jobs started | Jobs finished "
        "| Rows wrong | Bytes lost |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for record, result in rows:
        shown = f"**{result}**" if result in ("failed", "error") else result
        lines.append(
            "| "
            + " | ".join(
                [
                    _cell(record.fault),
                    _cell(record.promise),
                    f"`{_cell(record.nodeid)}`",
                    shown,
                    _count(record.jobs_started),
                    _count(record.jobs_finished),
                    _count(record.rows_wrong),
                    _count(record.bytes_lost),
                ]
            )
            + " |"
        )
    if attacks:
        held = sum(1 for *_rest, result in attacks if result == "passed")
        lines += [
            "",
            "## Attacks",
            "",
            f"{len(attacks)} attack(s) made by the hostile-input tests; {held} held.",
            "",
            "| Attack | What MistRelay promises | Test | Result |",
            "|---|---|---|---|",
        ]
        for attack, promise, nodeid, result in attacks:
            shown = f"**{result}**" if result in ("failed", "error") else result
            lines.append(f"| {_cell(attack)} | {_cell(promise)} | `{_cell(nodeid)}` | {shown} |")
    notes = [(record, result) for record, result in rows if record.extra]
    if notes:
        lines += ["", "## Details", ""]
        for record, _result in notes:
            details = ", ".join(f"{_cell(k)}: {_cell(v)}" for k, v in sorted(record.extra.items()))
            lines.append(f"- **{_cell(record.fault)}** — {details}")
    lines += [
        "",
        "Columns: *Jobs started* counts the downloads the test submitted; *Jobs finished* those",
        "that ended in a final state; *Rows wrong* counts database rows that disagreed with the",
        "disk or aria2 afterwards; *Bytes lost* counts accepted bytes that were missing or damaged",
        f"at the end. {_MISSING} means the test stopped before it could measure.",
        "",
    ]
    return "\n".join(lines)


def command_line(config: pytest.Config) -> str:
    """The pytest command of this session, with paths shown relative to the project root."""
    root = str(config.rootpath)
    args = []
    for arg in config.invocation_params.args:
        text = str(arg)
        args.append("." if text == root else text.replace(root + os.sep, ""))
    return " ".join(["pytest", *args])


def picked_some_tests(config: pytest.Config) -> bool:
    """Whether the session ran a selection (paths, -k, -m) rather than the whole suite."""
    named_paths = config.args_source is pytest.Config.ArgsSource.ARGS
    return named_paths or bool(config.getoption("keyword") or config.getoption("markexpr"))


# -- the pytest plugin --------------------------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability-file",
        default=None,
        help=f"where fault tests' figures are written (default: {FILE_NAME} at the project root;"
        " empty: nowhere)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "fault(name, promise=...): a fault-injection test; it gets a row in "
        f"{FILE_NAME} even when it fails before recording its figures",
    )
    config.addinivalue_line(
        "markers",
        f"attack(name, promise=...): a hostile-input test; it gets a row in {FILE_NAME}",
    )
    config.stash[_STORE] = ReliabilityStore()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        store = item.config.stash[_STORE]
        for kind, table in (("fault", store.declared), ("attack", store.attacks)):
            marker = item.get_closest_marker(kind)
            if marker is not None:
                name = str(marker.args[0]) if marker.args else item.name
                table[item.nodeid] = (name, str(marker.kwargs.get("promise", "")))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    store = item.config.stash.get(_STORE, None)
    if store is not None:
        store.note_outcome(item.nodeid, report.when, report.outcome)
    return report


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    """Record the figures of the fault this test injects (see the module doc)."""
    yield Recorder(request.config.stash[_STORE], request.node.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput"):
        return  # a parallel worker: its records are partial
    store = config.stash.get(_STORE, None)
    if store is None:
        return
    # Only tests that actually ran (recorded, or marked and run) make rows.
    ran = [(record, result) for record, result in store.rows() if result != "not run"]
    attacks = [row for row in store.attack_rows() if row[3] != "not run"]
    if not ran and not attacks:
        return
    option = config.getoption("--reliability-file")
    if option == "" or (option is None and picked_some_tests(config)):
        return
    target = Path(option) if option else config.rootpath / FILE_NAME
    text = render(ran, when=datetime.now(UTC), command=command_line(config), attacks=attacks)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, target)
