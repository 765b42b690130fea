"""Range, If-Range, preconditions and Content-Disposition held to RFC 9110 and RFC 6266."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from webstreamer.ranges import (
    MAX_RANGE_HEADER_LENGTH,
    ByteRange,
    RangeNotSatisfiable,
    content_disposition,
    evaluate_preconditions,
    guess_mime,
    http_date,
    if_range_allows,
    is_inline_safe,
    parse_http_date,
    parse_range,
    sanitize_filename,
)

MIB = 1024 * 1024
UNSATISFIABLE = "416"

# (header, size, expected): expected is (start, end), None for "send it all with 200", or 416.
RANGE_CASES: list[tuple[str | None, int, tuple[int, int] | str | None]] = [
    (None, 1000, None),
    ("bytes=0-99", 1000, (0, 99)),
    ("bytes=0-0", 1000, (0, 0)),
    ("bytes=999-999", 1000, (999, 999)),
    ("bytes=-1", 1000, (999, 999)),
    ("bytes=500-", 1000, (500, 999)),
    ("bytes=0-", 1000, (0, 999)),
    ("bytes=0-5000", 1000, (0, 999)),
    ("bytes=998-5000", 1000, (998, 999)),
    ("bytes=-5000", 1000, (0, 999)),
    ("bytes=-1000", 1000, (0, 999)),
    ("bytes=-999", 1000, (1, 999)),
    ("bytes=1000-", 1000, UNSATISFIABLE),
    ("bytes=1000-2000", 1000, UNSATISFIABLE),
    ("bytes=-0", 1000, UNSATISFIABLE),
    ("bytes=-0,1000-", 1000, UNSATISFIABLE),
    ("bytes=1000-1000, 2000-", 1000, UNSATISFIABLE),
    # case-insensitive unit, OWS around the value and around commas, empty list elements
    ("Bytes=0-1", 1000, (0, 1)),
    ("BYTES=0-1", 1000, (0, 1)),
    (" \tbytes=0-1 \t", 1000, (0, 1)),
    ("bytes=0-1 , 2-3", 1000, (0, 3)),
    ("bytes=0-1\t,\t2-3", 1000, (0, 3)),
    ("bytes=0-1,,2-3", 1000, (0, 3)),
    ("bytes=,0-1", 1000, (0, 1)),
    ("bytes=0-1,", 1000, (0, 1)),
    # several ranges: coalesced when they overlap or touch, otherwise the whole file
    ("bytes=0-10,5-20", 1000, (0, 20)),
    ("bytes=5-20,0-10", 1000, (0, 20)),
    ("bytes=0-9,10-19", 1000, (0, 19)),
    ("bytes=0-1,5-9", 1000, None),
    ("bytes=0-0,-1", 1000, None),
    ("bytes=0-0,-1", 1, (0, 0)),
    ("bytes=990-,-20", 1000, (980, 999)),
    ("bytes=0-1,2000-3000", 1000, (0, 1)),
    ("bytes=-0,0-1", 1000, (0, 1)),
    # invalid: ignored, never rejected
    ("bytes=5-4", 1000, None),
    ("bytes=0-1,5-4", 1000, None),
    ("bytes=abc", 1000, None),
    ("bytes=0-1,abc", 1000, None),
    ("bytes=", 1000, None),
    ("bytes=,", 1000, None),
    ("bytes", 1000, None),
    ("", 1000, None),
    ("=0-1", 1000, None),
    ("items=0-1", 1000, None),
    ("bytes =0-1", 1000, None),
    ("bytes=0 - 1", 1000, None),
    ("bytes=1-2-3", 1000, None),
    ("bytes=--1", 1000, None),
    ("bytes=+1-2", 1000, None),
    ("bytes=-", 1000, None),
    ("bytes=0x10-20", 1000, None),
    ("bytes=\u0660-\u0661", 1000, None),
    ("bytes=1_0-20", 1000, None),
    ("bytes=0-1;x", 1000, None),
    ("bytes=0-1, bytes=2-3", 1000, None),
    # huge numbers are fine: they are just beyond the end
    ("bytes=0-" + "9" * 200, 1000, (0, 999)),
    ("bytes=" + "9" * 200 + "-", 1000, UNSATISFIABLE),
    ("bytes=-" + "9" * 200, 1000, (0, 999)),
    ("bytes=" + "0" * 50 + "7-" + "0" * 50 + "9", 1000, (7, 9)),
    # an empty representation: no int-range fits; a non-zero suffix fits but has no 206 form
    ("bytes=0-", 0, UNSATISFIABLE),
    ("bytes=0-0", 0, UNSATISFIABLE),
    ("bytes=-0", 0, UNSATISFIABLE),
    ("bytes=-5", 0, None),
    ("bytes=0-0,-1", 0, None),
    ("bytes=0-0", 1, (0, 0)),
    ("bytes=-1", 1, (0, 0)),
    ("bytes=1-", 1, UNSATISFIABLE),
    # the 1 MiB boundary, where streamers tend to lose a byte
    (f"bytes={MIB - 1}-{MIB}", MIB + 1, (MIB - 1, MIB)),
    (f"bytes={MIB}-", MIB + 1, (MIB, MIB)),
    (f"bytes={MIB}-", MIB, UNSATISFIABLE),
    (f"bytes=-{MIB}", MIB + 1, (1, MIB)),
]


@pytest.mark.parametrize(("header", "size", "expected"), RANGE_CASES)
def test_parse_range_table(
    header: str | None, size: int, expected: tuple[int, int] | str | None
) -> None:
    if expected == UNSATISFIABLE:
        with pytest.raises(RangeNotSatisfiable) as raised:
            parse_range(header, size)
        assert raised.value.size == size
        assert raised.value.content_range == f"bytes */{size}"
    elif expected is None:
        assert parse_range(header, size) is None
    else:
        assert isinstance(expected, tuple)
        assert parse_range(header, size) == ByteRange(*expected)


def test_hostile_headers_are_ignored_without_error() -> None:
    assert parse_range("bytes=" + "0-0," * 101, 1000) is None
    assert parse_range("bytes=" + ",".join(["0-0"] * 100), 1000) == ByteRange(0, 0)
    assert parse_range("bytes=" + "1" * (MAX_RANGE_HEADER_LENGTH + 1) + "-", 1000) is None
    assert parse_range("bytes=" + "," * 5000 + "0-1", 1000) is None
    assert parse_range("bytes=0-1" + " " * 10_000, 1000) is None


def test_byte_range_helpers() -> None:
    assert ByteRange(0, 99).length == 100
    assert ByteRange(0, 99).content_range(1000) == "bytes 0-99/1000"
    assert ByteRange(5, 5).content_range(6) == "bytes 5-5/6"
    with pytest.raises(ValueError):
        ByteRange(5, 4)
    with pytest.raises(ValueError):
        ByteRange(-1, 4)


# ---- property tests: structured Range headers against an independent reading of the RFC ----


@dataclass(frozen=True)
class Spec:
    first: int | None  # None for a suffix-range
    last: int | None  # last-pos of an int-range, or the suffix-length

    def render(self) -> str:
        if self.first is None:
            return f"-{self.last}"
        return f"{self.first}-" + ("" if self.last is None else str(self.last))


def rfc_expectation(specs: list[Spec], size: int) -> tuple[int, int] | str | None:
    """What RFC 9110 §14.1.2/§14.2 asks for, given that we only ever send one range."""
    if any(s.first is not None and s.last is not None and s.last < s.first for s in specs):
        return None  # invalid ranges-specifier: ignored
    pieces: list[tuple[int, int]] = []
    suffix_on_empty = False
    for spec in specs:
        if spec.first is None:
            assert spec.last is not None
            if spec.last > 0 and size == 0:
                suffix_on_empty = True
            elif spec.last > 0:
                pieces.append((max(0, size - spec.last), size - 1))
        elif spec.first < size:
            end = size - 1 if spec.last is None else min(spec.last, size - 1)
            pieces.append((spec.first, end))
    if not pieces:
        return None if suffix_on_empty else UNSATISFIABLE
    low = min(start for start, _ in pieces)
    high = max(end for _, end in pieces)
    # One range iff no byte between low and high is left uncovered: walk the gaps.
    covered_until = low - 1
    for start, end in sorted(pieces):
        if start > covered_until + 1:
            return None
        covered_until = max(covered_until, end)
    return (low, high)


def positions(size: int) -> st.SearchStrategy[int]:
    near_edges = st.sampled_from([0, 1, max(size - 1, 0), size, size + 1, MIB - 1, MIB, MIB + 1])
    return st.one_of(near_edges, st.integers(0, size + 10), st.integers(0, 10**30))


@st.composite
def range_requests(draw: st.DrawFn, max_size: int) -> tuple[int, list[Spec], str]:
    size = draw(st.integers(0, max_size))
    spec = st.one_of(
        st.builds(Spec, positions(size), st.one_of(st.none(), positions(size))),
        st.builds(Spec, st.none(), positions(size)),
    )
    specs = draw(st.lists(spec, min_size=1, max_size=6))
    unit = draw(st.sampled_from(["bytes", "Bytes", "BYTES", "bYtEs"]))
    separators = st.sampled_from([",", ", ", " ,", "\t,\t", ",,", " , ,"])
    text = specs[0].render()
    for item in specs[1:]:
        text += draw(separators) + item.render()
    outer = draw(st.sampled_from(["", " ", "\t", " \t"]))
    return size, specs, f"{outer}{unit}={text}{outer}"


def check_against_rfc(size: int, specs: list[Spec], header: str) -> None:
    expected = rfc_expectation(specs, size)
    if expected == UNSATISFIABLE:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, size)
        return
    got = parse_range(header, size)
    if expected is None:
        assert got is None
    else:
        assert isinstance(expected, tuple)
        assert got == ByteRange(*expected)
        assert 0 <= got.start <= got.end <= size - 1


@settings(max_examples=400)
@given(range_requests(max_size=5 * MIB))
def test_parse_range_matches_rfc_for_any_size(case: tuple[int, list[Spec], str]) -> None:
    check_against_rfc(*case)


@settings(max_examples=300)
@given(range_requests(max_size=64))
def test_parse_range_matches_rfc_by_counting_bytes(case: tuple[int, list[Spec], str]) -> None:
    """Small sizes: the expectation is rebuilt from the set of requested byte positions."""
    size, specs, header = case
    wanted: set[int] = set()
    invalid = any(s.first is not None and s.last is not None and s.last < s.first for s in specs)
    satisfiable = False
    for spec in specs:
        if spec.first is None:
            assert spec.last is not None
            satisfiable |= spec.last > 0
            wanted |= set(range(max(0, size - spec.last), size)) if spec.last else set()
        else:
            satisfiable |= spec.first < size
            last = size - 1 if spec.last is None else min(spec.last, size - 1)
            wanted |= set(range(spec.first, last + 1))
    if not invalid and not satisfiable:
        with pytest.raises(RangeNotSatisfiable):
            parse_range(header, size)
        return
    got = parse_range(header, size)
    contiguous = bool(wanted) and wanted == set(range(min(wanted), max(wanted) + 1))
    if invalid or not contiguous:
        assert got is None
    else:
        assert got is not None
        assert set(range(got.start, got.end + 1)) == wanted


@settings(max_examples=300)
@given(
    st.integers(0, 5 * MIB), st.integers(0, 6 * MIB), st.one_of(st.none(), st.integers(0, 6 * MIB))
)
def test_one_plain_range_reads_as_its_spaced_form(size: int, first: int, last: int | None) -> None:
    """ "bytes=a-b", read on a short path, means what " bytes= a-b " means on the full one."""
    plain = f"bytes={first}-{'' if last is None else last}"
    spaced = f" bytes= {plain[6:]} "
    outcomes: list[ByteRange | str | None] = []
    for header in (plain, spaced):
        try:
            outcomes.append(parse_range(header, size))
        except RangeNotSatisfiable:
            outcomes.append(UNSATISFIABLE)
    assert outcomes[0] == outcomes[1]


def valid_or_raise(header: str, size: int) -> None:
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiable as unsatisfiable:
        assert unsatisfiable.size == size
        return
    if got is not None:
        assert 0 <= got.start <= got.end <= size - 1


@settings(max_examples=300)
@given(
    st.integers(0, 5 * MIB),
    st.one_of(
        st.text(max_size=200),
        st.text(alphabet="bytes=0123456789-, \t\r\n;*\x00", max_size=60),
        st.from_regex(r"bytes=[0-9,\- ]{0,40}", fullmatch=True),
    ),
)
def test_parse_range_survives_garbage(size: int, header: str) -> None:
    valid_or_raise(header, size)


@settings(max_examples=200)
@given(range_requests(max_size=5 * MIB), st.integers(0, 200), st.characters())
def test_parse_range_survives_mutated_headers(
    case: tuple[int, list[Spec], str], where: int, char: str
) -> None:
    size, _, header = case
    position = where % (len(header) + 1)
    valid_or_raise(header[:position] + char + header[position:], size)


# ---- If-Range and the other preconditions ----

ETAG = '"5d41402abc4b2a76b9719d91"'
MODIFIED = datetime(2024, 5, 6, 7, 8, 9, 500_000, tzinfo=UTC)


@pytest.mark.parametrize(
    ("if_range", "allowed"),
    [
        (None, False),
        (ETAG, True),
        (f"  {ETAG}\t", True),
        ('"5d41402abc4b2a76b9719d92"', False),
        (f"W/{ETAG}", False),
        (ETAG.strip('"'), False),
        (f"{ETAG}, {ETAG}", False),
        ("", False),
        ("garbage", False),
        (http_date(MODIFIED), True),
        ("Mon, 06 May 2024 07:08:09 GMT", True),
        ("Monday, 06-May-24 07:08:09 GMT", True),
        ("Mon May  6 07:08:09 2024", True),
        ("Mon, 06 May 2024 07:08:10 GMT", False),
        ("Mon, 06 May 2024 07:08:08 GMT", False),
        ("Mon, 32 May 2024 07:08:09 GMT", False),
    ],
)
def test_if_range(if_range: str | None, allowed: bool) -> None:
    assert if_range_allows(if_range, ETAG, MODIFIED) is allowed


def test_if_range_date_needs_a_modification_time() -> None:
    assert not if_range_allows(http_date(MODIFIED), ETAG, None)
    assert if_range_allows(ETAG, ETAG, None)


def test_http_date_round_trip() -> None:
    assert http_date(MODIFIED) == "Mon, 06 May 2024 07:08:09 GMT"
    assert parse_http_date(http_date(MODIFIED)) == MODIFIED.replace(microsecond=0)
    assert http_date(datetime(2024, 5, 6, 9, 8, 9, tzinfo=timezone(timedelta(hours=2)))) == (
        "Mon, 06 May 2024 07:08:09 GMT"
    )
    assert parse_http_date("not a date") is None
    assert parse_http_date(None) is None


@pytest.mark.parametrize(
    ("headers", "method", "status"),
    [
        ({}, "GET", None),
        ({"if_none_match": ETAG}, "GET", 304),
        ({"if_none_match": f"W/{ETAG}"}, "HEAD", 304),
        ({"if_none_match": f'"other", {ETAG}'}, "GET", 304),
        ({"if_none_match": "*"}, "GET", 304),
        ({"if_none_match": '"other"'}, "GET", None),
        ({"if_none_match": '"other"', "if_modified_since": http_date(MODIFIED)}, "GET", None),
        ({"if_modified_since": http_date(MODIFIED)}, "GET", 304),
        ({"if_modified_since": http_date(MODIFIED - timedelta(seconds=1))}, "GET", None),
        ({"if_modified_since": "yesterday"}, "GET", None),
        ({"if_match": ETAG}, "GET", None),
        ({"if_match": "*"}, "GET", None),
        ({"if_match": f"W/{ETAG}"}, "GET", 412),
        ({"if_match": '"other"'}, "GET", 412),
        ({"if_match": "garbage"}, "GET", 412),
        ({"if_unmodified_since": http_date(MODIFIED)}, "GET", None),
        ({"if_unmodified_since": http_date(MODIFIED - timedelta(seconds=1))}, "GET", 412),
        (
            {"if_match": ETAG, "if_unmodified_since": http_date(MODIFIED - timedelta(days=1))},
            "GET",
            None,
        ),
        ({"if_match": '"other"', "if_none_match": ETAG}, "GET", 412),
    ],
)
def test_preconditions(headers: dict[str, str], method: str, status: int | None) -> None:
    got = evaluate_preconditions(method=method, etag=ETAG, last_modified=MODIFIED, **headers)
    assert got == status


# ---- Content-Disposition ----

_CD_RE = re.compile(
    r"(inline|attachment); filename=\"([^\"\\\x00-\x1f\x7f]*)\"; "
    r"filename\*=UTF-8''([A-Za-z0-9!#$&+\-.^_`|~%]+)"
)


def parse_disposition(value: str) -> tuple[str, str, str]:
    """(type, fallback filename, filename*) per RFC 6266 / RFC 8187, strictly."""
    match = _CD_RE.fullmatch(value)
    assert match is not None, value
    encoded = match.group(3)
    assert re.fullmatch(r"(?:[^%]|%[0-9A-F]{2})*", encoded), encoded
    return match.group(1), match.group(2), unquote(encoded, encoding="utf-8", errors="strict")


@pytest.mark.parametrize(
    ("name", "fallback", "exact"),
    [
        ("report.pdf", "report.pdf", "report.pdf"),
        ("naïve café.mkv", "na_ve caf_.mkv", "naïve café.mkv"),
        ("👩‍💻 notes.txt", "___ notes.txt", "👩‍💻 notes.txt"),
        ("שלום עולם.mp4", "____ ____.mp4", "שלום עולם.mp4"),
        ("مرحبا.mp3", "_____.mp3", "مرحبا.mp3"),
        ('say "hi".txt', "say _hi_.txt", 'say "hi".txt'),
        ("100%25 done.txt", "100_25 done.txt", "100%25 done.txt"),
        ("a;b=c, d.txt", "a;b=c, d.txt", "a;b=c, d.txt"),
        ("../../etc/passwd", "....etcpasswd", "....etcpasswd"),
        ("C:\\Windows\\evil.exe", "C:Windowsevil.exe", "C:Windowsevil.exe"),
        ("evil\u202egnp.exe", "evilgnp.exe", "evilgnp.exe"),
        ("iso\u2066late\u2069d.txt", "isolated.txt", "isolated.txt"),
        ("line\r\nSet-Cookie: x=1.txt", "lineSet-Cookie: x=1.txt", "lineSet-Cookie: x=1.txt"),
        ("nul\x00byte\x7f.txt", "nulbyte.txt", "nulbyte.txt"),
        ("sep\u2028ara\u2029tor.txt", "separator.txt", "separator.txt"),
        ("", "download", "download"),
        ("..", "download", "download"),
        ("/", "download", "download"),
        ("  spaced.txt  ", "spaced.txt", "spaced.txt"),
    ],
)
def test_content_disposition_table(name: str, fallback: str, exact: str) -> None:
    kind, got_fallback, got_exact = parse_disposition(content_disposition(name, inline=False))
    assert (kind, got_fallback, got_exact) == ("attachment", fallback, exact)
    assert content_disposition(name, inline=True).startswith("inline; ")


def test_long_names_keep_their_extension() -> None:
    name = "x" * 1000 + ".mkv"
    cleaned = sanitize_filename(name)
    assert len(cleaned) == 255
    assert cleaned.endswith(".mkv")


_FORBIDDEN_IN_NAME = set(
    "/\\\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


@settings(max_examples=400)
@given(st.text(max_size=300), st.booleans())
def test_content_disposition_round_trips_any_name(name: str, inline: bool) -> None:
    value = content_disposition(name, inline=inline)
    assert value.isascii()
    assert not any(ord(char) < 0x20 or ord(char) == 0x7F for char in value)
    kind, fallback, exact = parse_disposition(value)
    assert kind == ("inline" if inline else "attachment")
    assert exact == sanitize_filename(name)
    assert len(fallback) == len(exact)
    assert exact and exact.strip(".")
    assert not _FORBIDDEN_IN_NAME & set(exact)
    assert all(unicodedata.category(c) not in ("Cc", "Cs", "Zl", "Zp") for c in exact)
    # what survives sanitising is the name itself, in order
    if len(name) <= 255 and exact != "download":
        kept = iter(name)
        assert all(char in kept for char in exact)


# ---- media types ----


@pytest.mark.parametrize(
    ("mime", "inline"),
    [
        ("video/mp4", True),
        ("video/x-matroska", True),
        ("audio/mpeg", True),
        ("image/png", True),
        ("IMAGE/JPEG", True),
        ("text/plain", True),
        ("text/plain; charset=utf-8", True),
        ("image/svg+xml", False),
        ("Image/SVG+XML; charset=utf-8", False),
        ("text/html", False),
        ("text/html; charset=utf-8", False),
        ("application/xhtml+xml", False),
        ("text/xml", False),
        ("application/xml", False),
        ("application/javascript", False),
        ("text/javascript", False),
        ("application/pdf", False),
        ("application/octet-stream", False),
        ("text/markdown", False),
        ("video", False),
        ("video/", False),
        ("", False),
        ("video/mp4\r\nX-Evil: 1", False),
    ],
)
def test_is_inline_safe(mime: str, inline: bool) -> None:
    assert is_inline_safe(mime) is inline


@pytest.mark.parametrize(
    ("name", "mime"),
    [
        ("movie.mp4", "video/mp4"),
        ("Movie.MKV", "video/x-matroska"),
        ("song.flac", "audio/flac"),
        ("song.mp3", "audio/mpeg"),
        ("photo.JPG", "image/jpeg"),
        ("drawing.svg", "image/svg+xml"),
        ("page.html", "text/html"),
        ("notes.txt", "text/plain"),
        ("backup.tar.gz", "application/gzip"),
        ("data.xz", "application/x-xz"),
        ("archive.zip", "application/zip"),
        ("data:evil.mp4", "video/mp4"),
        ("no_extension", "application/octet-stream"),
        ("weird.zzzz", "application/octet-stream"),
        ("", "application/octet-stream"),
    ],
)
def test_guess_mime(name: str, mime: str) -> None:
    assert guess_mime(name) == mime
