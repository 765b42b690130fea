"""The bot's texts and buttons, straight from records: no Telegram, no service."""

from __future__ import annotations

import pytest
from pyrogram.types import InlineKeyboardMarkup

from bot import render
from bot.commands import COMMANDS
from bot.file_choice import chooser
from bot.render import Notice
from configer import UploadTarget
from db import DOWNLOAD_STATUSES, UPLOAD_STATUSES, download_actions, upload_actions
from records import Statistics, TorrentFile
from tests.support.records import download_row, upload_row

ROW = download_row(
    gid="abc",
    source_key="http://example.com/film.mkv",
    source_url="http://example.com/film.mkv",
    file_name="film.mkv",
    total_length=1000,
    completed_length=250,
    download_speed=50,
    owner_id=1,
    chat_id=1,
    message_id=10,
    group_key="message:1:10",
    progress_message_id=11,
)
UPLOAD = upload_row(uploaded_size=512, upload_speed=2048.0)


def callbacks(markup: InlineKeyboardMarkup | None) -> list[str]:
    if markup is None:
        return []
    return [str(b.callback_data) for line in markup.inline_keyboard for b in line]


@pytest.mark.parametrize("status", DOWNLOAD_STATUSES)
def test_download_buttons_are_the_stores_actions(status: str) -> None:
    row = ROW._replace(status=status)
    buttons = render.download_buttons("en", row, origin="s0", with_id=True)
    expected = download_actions(status)
    assert [b.callback_data for b in buttons] == [f"d:{a}:7:s0" for a in expected]
    assert all(b.text.endswith(" #7") for b in buttons)


@pytest.mark.parametrize("status", UPLOAD_STATUSES)
def test_upload_buttons_are_the_stores_actions(status: str) -> None:
    upload = UPLOAD._replace(status=status)
    buttons = render.upload_buttons("en", upload)
    assert [b.callback_data for b in buttons] == [f"u:{a}:3" for a in upload_actions(status)]


def test_progress_message_of_a_running_job() -> None:
    text, markup = render.progress_message("en", ROW, [UPLOAD])
    lines = text.splitlines()
    assert lines[0] == "⬇️ #7 film.mkv"
    assert lines[1] == "[███░░░░░░░░░] 25.0%"
    assert "ETA" in text and "cloud" in text and "50.0%" in text
    assert callbacks(markup) == ["d:pause:7", "d:cancel:7"]


def test_progress_message_offers_a_retry_for_each_failed_upload_only() -> None:
    done = ROW._replace(status="completed", completed_length=1000)
    failed = UPLOAD._replace(id=4, status="failed", error_message="remote is full")
    finished = UPLOAD._replace(id=5, status="completed", remote_path="cloud:/film.mkv")
    text, markup = render.progress_message("en", done, [failed, finished])
    assert "remote is full" in text and "cloud:/film.mkv" in text
    assert callbacks(markup) == ["u:retry:4"]
    _, nothing = render.progress_message("en", done, [finished])
    assert nothing is None


def test_markup_signature_tells_buttons_apart() -> None:
    _, running = render.progress_message("en", ROW, [])
    _, paused = render.progress_message("en", ROW._replace(status="paused"), [])
    assert render.markup_signature(running) != render.markup_signature(paused)
    assert render.markup_signature(None) == ""


def test_completion_notice_carries_the_links() -> None:
    done = ROW._replace(status="completed", total_length=2048)
    notice = Notice("download", 7, "completed")
    text = render.notice_text("en", done, [], notice, ["https://x/stream/7/film.mkv?sig=s"])
    assert text is not None
    assert text.startswith("✅ Downloaded #7")
    assert text.splitlines()[-1] == "https://x/stream/7/film.mkv?sig=s"
    # It moved on (retried) before the notice was sent: nothing to say.
    assert render.notice_text("en", done._replace(status="pending"), [], notice) is None


def test_a_torrents_notice_links_its_first_files_and_counts_the_rest() -> None:
    files = tuple(TorrentFile(index=i, path=f"pack/{i}.bin", length=1) for i in range(1, 13))
    done = ROW._replace(status="completed", source_type="torrent", files=files)
    links = [f"https://x/stream/7/{i}/{i}.bin" for i in range(1, render.MAX_LINKS + 1)]
    text = render.notice_text("en", done, [], Notice("download", 7, "completed"), links)
    assert text is not None
    lines = text.splitlines()
    assert lines[-1] == "… (+2)"
    assert lines[-2] == links[-1] and lines[1] == links[0]


def test_target_buttons_only_with_several_targets_and_until_the_job_completes() -> None:
    _, one = render.progress_message("en", ROW, [], ["cloud"])
    assert one is None or not any(
        str(b.callback_data).startswith("t:") for line in one.inline_keyboard for b in line
    )
    _, several = render.progress_message("en", ROW, [], ["cloud", "nas", "x" * 99])
    assert several is not None
    offered = [
        b for line in several.inline_keyboard for b in line if str(b.callback_data).startswith("t:")
    ]
    assert [b.callback_data for b in offered] == ["t:7:0", "t:7:1", "t:7:2", "t:7:-"]
    assert offered[1].text == "☁️ nas only" and len(offered[2].text) < 60
    done = ROW._replace(status="completed")
    assert render.target_buttons("en", done, ["cloud", "nas"]) == []


def test_an_upload_notice_gives_the_remote_link_else_the_remote_path() -> None:
    done = UPLOAD._replace(status="completed", remote_path="dav:/up/film.mkv")
    notice = Notice("upload", 3, "completed")
    text = render.notice_text("en", ROW, [done], notice)
    assert text is not None and "dav:/up/film.mkv" in text
    linked = done._replace(public_link="https://drive.example/s/AbC")
    text = render.notice_text("en", ROW, [linked], notice)
    assert text is not None and "https://drive.example/s/AbC" in text
    assert "dav:/up/film.mkv" not in text


def test_a_failed_upload_is_final_and_a_waiting_retry_is_shown_in_the_progress_message() -> None:
    failed = UPLOAD._replace(status="failed", error_message="timeout", retry_count=1)
    notice = Notice("upload", 3, "failed")
    text = render.notice_text("en", ROW, [failed], notice)
    assert text is not None and "timeout" in text and "cloud" in text
    waiting = UPLOAD._replace(
        status="pending",
        error_message="timeout",
        retry_count=1,
        next_attempt_at="2024-01-01T00:00:08.000+00:00",
        updated_at="2024-01-01T00:00:00.004+00:00",
    )
    # It moved on (back to pending, waiting for its retry) before the notice was sent.
    assert render.notice_text("en", ROW, [waiting], notice) is None
    assert render.retry_wait(waiting) == 8
    assert render.retry_wait(failed) is None
    assert render.retry_wait(waiting._replace(next_attempt_at=None)) is None
    line = render.upload_line("en", waiting)
    assert line == "⏳ cloud: retrying in 8 s (1/3): timeout"
    assert "8 秒后重试" in render.upload_line("zh", waiting)
    text, markup = render.progress_message("en", ROW, [waiting])
    assert line in text.splitlines()
    assert callbacks(markup) == ["d:pause:7", "d:cancel:7"]  # no retry button while it waits
    assert "(1/3) · timeout" in render.upload_entry("en", waiting)


def test_status_page_is_paged_and_clamped() -> None:
    rows = [ROW._replace(id=n, file_name=f"job{n}") for n in range(1, 8)]
    text, markup = render.status_page("en", rows, 5)  # past the end: the last page
    assert "page 2/2" in text and "job6" in text and "job1" not in text
    data = callbacks(markup)
    assert "d:pause:6:s1" in data and data[-2:] == ["s:0", "s:1"]
    first, markup = render.status_page("en", rows, 0)
    assert "page 1/2" in first and callbacks(markup)[-2:] == ["s:0", "s:1"]
    assert render.status_page("en", [], 0) == ("Nothing is downloading or waiting.", None)


def test_lists_and_their_empty_texts() -> None:
    failed = ROW._replace(status="failed", error_message="404 Not Found")
    listing = render.downloads_list("en", [failed])
    assert "❌ #7 film.mkv" in listing and "404 Not Found" in listing
    assert render.downloads_list("en", []) == "No downloads yet."
    text, markup = render.uploads_page("en", [UPLOAD._replace(status="cancelled")])
    assert "↑3 #7 → cloud" in text
    assert callbacks(markup) == ["u:retry:3:l"]
    assert render.uploads_page("en", []) == ("No uploads yet.", None)


def test_stats_with_and_without_the_disk() -> None:
    statistics: Statistics = {
        "downloads": {
            "total": 9,
            "by_status": {"downloading": 2, "paused": 1, "completed": 5, "failed": 1},
            "total_bytes": 4096,
            "completed_bytes": 2048,
            "download_speed": 1024,
        },
        "uploads": {
            "total": 4,
            "by_status": {"uploading": 1, "completed": 3},
            "by_target": {},
            "total_bytes": 0,
            "upload_speed": 0.0,
            "cleaned": 0,
        },
    }
    text = render.stats_text("en", statistics, (1024**3, 2 * 1024**3))
    assert "Downloads: 9 in all" in text and "3 active" in text
    assert "1.0 GiB free" in text
    unknown = render.stats_text("en", statistics, None)
    assert unknown.splitlines()[:-1] == text.splitlines()[:-1]
    assert unknown.splitlines()[-1] != text.splitlines()[-1]


def test_targets_help_and_address() -> None:
    targets = (
        UploadTarget(name="cloud", type="rclone", remote="mycloud", path="/Films"),
        UploadTarget(name="tg", type="telegram", chat_id=-100123),
    )
    text = render.targets_text("en", targets)
    assert "cloud (rclone) → mycloud:/Films" in text and "-100123" in text
    assert render.targets_text("en", ()) != text
    help_lines = render.help_text("en", COMMANDS).splitlines()
    for name, args in COMMANDS:
        assert any(line.startswith(f"/{name} {args}".strip()) for line in help_lines), name
    assert "命令" in render.help_text("zh", COMMANDS)
    assert [c.command for c in render.command_menu("en", COMMANDS)] == [n for n, _ in COMMANDS]
    address = render.public_address("https://user:secret@relay.example.com:8443/base?token=t#x")
    assert address == "https://relay.example.com:8443/base"


def test_long_texts_are_clipped_to_one_message() -> None:
    rows = [ROW._replace(id=n, status="failed", error_message="e" * 300) for n in range(40)]
    text = render.downloads_list("en", rows)
    assert len(text) == render.TEXT_LIMIT and text.endswith("…")


def test_a_link_shown_in_a_chat_never_shows_its_password() -> None:
    row = download_row(
        file_name=None, source_url="https://ann:hunter2secret@files.example/a.bin", status="failed"
    )
    shown = [
        render.download_title(row),
        render.download_entry("en", row),
        render.notice_text("en", row, [], Notice("download", row.id, "failed")),
    ]
    for text in shown:
        assert text is not None
        assert "hunter2secret" not in text and "ann:***@files.example" in text


def test_file_chooser_in_chinese_and_its_button_only_while_a_choice_is_open() -> None:
    files = (
        TorrentFile(1, "pack/a.mkv", 2048),
        TorrentFile(2, "pack/" + "n" * 80 + ".txt", 10, selected=False),
    )
    row = download_row(source_type="torrent", status="paused", file_name="pack", files=files)
    assert callbacks(render.progress_message("zh", row, ())[1])[-1] == "f:7:o"
    for closed in (
        download_row(source_type="torrent", status="completed", files=files),
        download_row(source_type="torrent", files=files[:1]),
        download_row(files=files),  # not a torrent
    ):
        assert "f:7:o" not in callbacks(render.progress_message("en", closed, ())[1])

    text, markup = chooser("zh", row, {1}, 5)  # the page is clamped
    assert text.startswith("#7 pack 的文件：已选 1/2（2.0 KiB），第 1/1 页。")
    labels = [b.text for line in markup.inline_keyboard for b in line]
    assert labels[0] == "✅ a.mkv (2.0 KiB)"
    assert labels[1].startswith("⬜ nnn") and len(labels[1]) < 70  # a long name is cut
    assert labels[2:] == ["全部", "全不选", "🎬 仅视频", "最大的", "✔ 应用"]
    assert all(len(b.encode()) <= 64 for b in callbacks(markup))
