"""What the bot owes a chat when a download ends (the progress message's last edit and the notice
of how it ended) survives a stop: it is in the store's outbox, delivered after the restart, once.
A real service with its bot, an offline Telegram at the network edge (tests/support/
fake_telegram.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from records import DownloadRow
from tests.support.fake_telegram import SentMessage
from tests.support.http_files import MIB, FileServer
from tests.support.reliability import Recorder
from tests.test_bot import Relay, RelayFactory, eventually, relay_factory

__all__ = ["relay_factory"]  # the fixture, shared with the bot's other tests

LONG_INTERVAL = 60.0  # seconds between a chat's edits: nothing more is sent before the stop
# The test's file server is on loopback.
LOOPBACK_ALLOWED = {"aria2": {"allow_private_addresses": True}}


def set_progress_interval(config_path: Path, seconds: float) -> None:
    document = yaml.safe_load(config_path.read_text())
    document["telegram"]["progress_interval"] = seconds
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))


def completion_notices(relay: Relay, row: DownloadRow) -> list[SentMessage]:
    return [m for m in relay.fake.sent_messages() if m.text.startswith(f"✅ Downloaded #{row.id} ")]


async def finish_in_chat(relay: Relay, file_server: FileServer, name: str) -> DownloadRow:
    """A download asked for in the admin's chat, run to its end; the row as it ended."""
    file_server.add_file(name, size=MIB, seed=len(name))
    await relay.chat().say(file_server.url(name))
    rows = [r for r in await relay.downloads() if r.file_name == name]
    assert len(rows) == 1, rows
    await relay.wait_status(rows[0].id, "completed")
    ended: DownloadRow = await relay.db.get_download_by_id(rows[0].id)
    return ended


@pytest.mark.fault(
    "MistRelay stopped just after a chat's job ended",
    promise="after the restart the job's progress message shows its end and its notice is sent, "
    "once",
)
async def test_a_job_that_ends_just_before_a_stop_is_told_after_the_restart_once(
    relay_factory: RelayFactory,
    file_server: FileServer,
    caplog: pytest.LogCaptureFixture,
    reliability: Recorder,
) -> None:
    caplog.set_level(logging.WARNING, logger="pyrogram")
    relay = await relay_factory(LOOPBACK_ALLOWED, interval=LONG_INTERVAL, name="outbox")
    chat = relay.chat()
    file_server.add_file("ends.bin", size=2 * MIB, seed=5)
    [ack] = await chat.say(file_server.url("ends.bin", route="hold", bytes=65536))
    [row] = await relay.jobs(1)
    await relay.wait_status(row.id, "downloading")

    def edited_to(text: str) -> bool:
        return any(e.message_id == ack.message_id and text in e.text for e in relay.fake.edits())

    # The chat's first edit goes out at once, the next one only a minute later...
    await eventually(lambda: edited_to(""), 20, "the progress message edited")
    # ... so the end, a moment later, is still owed when the service stops.
    file_server.release("ends.bin")
    await relay.wait_status(row.id, "completed")
    [owed] = await relay.db.fetch_undelivered_notices()
    assert (owed.download_id, owed.chat_id, owed.kind) == (row.id, row.chat_id, "completed")
    config_path = relay.running.config_path
    await relay.running.stop()
    assert not edited_to("Completed")
    assert completion_notices(relay, row) == []

    set_progress_interval(config_path, 0.05)
    again = await relay_factory(config_path=config_path, name="outbox")
    await eventually(lambda: bool(completion_notices(again, row)), 20, "the completion notice")
    final = [e for e in again.fake.edits() if e.message_id == ack.message_id][-1]
    [notice] = completion_notices(again, row)
    owed_after_restart = await again.db.fetch_undelivered_notices()

    # Another start sends it no more: a later job's notice comes, that one's does not again.
    await again.running.stop()
    third = await relay_factory(config_path=config_path, name="outbox")
    later = await finish_in_chat(third, file_server, "later.bin")
    await eventually(lambda: bool(completion_notices(third, later)), 20, "the later job's notice")
    sent = len(completion_notices(third, row))
    deprecated = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    reliability.record(
        "MistRelay stopped just after a chat's job ended",
        "after the restart the job's progress message shows its end and its notice is sent, once",
        jobs_started=1,
        jobs_finished=1,
        rows_wrong=len(owed_after_restart),
        bytes_lost=0,
        extra={"notices sent over three runs": sent, "deprecation warnings": len(deprecated)},
    )
    assert "Completed" in final.text and final.buttons == []  # nothing left to press
    assert notice.reply_to_message_id == row.message_id
    assert f"/stream/{row.id}/ends.bin?sig=" in notice.text
    assert owed_after_restart == []
    assert sent == 1
    assert await third.db.fetch_undelivered_notices() == []
    assert deprecated == []


async def test_a_failure_owed_at_a_stop_is_told_after_the_restart(
    relay_factory: RelayFactory, file_server: FileServer
) -> None:
    relay = await relay_factory(LOOPBACK_ALLOWED, interval=LONG_INTERVAL, name="failing")
    # The chat's first edit goes out at once, the next one only a minute later: spend it.
    [first] = await relay.chat().say(file_server.url("missing.bin"))
    await eventually(
        lambda: any(e.message_id == first.message_id for e in relay.fake.edits()),
        20,
        "the first job's progress message edited",
    )
    [ack] = await relay.chat().say(file_server.status_url(404))
    rows = await relay.jobs(2)
    row = rows[-1]
    await relay.wait_status(row.id, "failed")
    owed = {n.download_id for n in await relay.db.fetch_undelivered_notices()}
    assert row.id in owed
    config_path = relay.running.config_path
    await relay.running.stop()
    assert not any(
        e.message_id == ack.message_id and "Failed" in e.text for e in relay.fake.edits()
    )
    assert not [m for m in relay.fake.sent_messages() if m.text.startswith(f"❌ #{row.id} ")]

    set_progress_interval(config_path, 0.05)
    again = await relay_factory(config_path=config_path, name="failing")

    def told() -> list[SentMessage]:
        return [m for m in again.fake.sent_messages() if m.text.startswith(f"❌ #{row.id} ")]

    await eventually(lambda: bool(told()), 20, "the failure notice")
    failed = await again.db.get_download_by_id(row.id)
    [notice] = told()
    assert failed.error_message and failed.error_message in notice.text
    final = [e for e in again.fake.edits() if e.message_id == ack.message_id][-1]
    assert "Failed" in final.text
    assert [b.callback_data for line in final.buttons for b in line] == [
        f"d:retry:{row.id}".encode()
    ]
