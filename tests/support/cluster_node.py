"""One cluster node for tests: `python -m tests.support.cluster_node --config X`.

The service as `app.py run` runs it (`Service`, stopped on SIGTERM or SIGINT), but its Telegram
edge is a :class:`~tests.support.fake_telegram.FakeTelegram` (the config must carry Telegram
credentials for the bot to be built). The fake appends ``"<node> updates-session started"`` (and
``… stopped``) to the file named by :data:`BOT_LOG_ENV` whenever the bot's updates session (the
main data centre's session of a client that takes updates) starts or stops, so a test sees which
node runs the bot. Exit codes as `app.py`: 2 when the configuration or the store is refused.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TextIO

from loguru import logger

from app import AlreadyRunning, configure_logging, run_service
from configer import Config, ConfigError, load_config
from db import StoreError
from tests.support.fake_telegram import FakeSession, FakeTelegram

BOT_LOG_ENV = "CLUSTER_TEST_BOT_LOG"


class ReportingTelegram(FakeTelegram):
    """The fake Telegram, writing a line to `log` when an updates session starts or stops."""

    def __init__(self, node: str, log: TextIO | None) -> None:
        super().__init__()
        self.node = node
        self.log = log

    def _session_started(self, session: FakeSession) -> None:
        super()._session_started(session)
        self._report(session, "started")

    def _session_stopped(self, session: FakeSession) -> None:
        super()._session_stopped(session)
        self._report(session, "stopped")

    def _report(self, session: FakeSession, what: str) -> None:
        if self.log is None or session.is_media or session.dc_id != self.main_dc:
            return
        if session.client.no_updates:
            return
        # One short line to a line-buffered file opened for appending: one write, as cheap as a
        # log line, and whole even when several nodes write at once.
        self.log.write(f"{self.node} updates-session {what}\n")
        logger.bind(node=self.node).info("fake Telegram: updates session {}", what)


async def run_node(config: Config, log: TextIO | None) -> None:
    fake = ReportingTelegram(config.cluster.name, log)
    await run_service(config, telegram_client_factory=fake.make_client)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cluster_node")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    configure_logging("INFO")
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        logger.error("{}", exc)
        return 2
    configure_logging(config.logging.level)
    log_path = os.environ.get(BOT_LOG_ENV)
    log = open(log_path, "a", buffering=1, encoding="utf-8") if log_path else None  # noqa: SIM115
    try:
        asyncio.run(run_node(config, log))
    except (AlreadyRunning, StoreError) as exc:
        logger.error("{}", exc)
        return 2
    finally:
        if log is not None:
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
