"""configer: loading, precedence, validation, secrets, write-back and live-reload classification."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from loguru import logger

import configer
from configer import (
    DB_PATH_ALIAS,
    ENV_VARS,
    KNOWN_KEYS,
    LIVE_KEYS,
    SECRET_KEYS,
    Config,
    ConfigError,
    UploadMatch,
    UploadTarget,
    default_config,
    diff_config,
    ensure_secrets,
    load_config,
    log_secrets,
    masked_settings,
    parse_size,
    set_value_in_file,
)

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = PROJECT_ROOT / "config.yaml"
SECRET = "Zq8SECRETVALUEx7"  # a value that must never show up in an error or a log


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def log_lines() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logger.add(lambda message: lines.append(str(message)), format="{message} {extra}")
    try:
        yield lines
    finally:
        logger.remove(handler)


# --- defaults and the shipped file ---------------------------------------------------------------


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert config.config_path is None
    assert config.web.port == 8080 and config.web.host == "127.0.0.1"
    assert config.web.base_url == "http://127.0.0.1:8080"
    assert config.database.path == tmp_path / "data" / "mistrelay.db"
    assert config.data_dir == tmp_path / "data"
    assert config.aria2.download_dir == tmp_path / "data" / "downloads"
    assert config.aria2.embedded and not config.telegram.enabled
    assert config.upload.targets == ()
    assert config.web.max_body_size == 20 * 1024 * 1024
    assert config == default_config(tmp_path)


def test_shipped_config_loads_and_matches_the_defaults() -> None:
    config = load_config(SHIPPED_CONFIG, env={})
    assert config.config_path == SHIPPED_CONFIG
    assert config.database.path == PROJECT_ROOT / "data" / "mistrelay.db"
    assert config.aria2.download_dir == PROJECT_ROOT / "data" / "downloads"
    assert dataclasses.replace(config, config_path=None) == default_config(PROJECT_ROOT)
    assert not config.telegram.enabled and config.aria2.embedded


def test_shipped_config_documents_every_key() -> None:
    data = yaml.safe_load(SHIPPED_CONFIG.read_text(encoding="utf-8"))
    present = {f"{section}.{key}" for section, body in data.items() for key in body}
    assert present == set(KNOWN_KEYS)
    lines = SHIPPED_CONFIG.read_text(encoding="utf-8").splitlines()
    for index, line in enumerate(lines):
        if line.startswith("  ") and not line.strip().startswith("#") and ":" in line:
            assert lines[index - 1].strip().startswith("#"), f"no comment above: {line}"


def test_config_file_found_in_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path / "config.yaml", "web:\n  port: 9100\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(env={})
    assert config.web.port == 9100
    assert config.config_path == tmp_path / "config.yaml"


def test_config_file_named_by_the_environment(tmp_path: Path) -> None:
    path = write(tmp_path / "elsewhere" / "relay.yaml", "web:\n  port: 9200\n")
    config = load_config(env={"MISTRELAY_CONFIG": str(path)})
    assert config.web.port == 9200 and config.config_path == path


# --- overrides -----------------------------------------------------------------------------------


def test_yaml_overrides_and_relative_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(
        tmp_path / "conf" / "config.yaml",
        """
telegram:
  api_id: 12345
  api_hash: abcdef0123456789
  bot_token: "123:ABC"
  admins: [11, 22]
  allowed_users: 33
aria2:
  download_dir: downloads
  max_download_size: 2GiB
  allow_private_addresses: yes
  options: {max-tries: 5, check-certificate: false, split: "8"}
upload:
  targets:
    - name: onedrive
      type: rclone
      remote: "onedrive:"
      path: /Downloads
    - name: tg
      type: telegram
      chat_id: -1001234567890
      max_retries: 7
      match:
        source_types: [HTTP, magnet]
        extensions: [.MKV, mp4, mkv]
        min_size: 1MB
        max_size: 2GiB
  rclone_config: rclone.conf
web:
  public_url: https://relay.example.com/
  port: 9000
database:
  path: /var/tmp/somewhere/relay.db
""",
    )
    config = load_config(path, env={})
    assert config.telegram.enabled
    assert config.telegram.admins == (11, 22) and config.telegram.allowed_users == (33,)
    assert config.aria2.download_dir == tmp_path / "conf" / "downloads"
    assert config.aria2.max_download_size == 2 * 1024**3
    assert config.aria2.allow_private_addresses is True
    assert config.aria2.options == {"max-tries": "5", "check-certificate": "false", "split": "8"}
    onedrive, tg = config.upload.targets
    assert onedrive == UploadTarget(
        name="onedrive", type="rclone", remote="onedrive", path="/Downloads"
    )
    assert tg.chat_id == -1001234567890 and tg.max_retries == 7
    assert tg.match == UploadMatch(("http", "magnet"), ("mkv", "mp4"), 1_000_000, 2 * 1024**3)
    assert config.upload.retries_for(tg) == 7 and config.upload.retries_for(onedrive) == 3
    assert config.upload.target("tg") is tg
    assert config.upload.rclone_config == str(tmp_path / "conf" / "rclone.conf")
    assert config.web.public_url == "https://relay.example.com"
    assert config.web.base_url == "https://relay.example.com"
    assert config.web.port == 9000
    assert config.database.path == Path("/var/tmp/somewhere/relay.db")
    assert config.data_dir == Path("/var/tmp/somewhere")


def test_an_empty_value_keeps_the_default(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "c.yaml", "web:\n  port:\ntelegram:\n"), env={})
    assert config.web.port == 8080


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "conf" / "config.yaml", "web:\n  port: 9000\n  host: 0.0.0.0\n")
    env = {
        "MISTRELAY_WEB_PORT": "9100",
        "MISTRELAY_TELEGRAM_ADMINS": "1, 2,2",
        "MISTRELAY_ARIA2_ALLOW_PRIVATE_ADDRESSES": "true",
        "MISTRELAY_ARIA2_POLL_INTERVAL": "0.25",
        "MISTRELAY_ARIA2_MAX_DOWNLOAD_SIZE": "500MB",
        "MISTRELAY_ARIA2_DOWNLOAD_DIR": "dl",
        "MISTRELAY_ARIA2_OPTIONS": '{"split": "4"}',
        "MISTRELAY_UPLOAD_TARGETS": json.dumps([{"name": "tg", "type": "telegram", "chat_id": 5}]),
        "MISTRELAY_WEB_TOKEN": SECRET,
        "MISTRELAY_CONFIG": "ignored because a path is given",
        "UNRELATED": "x",
    }
    config = load_config(path, env=env)
    assert config.web.port == 9100 and config.web.host == "0.0.0.0"
    assert config.web.base_url == "http://127.0.0.1:9100"
    assert config.telegram.admins == (1, 2)
    assert config.aria2.allow_private_addresses is True
    assert config.aria2.poll_interval == 0.25
    assert config.aria2.max_download_size == 500_000_000
    assert config.aria2.download_dir == tmp_path / "dl"  # env paths: relative to the cwd
    assert config.aria2.options == {"split": "4"}
    assert config.upload.targets == (UploadTarget(name="tg", type="telegram", chat_id=5),)
    assert config.web.token == SECRET


def test_os_environ_is_used_when_env_is_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MISTRELAY_WEB_PORT", "9300")
    assert load_config(write(tmp_path / "c.yaml", ""), env=None).web.port == 9300


def test_db_path_alias(tmp_path: Path) -> None:
    empty = write(tmp_path / "c.yaml", "")
    db = tmp_path / "db" / "relay.db"
    assert load_config(empty, env={DB_PATH_ALIAS: str(db)}).database.path == db
    both = {DB_PATH_ALIAS: str(db), "MISTRELAY_DATABASE_PATH": str(db)}
    assert load_config(empty, env=both).data_dir == tmp_path / "db"
    with pytest.raises(ConfigError, match="MISTRELAY_DB_PATH") as caught:
        load_config(empty, env={**both, "MISTRELAY_DATABASE_PATH": str(tmp_path / "other.db")})
    assert "database.path" in str(caught.value)


def test_every_key_has_an_env_var() -> None:
    assert set(ENV_VARS.values()) == set(KNOWN_KEYS)
    assert ENV_VARS["MISTRELAY_ARIA2_ALLOW_PRIVATE_ADDRESSES"] == "aria2.allow_private_addresses"


# --- validation ----------------------------------------------------------------------------------

TARGET = "upload:\n  targets:\n"
FILE_CASES = [
    ("web:\n  port: abc\n", "web.port: must be an integer between 1 and 65535, got 'abc'"),
    ("web:\n  port: 70000\n", "web.port: must be an integer between 1 and 65535, got 70000"),
    ("web:\n  port: true\n", "web.port: must be an integer"),
    ("web:\n  prot: 1\n", "web.prot: unknown key; did you mean web.port?"),
    ("telegram:\n  port: 1\n", "telegram.port: unknown key; did you mean web.port?"),
    ("wbe:\n  port: 1\n", "wbe: unknown section; did you mean web?"),
    ("telegram:\n  admins: x\n", "telegram.admins: must be a list of Telegram user ids"),
    ("telegram:\n  admins: [1, -2]\n", "telegram.admins: must be a list"),
    ("telegram:\n  parts_in_flight: 0\n", "telegram.parts_in_flight: must be an integer between 1"),
    (
        "telegram:\n  max_upload_size: 4001MiB\n",
        "telegram.max_upload_size: must be a size in bytes between 65536 and 4194304000",
    ),
    ("telegram:\n  max_upload_size: 0\n", "telegram.max_upload_size: must be a size"),
    ("aria2:\n  poll_interval: 0\n", "aria2.poll_interval: must be a number > 0"),
    ("aria2:\n  idle_poll_interval: -1\n", "aria2.idle_poll_interval: must be a number > 0"),
    ("aria2:\n  poll_interval: .nan\n", "aria2.poll_interval: must be a number"),
    ("aria2:\n  max_download_size: -5\n", "aria2.max_download_size: must be a size"),
    ("aria2:\n  max_download_size: lots\n", "aria2.max_download_size: must be a size"),
    ("aria2:\n  max_concurrent_downloads: 0\n", "aria2.max_concurrent_downloads: must be"),
    ("aria2:\n  allow_private_addresses: maybe\n", "aria2.allow_private_addresses: must be true"),
    ("aria2:\n  rpc_port: 70000\n", "aria2.rpc_port: must be an integer between 0 and 65535"),
    ("aria2:\n  rpc_url: not a url\n", "aria2.rpc_url: must be empty or a URL"),
    ("aria2:\n  options: [a]\n", "aria2.options: must be a mapping"),
    ("aria2:\n  options: {rpc-listen-all: true}\n", "aria2.options.rpc-listen-all: cannot be set"),
    (
        "aria2:\n  options: {dir: /x}\n",
        "aria2.options.dir: cannot be set here: set aria2.download_dir",
    ),
    ("aria2:\n  download_dir: ''\n", "aria2.download_dir: must not be empty"),
    ("upload:\n  max_retries: -1\n", "upload.max_retries: must be an integer between 0 and 100"),
    ("upload:\n  retry_backoff: -1\n", "upload.retry_backoff: must be a number between 0"),
    ("upload:\n  targets: {name: x}\n", "upload.targets: must be a list of targets"),
    ("maintenance:\n  check_interval: -1\n", "maintenance.check_interval: must be a number"),
    ("logging:\n  level: LOUD\n", "logging.level: must be one of TRACE"),
    ("web:\n  public_url: ftp://x\n", "web.public_url: must be empty or a URL starting with http"),
    ("web:\n  host: 'a b'\n", "web.host: must be a host name"),
    ("web:\n  link_expiry: -1\n", "web.link_expiry: must be an integer between 0"),
    ("web:\n  max_body_size: 0\n", "web.max_body_size: must be a size in bytes >= 1"),
    ("web: 5\n", "web: must be a mapping of keys, got 5"),
    ("- a\n- b\n", "the top level must be a mapping of sections, got list"),
    ("just text\n", "the top level must be a mapping"),
    ("web: [\n", "line 2, column 1: invalid YAML"),
    ("web:\n  port: 1\n  port: 2\n", "duplicate key 'port'"),
    ("web:\n  port: 1\nweb:\n  host: x\n", "duplicate key 'web'"),
    ("when: 2020-02-30\n", "invalid YAML"),
    ("telegram:\n  bot_token: '1:x'\n", "telegram.api_id: must be set too"),
    (TARGET + "    - {name: od, type: rclone}\n", "upload.targets[0].remote: is required"),
    (TARGET + "    - {name: tg, type: telegram}\n", "upload.targets[0].chat_id: is required"),
    (TARGET + "    - {name: 'a b', type: rclone, remote: r}\n", "upload.targets[0].name: must be"),
    (TARGET + "    - {type: rclone, remote: r}\n", "upload.targets[0].name: is required"),
    (TARGET + "    - {name: x, type: s3}\n", "upload.targets[0].type: must be rclone or telegram"),
    (
        TARGET + "    - {name: x, type: rclone, remtoe: r}\n",
        "remtoe: unknown key; did you mean remote?",
    ),
    (
        TARGET + "    - {name: x, type: rclone, remote: r, chat_id: 1}\n",
        "[0].chat_id: applies only",
    ),
    (
        TARGET + "    - {name: x, type: telegram, chat_id: 1, remote: r}\n",
        "[0].remote: applies only",
    ),
    (
        TARGET + "    - name: x\n      type: rclone\n      remote: r\n    - name: X\n"
        "      type: telegram\n      chat_id: 1\n",
        "upload.targets[1].name: duplicate target name",
    ),
    (
        TARGET + "    - {name: x, type: telegram, chat_id: 1, match: {source_types: [smtp]}}\n",
        "upload.targets[0].match.source_types: must be among telegram, http",
    ),
    (
        TARGET + "    - {name: x, type: telegram, chat_id: 1, match: {extension: [mkv]}}\n",
        "match.extension: unknown key; did you mean extensions?",
    ),
    (
        TARGET
        + "    - {name: x, type: telegram, chat_id: 1, match: {min_size: 2GB, max_size: 1GB}}\n",
        "upload.targets[0].match.max_size: must not be below min_size",
    ),
    (
        TARGET + "    - {name: x, type: telegram, chat_id: 1, max_retries: many}\n",
        "upload.targets[0].max_retries: must be an integer",
    ),
]


@pytest.mark.parametrize(("text", "expected"), FILE_CASES)
def test_bad_file_values_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path / "config.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    message = str(caught.value)
    assert message.startswith(f"{path}: "), message
    assert expected in message, message
    assert "\n" not in message


def test_error_line_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "config.yaml", "web:\n  port: 70000\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_config(Path("config.yaml"), env={})
    assert str(caught.value) == (
        "config.yaml: web.port: must be an integer between 1 and 65535, got 70000"
    )
    assert caught.value.key == "web.port" and caught.value.source == "config.yaml"


ENV_CASES = [
    ({"MISTRELAY_WEB_PORT": "abc"}, "env MISTRELAY_WEB_PORT: web.port: must be an integer"),
    ({"MISTRELAY_WEB_PORT": "0"}, "env MISTRELAY_WEB_PORT: web.port: must be an integer"),
    ({"MISTRELAY_WEB_PORT": ""}, "env MISTRELAY_WEB_PORT: web.port"),
    ({"MISTRELAY_TELEGRAM_ADMINS": "1,x"}, "telegram.admins: must be a list of Telegram user ids"),
    ({"MISTRELAY_ARIA2_ALLOW_PRIVATE_ADDRESSES": "maybe"}, "allow_private_addresses: must be true"),
    ({"MISTRELAY_ARIA2_ENABLE_DHT": "2"}, "env MISTRELAY_ARIA2_ENABLE_DHT: aria2.enable_dht"),
    ({"MISTRELAY_ARIA2_POLL_INTERVAL": "inf"}, "aria2.poll_interval: must be a number"),
    (
        {"MISTRELAY_WEB_PROT": "1"},
        "env MISTRELAY_WEB_PROT: unknown MistRelay setting; did you mean",
    ),
    ({"MISTRELAY_NOTHING": "1"}, "env MISTRELAY_NOTHING: unknown MistRelay setting"),
    ({"MISTRELAY_UPLOAD_TARGETS": "[{"}, "env MISTRELAY_UPLOAD_TARGETS: upload.targets: must be"),
    ({"MISTRELAY_UPLOAD_TARGETS": '{"name": "x"}'}, "upload.targets: must be a list of targets"),
    (
        {
            "MISTRELAY_UPLOAD_TARGETS": '[{"name": "a", "type": "telegram", "chat_id": 1},'
            ' {"name": "a", "type": "telegram", "chat_id": 2}]'
        },
        "upload.targets[1].name: duplicate target name",
    ),
    ({"MISTRELAY_ARIA2_OPTIONS": "[1]"}, "aria2.options: must be a mapping"),
    ({"MISTRELAY_CONFIG": "/nonexistent/relay.yaml"}, "config file not found"),
]


@pytest.mark.parametrize(("env", "expected"), ENV_CASES)
def test_bad_env_values_name_the_variable(
    tmp_path: Path, env: dict[str, str], expected: str
) -> None:
    path = None if "MISTRELAY_CONFIG" in env else write(tmp_path / "c.yaml", "")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env=env)
    assert expected in str(caught.value), str(caught.value)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found") as caught:
        load_config(tmp_path / "nope.yaml", env={})
    assert "nope.yaml" in str(caught.value)


def test_a_folder_or_binary_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path, env={})
    (tmp_path / "bin.yaml").write_bytes(b"web:\n  host: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path / "bin.yaml", env={})


# --- secrets stay secret -------------------------------------------------------------------------

SECRET_FILE_CASES = [
    "telegram:\n  api_hash: 987654321012345\n",  # a number, not a string
    f"telegram:\n  bot_token: [{SECRET}]\n",
    f"web:\n  token: '{SECRET} with spaces'\n",
    f"aria2:\n  rpc_secret: {{a: {SECRET}}}\n",
    f"telegram:\n  bot_token: '1:{SECRET}'\n",  # incomplete credentials
    f"telegram:\n  bot_tokn: {SECRET}\n",  # unknown key
    f"aria2:\n  options: {{http-passwd: [{SECRET}]}}\n",
]


@pytest.mark.parametrize("text", SECRET_FILE_CASES)
def test_secrets_never_appear_in_errors(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "c.yaml", text), env={})
    message = str(caught.value)
    assert SECRET not in message and "987654321012345" not in message
    assert "telegram." in message or "web." in message or "aria2." in message


def test_secret_from_env_not_in_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path / "c.yaml", ""), env={"MISTRELAY_WEB_TOKEN": f"a {SECRET}"})
    assert "web.token: invalid value" in str(caught.value)
    assert SECRET not in str(caught.value)


def test_masked_settings_hide_secrets(tmp_path: Path) -> None:
    env = {
        "MISTRELAY_TELEGRAM_API_ID": "1",
        "MISTRELAY_TELEGRAM_API_HASH": SECRET + "h",
        "MISTRELAY_TELEGRAM_BOT_TOKEN": SECRET + "b",
        "MISTRELAY_ARIA2_RPC_SECRET": SECRET + "a",
        "MISTRELAY_WEB_TOKEN": SECRET + "w",
        "MISTRELAY_WEB_METRICS_TOKEN": SECRET + "m",
        "MISTRELAY_ARIA2_OPTIONS": json.dumps({"http-passwd": SECRET, "split": "4"}),
        "MISTRELAY_TELEGRAM_ADMINS": "5,6",
        "MISTRELAY_TELEGRAM_WORKER_BOT_TOKENS": f"11:{SECRET}x,12:{SECRET}y",
        "MISTRELAY_TELEGRAM_STORAGE_CHANNEL": "-1001234567890",
    }
    settings = masked_settings(load_config(write(tmp_path / "c.yaml", ""), env=env))
    assert set(settings) == set(KNOWN_KEYS)
    assert all(isinstance(value, str) for value in settings.values())
    assert SECRET not in json.dumps(settings)
    assert {settings[key] for key in SECRET_KEYS} == {"***"}
    assert json.loads(settings["aria2.options"]) == {"http-passwd": "***", "split": "4"}
    assert json.loads(settings["telegram.admins"]) == [5, 6]
    assert settings["web.port"] == "8080" and settings["aria2.enable_dht"] == "true"
    empty = masked_settings(default_config(tmp_path))
    assert {empty[key] for key in SECRET_KEYS} == {""}
    assert json.loads(empty["upload.targets"]) == []


def test_worker_bots_need_a_storage_channel_and_valid_tokens(tmp_path: Path) -> None:
    bot = "telegram:\n  api_id: 1\n  api_hash: h\n  bot_token: '10:main'\n"
    tokens = f"  worker_bot_tokens: ['11:{SECRET}a', '12:{SECRET}b']\n"
    config = load_config(
        write(tmp_path / "ok.yaml", bot + tokens + "  storage_channel: -1001234567890\n"), env={}
    )
    assert config.telegram.worker_bot_tokens == (f"11:{SECRET}a", f"12:{SECRET}b")
    assert config.telegram.storage_channel == -1001234567890
    assert SECRET not in repr(config.telegram)
    hidden = log_secrets(config, ensure_secrets(config))
    assert set(config.telegram.worker_bot_tokens) <= set(hidden)
    cases = {
        "no channel": (bot + tokens, "telegram.storage_channel", "must be set"),
        "a group id": (
            bot + tokens + "  storage_channel: -12345\n",
            "telegram.storage_channel",
            "channel's chat id",
        ),
        "a bad token": (
            bot + f"  worker_bot_tokens: ['{SECRET}']\n  storage_channel: -1001234567890\n",
            "telegram.worker_bot_tokens[0]",
            "<bot id>:<secret>",
        ),
        "the main token": (
            bot + "  worker_bot_tokens: ['10:main']\n  storage_channel: -1001234567890\n",
            "telegram.worker_bot_tokens",
            "main bot",
        ),
        "no main bot": (
            "telegram:\n" + tokens + "  storage_channel: -1001234567890\n",
            "telegram.worker_bot_tokens",
            "needs the main bot",
        ),
    }
    for name, (text, key, problem) in cases.items():
        with pytest.raises(ConfigError) as caught:
            load_config(write(tmp_path / "bad.yaml", text), env={})
        assert caught.value.key == key, name
        assert problem in str(caught.value), name
        assert SECRET not in str(caught.value), name


# --- database.url --------------------------------------------------------------------------------

PG_URL = f"postgresql://relay:{SECRET}@db.example.com:5433/mistrelay"


def test_database_url_empty_or_sqlite_names_the_sqlite_file(tmp_path: Path) -> None:
    conf = tmp_path / "conf"
    default = load_config(write(conf / "a.yaml", "database:\n  url: ''\n"), env={}).database
    assert (default.backend, default.url, default.redacted_url) == ("sqlite", "", "")
    assert default.sqlite_path == default.path == conf / "data" / "mistrelay.db"

    config = load_config(write(conf / "b.yaml", "database:\n  url: sqlite:///state/r.db\n"), env={})
    assert config.database.backend == "sqlite"
    assert config.database.sqlite_path == config.database.path == conf / "state" / "r.db"
    assert config.data_dir == conf / "state"  # the data folder follows the SQLite file
    assert config.database.url == f"sqlite:///{conf}/state/r.db"  # canonical: absolute

    absolute = load_config(None, env={"MISTRELAY_DATABASE_URL": "SQLITE:////var/tmp/x/r.db"})
    assert absolute.database.url == "sqlite:////var/tmp/x/r.db"
    with pytest.raises(ValueError, match="does not name a PostgreSQL server"):
        _ = default.postgres_dsn


def test_a_sqlite_url_wins_over_database_path(tmp_path: Path) -> None:
    both = "database:\n  path: a.db\n  url: sqlite:///b.db\n"
    config = load_config(write(tmp_path / "c.yaml", both), env={DB_PATH_ALIAS: "/elsewhere/c.db"})
    assert config.database.path == config.database.sqlite_path == tmp_path / "b.db"
    # The shipped file sets database.path; the URL from the environment still decides.
    env = {"MISTRELAY_DATABASE_URL": "sqlite:////var/tmp/x/r.db"}
    assert load_config(SHIPPED_CONFIG, env=env).database.sqlite_path == Path("/var/tmp/x/r.db")


def test_database_url_postgresql_view(tmp_path: Path) -> None:
    url = f"postgres://re%20lay:{SECRET}%2F%40@DB.example.com:5433/mist%2Frelay"
    query = "?sslmode=verify-full&application_name=mist+relay&connect_timeout=7"
    config = load_config(write(tmp_path / "c.yaml", f"database:\n  url: {url}{query}\n"), env={})
    database = config.database
    assert database.backend == "postgresql"
    assert database.path == tmp_path / "data" / "mistrelay.db"  # only the data folder now
    canonical = "postgresql://re%20lay:{}@db.example.com:5433/mist%2Frelay"
    assert database.url == canonical.format(f"{SECRET}%2F%40") + query
    assert database.redacted_url == canonical.format("***") + query
    assert database.postgres_dsn == (
        canonical.format(f"{SECRET}%2F%40") + "?sslmode=verify-full&application_name=mist+relay"
    )
    assert database.postgres_connect_timeout == 7.0
    assert SECRET not in repr(database) and SECRET not in repr(config)
    with pytest.raises(ValueError, match="not a SQLite file"):
        _ = database.sqlite_path

    bare = load_config(None, env={"MISTRELAY_DATABASE_URL": "postgresql://[::1]/d"}).database
    assert bare.postgres_dsn == bare.redacted_url == "postgresql://[::1]/d"
    assert bare.postgres_connect_timeout is None


BAD_DATABASE_URLS = [
    ("mysql://h/db", "must be empty, sqlite:///PATH or postgresql://"),
    ("postgresql", "must be empty, sqlite:///PATH or postgresql://"),
    (f"{SECRET}", "must be empty, sqlite:///PATH or postgresql://"),
    ("sqlite://r.db", "must be sqlite:///PATH: three slashes"),
    ("sqlite:///", "must be sqlite:///PATH: three slashes"),
    ("sqlite:///:memory:", "must name a file"),
    ("sqlite:///r.db?mode=ro", "a SQLite URL takes no query string or fragment"),
    (f"postgresql://u:{SECRET}@h:0/db", "port must be between 1 and 65535"),
    (f"postgresql://u:{SECRET}@h:65536/db", "has an invalid host or port (the port must be"),
    (f"postgresql://u:{SECRET}@h:port/db", "has an invalid host or port"),
    (f"postgresql://u:{SECRET}/x@h/db", "write / ? # @ in the user name or password as %2F"),
    (f"postgresql://u:{SECRET}?@h/db", "has an invalid host or port"),
    (f"postgresql://u:{SECRET}@h/db#", "must not contain # (write it as %23 in a password)"),
    (f"postgresql://u:{SECRET}@/db", "must name a host: a name or an IP address"),
    (f"postgresql://u:{SECRET}@%2Frun%2Fpg/db", "must name a host"),
    (f"postgresql://u:{SECRET}@[fe80::zz]/db", "invalid host or port"),
    (f"postgresql://u:{SECRET}@h", "must name one database after the host (…/database)"),
    (f"postgresql://u:{SECRET}@h/", "must name one database after the host"),
    (f"postgresql://u:{SECRET}@h/a/b", "must name one database after the host"),
    (f"postgresql://u:{SECRET}%00@h/db", "password and database must not contain control"),
    (f"postgresql://h/db?password={SECRET}", "unknown query parameter 'password' (allowed: ssl"),
    (f"postgresql://u:{SECRET}@h/db?sslmode=maybe", "sslmode must be one of disable, allow"),
    (f"postgresql://u:{SECRET}@h/db?sslmode=require&sslmode=disable", "sslmode is given twice"),
    (f"postgresql://u:{SECRET}@h/db?connect_timeout=0", "connect_timeout must be a whole"),
    (f"postgresql://u:{SECRET}@h/db?connect_timeout=1.5", "connect_timeout must be a whole"),
    (f"postgresql://u:{SECRET}@h/db?application_name=", "application_name must be 1-63"),
    (f"postgresql://u:{SECRET}@h/db?sslmode", "query string must be name=value pairs"),
]


@pytest.mark.parametrize(("url", "expected"), BAD_DATABASE_URLS)
def test_bad_database_url_is_one_line_without_the_password(
    tmp_path: Path, url: str, expected: str
) -> None:
    path = write(tmp_path / "c.yaml", f"database:\n  url: {json.dumps(url)}\n")
    empty = write(tmp_path / "empty.yaml", "")
    from_env = "env MISTRELAY_DATABASE_URL"
    attempts = [(path, {}, str(path)), (empty, {"MISTRELAY_DATABASE_URL": url}, from_env)]
    for config_file, env, source in attempts:
        with pytest.raises(ConfigError) as caught:
            load_config(config_file, env=env)
        message = str(caught.value)
        assert message.startswith(f"{source}: database.url: "), message
        assert expected in message, message
        assert SECRET not in message and "\n" not in message
        assert caught.value.key == "database.url"


def test_database_url_from_the_environment_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path / "conf" / "c.yaml", f"database:\n  url: {PG_URL}\n")
    assert load_config(path, env={}).database.backend == "postgresql"
    config = load_config(path, env={"MISTRELAY_DATABASE_URL": "sqlite:///local.db"})
    assert config.database.sqlite_path == tmp_path / "local.db"  # env paths: relative to the cwd
    assert load_config(path, env={"MISTRELAY_DATABASE_URL": ""}).database.backend == "sqlite"


def test_database_password_is_masked_and_listed_for_logs(tmp_path: Path) -> None:
    url = PG_URL.replace(SECRET, SECRET + "%40")
    config = load_config(write(tmp_path / "c.yaml", ""), env={"MISTRELAY_DATABASE_URL": url})
    settings = masked_settings(config)
    assert settings["database.url"] == "postgresql://relay:***@db.example.com:5433/mistrelay"
    assert SECRET not in json.dumps(settings)
    hidden = log_secrets(config, ensure_secrets(config))
    assert SECRET + "@" in hidden and SECRET + "%40" in hidden  # decoded and as in the URL
    assert all(hidden) and len(hidden) == len(set(hidden))
    sqlite = default_config(tmp_path)
    assert masked_settings(sqlite)["database.url"] == ""
    assert not any(SECRET in value for value in log_secrets(sqlite, ensure_secrets(sqlite)))


def test_database_url_written_back_needs_a_restart(tmp_path: Path, log_lines: list[str]) -> None:
    path = write(tmp_path / "c.yaml", "database:\n  # where the store lives\n  url: ''\n")
    old = load_config(path, env={})
    set_value_in_file(path, "database.url", PG_URL)
    new = load_config(path, env={})
    assert "# where the store lives" in path.read_text(encoding="utf-8")
    assert new.database.url == PG_URL
    assert diff_config(old, new) == configer.ConfigDiff(applied=[], needs_restart=["database.url"])
    assert log_lines and not any(SECRET in line for line in log_lines)


# --- generated secrets ---------------------------------------------------------------------------


def test_ensure_secrets_creates_private_files(tmp_path: Path, log_lines: list[str]) -> None:
    config = load_config(write(tmp_path / "c.yaml", "database:\n  path: state/relay.db\n"), env={})
    first = ensure_secrets(config)
    data_dir = tmp_path / "state"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for name in ("web_token", "link_key", "aria2_secret"):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600, name
    assert (
        len(first.link_key) == 32 and len(first.aria2_secret) >= 32 and len(first.web_token) >= 32
    )
    assert (data_dir / "link_key").read_text().strip() == first.link_key.hex()
    assert ensure_secrets(config) == first  # stable across calls
    logged = "\n".join(log_lines)
    for name in ("web_token", "link_key", "aria2_secret"):
        assert name in logged
    for value in (first.web_token, first.aria2_secret, first.link_key.hex()):
        assert value not in logged
    assert first.web_token not in repr(first)


def test_ensure_secrets_prefers_configured_values_and_tightens_modes(
    tmp_path: Path, log_lines: list[str]
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    link_key = "ab" * 32
    (data_dir / "link_key").write_text(link_key + "\n")
    os.chmod(data_dir / "link_key", 0o644)
    env = {"MISTRELAY_WEB_TOKEN": SECRET + "web", "MISTRELAY_ARIA2_RPC_SECRET": SECRET + "rpc"}
    found = ensure_secrets(load_config(write(tmp_path / "c.yaml", ""), env=env))
    assert found.web_token == SECRET + "web" and found.aria2_secret == SECRET + "rpc"
    assert found.link_key == bytes.fromhex(link_key)
    assert stat.S_IMODE((data_dir / "link_key").stat().st_mode) == 0o600
    assert not (data_dir / "web_token").exists() and not (data_dir / "aria2_secret").exists()
    assert any("link_key" in line for line in log_lines)
    assert SECRET not in "\n".join(log_lines)


def test_ensure_secrets_replaces_an_unusable_file(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "link_key").write_text("not hex")
    secrets_ = ensure_secrets(default_config(tmp_path))
    assert (data_dir / "link_key").read_text().strip() == secrets_.link_key.hex()


# --- writing back --------------------------------------------------------------------------------


def comment_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip().startswith("#")]


def test_set_value_keeps_comments_and_loads(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    original = SHIPPED_CONFIG.read_text(encoding="utf-8")
    path.write_text(original, encoding="utf-8")
    set_value_in_file(path, "web.port", 9000)
    set_value_in_file(path, "telegram.admins", (5, 6))
    set_value_in_file(path, "aria2.max_download_size", 1024)
    set_value_in_file(path, "logging.level", "DEBUG")
    set_value_in_file(path, "web.public_url", "https://relay.example.com")
    targets = (
        UploadTarget(name="od", type="rclone", remote="od", path="/in"),
        UploadTarget(
            name="tg", type="telegram", chat_id=-7, match=UploadMatch(extensions=("mkv",))
        ),
    )
    set_value_in_file(path, "upload.targets", targets)
    set_value_in_file(path, "upload.targets", targets[1:])  # replaces the block written before
    text = path.read_text(encoding="utf-8")
    assert comment_lines(text) == comment_lines(original)
    assert "  port: 9000\n" in text and "  level: DEBUG\n" in text
    config = load_config(path, env={})
    assert config.web.port == 9000 and config.telegram.admins == (5, 6)
    assert config.aria2.max_download_size == 1024 and config.logging.level == "DEBUG"
    assert config.upload.targets == targets[1:]
    assert config.web.public_url == "https://relay.example.com"
    unchanged = dataclasses.replace(
        config,
        web=dataclasses.replace(config.web, port=8080, public_url=""),
        telegram=dataclasses.replace(config.telegram, admins=()),
        aria2=dataclasses.replace(config.aria2, max_download_size=0),
        logging=dataclasses.replace(config.logging, level="INFO"),
        upload=dataclasses.replace(config.upload, targets=()),
        config_path=None,
    )
    assert unchanged == default_config(tmp_path)


def test_set_value_adds_keys_and_sections(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", "# mine\nweb:\n  # the port\n  port: 8081  # keep\n")
    set_value_in_file(path, "web.link_expiry", 3600)
    set_value_in_file(path, "web.port", 8082)
    set_value_in_file(path, "upload.auto_delete", True)
    text = path.read_text(encoding="utf-8")
    assert text.startswith(
        "# mine\nweb:\n  # the port\n  port: 8082  # keep\n  link_expiry: 3600\n"
    )
    assert text.endswith("upload:\n  auto_delete: true\n")
    config = load_config(path, env={})
    assert (config.web.port, config.web.link_expiry, config.upload.auto_delete) == (
        8082,
        3600,
        True,
    )


def test_set_value_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "new.yaml"
    set_value_in_file(path, "aria2.poll_interval", 0.5)
    assert load_config(path, env={}).aria2.poll_interval == 0.5


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("web.port", 0, "web.port: must be an integer between 1 and 65535"),
        ("web.prot", 1, "web.prot: unknown key; did you mean web.port?"),
        ("upload.targets", [{"name": "x", "type": "rclone"}], "upload.targets[0].remote"),
        ("aria2.allow_private_addresses", "maybe", "must be true or false"),
    ],
)
def test_set_value_refuses_what_would_not_load(
    tmp_path: Path, key: str, value: object, expected: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(SHIPPED_CONFIG.read_text(encoding="utf-8"), encoding="utf-8")
    before = path.read_bytes()
    with pytest.raises(ConfigError) as caught:
        set_value_in_file(path, key, value)
    assert expected in str(caught.value)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary left behind


# --- live reload ---------------------------------------------------------------------------------


def test_diff_config_classifies_live_and_restart_keys(tmp_path: Path) -> None:
    old = default_config(tmp_path)
    assert diff_config(old, old) == configer.ConfigDiff(applied=[], needs_restart=[])
    new = load_config(
        write(
            tmp_path / "c.yaml",
            "telegram:\n  admins: [1]\naria2:\n  poll_interval: 2\n  rpc_port: 6801\n"
            "upload:\n  targets: [{name: t, type: telegram, chat_id: 3}]\n"
            "web:\n  port: 9000\n  token: abcdefghijklmnopqrstu\n",
        ),
        env={},
    )
    diff = diff_config(old, new)
    assert diff.applied == ["telegram.admins", "aria2.poll_interval", "upload.targets"]
    assert diff.needs_restart == ["aria2.rpc_port", "web.port", "web.token"]
    assert diff.changed
    assert set(KNOWN_KEYS) >= LIVE_KEYS


# --- small parts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("2GiB", 2 * 1024**3), ("500MB", 500_000_000), ("1.5K", 1536), ("10 kb", 10_000)],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "-1", "2XB", "1e9", "GiB"])
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_upload_match_accepts() -> None:
    match = UploadMatch(("http",), ("mkv", "tar.gz"), 10, 100)
    assert match.accepts("http", "Movie.MKV", 50)
    assert match.accepts("http", "a.tar.gz", 10)
    assert not match.accepts("magnet", "Movie.mkv", 50)
    assert not match.accepts("http", "Movie.mp4", 50)
    assert not match.accepts("http", "Movie.mkv", 101)
    assert not match.accepts("http", "Movie.mkv", None)
    assert UploadMatch().accepts("torrent", "anything", None)


# --- fuzz: load_config returns a Config or raises ConfigError, nothing else ----------------------

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["2GiB", "1,2", "true", "http://127.0.0.1:1/x", "-1", "70000", "~/x", ""]),
    st.sampled_from(["sqlite:///x.db", "postgresql://u:p@h:5432/d?sslmode=require", "postgres:"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=10,
)
TARGETS = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["a", "b", "A", "bad name"]) | st.text(max_size=5)},
        optional={
            "type": st.sampled_from(["rclone", "telegram", "s3"]) | VALUES,
            "remote": st.sampled_from(["r", "r:", ""]) | VALUES,
            "path": VALUES,
            "chat_id": st.integers() | VALUES,
            "max_retries": st.integers(-2, 200) | VALUES,
            "match": st.fixed_dictionaries(
                {},
                optional={
                    "source_types": st.lists(st.sampled_from(["http", "x", "TORRENT"])) | VALUES,
                    "extensions": st.lists(st.sampled_from([".mkv", "", "a b"])) | VALUES,
                    "min_size": VALUES,
                    "max_size": VALUES,
                    "other": VALUES,
                },
            )
            | VALUES,
        },
    ),
    max_size=3,
)
SECTION_NAMES = [*configer._SECTION_KEYS, "bogus"]
KEY_NAMES = sorted({dotted.split(".")[1] for dotted in KNOWN_KEYS} | {"bogus"})
DOCUMENTS = st.dictionaries(
    st.sampled_from(SECTION_NAMES) | st.integers(),
    st.none()
    | VALUES
    | st.dictionaries(st.sampled_from(KEY_NAMES), VALUES, max_size=6)
    | st.fixed_dictionaries({"targets": TARGETS}),
    max_size=4,
)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def load_or_config_error(path: Path | None, env: dict[str, str]) -> None:
    try:
        config = load_config(path, env=env)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert isinstance(config, Config)
        masked_settings(config)  # the flat view works for anything that loads


@FUZZ
@given(document=DOCUMENTS)
def test_fuzz_yaml_documents(tmp_path: Path, document: dict[object, object]) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    load_or_config_error(path, {})


@FUZZ
@given(raw=st.binary(max_size=120) | st.text(max_size=120).map(str.encode))
def test_fuzz_raw_files(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    load_or_config_error(path, {})


ENV_NAMES = st.sampled_from([*ENV_VARS, DB_PATH_ALIAS, "MISTRELAY_BOGUS", "HOME_NOT_OURS"])
ENV_VALUES = st.text(max_size=30) | st.sampled_from(
    [
        *("1,2", "[1, 2]", "true", "0", "2GiB", "[]", "{}", '[{"name": "a"}]'),
        *("http://127.0.0.1:1", "sqlite:///x.db", "postgresql://u:p%40@[::1]:1/d"),
        "postgresql://h/d?connect_timeout=9",
    ]
)


@FUZZ
@given(env=st.dictionaries(ENV_NAMES, ENV_VALUES, max_size=5))
def test_fuzz_environment(tmp_path: Path, env: dict[str, str]) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    load_or_config_error(path, env)


def test_a_config_repr_shows_no_secret(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "telegram: {api_id: 1, api_hash: hash-for-repr-check,"
        " bot_token: '1:token-for-repr-check'}\n"
        "web: {token: web-token-for-repr-check}\n"
        "aria2: {rpc_secret: rpc-secret-for-repr-check}\n"
    )
    config = load_config(path, env={})
    shown = repr(config)
    assert "TelegramConfig(api_id=1" in shown
    secrets = ("hash-for-repr-check", "token-for-repr-check", "rpc-secret-for-repr-check")
    for secret in secrets:
        assert secret not in shown
