"""Store records built by hand for tests that need no store: every field has a plain default,
and a test names only what it is about."""

from __future__ import annotations

from typing import Any

from records import DownloadRow, UploadRow

STAMP = "2026-01-01T00:00:00.000+00:00"


def download_row(**fields: Any) -> DownloadRow:
    """An HTTP download, job 7, downloading; `fields` override any column."""
    row = DownloadRow(
        id=7,
        gid="0123456789abcdef",
        source_type="http",
        source_key="http://h/x/movie.mkv",
        source_url="http://h/x/movie.mkv",
        status="downloading",
        file_name="movie.mkv",
        local_path=None,
        total_length=0,
        completed_length=0,
        download_speed=0,
        error_message=None,
        error_code=None,
        file_unique_id=None,
        owner_id=None,
        chat_id=None,
        message_id=None,
        group_key="http:7",
        progress_message_id=None,
        info_hash=None,
        files=(),
        media_info=None,
        created_at=STAMP,
        started_at=None,
        completed_at=None,
        updated_at=STAMP,
    )
    return row._replace(**fields)


def upload_row(**fields: Any) -> UploadRow:
    """Upload 3 of job 7 to the rclone target "cloud", uploading; `fields` override any column."""
    row = UploadRow(
        id=3,
        download_id=7,
        upload_target="cloud",
        target_type="rclone",
        status="uploading",
        remote_path=None,
        uploaded_size=0,
        total_size=1024,
        upload_speed=0.0,
        retry_count=0,
        max_retries=3,
        failure_reason=None,
        error_message=None,
        error_code=None,
        verified_size=None,
        verified_hash=None,
        verified_at=None,
        next_attempt_at=None,
        created_at=STAMP,
        started_at=None,
        completed_at=None,
        cleaned_at=None,
        updated_at=STAMP,
        public_link=None,
    )
    return row._replace(**fields)
