"""The base image's Debian mirror, read from apt's sources as this machine's apt reads them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.docker import DockerUnavailable, debian_mirror

DEB822 = """Types: deb
# a comment inside the stanza
URIs: http://mirror.example/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib
"""


def test_mirror_from_a_deb822_file_skips_security_and_sources(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(DEB822)
    assert debian_mirror([sources]) == "http://mirror.example/debian"


def test_mirror_from_one_line_entries_with_options(tmp_path: Path) -> None:
    listed = tmp_path / "sources.list"
    listed.write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] https://one.example/debian bookworm main non-free\n"
    )
    disabled = tmp_path / "other.list.disabled"
    disabled.write_text("deb http://never.example/debian bookworm main\n")
    assert debian_mirror([disabled, listed]) == "https://one.example/debian"


def test_no_bookworm_main_mirror_names_what_is_missing(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: trixie\n")
    with pytest.raises(DockerUnavailable, match="no Debian bookworm main mirror"):
        debian_mirror([sources, tmp_path / "missing.list"])
