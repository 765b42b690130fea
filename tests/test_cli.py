"""`app.py add` and `app.py list` as real processes against a real service process (its own
aria2c and SQLite file) and a local HTTP file server."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from app import parse_args
from client_cli import display_name, final_line, is_torrent_file, run_command
from configer import load_config
from tests.support.http_files import FileServer
from tests.support.service import service_config
from tests.support.service_process import (
    APP_SCRIPT,
    PROJECT_ROOT,
    ServiceProcess,
    ServiceProcessFactory,
    clean_environment,
)
from tests.support.torrents import make_torrent


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["list", "--status", "nonsense"], "invalid choice: 'nonsense'"),
        (["list", "--limit", "0"], "not a whole number from 1 to 1000: '0'"),
        (["list", "--limit", "1001"], "not a whole number from 1 to 1000: '1001'"),
        (["add", "x", "--url", "ftp://127.0.0.1:8080"], "not an http:// or https:// address"),
        (["add"], "the following arguments are required: URL|MAGNET|FILE.torrent"),
    ],
)
def test_arguments_are_checked(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_names_from_the_service_cannot_drive_the_terminal() -> None:
    row = {"id": 7, "status": "failed", "file_name": "a\x1b[2J\nb", "error_message": "x\x07y"}
    assert display_name(row) == "a?[2J?b"
    assert final_line(row) == "#7\tfailed\ta?[2J?b: x?y"
    assert is_torrent_file("some/file.TORRENT")
    assert not is_torrent_file("magnet:?xt=urn:btih:0123&dn=file.torrent")
    assert not is_torrent_file("https://example.org/file.torrent")


def test_no_token_to_read_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = load_config(service_config(tmp_path))
    code = run_command(config, parse_args(["list"]))
    assert code == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: no web token: {config.data_dir / 'web_token'} does not exist "
        "(start the service once, or set web.token)\n"
    )
    assert not (config.data_dir / "web_token").exists()  # a client never creates it


@dataclass
class Run:
    code: int
    out: str
    err: str


async def spawn(
    config: Path, *args: str, stdout: int = asyncio.subprocess.PIPE
) -> asyncio.subprocess.Process:
    """Start `app.py --config CONFIG ARGS…` (stderr piped, a terminal 120 columns wide)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(APP_SCRIPT),
        "--config",
        str(config),
        *args,
        cwd=PROJECT_ROOT,
        env=clean_environment({"COLUMNS": "120"}),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
        stderr=asyncio.subprocess.PIPE,
    )


async def cli(config: Path, *args: str, timeout: float = 60) -> Run:
    """Run `app.py --config CONFIG ARGS…` to its end, stdout and stderr piped."""
    proc = await spawn(config, *args)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return Run(int(proc.returncode or 0), out.decode(), err.decode())


def read_all(fd: int) -> bytes:
    """Everything from a pty's master side until the other side is closed."""
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


async def cli_on_terminal(config: Path, *args: str, timeout: float = 60) -> Run:
    """Run the command line with its stdout on a pseudo-terminal (stderr piped)."""
    master, slave = pty.openpty()
    try:
        proc = await spawn(config, *args, stdout=slave)
        os.close(slave)
        slave = -1
        reader = asyncio.create_task(asyncio.to_thread(read_all, master))
        try:
            assert proc.stderr is not None
            err = await asyncio.wait_for(proc.stderr.read(), timeout)
            await asyncio.wait_for(proc.wait(), timeout)
            out = await asyncio.wait_for(reader, timeout)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    return Run(int(proc.returncode or 0), out.decode(errors="replace"), err.decode())


def added_ids(out: str) -> list[int]:
    return [int(line.split("\t")[0][1:]) for line in out.splitlines() if "\tadded\t" in line]


async def started(service_process: ServiceProcessFactory) -> ServiceProcess:
    svc = service_process()
    await svc.start()
    return svc


@pytest.mark.slow
async def test_add_wait_and_list(
    service_process: ServiceProcessFactory, file_server: FileServer
) -> None:
    svc = await started(service_process)
    first = file_server.add_file("first.bin", size=300_000, seed=1)
    second = file_server.add_file("second.bin", size=200_000, seed=2)
    url_1 = file_server.url("first.bin", route="slow", rate=400_000)
    url_2 = file_server.url("second.bin")

    run = await cli(svc.config_path, "add", url_1, "not-a-link", url_2, "--wait")

    # One bad link does not hold back the good ones: both added, the bad one refused with the
    # server's reason, and the exit code says something was refused.
    assert run.code == 1, run
    ids = added_ids(run.out)
    assert len(ids) == 2, run.out
    assert "refused\tnot-a-link: " in run.err
    refusal = run.err.split("refused\tnot-a-link: ")[1].splitlines()[0]
    assert refusal.strip(), run.err
    # Not a terminal: plain lines, no escape sequences, and one final line per job.
    assert "\x1b[" not in run.out
    assert f"#{ids[0]}\tcompleted\t" in run.out and f"#{ids[1]}\tcompleted\t" in run.out
    assert (svc.download_dir / str(ids[0]) / "first.bin").read_bytes() == first
    assert (svc.download_dir / str(ids[1]) / "second.bin").read_bytes() == second

    # Its own status and the service agree.
    for download_id in ids:
        assert (await svc.download(download_id))["status"] == "completed"

    failing = file_server.status_url(404)
    run = await cli(svc.config_path, "add", failing, "--wait")
    assert run.code == 1, run
    (failed_id,) = added_ids(run.out)
    assert f"#{failed_id}\tfailed\t" in run.out

    run = await cli(svc.config_path, "list")
    assert run.code == 0, run
    lines = run.out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "PROGRESS", "NAME"]
    listed = {int(line.split()[0]): line.split()[1:3] for line in lines[1:]}
    assert listed[ids[0]] == ["completed", "100.0%"]
    assert listed[ids[1]] == ["completed", "100.0%"]
    assert listed[failed_id][0] == "failed"

    run = await cli(svc.config_path, "list", "--status", "failed", "--json")
    assert run.code == 0, run
    rows = json.loads(run.out)
    assert [row["id"] for row in rows] == [failed_id]
    assert rows[0]["status"] == "failed"


@pytest.mark.slow
async def test_add_wait_on_a_terminal_draws_bars_and_ctrl_c_leaves_the_job(
    service_process: ServiceProcessFactory, file_server: FileServer
) -> None:
    svc = await started(service_process)
    file_server.add_file("bar.bin", size=400_000, seed=3)
    run = await cli_on_terminal(
        svc.config_path, "add", file_server.url("bar.bin", route="slow", rate=300_000), "--wait"
    )
    assert run.code == 0, run
    assert "\x1b[2K#" in run.out  # lines redrawn in place
    assert "[" + "#" * 24 + "] 100.0%" in run.out
    assert "\tcompleted\tbar.bin" in run.out

    # Ctrl-C while waiting: the command stops, the job goes on in the service.
    file_server.add_file("held.bin", size=500_000, seed=4)
    proc = await spawn(svc.config_path, "add", file_server.url("held.bin", route="hold"), "--wait")
    try:
        assert proc.stdout is not None and proc.stderr is not None
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        download_id = int(first.decode().split("\t")[0][1:])
        await file_server.wait_held("held.bin", within_s=30)
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 30)
        err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 130, err
    assert f"stopped waiting; the jobs go on in the service: #{download_id}" in err
    assert (await svc.download(download_id))["status"] in ("waiting", "downloading")

    # The same link while it is still active: refused, naming the job that has it.
    held_url = file_server.url("held.bin", route="hold")
    run = await cli(svc.config_path, "add", held_url)
    assert run.code == 1, run
    assert run.out == ""
    assert run.err == f"refused\t{held_url}: already added as #{download_id}\n"
    file_server.release("held.bin")
    await svc.wait_download(download_id, ["completed"])


@pytest.mark.slow
async def test_torrent_files_wrong_token_and_service_down(
    service_process: ServiceProcessFactory, file_server: FileServer, tmp_path: Path
) -> None:
    svc = await started(service_process)
    info = make_torrent(
        b"torrent payload " * 1000, tmp_path / "seed", "http://127.0.0.1:9/a", "t.bin"
    )
    torrent = info.torrent_path
    broken = tmp_path / "broken.torrent"
    broken.write_bytes(b"d4:infoi3ee")
    missing = tmp_path / "missing.torrent"

    run = await cli(svc.config_path, "add", str(torrent), str(broken), str(missing))
    assert run.code == 1, run
    (torrent_id,) = added_ids(run.out)
    assert run.out.strip().endswith("\tt.bin"), run.out
    row = await svc.download(torrent_id)
    assert row["source_type"] == "torrent" and row["info_hash"] == info.info_hash
    assert f"refused\t{broken}: " in run.err and "(HTTP 400)" in run.err
    assert f"refused\t{missing}: cannot read the file: No such file or directory" in run.err

    # A wrong token: one clear line, exit 2, and the token itself is never shown.
    wrong = "w" * 32
    document = yaml.safe_load(svc.config_path.read_text())
    document["web"]["token"] = wrong
    wrong_config = tmp_path / "wrong.yaml"
    wrong_config.write_text(yaml.safe_dump(document))
    run = await cli(wrong_config, "list")
    assert run.code == 2, run
    assert run.err.strip().splitlines() == [
        f"error: the service at {svc.base_url} refused the token (from web.token): "
        + run.err.split("(from web.token): ")[1].strip()
    ]
    assert wrong not in run.err + run.out and svc.token not in run.err + run.out

    # Another program at the address: named as such, exit 2.
    run = await cli(svc.config_path, "list", "--url", file_server.base_url)
    assert run.code == 2, run
    assert run.err == (
        f"error: {file_server.base_url} is not the service: GET /api/downloads answered "
        "HTTP 404 without a JSON object\n"
    )

    await svc.stop()
    run = await cli(svc.config_path, "add", "https://example.invalid/file.bin")
    assert run.code == 2, run
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: the service at {svc.base_url} is not reachable: "
    ), run.err
    assert svc.token not in run.err
