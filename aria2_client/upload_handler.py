"""Uploads: one row per finished download per matching target, run, verified, cleaned up.

(Interface in place; the transfer pipeline is being filled in.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from configer import UploadConfig
from db import Database, DownloadRow


class UploadManager:
    def __init__(
        self,
        db: Database,
        config: UploadConfig,
        *,
        download_dir: Path,
        data_dir: Path,
        telegram: Any = None,
    ) -> None:
        self.db = db
        self.config = config
        self.download_dir = download_dir
        self.data_dir = data_dir
        self.telegram = telegram

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def on_download_completed(self, row: DownloadRow) -> None:
        return None

    async def on_download_removed(self, row: DownloadRow) -> None:
        return None
