"""Shared pytest configuration: fixtures live in tests/support/ and are registered here."""

pytest_plugins = [
    "tests.support.processes",
    "tests.support.http_files",
    "tests.support.torrents",
    "tests.support.rclone_cloud",
    "tests.support.fake_telegram",
    "tests.support.service",
    "tests.support.service_process",
    "tests.support.reliability",
    "tests.support.postgres",
    "tests.support.stores",
    "tests.support.docker",
]
