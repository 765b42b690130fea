"""What a user may ask MistRelay to fetch: links, magnets and .torrent files, checked before use."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
import torf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aria2_client.sources import (
    MAX_SOURCE_HOSTS,
    MAX_URL_LENGTH,
    AddressPolicy,
    BlockedAddress,
    ParsedLink,
    SourceError,
    allowed_addresses,
    blocked_sources,
    ensure_public_host,
    extract_links,
    magnet_sources,
    parse_link,
    parse_torrent,
    torrent_sources,
    without_magnet_sources,
    without_torrent_sources,
)
from configer import DEFAULT_BLOCKED_NETWORKS
from tests.support.torrents import BencodeValue, bencode, corrupt_torrent_cases, make_torrent

ANNOUNCE = "http://127.0.0.1:1/announce"
DEFAULT_POLICY = AddressPolicy(DEFAULT_BLOCKED_NETWORKS)
INFO_HASH_HEX = "c12fe1c06bba254a9dc9f519b335aa7c1367a88a"

# --- parse_link -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "source_type", "host", "name"),
    [
        ("http://example.com/dir/file.iso", "http", "example.com", "file.iso"),
        ("https://example.com:8443/a%20b.zip?x=1", "http", "example.com", "a b.zip"),
        ("ftp://files.example.org/pub/readme.txt", "ftp", "files.example.org", "readme.txt"),
        ("HTTP://Example.COM/Big.BIN", "http", "example.com", "Big.BIN"),
        ("http://[2001:db8::1]:8080/x.bin", "http", "2001:db8::1", "x.bin"),
        ("  https://example.com/trimmed  ", "http", "example.com", "trimmed"),
    ],
)
def test_parse_link_accepts_http_https_ftp(
    url: str, source_type: str, host: str, name: str
) -> None:
    link = parse_link(url)
    assert link.source_type == source_type
    assert link.host == host
    assert link.display_name == name
    assert link.info_hash is None
    assert link.url == url.strip() or link.url.lower() == url.strip().lower()


def test_parse_link_source_key_ignores_case_of_scheme_and_host_and_the_fragment() -> None:
    a = parse_link("HTTPS://EXAMPLE.com/Path/File.bin#part")
    b = parse_link("https://example.com/Path/File.bin")
    assert a.source_key == b.source_key
    # The path keeps its case: /Path and /path are different files on most servers.
    assert parse_link("https://example.com/path/file.bin").source_key != b.source_key


def test_parse_link_drops_credentials_from_the_source_key() -> None:
    link = parse_link("ftp://user:secret@ftp.example.org/file")
    assert "secret" not in link.source_key
    assert link.host == "ftp.example.org"


def test_parse_link_magnet_with_hex_info_hash() -> None:
    magnet = f"magnet:?xt=urn:btih:{INFO_HASH_HEX.upper()}&dn=Some+Name&tr=http://t/announce"
    link = parse_link(magnet)
    assert link.source_type == "magnet"
    assert link.info_hash == INFO_HASH_HEX
    assert link.source_key == f"btih:{INFO_HASH_HEX}"
    assert link.display_name == "Some Name"
    assert link.url == magnet
    assert link.host is None


def test_parse_link_magnet_with_base32_info_hash_is_the_same_torrent() -> None:
    base32 = base64.b32encode(bytes.fromhex(INFO_HASH_HEX)).decode()
    assert len(base32) == 32
    link = parse_link(f"magnet:?xt=urn:btih:{base32}")
    assert link.info_hash == INFO_HASH_HEX
    assert link.source_key == parse_link(f"magnet:?xt=urn:btih:{INFO_HASH_HEX}").source_key
    # Without dn the name falls back to the hash.
    assert link.display_name == INFO_HASH_HEX


@pytest.mark.parametrize(
    ("url", "needle"),
    [
        ("file:///etc/passwd", "file"),
        ("javascript:alert(1)", "javascript"),
        ("data:text/plain;base64,SGVsbG8=", "data"),
        ("gopher://example.com/1", "gopher"),
        ("sftp://example.com/x", "sftp"),
        ("example.com/file.iso", "scheme"),
        ("//example.com/file.iso", "scheme"),
    ],
)
def test_parse_link_refuses_other_schemes(url: str, needle: str) -> None:
    with pytest.raises(SourceError, match=needle):
        parse_link(url)


@pytest.mark.parametrize("url", ["http://", "http:///path", "https://:80/x", "ftp://@/x"])
def test_parse_link_refuses_a_missing_host(url: str) -> None:
    with pytest.raises(SourceError, match="no host"):
        parse_link(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/a\x00b",
        "http://example.com/a\nb",
        "http://example.com/a\rHost: evil",
        "http://example.com/a\tb",
        "http://exa mple.com/",
        "http://example.com/\x7f",
    ],
)
def test_parse_link_refuses_control_characters_and_spaces(url: str) -> None:
    with pytest.raises(SourceError, match="control characters"):
        parse_link(url)


def test_parse_link_refuses_a_link_that_is_too_long() -> None:
    url = "http://example.com/" + "a" * MAX_URL_LENGTH
    with pytest.raises(SourceError, match="longer than"):
        parse_link(url)
    # Exactly at the limit is still fine.
    at_limit = "http://example.com/" + "a" * (MAX_URL_LENGTH - len("http://example.com/"))
    assert parse_link(at_limit).host == "example.com"


@pytest.mark.parametrize(
    "url",
    ["", "   ", "http://example.com:0/x", "http://example.com:99999/x", "http://[::1/x"],
)
def test_parse_link_refuses_empty_and_malformed(url: str) -> None:
    with pytest.raises(SourceError):
        parse_link(url)


@pytest.mark.parametrize(
    "magnet",
    [
        "magnet:?dn=no-hash",
        "magnet:?xt=urn:btih:1234",
        "magnet:?xt=urn:btih:" + "g" * 40,
        "magnet:?xt=urn:sha1:" + "a" * 40,
        "magnet:",
    ],
)
def test_parse_link_refuses_magnets_without_a_valid_info_hash(magnet: str) -> None:
    with pytest.raises(SourceError, match="info hash"):
        parse_link(magnet)


# --- extract_links ----------------------------------------------------------------------------


def test_extract_links_finds_every_link_in_chat_text() -> None:
    text = (
        "Here: https://example.com/one.iso, and (http://example.org/two.zip). "
        f"Also magnet:?xt=urn:btih:{INFO_HASH_HEX}&dn=x; "
        "ftp://files.example.net/three.tar.gz! and <https://example.com/four.bin>"
    )
    links, rejected = extract_links(text)
    assert [link.url for link in links] == [
        "https://example.com/one.iso",
        "http://example.org/two.zip",
        f"magnet:?xt=urn:btih:{INFO_HASH_HEX}&dn=x",
        "ftp://files.example.net/three.tar.gz!",
        "https://example.com/four.bin",
    ]
    assert rejected == []


@pytest.mark.parametrize("tail", [".", ",", ";", ")", "]", "}", ">", "»", '"', "'", ").", "'."])
def test_extract_links_strips_trailing_punctuation(tail: str) -> None:
    links, _ = extract_links(f"see https://example.com/file.bin{tail} thanks")
    assert [link.url for link in links] == ["https://example.com/file.bin"]


def test_extract_links_drops_duplicates_keeping_the_first() -> None:
    text = (
        "https://Example.com/a.bin https://example.com/a.bin HTTPS://EXAMPLE.COM/a.bin "
        f"magnet:?xt=urn:btih:{INFO_HASH_HEX} "
        f"magnet:?xt=urn:btih:{base64.b32encode(bytes.fromhex(INFO_HASH_HEX)).decode()}"
    )
    links, rejected = extract_links(text)
    assert len(links) == 2
    assert links[0].url == "https://Example.com/a.bin"
    assert links[1].source_type == "magnet"
    assert rejected == []


def test_extract_links_reports_bad_link_like_tokens() -> None:
    text = "file:///etc/passwd and https://example.com/ok.bin and magnet:?xt=urn:btih:zz"
    links, rejected = extract_links(text)
    assert [link.url for link in links] == ["https://example.com/ok.bin"]
    assert len(rejected) == 2
    assert any("file" in reason for reason in rejected)
    assert any("info hash" in reason for reason in rejected)


def test_extract_links_in_plain_text_finds_nothing() -> None:
    assert extract_links("no links here, just example.com and a:b") == ([], [])


# --- ensure_public_host (literal addresses only: nothing is resolved) --------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x",
        "http://127.8.9.10:8080/x",
        "http://[::1]/x",
        "http://localhost/x",
        "http://LOCALHOST:8080/x",
        "http://api.localhost/x",
        "http://10.0.0.1/x",
        "http://10.255.255.254/x",
        "http://172.16.5.4/x",
        "http://192.168.1.1/x",
        "http://169.254.169.254/latest/meta-data/",
        "http://0.0.0.0/x",
        "http://[::ffff:127.0.0.1]/x",
        "http://[fe80::1]/x",
        "http://[fc00::1]/x",
        "http://100.64.0.1/x",
        "http://224.0.0.1/x",
        # Numeric spellings of 127.0.0.1 that the C library reads without any DNS query.
        "http://2130706433/x",
        "http://0x7f000001/x",
        "http://127.1/x",
    ],
)
async def test_ensure_public_host_refuses_loopback_private_and_reserved(url: str) -> None:
    with pytest.raises(SourceError):
        await ensure_public_host(parse_link(url), DEFAULT_POLICY)


@pytest.mark.parametrize(
    "url", ["http://93.184.216.34/x", "https://[2606:4700:4700::1111]/x", "ftp://8.8.8.8/x"]
)
async def test_ensure_public_host_lets_public_literal_addresses_through(url: str) -> None:
    await ensure_public_host(parse_link(url), DEFAULT_POLICY)


async def test_ensure_public_host_ignores_magnets() -> None:
    await ensure_public_host(parse_link(f"magnet:?xt=urn:btih:{INFO_HASH_HEX}"), DEFAULT_POLICY)


# --- the address policy (aria2.blocked_networks) ------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.31.255.255",
        "192.168.0.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "240.0.0.1",
        "255.255.255.255",
        "224.0.0.251",
        "::",
        "::1",
        "fe80::1%eth0",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        # IPv6 forms that carry an IPv4 address are judged by it too.
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::127.0.0.1",
        "64:ff9b::a00:1",
        "2002:c0a8:101::1",
    ],
)
def test_the_default_policy_blocks_private_loopback_and_reserved_addresses(address: str) -> None:
    assert DEFAULT_POLICY.blocking_network(address) is not None


@pytest.mark.parametrize(
    "address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
)
def test_the_default_policy_lets_public_addresses_through(address: str) -> None:
    assert DEFAULT_POLICY.blocking_network(address) is None


async def test_a_host_with_any_blocked_address_is_refused_naming_it() -> None:
    async def resolve(host: str) -> list[str]:
        return {"mixed.test": ["93.184.216.34", "10.0.0.7"], "none.test": []}.get(host, [host])

    with pytest.raises(BlockedAddress, match=r"mixed\.test: blocked address 10\.0\.0\.7"):
        await allowed_addresses("mixed.test", DEFAULT_POLICY, resolve)
    with pytest.raises(SourceError, match="does not resolve"):
        await allowed_addresses("none.test", DEFAULT_POLICY, resolve)
    narrow = AddressPolicy(["127.0.0.2/32"])
    assert await allowed_addresses("127.0.0.1", narrow, resolve) == ["127.0.0.1"]
    with pytest.raises(BlockedAddress):
        await allowed_addresses("::ffff:127.0.0.2", narrow, resolve)


# --- trackers and web seeds of torrents and magnets ---------------------------------------------


def test_blocked_trackers_and_web_seeds_leave_a_torrent_with_its_info_hash() -> None:
    info: BencodeValue = {
        "length": 1,
        "name": "film.bin",
        "piece length": 16384,
        "pieces": b"\0" * 20,
    }
    torrent = bencode(
        {
            "announce": "http://10.0.0.1/announce",
            "announce-list": [
                ["http://10.0.0.1/announce", "udp://tracker.test:80"],
                ["http://10.0.0.2/a"],
            ],
            "comment": "kept",
            "info": info,
            "url-list": ["http://10.0.0.3/seed/", "http://seed.test/film.bin"],
        }
    )
    assert torrent_sources(torrent) == [
        "http://10.0.0.1/announce",
        "http://10.0.0.1/announce",
        "udp://tracker.test:80",
        "http://10.0.0.2/a",
        "http://10.0.0.3/seed/",
        "http://seed.test/film.bin",
    ]
    dropped = {"http://10.0.0.1/announce", "http://10.0.0.2/a", "http://10.0.0.3/seed/"}
    rewritten = without_torrent_sources(torrent, dropped)
    assert rewritten == bencode(
        {
            "announce-list": [["udp://tracker.test:80"]],
            "comment": "kept",
            "info": info,
            "url-list": ["http://seed.test/film.bin"],
        }
    )
    assert parse_torrent(rewritten).info_hash == hashlib.sha1(bencode(info)).hexdigest()
    assert without_torrent_sources(torrent, set()) == torrent  # nothing dropped: the same bytes


def test_blocked_trackers_and_web_seeds_leave_a_magnet_otherwise_as_it_was() -> None:
    magnet = (
        f"magnet:?xt=urn:btih:{INFO_HASH_HEX}&dn=A+film&tr=http%3A%2F%2F10.0.0.1%2Fa"
        "&tr.1=udp%3A%2F%2Ftracker.test%3A80&ws=http%3A%2F%2F10.0.0.3%2Fseed&x.pe=1.2.3.4:5"
    )
    assert magnet_sources(magnet) == [
        "http://10.0.0.1/a",
        "udp://tracker.test:80",
        "http://10.0.0.3/seed",
    ]
    kept = without_magnet_sources(magnet, {"http://10.0.0.1/a", "http://10.0.0.3/seed"})
    assert kept == (
        f"magnet:?xt=urn:btih:{INFO_HASH_HEX}&dn=A+film&tr.1=udp%3A%2F%2Ftracker.test%3A80"
        "&x.pe=1.2.3.4:5"
    )
    assert parse_link(kept).info_hash == INFO_HASH_HEX


async def test_sources_are_judged_by_host_once_and_unresolvable_ones_dropped() -> None:
    looked_up: list[str] = []

    async def resolve(host: str) -> list[str]:
        looked_up.append(host)
        return {"good.test": ["93.184.216.34"], "inner.test": ["192.168.1.5"]}.get(host, [])

    urls = [
        "http://good.test/announce",
        "udp://good.test:6969",
        "http://inner.test/announce",
        "http://gone.test/announce",
        "http://[::1]:80/seed",
        "not a url",
    ]
    reasons = await blocked_sources(urls, DEFAULT_POLICY, resolve)
    assert set(reasons) == set(urls[2:])
    assert "blocked address 192.168.1.5" in reasons["http://inner.test/announce"]
    assert "does not resolve" in reasons["http://gone.test/announce"]
    assert looked_up.count("good.test") == 1
    many = [f"http://h{n}.test/a" for n in range(MAX_SOURCE_HOSTS + 5)]

    async def public(host: str) -> list[str]:
        return ["93.184.216.34"]

    reasons = await blocked_sources(many, DEFAULT_POLICY, public)
    assert sorted(reasons) == sorted(many[MAX_SOURCE_HOSTS:])


# --- parse_torrent ----------------------------------------------------------------------------


def test_parse_torrent_single_file(tmp_path: Path) -> None:
    data = b"single file content " * 1000
    info = make_torrent(data, tmp_path, ANNOUNCE, "single.bin")
    meta = parse_torrent(info.torrent_bytes)
    assert meta.name == "single.bin"
    assert meta.info_hash == info.info_hash
    assert meta.info_hash == str(torf.Torrent.read_stream(info.torrent_bytes).infohash).lower()
    assert [(f.index, f.path, f.length) for f in meta.files] == [(1, "single.bin", len(data))]
    assert meta.total_length == len(data)
    assert meta.source_key == f"btih:{info.info_hash}"


def test_parse_torrent_multi_file(tmp_path: Path) -> None:
    files = {
        "a.bin": b"a" * 40_000,
        "sub/b.bin": b"b" * 70_001,
        "sub/deeper/c.txt": b"c" * 3,
    }
    info = make_torrent(files, tmp_path, ANNOUNCE, "folder")
    meta = parse_torrent(info.torrent_bytes)
    assert meta.name == "folder"
    assert meta.info_hash == info.info_hash
    by_path = {f.path: f.length for f in meta.files}
    assert by_path == {path: len(data) for path, data in info.files.items()}
    assert sorted(f.index for f in meta.files) == [1, 2, 3]
    assert meta.total_length == info.total_size


@pytest.mark.parametrize(
    "label",
    list(corrupt_torrent_cases()),
)
def test_parse_torrent_refuses_every_corrupt_sample(label: str) -> None:
    data = corrupt_torrent_cases()[label]
    with pytest.raises(SourceError) as caught:
        parse_torrent(data)
    message = str(caught.value)
    assert message
    assert len(message) < 300  # a clear sentence, not a dump of the input


def test_parse_torrent_says_the_info_dictionary_is_missing() -> None:
    data = corrupt_torrent_cases()["no_info_dict"]
    with pytest.raises(SourceError, match="info"):
        parse_torrent(data)


def test_parse_torrent_refuses_trailing_bytes(tmp_path: Path) -> None:
    info = make_torrent(b"x" * 100, tmp_path, ANNOUNCE, "t.bin")
    with pytest.raises(SourceError, match="trailing"):
        parse_torrent(info.torrent_bytes + b"junk")


def test_parse_torrent_gives_the_paths_on_disk_under_the_one_name_policy(tmp_path: Path) -> None:
    files = {
        "a\u202eb.txt": b"1",
        "ab.txt": b"2",  # what the first cleans to: numbered
        "ab.1.txt": b"3",  # and what that number would give: numbered further
        "d\u2066ir/c\x7f.bin": b"4",
        "plain.bin": b"5",
    }
    info = make_torrent(files, tmp_path, ANNOUNCE, "pa\u202eck")
    meta = parse_torrent(info.torrent_bytes)
    paths = [f.path for f in meta.files]
    assert sorted(paths) == [
        "pack/ab.1.txt",
        "pack/ab.2.txt",
        "pack/ab.txt",
        "pack/dir/c.bin",
        "pack/plain.bin",
    ]
    assert meta.renamed == {f.index for f in meta.files}  # the folder itself was cleaned
    assert meta.index_out.splitlines() == [f"{f.index}={f.path}" for f in meta.files]

    clean = parse_torrent(make_torrent({"x.bin": b"1"}, tmp_path, ANNOUNCE, "ok").torrent_bytes)
    assert (clean.renamed, clean.index_out) == (frozenset(), "")
    single = make_torrent(b"1", tmp_path, ANNOUNCE, "invoice\u202egpj.exe")
    meta = parse_torrent(single.torrent_bytes)
    assert [f.path for f in meta.files] == ["invoicegpj.exe"]
    assert meta.index_out == "1=invoicegpj.exe"


def test_parse_torrent_refuses_missing_pieces() -> None:
    data = bencode({"info": {"name": "x", "length": 1, "piece length": 16384}})
    with pytest.raises(SourceError, match="pieces"):
        parse_torrent(data)


# --- fuzz: only SourceError or success ---------------------------------------------------------


def _parse_link_or_source_error(text: str) -> None:
    try:
        link = parse_link(text)
    except SourceError as exc:
        assert str(exc)
        return
    assert isinstance(link, ParsedLink)
    assert link.source_type in ("http", "ftp", "magnet")
    assert link.source_key


link_like = st.one_of(
    st.text(max_size=300),
    st.builds(
        lambda scheme, rest: f"{scheme}{rest}",
        st.sampled_from(
            ["http://", "https://", "ftp://", "magnet:?", "magnet:?xt=urn:btih:", "HTTP://", ""]
        ),
        st.text(max_size=200),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(link_like)
def test_fuzz_parse_link_raises_only_source_error(text: str) -> None:
    _parse_link_or_source_error(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=500))
def test_fuzz_extract_links_never_raises(text: str) -> None:
    links, rejected = extract_links(text)
    assert all(isinstance(link, ParsedLink) for link in links)
    assert all(isinstance(reason, str) for reason in rejected)
    assert len({link.source_key for link in links}) == len(links)


def _parse_torrent_or_source_error(data: bytes) -> None:
    try:
        meta = parse_torrent(data)
    except SourceError as exc:
        assert str(exc)
        return
    assert len(meta.info_hash) == 40
    assert meta.files


_VALID_TORRENT = bencode(
    {
        "announce": ANNOUNCE,
        "info": {
            "name": "folder",
            "piece length": 16384,
            "pieces": b"\x01" * 40,
            "files": [{"length": 10, "path": ["a"]}, {"length": 20, "path": ["b", "c"]}],
        },
    }
)


@st.composite
def mutated_torrents(draw: st.DrawFn) -> bytes:
    data = bytearray(_VALID_TORRENT)
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
        if action == "flip" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete" and position < len(data):
            del data[position]
        elif action == "truncate":
            del data[position:]
    return bytes(data)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=2000), mutated_torrents()))
def test_fuzz_parse_torrent_raises_only_source_error(data: bytes) -> None:
    _parse_torrent_or_source_error(data)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.one_of(st.integers(), st.binary(max_size=20)),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.binary(max_size=8), children, max_size=4),
        ),
        max_leaves=20,
    )
)
def test_fuzz_parse_torrent_on_arbitrary_bencode(value: object) -> None:
    for document in (value, {"info": value}, {b"info": {b"name": b"n", b"files": value}}):
        try:
            data = bencode(document)  # type: ignore[arg-type]
        except TypeError:
            continue
        _parse_torrent_or_source_error(data)
