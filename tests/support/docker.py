"""The Docker image under test: a docker CLI that builds with BuildKit, a Debian base image made
locally when no registry can be reached, and the image built from the project's Dockerfile.

- :func:`docker_cli` finds a ``docker`` on PATH that reaches a daemon and builds with BuildKit
  (the buildx plugin, or a CLI older than 23 with BuildKit built in); the tests skip with one
  line when there is none.
- :func:`ensure_base_image` reuses the tag ``mistrelay-base:bookworm`` when it exists (docker's
  storage outlives a test run); else it takes ``debian:bookworm-slim`` when present, else makes
  the base with ``debootstrap --variant=minbase bookworm`` from the Debian mirror of this
  machine's apt sources and ``docker import``.
- :func:`pip_build_secrets` writes a pip.conf from this machine's pip settings (network indexes,
  timeout, proxy, and its CA bundle as the ``pip-ca`` secret) for ``docker build --secret``:
  the build reaches the package index as the host does and no layer keeps the settings.
- The session fixture ``docker_image`` builds the image once per run (layers are cached by docker).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from loguru import logger

PROJECT_ROOT = Path(__file__).resolve().parents[2]
BASE_TAG = "mistrelay-base:bookworm"
OFFICIAL_BASE = "debian:bookworm-slim"
IMAGE_TAG = "mistrelay:test"
SUITE = "bookworm"
APT_SOURCES = Path("/etc/apt/sources.list")
APT_SOURCES_DIR = Path("/etc/apt/sources.list.d")
# pip settings that still mean something inside the build (file:// indexes and local
# find-links do not: the build sees none of this machine's files).
_PIP_NETWORK_KEYS = ("index-url", "extra-index-url", "trusted-host", "timeout", "proxy")
_PIP_SCOPES = ("global", "install")


class DockerUnavailable(Exception):
    """No way to build and run the image here; the message is the one-line skip reason."""


@dataclass(frozen=True)
class DockerCli:
    """A docker executable that reaches a daemon and builds with BuildKit."""

    path: str
    env: dict[str, str]

    def command(self, *args: str) -> list[str]:
        return [self.path, *args]

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a docker command to its end (blocking: call it from a thread in async code)."""
        result = subprocess.run(
            self.command(*args),
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(args[:3])} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout)[-3000:]}"
            )
        return result

    async def arun(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(self.run, *args, timeout=timeout, check=check)


def _docker_executables() -> list[str]:
    """Every `docker` on PATH, in PATH order, each file once."""
    found: list[str] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / "docker"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            real = str(candidate.resolve())
            if real not in found:
                found.append(real)
    return found


def _builds_with_buildkit(path: str, env: dict[str, str]) -> bool:
    def output(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [path, *args], env=env, capture_output=True, text=True, timeout=30, check=False
        )

    if output("buildx", "version").returncode == 0:
        return True
    version = output("version", "--format", "{{.Client.Version}}").stdout.strip()
    major = re.match(r"(\d+)\.", version)
    return major is not None and int(major.group(1)) < 23


def docker_cli() -> DockerCli:
    """The first docker on PATH that reaches its daemon and can build with BuildKit."""
    executables = _docker_executables()
    if not executables:
        raise DockerUnavailable("no docker command on PATH")
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    first = executables[0]
    ping = subprocess.run(
        [first, "info", "--format", "{{.ServerVersion}}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if ping.returncode != 0 or not ping.stdout.strip():
        raise DockerUnavailable("no Docker daemon answers (make test starts dockerd if installed)")
    for path in executables:
        if _builds_with_buildkit(path, env):
            return DockerCli(path, env)
    raise DockerUnavailable("no docker CLI here builds with BuildKit (no buildx plugin)")


# -- the base image ---------------------------------------------------------------------------


def _deb822_mirrors(text: str) -> Iterator[tuple[str, list[str], list[str], list[str]]]:
    """(types, URIs, suites, components) of each stanza of a deb822 .sources file."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            if line[0].isspace() and key:
                fields[key] += " " + line.strip()
                continue
            key, _, value = line.partition(":")
            key = key.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        yield (
            fields.get("types", ""),
            fields.get("uris", "").split(),
            fields.get("suites", "").split(),
            fields.get("components", "").split(),
        )


def _one_line_mirrors(text: str) -> Iterator[tuple[str, list[str], list[str], list[str]]]:
    """The same from one-line `deb [options] URI suite components...` entries."""
    for raw in text.splitlines():
        line = re.sub(r"\[[^]]*\]", " ", raw.split("#", 1)[0]).split()
        if len(line) >= 4:
            yield line[0], [line[1]], [line[2]], line[3:]


def apt_source_files() -> list[Path]:
    """sources.list and the files of sources.list.d, in apt's order."""
    listed = sorted(APT_SOURCES_DIR.iterdir()) if APT_SOURCES_DIR.is_dir() else []
    return [APT_SOURCES, *listed]


def debian_mirror(files: Sequence[Path] | None = None) -> str:
    """The Debian mirror that apt on this machine uses for `bookworm main`."""
    entries: list[tuple[str, list[str], list[str], list[str]]] = []
    for path in apt_source_files() if files is None else files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            entries.extend(_deb822_mirrors(text))
        elif path.suffix == ".list" or path.name == "sources.list":
            entries.extend(_one_line_mirrors(text))
    for types, uris, suites, components in entries:
        if "deb" in types.split() and SUITE in suites and "main" in components:
            for uri in uris:
                if uri.startswith(("http://", "https://")):
                    return uri
    raise DockerUnavailable(f"no Debian {SUITE} main mirror in this machine's apt sources")


def _image_id(cli: DockerCli, tag: str) -> str | None:
    found = cli.run("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    if found.returncode != 0:
        return None
    return found.stdout.strip() or None


def _image_exists(cli: DockerCli, tag: str) -> bool:
    return _image_id(cli, tag) is not None


def ensure_base_image(cli: DockerCli) -> str:
    """A Debian bookworm base image to build on: the local one, made once and then reused."""
    for tag in (BASE_TAG, OFFICIAL_BASE):
        if _image_exists(cli, tag):
            return tag
    debootstrap = shutil.which("debootstrap")
    if debootstrap is None or os.geteuid() != 0:
        raise DockerUnavailable(
            f"no {OFFICIAL_BASE} image and no way to make one (debootstrap as root)"
        )
    mirror = debian_mirror()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mistrelay-base-") as folder:
        root = Path(folder) / "root"
        made = subprocess.run(
            [debootstrap, "--variant=minbase", SUITE, str(root), mirror],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        if made.returncode != 0:
            raise AssertionError(f"debootstrap failed: {(made.stderr or made.stdout)[-3000:]}")
        # The downloaded packages stay in apt's cache: the image needs none of them.
        for deb in (root / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                cli.command("import", "-", BASE_TAG),
                env=cli.env,
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait(timeout=600)
        if imported.returncode != 0 or tar.returncode != 0:
            raise AssertionError(f"docker import failed: {imported.stderr[-3000:]}")
    logger.info("made {} from {} in {:.0f} s", BASE_TAG, mirror, time.monotonic() - started)
    return BASE_TAG


# -- pip inside the build ---------------------------------------------------------------------


def _pip_settings() -> dict[str, str]:
    """This machine's pip settings as `pip config list` shows them; the environment wins."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    from_files: dict[str, str] = {}
    from_env: dict[str, str] = {}
    for line in listed.splitlines():
        match = re.fullmatch(r"([^.=]+|:env:)\.([\w-]+)='(.*)'", line.strip())
        if match is None:
            continue
        scope, key, value = match.groups()
        key = "timeout" if key == "default-timeout" else key
        if scope == ":env:":
            from_env[key] = value
        elif scope in _PIP_SCOPES:
            from_files[key] = value
    return {**from_files, **from_env}


def pip_build_secrets(folder: Path) -> list[str]:
    """`--secret` arguments giving the build this machine's pip index settings and CA bundle."""
    settings = _pip_settings()
    lines = ["[global]"]
    for key in _PIP_NETWORK_KEYS:
        value = settings.get(key, "")
        if key.endswith("index-url"):
            value = " ".join(u for u in value.split() if u.startswith(("http://", "https://")))
        if value:
            lines.append(f"{key} = {value}")
    arguments: list[str] = []
    cert = settings.get("cert", "")
    if cert and Path(cert).is_file():
        lines.append("cert = /run/secrets/pip-ca")
        arguments += ["--secret", f"id=pip-ca,src={cert}"]
    conf = folder / "pip.conf"
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [*arguments, "--secret", f"id=pip-conf,src={conf}"]


# -- the image --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltImage:
    cli: DockerCli
    tag: str
    base: str
    build_seconds: float


def build_image(cli: DockerCli, folder: Path, extra: Sequence[str] = ()) -> BuiltImage:
    """Build the project's Dockerfile on the local base image, as IMAGE_TAG."""
    base = ensure_base_image(cli)
    previous = _image_id(cli, IMAGE_TAG)
    started = time.monotonic()
    cli.run(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE={base}",
        *pip_build_secrets(folder),
        *extra,
        "--tag",
        IMAGE_TAG,
        str(PROJECT_ROOT),
        timeout=1500,
    )
    seconds = time.monotonic() - started
    if previous is not None and previous != _image_id(cli, IMAGE_TAG):
        # The image of an earlier run, now untagged: its layers would pile up run after run.
        cli.run("image", "rm", previous, check=False)
    return BuiltImage(cli, IMAGE_TAG, base, seconds)


@pytest.fixture(scope="session")
def docker_image(tmp_path_factory: pytest.TempPathFactory) -> BuiltImage:
    """The image, built once per test session; skips when Docker cannot be used here."""
    try:
        cli = docker_cli()
    except DockerUnavailable as exc:
        pytest.skip(str(exc))
    try:
        return build_image(cli, tmp_path_factory.mktemp("docker-build"))
    except DockerUnavailable as exc:
        pytest.skip(str(exc))


def remove_quietly(cli: DockerCli, kind: str, *names: str) -> None:
    """Remove containers or volumes a test made, whatever state they are in."""
    with contextlib.suppress(subprocess.SubprocessError, AssertionError):
        if kind == "container":
            cli.run("rm", "--force", "--volumes", *names, check=False)
        else:
            cli.run("volume", "rm", "--force", *names, check=False)
