"""The aria2 layer against a real aria2c: process, transport, and operations."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp import web

from aria2_client.client import Aria2Client
from aria2_client.models import (
    STATUS_KEYS,
    Aria2Notification,
    Aria2Status,
    format_duration,
    human_size,
    human_speed,
)
from aria2_client.process import Aria2StartError, EmbeddedAria2
from aria2_client.sync import (
    Complete,
    Fail,
    FollowGid,
    Move,
    Oversized,
    RowDetails,
    RowSync,
    local_path,
    plan,
    store_change,
)
from aria2_client.transport import (
    Aria2RpcError,
    Aria2Transport,
    Aria2Unavailable,
    websocket_url,
)
from records import DownloadRow, ProgressUpdate, TorrentFile
from tests.support import records
from tests.support.processes import ProcessReaper, free_port, make_test_aria2, pid_alive

UNKNOWN_GID = "0123456789abcdef"
ROOT = Path(__file__).resolve().parent.parent


# -- a tiny static file server (Range support comes with aiohttp's static route) ---------------


@dataclass
class FileServer:
    root: Path
    base_url: str

    def add(self, name: str, size: int) -> tuple[str, bytes]:
        data = os.urandom(size)
        (self.root / name).write_bytes(data)
        return self.base_url + name, data


@pytest_asyncio.fixture
async def file_server(tmp_path: Path) -> AsyncIterator[FileServer]:
    root = tmp_path / "www"
    root.mkdir()
    app = web.Application()
    app.router.add_static("/files/", root)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield FileServer(root, f"http://127.0.0.1:{port}/files/")
    finally:
        await runner.cleanup()


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 10, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


async def wait_status(
    client: Aria2Client, gid: str, states: set[str], timeout: float = 10
) -> Aria2Status:
    seen: list[Aria2Status] = []

    async def reached() -> bool:
        seen.append(await client.tell_status(gid))
        return seen[-1].status in states

    await wait_until(reached, timeout, f"{gid} to reach {states}")
    return seen[-1]


# -- models (no process) ---------------------------------------------------------------------


def test_status_from_struct_converts_strings_and_tolerates_missing_keys() -> None:
    status = Aria2Status.from_struct(
        {
            "gid": "2089b05ecca3d829",
            "status": "active",
            "totalLength": "1000",
            "completedLength": "420",
            "downloadSpeed": "10",
            "errorCode": "0",
            "followedBy": ["aaaa000000000001"],
            "files": [
                {
                    "index": "1",
                    "path": "/data/dl/movie.mkv",
                    "length": "1000",
                    "completedLength": "420",
                    "selected": "true",
                    "uris": [{"uri": "http://h/x/movie.mkv", "status": "used"}],
                }
            ],
            "seeder": "false",
            "connections": "3",
        }
    )
    assert status.total_length == 1000 and status.completed_length == 420
    assert status.progress == pytest.approx(0.42)
    assert status.progress_string() == "42.00%"
    assert status.eta_seconds == 58
    assert status.eta_string() == "58s"
    assert status.name == "movie.mkv"
    assert status.followed_by == ("aaaa000000000001",)
    assert status.connections == 3 and status.upload_speed == 0
    assert not status.is_torrent and not status.is_metadata
    assert status.files[0].selected and status.files[0].index == 1

    stalled = Aria2Status.from_struct({"gid": "g", "status": "waiting"})
    assert stalled.progress == 0.0 and stalled.eta_seconds is None and stalled.eta_string() == "-"
    assert stalled.name == "" and stalled.files == () and stalled.following is None


def test_status_names_torrents_and_metadata() -> None:
    torrent = Aria2Status.from_struct(
        {
            "gid": "g1",
            "status": "complete",
            "infoHash": "ab" * 20,
            "bittorrent": {"info": {"name": "Album"}, "mode": "multi"},
            "files": [{"index": "1", "path": "/d/Album/01.flac", "length": "5"}],
        }
    )
    assert torrent.is_torrent and torrent.name == "Album" and torrent.bittorrent_mode == "multi"
    assert torrent.progress == 1.0  # complete, length unknown
    metadata = Aria2Status.from_struct(
        {
            "gid": "g2",
            "status": "active",
            "infoHash": "cd" * 20,
            "bittorrent": {},
            "files": [{"index": "1", "path": "[METADATA]" + "cd" * 20, "length": "0"}],
        }
    )
    assert metadata.is_metadata and metadata.is_torrent
    by_uri = Aria2Status.from_struct(
        {
            "gid": "g3",
            "status": "waiting",
            "files": [{"path": "", "uris": [{"uri": "http://h/dir/My%20File.zip?x=1"}]}],
        }
    )
    assert by_uri.name == "My File.zip"
    with pytest.raises(ValueError):
        Aria2Status.from_struct({"gid": "g4", "status": "bogus"})


def test_human_readable_helpers() -> None:
    assert human_size(0) == "0 B"
    assert human_size(1023) == "1023 B"
    assert human_size(1536) == "1.5 KiB"
    assert human_size(1.5 * 1024 * 1024) == "1.5 MiB"
    assert human_size(3 * 1024**4) == "3.0 TiB"
    assert human_speed(1572864) == "1.5 MiB/s"
    assert format_duration(None) == "-"
    assert format_duration(65) == "1m 05s"
    assert format_duration(3725) == "1h 02m"
    assert format_duration(90000) == "1d 01h"


def test_notification_and_url_parsing() -> None:
    message = {"jsonrpc": "2.0", "method": "aria2.onDownloadStart", "params": [{"gid": "abc"}]}
    assert Aria2Notification.from_message(message) == [Aria2Notification("onDownloadStart", "abc")]
    assert Aria2Notification.from_message({"id": None, "error": {"code": 1}}) == []
    assert websocket_url("http://127.0.0.1:6800/jsonrpc") == "ws://127.0.0.1:6800/jsonrpc"
    assert websocket_url("https://h:443/jsonrpc") == "wss://h:443/jsonrpc"
    assert websocket_url("http://h:1") == "ws://h:1/jsonrpc"
    assert "infoHash" in STATUS_KEYS and "bitfield" not in STATUS_KEYS


# -- sync: aria2's view onto a row (no process) ------------------------------------------------

GID = "2089b05ecca3d829"
NEXT_GID = "a1b2c3d4e5f60718"
INFO_HASH = "ab" * 20


def download_row(
    status: str,
    *,
    source_type: str = "http",
    file_name: str = "movie.mkv",
    local_path: str | None = None,
    total_length: int = 0,
    files: tuple[TorrentFile, ...] = (),
) -> DownloadRow:
    """A row as the store reads it: job 7, handed to aria2 as GID."""
    return records.download_row(
        gid=GID,
        status=status,
        source_type=source_type,
        file_name=file_name,
        local_path=local_path,
        total_length=total_length,
        files=files,
    )


def http_status(state: str, done: int = 420, total: int = 1000, **extra: object) -> Aria2Status:
    """`aria2.tellStatus` of a one-file HTTP job, as aria2 sends it (numbers as strings)."""
    return Aria2Status.from_struct(
        {
            "gid": GID,
            "status": state,
            "totalLength": str(total),
            "completedLength": str(done),
            "downloadSpeed": "10" if state == "active" else "0",
            "dir": "/dl/7",
            "files": [
                {
                    "index": "1",
                    "path": "/dl/7/movie.mkv",
                    "length": str(total),
                    "completedLength": str(done),
                    "selected": "true",
                    "uris": [{"uri": "http://h/x/movie.mkv", "status": "used"}],
                }
            ],
            **extra,
        }
    )


def torrent_status(state: str, done: int) -> Aria2Status:
    """A two-file torrent (70 + 50 bytes) in /dl/9, as `aria2.tellStatus` reports it."""
    return Aria2Status.from_struct(
        {
            "gid": GID,
            "status": state,
            "totalLength": "120",
            "completedLength": str(done),
            "downloadSpeed": "0",
            "infoHash": INFO_HASH,
            "seeder": "true" if done == 120 else "false",
            "dir": "/dl/9",
            "bittorrent": {"info": {"name": "pack"}, "mode": "multi"},
            "files": [
                {
                    "index": "1",
                    "path": "/dl/9/pack/sub/one.bin",
                    "length": "70",
                    "selected": "true",
                },
                {"index": "2", "path": "/dl/9/pack/two.bin", "length": "50", "selected": "false"},
            ],
        }
    )


def metadata_status(state: str, followed_by: list[str] | None = None) -> Aria2Status:
    """A magnet's metadata job: aria2 names its one file "[METADATA]<info hash>"."""
    return Aria2Status.from_struct(
        {
            "gid": GID,
            "status": state,
            "totalLength": "0",
            "completedLength": "0",
            "infoHash": INFO_HASH,
            "bittorrent": {},
            "files": [{"index": "1", "path": f"[METADATA]{INFO_HASH}", "length": "0"}],
            **({"followedBy": followed_by} if followed_by else {}),
        }
    )


@pytest.mark.parametrize("final", ["pending", "completed", "failed", "cancelled"])
def test_sync_leaves_rows_aria2_does_not_drive(final: str) -> None:
    assert plan(download_row(final), http_status("complete", 1000)) == RowSync()
    assert plan(download_row(final), http_status("error")) == RowSync()


def test_sync_starts_resumes_pauses_and_records_progress() -> None:
    learnt = RowDetails("movie.mkv", "/dl/7/movie.mkv", 1000, None)
    progress = ProgressUpdate(GID, 420, 1000, 10)
    assert plan(download_row("waiting"), http_status("active")) == RowSync(
        Move("downloading"), learnt, progress
    )
    assert plan(download_row("paused"), http_status("waiting")).change == Move("waiting")
    assert plan(download_row("downloading"), http_status("paused")).change == Move("paused")
    assert plan(download_row("waiting"), http_status("paused")).change == Move("paused")
    # What the row already says needs no change: progress only, and nothing learnt twice.
    known = download_row("downloading", local_path="/dl/7/movie.mkv", total_length=1000)
    assert plan(known, http_status("active")) == RowSync(progress=progress)
    assert plan(download_row("downloading"), http_status("waiting")).change is None


def test_sync_completes_only_whole_downloads_even_from_a_queue() -> None:
    for queued in ("waiting", "paused", "downloading"):
        sync = plan(download_row(queued), http_status("complete", 1000))
        assert sync.change == Complete("/dl/7/movie.mkv", 1000), queued
        assert sync.progress is None
    short = plan(download_row("downloading"), http_status("complete", 999))
    assert short.change is None and short.progress is None

    change = store_change(download_row("waiting"), Complete("/dl/7/movie.mkv", 1000))
    assert (change.download_id, change.expected_status, change.expected_gid) == (7, "waiting", GID)
    assert change.target == "completed" and change.reason == "aria2 completed"
    assert change.columns == {
        "local_path": "/dl/7/movie.mkv",
        "total_length": 1000,
        "completed_length": 1000,
        "download_speed": 0,
    }


def test_sync_completes_a_seeding_torrent_with_its_folder_and_files() -> None:
    downloading = plan(download_row("downloading"), torrent_status("active", 60))
    assert downloading.change is None and downloading.progress is not None
    assert downloading.details == RowDetails(
        "pack",
        "/dl/9/pack",
        120,
        (TorrentFile(1, "pack/sub/one.bin", 70, True), TorrentFile(2, "pack/two.bin", 50, False)),
    )
    seeding = plan(download_row("downloading"), torrent_status("active", 120))
    assert seeding.change == Complete("/dl/9/pack", 120)
    assert local_path(torrent_status("active", 120)) == "/dl/9/pack"
    # A row that lists its files already is not given them again.
    listed = download_row("downloading", files=(TorrentFile(1, "pack/sub/one.bin", 70),))
    details = plan(listed, torrent_status("active", 60)).details
    assert details is not None and details.files is None


def test_sync_follows_a_magnet_and_never_completes_its_metadata() -> None:
    magnet = download_row("downloading", source_type="magnet", file_name="wanted")
    assert plan(magnet, metadata_status("active")) == RowSync(progress=ProgressUpdate(GID, 0, 0, 0))
    assert plan(magnet, metadata_status("complete")) == RowSync()
    followed = plan(magnet, metadata_status("complete", [NEXT_GID]))
    assert followed == RowSync(FollowGid(NEXT_GID))
    change = store_change(magnet, FollowGid(NEXT_GID), note="consistency repair")
    assert (change.target, change.new_gid, change.expected_gid) == (None, NEXT_GID, GID)
    assert change.reason == f"followed {GID} (consistency repair)"


def test_sync_fails_in_words_and_cancels_what_aria2_removed() -> None:
    failed = plan(
        download_row("downloading"),
        http_status("error", errorCode="3", errorMessage="Resource not found"),
    )
    assert failed.change == Fail("not found on the server (Resource not found)", "3")
    full = plan(
        download_row("downloading"),
        http_status("error", errorCode="1", errorMessage="No space left on device"),
    )
    assert full.change == Fail("not enough disk space (No space left on device)", "1")
    change = store_change(download_row("downloading"), full.change)
    assert change.columns == {
        "error_message": "not enough disk space (No space left on device)",
        "error_code": "1",
        "download_speed": 0,
    }
    removed = plan(download_row("paused"), http_status("removed"))
    assert removed.change == Move("cancelled")
    assert store_change(download_row("paused"), Move("cancelled")).reason == "removed from aria2"


def test_sync_stops_a_job_above_the_size_limit() -> None:
    big = plan(download_row("downloading"), http_status("active", 10, 5000), 1000)
    assert big.change == Oversized(5000, 1000) and big.progress is None
    change = store_change(download_row("downloading"), Oversized(5000, 1000))
    assert change.target == "failed" and change.columns["error_code"] == "too_large"
    assert change.reason == "4.9 KiB is larger than the limit of 1000 B (aria2.max_download_size)"
    assert plan(download_row("downloading"), http_status("active", 10, 5000)).change is None
    assert plan(download_row("downloading"), metadata_status("active"), 1).change is None


# -- process ---------------------------------------------------------------------------------


async def test_start_stop_hides_secret_and_leaves_no_process(
    tmp_path: Path, process_reaper: ProcessReaper, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MistRelay's own settings may carry secrets; aria2c must not inherit them.
    monkeypatch.setenv("MISTRELAY_TELEGRAM_BOT_TOKEN", "123456:bot-token-for-environ-check")
    monkeypatch.setenv("MISTRELAY_DATABASE_URL", "postgresql://u:db-pass-for-environ@h/d")
    embedded = make_test_aria2(tmp_path, secret="s3cret-value-for-cmdline-check")
    await embedded.start()
    pid = embedded.pid
    assert pid is not None
    process_reaper.track(pid)
    try:
        cmdline = await asyncio.to_thread(Path(f"/proc/{pid}/cmdline").read_bytes)
        assert b"aria2c" in cmdline
        assert b"s3cret-value" not in cmdline
        environ = await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_bytes)
        assert b"PATH=" in environ
        assert b"MISTRELAY_" not in environ
        assert b"bot-token-for-environ-check" not in environ
        assert b"db-pass-for-environ" not in environ
        assert stat.S_IMODE(embedded.conf_path.stat().st_mode) == 0o600
        assert "rpc-secret=s3cret-value-for-cmdline-check" in embedded.conf_path.read_text()
        async with Aria2Transport(embedded.rpc_url, embedded.secret) as transport:
            assert await transport.wait_connected(5)
            assert (await Aria2Client(transport).version()).startswith("1.")
    finally:
        await embedded.stop(timeout=5)
    assert not embedded.running and embedded.pid is None
    assert not pid_alive(pid)
    assert embedded.session_path.exists()


async def test_start_failure_reports_aria2_output(tmp_path: Path) -> None:
    embedded = make_test_aria2(tmp_path, extra_options={"max-connection-per-server": "lots"})
    with pytest.raises(Aria2StartError, match="max-connection-per-server"):
        await embedded.start()
    assert not embedded.running
    with pytest.raises(ValueError, match="managed"):
        make_test_aria2(tmp_path, extra_options={"rpc-secret": "x"})


@pytest.mark.slow
async def test_aria2c_dies_with_its_parent(tmp_path: Path, process_reaper: ProcessReaper) -> None:
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        from pathlib import Path
        sys.path.insert(0, {str(ROOT)!r})
        from aria2_client.process import EmbeddedAria2

        async def main():
            a = EmbeddedAria2(download_dir=Path({str(tmp_path / "dl")!r}),
                              data_dir=Path({str(tmp_path / "data")!r}), secret="x" * 20,
                              extra_options={{"enable-dht": "false"}})
            await a.start()
            print(a.pid, flush=True)
            os._exit(0)  # die without stopping aria2c

        asyncio.run(main())
        """
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    process_reaper.track(parent.pid)
    out, _ = await asyncio.wait_for(parent.communicate(), 20)
    aria2_pid = int(out.split()[0])
    process_reaper.track(aria2_pid)

    async def gone() -> bool:
        return not pid_alive(aria2_pid)

    await wait_until(gone, 10, "aria2c to exit after its parent died")


# -- transport and operations ----------------------------------------------------------------


async def test_add_uri_completes_with_notifications_in_order(
    file_server: FileServer, aria2: EmbeddedAria2
) -> None:
    url, data = file_server.add("small.bin", 300_000)
    events: list[Aria2Notification] = []
    changes: list[bool] = []

    async def on_notification(event: Aria2Notification) -> None:
        events.append(event)
        raise RuntimeError("a failing handler must not stop the reader")

    async def on_change(up: bool) -> None:
        changes.append(up)

    transport = Aria2Transport(aria2.rpc_url, aria2.secret)
    await transport.start(on_notification=on_notification, on_connection_change=on_change)
    try:
        assert await transport.wait_connected(5)
        client = Aria2Client(transport)
        gid = await client.add_uri([url])

        async def completed() -> bool:
            return Aria2Notification("onDownloadComplete", gid) in events

        await wait_until(completed, 10, "onDownloadComplete")
        assert [e.event for e in events if e.gid == gid] == [
            "onDownloadStart",
            "onDownloadComplete",
        ]
        status = await client.tell_status(gid)
        assert status.status == "complete" and status.progress == 1.0
        assert status.name == "small.bin" and status.total_length == len(data)
        assert await asyncio.to_thread(Path(status.files[0].path).read_bytes) == data
        files = await client.get_files(gid)
        assert [f.path for f in files] == [status.files[0].path]
        stat_counts = await client.global_stat()
        assert stat_counts["numStopped"] >= 1
    finally:
        await transport.close()
    assert changes == [True]


async def test_poll_and_statuses_are_one_call_each(
    file_server: FileServer, aria2_client: Aria2Client
) -> None:
    done_url, _ = file_server.add("done.bin", 10_000)
    slow_url, _ = file_server.add("slow.bin", 2_000_000)
    done = await aria2_client.add_uri([done_url])
    await wait_status(aria2_client, done, {"complete"})
    slow = await aria2_client.add_uri([slow_url], {"max-download-limit": "50K"})
    queued = await aria2_client.add_uri([slow_url], {"pause": True, "out": "queued.bin"})

    transport = aria2_client.transport
    before = transport.rpc_calls
    polled = await aria2_client.poll()
    assert transport.rpc_calls - before == 1
    by_gid = {s.gid: s for s in polled}
    assert by_gid[done].status == "complete"
    assert by_gid[slow].status == "active"
    assert by_gid[queued].status == "paused"

    before = transport.rpc_calls
    found = await aria2_client.statuses([done, slow, UNKNOWN_GID, "not-a-gid"])
    assert transport.rpc_calls - before == 1
    assert found[UNKNOWN_GID] is None and found["not-a-gid"] is None
    done_status, slow_status = found[done], found[slow]
    assert done_status is not None and done_status.status == "complete"
    assert slow_status is not None and slow_status.gid == slow

    before = transport.rpc_calls
    results = await transport.multicall([("aria2.getVersion", []), ("aria2.tellStatus", [done])])
    assert transport.rpc_calls - before == 1
    version, status = results
    assert isinstance(version, dict) and version["version"].startswith("1.")
    assert isinstance(status, dict) and status["status"] == "complete"
    assert await aria2_client.statuses([]) == {}


async def test_pause_unpause_and_remove(file_server: FileServer, aria2_client: Aria2Client) -> None:
    url, _ = file_server.add("paced.bin", 2_000_000)
    gid = await aria2_client.add_uri([url], {"max-download-limit": "50K"})
    await wait_status(aria2_client, gid, {"active"})
    await aria2_client.pause(gid)
    await wait_status(aria2_client, gid, {"paused"})
    await aria2_client.unpause(gid)
    await wait_status(aria2_client, gid, {"active", "waiting"})
    await aria2_client.change_option(gid, {"max-download-limit": "60K"})
    assert (await aria2_client.get_option(gid))["max-download-limit"] == "61440"

    assert await aria2_client.remove(gid) is True
    with pytest.raises(Aria2RpcError) as info:
        await aria2_client.tell_status(gid)
    assert info.value.is_not_found
    assert await aria2_client.remove(gid) is False
    assert await aria2_client.remove(UNKNOWN_GID) is False


async def test_remove_of_finished_download_returns_false(
    file_server: FileServer, aria2_client: Aria2Client
) -> None:
    url, _ = file_server.add("finished.bin", 5_000)
    gid = await aria2_client.add_uri([url])
    await wait_status(aria2_client, gid, {"complete"})
    assert await aria2_client.remove(gid) is False
    assert (await aria2_client.statuses([gid]))[gid] is None  # its result was cleared too
    assert await aria2_client.remove_result(gid) is False


@pytest.mark.slow  # aria2 delays each unauthorised answer by about 2 s
async def test_wrong_secret_is_an_rpc_error(aria2: EmbeddedAria2) -> None:
    async with Aria2Transport(aria2.rpc_url, "wrong-secret") as transport:
        assert await transport.wait_connected(5)
        with pytest.raises(Aria2RpcError) as info:
            await transport.call("aria2.getVersion")
        assert info.value.code == 1 and "Unauthorized" in info.value.message
        assert "wrong-secret" not in str(info.value)
        results = await transport.multicall([("aria2.getVersion", [])])
        assert isinstance(results[0], Aria2RpcError)


async def test_close_leaves_no_tasks_and_calls_fail_after(aria2: EmbeddedAria2) -> None:
    transport = Aria2Transport(aria2.rpc_url, aria2.secret)
    await transport.start()
    assert await transport.wait_connected(5)
    await transport.close()
    names = {t.get_name() for t in asyncio.all_tasks() if not t.done()}
    assert not names & {"aria2-connection", "aria2-events"}
    assert not transport.connected
    with pytest.raises(Aria2Unavailable):
        await transport.call("aria2.getVersion")


async def test_heartbeat_keeps_the_connection(aria2: EmbeddedAria2) -> None:
    changes: list[bool] = []

    async def on_change(up: bool) -> None:
        changes.append(up)

    transport = Aria2Transport(aria2.rpc_url, aria2.secret, heartbeat=0.2)
    await transport.start(on_connection_change=on_change)
    try:
        assert await transport.wait_connected(5)
        await asyncio.sleep(1.0)  # several pings; aria2 also answers each with an id-less error
        assert transport.connected
        assert (await Aria2Client(transport).version()).startswith("1.")
    finally:
        await transport.close()
    assert changes == [True]


@pytest.mark.slow
async def test_transport_reconnects_after_aria2_restart(
    aria2: EmbeddedAria2, process_reaper: ProcessReaper
) -> None:
    changes: list[bool] = []

    async def on_change(up: bool) -> None:
        changes.append(up)

    transport = Aria2Transport(aria2.rpc_url, aria2.secret)
    await transport.start(on_connection_change=on_change)
    try:
        client = Aria2Client(transport)
        assert await transport.wait_connected(5)
        pid = aria2.pid
        assert pid is not None
        # A call in flight when the socket drops fails at once, not after its timeout.
        os.kill(pid, signal.SIGSTOP)
        in_flight = asyncio.create_task(transport.call("aria2.getVersion", timeout=30))
        await asyncio.sleep(0.2)
        assert not in_flight.done()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(Aria2Unavailable):
            await asyncio.wait_for(in_flight, 5)
        assert await aria2.wait_exit() == -signal.SIGKILL

        async def down() -> bool:
            return not transport.connected

        await wait_until(down, 5, "the transport to notice")
        with pytest.raises(Aria2Unavailable):
            await client.version()

        await aria2.start()
        process_reaper.track(aria2.pid)
        assert await transport.wait_connected(10)
        assert (await client.version()).startswith("1.")

        async def all_reported() -> bool:
            return len(changes) >= 3

        await wait_until(all_reported, 5, "connection changes")
        assert changes == [True, False, True]
    finally:
        await transport.close()


@pytest.mark.slow
async def test_session_restores_unfinished_download(
    file_server: FileServer,
    aria2: EmbeddedAria2,
    aria2_client: Aria2Client,
    process_reaper: ProcessReaper,
) -> None:
    url, data = file_server.add("resume.bin", 1_500_000)
    gid = await aria2_client.add_uri([url], {"max-download-limit": "100K"})

    async def started() -> bool:
        return (await aria2_client.tell_status(gid)).completed_length > 0

    await wait_until(started, 10, "bytes to arrive")
    await aria2.restart(timeout=5)
    process_reaper.track(aria2.pid)
    assert f"gid={gid}" in aria2.session_path.read_text()
    assert await aria2_client.transport.wait_connected(10)

    async def reconnected() -> bool:
        try:
            await aria2_client.version()
        except Aria2Unavailable:
            return False
        return True

    await wait_until(reconnected, 10, "RPC after restart")
    restored = await aria2_client.tell_status(gid)
    assert restored.status in ("active", "waiting")
    await aria2_client.change_option(gid, {"max-download-limit": "0"})
    final = await wait_status(aria2_client, gid, {"complete"}, timeout=15)
    assert await asyncio.to_thread(Path(final.files[0].path).read_bytes) == data


@pytest.mark.slow
async def test_supervise_restarts_a_killed_aria2c(
    aria2: EmbeddedAria2, aria2_client: Aria2Client, process_reaper: ProcessReaper
) -> None:
    restarted = asyncio.Event()

    async def on_restart() -> None:
        restarted.set()

    supervisor = asyncio.create_task(aria2.supervise(on_restart))
    try:
        old_pid = aria2.pid
        assert old_pid is not None
        await asyncio.sleep(0.1)
        os.kill(old_pid, signal.SIGKILL)
        await asyncio.wait_for(restarted.wait(), 15)
        process_reaper.track(aria2.pid)
        assert aria2.running and aria2.pid not in (None, old_pid)
        assert aria2.restarts == 1
        assert await aria2_client.transport.wait_connected(10)

        async def answers() -> bool:
            try:
                return bool(await aria2_client.version())
            except Aria2Unavailable:
                return False

        await wait_until(answers, 10, "RPC from the restarted aria2c")
        await aria2.stop(timeout=5)
        await asyncio.wait_for(supervisor, 5)
        assert not aria2.running and aria2.restarts == 1
    finally:
        supervisor.cancel()
