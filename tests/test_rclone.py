"""The rclone edge against real rclone and real clouds on 127.0.0.1 (rclone serve webdav/sftp)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.rclone_cloud import (
    FullWebdavCloud,
    RcloneCloud,
    add_remote,
    free_port,
)
from uploads.rclone import (
    AUTH_FAILED,
    CANCELLED,
    LOCAL_FILE_MISSING,
    NETWORK,
    REMOTE_FULL,
    REMOTE_NOT_FOUND,
    VERIFY_HASH_MISMATCH,
    VERIFY_SIZE_MISMATCH,
    Rclone,
    RcloneError,
    TransferProgress,
    classify_failure,
    parse_link_output,
    redact,
)

MIB = 1024 * 1024
# Fail fast where the production defaults (10 low-level retries, 3 retries) would take ~10-40 s.
FAIL_FAST = ("--retries", "1", "--low-level-retries", "1")


def make_file(path: Path, size: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(f"{seed}".encode()).digest() * (MIB // 32)
    with path.open("wb") as out:
        remaining = size
        counter = 0
        while remaining > 0:
            chunk = (counter.to_bytes(8, "big") + block)[: min(remaining, MIB)]
            out.write(chunk)
            remaining -= len(chunk)
            counter += 1
    return path


def pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def rclone_for(config: Path, tmp_path: Path, *extra_args: str) -> Rclone:
    return Rclone(config_path=config, pid_dir=tmp_path / "pids", extra_args=extra_args)


async def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def ignore(_: TransferProgress) -> None:
    return None


# --------------------------------------------------------------------------- remotes


async def test_list_remotes_names_every_configured_remote(
    rclone_config: Path, tmp_path: Path
) -> None:
    add_remote(rclone_config, "alpha", {"type": "local"})
    add_remote(rclone_config, "beta-2", {"type": "webdav", "url": "http://127.0.0.1:9"})
    rclone = rclone_for(rclone_config, tmp_path)

    assert sorted(await rclone.list_remotes()) == ["alpha", "beta-2"]
    await rclone.check_remote("alpha")
    await rclone.check_remote("beta-2:")


async def test_check_remote_missing_names_it(rclone_config: Path, tmp_path: Path) -> None:
    add_remote(rclone_config, "present", {"type": "local"})
    rclone = rclone_for(rclone_config, tmp_path)

    with pytest.raises(RcloneError) as caught:
        await rclone.check_remote("onedrive")
    assert caught.value.reason == REMOTE_NOT_FOUND
    assert "'onedrive'" in caught.value.message
    assert caught.value.retryable is False


async def test_transfer_to_unconfigured_remote_is_remote_not_found(
    rclone_config: Path, tmp_path: Path
) -> None:
    rclone = rclone_for(rclone_config, tmp_path)
    source = make_file(tmp_path / "a.bin", 1000)

    with pytest.raises(RcloneError) as caught:
        await rclone.transfer(source, "gdrive:/x/a.bin", on_progress=ignore, job_key="nr")
    assert caught.value.reason == REMOTE_NOT_FOUND
    assert "'gdrive'" in caught.value.message
    assert not (tmp_path / "pids" / "nr.pid").exists()


# --------------------------------------------------------------------------- transfers


@pytest.mark.slow
async def test_webdav_transfer_reports_growing_progress_and_lands_bytes(
    webdav_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    size = 24 * MIB
    source = make_file(tmp_path / "src" / "movie.mkv", size, seed=1)
    rclone = rclone_for(rclone_config, tmp_path, "--bwlimit", "8M")
    reports: list[TransferProgress] = []
    pid_file_seen: list[bool] = []

    async def on_progress(progress: TransferProgress) -> None:
        reports.append(progress)
        pid_file_seen.append((tmp_path / "pids" / "up-1.pid").exists())

    await rclone.transfer(
        source, "testdav:/media/movie.mkv", on_progress=on_progress, job_key="up-1"
    )

    landed = webdav_cloud.root / "media" / "movie.mkv"
    assert landed.read_bytes() == source.read_bytes()
    assert len(reports) >= 2
    done = [report.bytes_done for report in reports]
    assert done == sorted(done)
    assert done[0] < size
    assert reports[-1].bytes_done == size
    assert all(report.total == size for report in reports)
    assert any(report.speed > 0 for report in reports)
    assert pid_file_seen and all(pid_file_seen[:-1])
    assert not (tmp_path / "pids" / "up-1.pid").exists()
    assert rclone.running_jobs() == []


async def test_sftp_transfer_and_verify_by_md5(
    sftp_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    source = make_file(tmp_path / "song.flac", 3 * MIB + 17, seed=2)
    rclone = rclone_for(rclone_config, tmp_path)
    reports: list[TransferProgress] = []

    await rclone.transfer(
        source, "testsftp:/music/song.flac", on_progress=reports.append, job_key="sftp-1"
    )

    assert (sftp_cloud.root / "music" / "song.flac").read_bytes() == source.read_bytes()
    assert reports and reports[-1].bytes_done == source.stat().st_size
    result = await rclone.verify(source, "testsftp:/music/song.flac")
    assert result.size == source.stat().st_size
    assert result.hash_type == "md5"
    assert result.hash == hashlib.md5(source.read_bytes()).hexdigest()
    assert await rclone.remote_size("testsftp:/music/song.flac") == source.stat().st_size


async def test_hostile_file_name_is_data_not_shell_and_failing_callback_is_harmless(
    sftp_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    # File names come from Telegram users and torrents.
    name = 'we$(touch PWNED) `id` "q" it\'s;rm -rf x.bin'
    source = make_file(tmp_path / "in" / name, 70_000, seed=8)
    rclone = rclone_for(rclone_config, tmp_path)

    def broken_display(_: TransferProgress) -> None:
        raise RuntimeError("display went away")

    await rclone.transfer(
        source, f"testsftp:/odd/{name}", on_progress=broken_display, job_key="odd"
    )

    assert (sftp_cloud.root / "odd" / name).read_bytes() == source.read_bytes()
    assert (await rclone.verify(source, f"testsftp:/odd/{name}")).hash_type == "md5"
    assert await rclone.remote_size(f"testsftp:/odd/{name}") == 70_000
    assert not await asyncio.to_thread(lambda: list(Path.cwd().glob("PWNED*")))


async def test_folder_transfer_copies_contents_and_verifies_by_size(
    webdav_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "Some Torrent"
    files = {
        "a.bin": 1 * MIB,
        "sub/b b.bin": 200_000,
        "sub/deeper/c.txt": 5,
        "empty.dat": 0,
    }
    for index, (relative, size) in enumerate(files.items()):
        make_file(folder / relative, size, seed=index)
    rclone = rclone_for(rclone_config, tmp_path)

    await rclone.transfer(folder, "testdav:/dl/Some Torrent", on_progress=ignore, job_key="fold")

    for relative in files:
        landed = webdav_cloud.root / "dl" / "Some Torrent" / relative
        assert landed.read_bytes() == (folder / relative).read_bytes(), relative
    result = await rclone.verify(folder, "testdav:/dl/Some Torrent")
    assert result.size == sum(files.values())
    assert result.hash_type is None  # WebDAV with vendor=other offers no hash
    assert await rclone.remote_size("testdav:/dl/Some Torrent") == sum(files.values())
    assert await rclone.remote_size("testdav:/dl/not there") is None

    (webdav_cloud.root / "dl" / "Some Torrent" / "sub" / "b b.bin").unlink()
    with pytest.raises(RcloneError) as caught:
        await rclone.verify(folder, "testdav:/dl/Some Torrent")
    assert caught.value.reason == VERIFY_SIZE_MISMATCH
    assert "missing" in caught.value.message


async def test_verify_detects_planted_size_mismatch(
    webdav_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    source = make_file(tmp_path / "doc.pdf", 300_000, seed=3)
    rclone = rclone_for(rclone_config, tmp_path)
    await rclone.transfer(source, "testdav:/doc.pdf", on_progress=ignore, job_key="v1")
    assert (await rclone.verify(source, "testdav:/doc.pdf")).size == 300_000

    with (webdav_cloud.root / "doc.pdf").open("ab") as planted:
        planted.write(b"garbage")

    with pytest.raises(RcloneError) as caught:
        await rclone.verify(source, "testdav:/doc.pdf")
    assert caught.value.reason == VERIFY_SIZE_MISMATCH
    assert caught.value.retryable is True
    assert "300000" in caught.value.message and "300007" in caught.value.message

    with pytest.raises(RcloneError) as nothing:
        await rclone.verify(source, "testdav:/never-uploaded.pdf")
    assert nothing.value.reason == VERIFY_SIZE_MISMATCH


async def test_verify_detects_same_size_corruption_by_hash(
    sftp_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    source = make_file(tmp_path / "x.iso", 500_000, seed=4)
    rclone = rclone_for(rclone_config, tmp_path)
    await rclone.transfer(source, "testsftp:/x.iso", on_progress=ignore, job_key="h1")

    landed = sftp_cloud.root / "x.iso"
    data = bytearray(landed.read_bytes())
    data[123_456] ^= 0xFF
    landed.write_bytes(bytes(data))

    with pytest.raises(RcloneError) as caught:
        await rclone.verify(source, "testsftp:/x.iso")
    assert caught.value.reason == VERIFY_HASH_MISMATCH
    assert caught.value.retryable is True


async def test_missing_local_file_fails_before_rclone_starts(
    rclone_config: Path, tmp_path: Path
) -> None:
    add_remote(rclone_config, "anywhere", {"type": "local"})
    rclone = rclone_for(rclone_config, tmp_path)

    with pytest.raises(RcloneError) as caught:
        await rclone.transfer(
            tmp_path / "gone.bin", "anywhere:/gone.bin", on_progress=ignore, job_key="gone"
        )
    assert caught.value.reason == LOCAL_FILE_MISSING
    assert caught.value.retryable is False
    assert caught.value.exit_code is None
    with pytest.raises(RcloneError) as verify_caught:
        await rclone.verify(tmp_path / "gone.bin", "anywhere:/gone.bin")
    assert verify_caught.value.reason == LOCAL_FILE_MISSING


# --------------------------------------------------------------------------- cancel and faults


@pytest.mark.slow
async def test_cancel_kills_rclone_within_two_seconds(
    webdav_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    source = make_file(tmp_path / "big.bin", 40 * MIB, seed=5)
    rclone = rclone_for(rclone_config, tmp_path, "--bwlimit", "2M")
    reports: list[TransferProgress] = []
    upload = asyncio.create_task(
        rclone.transfer(source, "testdav:/big.bin", on_progress=reports.append, job_key="c-1")
    )
    pid_file = tmp_path / "pids" / "c-1.pid"
    await wait_for(lambda: bool(reports), 10, "first progress report")
    pid = int(pid_file.read_text())
    assert pid_alive(pid)

    started = time.monotonic()
    assert await rclone.cancel("c-1") is True
    with pytest.raises(RcloneError) as caught:
        await asyncio.wait_for(upload, timeout=5)
    await wait_for(lambda: not pid_alive(pid), 2, "rclone to exit")
    assert time.monotonic() - started < 2.0
    assert caught.value.reason == CANCELLED
    assert caught.value.retryable is False
    assert not pid_file.exists()
    assert await rclone.cancel("c-1") is False
    assert await rclone.cancel("never-started") is False


@pytest.mark.slow
async def test_cancelling_the_calling_task_kills_rclone(
    webdav_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    source = make_file(tmp_path / "big.bin", 20 * MIB, seed=6)
    rclone = rclone_for(rclone_config, tmp_path, "--bwlimit", "2M")
    upload = asyncio.create_task(
        rclone.transfer(source, "testdav:/big.bin", on_progress=ignore, job_key="t-1")
    )
    pid_file = tmp_path / "pids" / "t-1.pid"
    await wait_for(pid_file.exists, 10, "pid file")
    pid = int(pid_file.read_text())

    upload.cancel()
    with pytest.raises(asyncio.CancelledError):
        await upload
    await wait_for(lambda: not pid_alive(pid), 2, "rclone to exit")
    assert not pid_file.exists()


@pytest.mark.slow
async def test_cloud_stopping_mid_transfer_is_retryable_and_retry_succeeds(
    webdav_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    source = make_file(tmp_path / "big.bin", 16 * MIB, seed=7)
    rclone = rclone_for(rclone_config, tmp_path, "--bwlimit", "4M", *FAIL_FAST)
    reports: list[TransferProgress] = []
    upload = asyncio.create_task(
        rclone.transfer(source, "testdav:/in/big.bin", on_progress=reports.append, job_key="s-1")
    )
    await wait_for(lambda: bool(reports), 10, "first progress report")
    await webdav_cloud.stop()

    with pytest.raises(RcloneError) as caught:
        await asyncio.wait_for(upload, timeout=20)
    assert caught.value.retryable is True
    assert caught.value.reason == NETWORK
    assert caught.value.exit_code not in (None, 0)

    await webdav_cloud.start()
    fast = rclone_for(rclone_config, tmp_path)
    await fast.transfer(source, "testdav:/in/big.bin", on_progress=ignore, job_key="s-1")
    assert (await fast.verify(source, "testdav:/in/big.bin")).size == 16 * MIB


async def test_unreachable_cloud_is_network_error(
    webdav_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    await webdav_cloud.stop()
    source = make_file(tmp_path / "a.bin", 1000)
    rclone = rclone_for(rclone_config, tmp_path, *FAIL_FAST)

    with pytest.raises(RcloneError) as caught:
        await rclone.transfer(source, "testdav:/a.bin", on_progress=ignore, job_key="u-1")
    assert caught.value.reason == NETWORK
    assert caught.value.retryable is True
    with pytest.raises(RcloneError) as size_caught:
        await rclone.remote_size("testdav:/a.bin")
    assert size_caught.value.reason == NETWORK


async def test_wrong_password_is_auth_failed(
    sftp_bad_password_remote: str, rclone_config: Path, tmp_path: Path
) -> None:
    source = make_file(tmp_path / "a.bin", 1000)
    # With rclone's default 10 low-level retries the refusal takes ~11 s to surface.
    rclone = rclone_for(rclone_config, tmp_path, *FAIL_FAST)

    with pytest.raises(RcloneError) as caught:
        await rclone.transfer(
            source, f"{sftp_bad_password_remote}:/a.bin", on_progress=ignore, job_key="pw"
        )
    assert caught.value.reason == AUTH_FAILED
    assert caught.value.retryable is False
    assert caught.value.exit_code == 1


async def test_full_cloud_is_remote_full(
    full_webdav_cloud: FullWebdavCloud, rclone_config: Path, tmp_path: Path
) -> None:
    source = make_file(tmp_path / "a.bin", 100_000)
    rclone = rclone_for(rclone_config, tmp_path, *FAIL_FAST)

    with pytest.raises(RcloneError) as caught:
        await rclone.transfer(source, "testfull:/d/a.bin", on_progress=ignore, job_key="full")
    assert caught.value.reason == REMOTE_FULL
    assert caught.value.retryable is False
    assert full_webdav_cloud.rejected_uploads == ["/d/a.bin"]


async def test_aws_ca_bundle_is_not_passed_to_rclone(
    rclone_config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With AWS_CA_BUNDLE set, rclone's s3 backend fails before any request
    # (LoadCustomCABundleError); without it, it reaches the (closed) port: a network error.
    monkeypatch.setenv("AWS_CA_BUNDLE", str(tmp_path / "no-such-bundle.pem"))
    add_remote(
        rclone_config,
        "tests3",
        {
            "type": "s3",
            "provider": "Other",
            "endpoint": f"http://127.0.0.1:{free_port()}",
            "access_key_id": "id",
            "secret_access_key": "top-secret-key",
        },
    )
    rclone = rclone_for(rclone_config, tmp_path, *FAIL_FAST)

    with pytest.raises(RcloneError) as caught:
        await rclone.remote_size("tests3:bucket/file.bin")
    assert caught.value.reason == NETWORK
    assert "CABundle" not in caught.value.message
    assert "top-secret-key" not in caught.value.message


# --------------------------------------------------------------------------- start-up


def test_kill_leftovers_kills_only_stray_rclone(rclone_config: Path, tmp_path: Path) -> None:
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    stray = subprocess.Popen(
        ["rclone", "--config", str(rclone_config), "rcd", "--rc-addr", f"127.0.0.1:{free_port()}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    bystander = subprocess.Popen(["sleep", "30"], start_new_session=True)
    # A reused pid whose command line merely mentions rclone (a test run, an editor).
    mentions = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)", "tests/test_rclone.py"],
        start_new_session=True,
    )
    try:
        (pid_dir / "old-upload.pid").write_text(f"{stray.pid}\n")
        (pid_dir / "reused-pid.pid").write_text(f"{bystander.pid}\n")
        (pid_dir / "mentions-rclone.pid").write_text(f"{mentions.pid}\n")
        (pid_dir / "garbage.pid").write_text("not a pid")
        rclone = Rclone(config_path=rclone_config, pid_dir=pid_dir)

        killed = rclone.kill_leftovers()

        assert killed == [stray.pid]
        assert stray.wait(timeout=2) is not None
        assert bystander.poll() is None and mentions.poll() is None
        assert list(pid_dir.glob("*.pid")) == []
    finally:
        for process in (stray, bystander, mentions):
            if process.poll() is None:
                os.kill(process.pid, 9)
                process.wait(timeout=5)


# --------------------------------------------------------------------------- classification


# Error lines as rclone prints them for real clouds (Drive, OneDrive, Nextcloud, OAuth).
CLASSIFICATION_CASES = [
    (
        1,
        'Failed to create file system for "od:": didn\'t find section in config file',
        REMOTE_NOT_FOUND,
    ),
    (
        1,
        "Failed to copy: googleapi: Error 403: The user's Drive storage quota has been exceeded., "
        "storageQuotaExceeded",
        REMOTE_FULL,
    ),
    (1, "Failed to copy: quotaLimitReached: Insufficient Space Available", REMOTE_FULL),
    (1, "Failed to copy: Insufficient Storage: 507 Insufficient Storage", REMOTE_FULL),
    (1, "Failed to copy: Unauthorized: 401 Unauthorized", AUTH_FAILED),
    (
        1,
        "couldn't fetch token: invalid_grant: maybe token expired? - try refreshing with "
        '"rclone config reconnect od:"',
        AUTH_FAILED,
    ),
    (
        5,
        'Failed to copy: Put "https://x/y": read tcp 10.0.0.1:5->10.0.0.2:443: read: '
        "connection reset by peer",
        NETWORK,
    ),
    (
        1,
        'oauth2: cannot fetch token: Post "https://login/token": dial tcp: lookup login: '
        "no such host",
        NETWORK,
    ),
    (5, "Failed to copy: something odd", NETWORK),
    (7, "Failed to copy: fatal error encountered", "rclone_error"),
    (1, "Failed to copy: something odd", "rclone_error"),
]


@pytest.mark.parametrize(("exit_code", "line", "reason"), CLASSIFICATION_CASES)
def test_classify_failure(exit_code: int, line: str, reason: str) -> None:
    error = classify_failure(exit_code, [line], remote="od")
    assert error.reason == reason
    assert error.exit_code == exit_code
    if exit_code == 7:
        assert error.retryable is False


def test_redact_hides_credentials() -> None:
    text = redact(
        'Put "https://bob:hunter2@dav.example/x?sig=abc123" failed; '
        "Authorization: Bearer eyJhbGciOi.x.y password=hunter2 token: abc"
    )
    assert "hunter2" not in text
    assert "abc123" not in text
    assert "eyJhbGciOi" not in text
    assert "token: ***" in text
    assert "dav.example/x" in text


async def test_a_remote_without_links_gives_none_and_the_path_stays(
    webdav_cloud: RcloneCloud, rclone_config: Path, tmp_path: Path
) -> None:
    source = make_file(tmp_path / "src" / "a.bin", 2000)
    rclone = rclone_for(rclone_config, tmp_path, *FAIL_FAST)
    await rclone.transfer(source, "testdav:/l/a.bin", on_progress=ignore, job_key="link-1")
    # `rclone serve webdav` (like SFTP and local folders) cannot make public links.
    assert await rclone.public_link("testdav:/l/a.bin") is None
    assert (webdav_cloud.root / "l" / "a.bin").read_bytes() == source.read_bytes()


@pytest.mark.parametrize(
    ("stdout", "link"),
    [
        ("https://drive.example/s/AbC123\n", "https://drive.example/s/AbC123"),
        ("  http://127.0.0.1:9/f?dl=1  \n\n", "http://127.0.0.1:9/f?dl=1"),
        ("", None),
        ("\n\n", None),
        ("ftp://host/file\n", None),
        ("https://a b/c\n", None),
        ("https://x/\x1b[31m\n", None),
        ("https://x/" + "a" * 3000 + "\n", None),
    ],
)
def test_link_output_is_one_http_url_or_nothing(stdout: str, link: str | None) -> None:
    assert parse_link_output(stdout) == link
