"""Pure HTTP byte-serving rules: Range, If-Range and other preconditions, Content-Disposition.

Everything here is free of I/O so it can be table- and property-tested against the text of
RFC 9110 (HTTP semantics) and RFC 6266 / RFC 8187 (Content-Disposition and its filename*).

Choices this module makes where the RFCs leave room:

- One range per response. We never send ``multipart/byteranges``. A Range with several
  range-specs is answered with one 206 when its satisfiable ranges overlap or touch so that they
  coalesce into a single range; otherwise the header is ignored and the whole representation is
  sent with 200 (RFC 9110 §14.2: "A server MAY ignore the Range header field").
- An invalid Range (bad syntax, last-pos < first-pos, an ``other-range`` form, an unknown unit,
  more than ``MAX_RANGE_SPECS`` ranges or a value longer than ``MAX_RANGE_HEADER_LENGTH``) is
  ignored, never rejected: a 416 says the file cannot supply what was asked for, while a malformed
  value never said what it asked for.
- OWS is accepted around every list element (the ABNF allows it around commas; accepting it after
  the ``=`` too is harmless), and a reasonable number of empty list elements is skipped
  (RFC 9110 §5.6.1.2).
- An empty representation: an int-range can never be satisfied (416), but a suffix-range with a
  non-zero length is satisfiable (RFC 9110 §14.1.2) and yet has no 206 form (Content-Range cannot
  describe zero bytes), so such a header is ignored and the empty body is sent with 200
  (RFC 9110 §14.2 allows ignoring Range when the representation has no content).
"""

from __future__ import annotations

import mimetypes
import re
import unicodedata
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from urllib.parse import quote

__all__ = [
    "MAX_RANGE_HEADER_LENGTH",
    "MAX_RANGE_SPECS",
    "ByteRange",
    "RangeNotSatisfiable",
    "content_disposition",
    "evaluate_preconditions",
    "guess_mime",
    "http_date",
    "if_range_allows",
    "is_inline_safe",
    "parse_http_date",
    "parse_range",
    "sanitize_filename",
]

# A legitimate client never needs more; these bounds keep parsing cheap on hostile input.
MAX_RANGE_HEADER_LENGTH = 4096
MAX_RANGE_SPECS = 100
_MAX_LIST_ELEMENTS = 2 * MAX_RANGE_SPECS

_OWS = " \t"
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_INT_RANGE_RE = re.compile(r"([0-9]+)-([0-9]*)")
_SUFFIX_RANGE_RE = re.compile(r"-([0-9]+)")
# The form players and download tools send nearly always: one int-range, no spaces.
_SIMPLE_RANGE_RE = re.compile(r"bytes=([0-9]+)-([0-9]*)")


@dataclass(frozen=True)
class ByteRange:
    """An inclusive, satisfiable byte range [start, end] of a representation."""

    start: int
    end: int  # inclusive

    def __post_init__(self) -> None:
        if self.start < 0 or self.end < self.start:
            raise ValueError(f"invalid byte range {self.start}-{self.end}")

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self, size: int) -> str:
        """The Content-Range value of a 206 carrying this range (RFC 9110 §14.4)."""
        return f"bytes {self.start}-{self.end}/{size}"


class RangeNotSatisfiable(Exception):
    """No range-spec of a valid bytes Range overlaps the representation: answer 416."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for a representation of {size} bytes")
        self.size = size

    @property
    def content_range(self) -> str:
        """The unsatisfied-range Content-Range value a 416 carries (RFC 9110 §14.4)."""
        return f"bytes */{self.size}"


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """Interpret a Range header for a representation of ``size`` bytes (RFC 9110 §14.1-§14.2).

    Returns the single range to send with 206, or None to send the whole representation with
    200 (no header, an invalid or foreign-unit header, or ranges that do not coalesce into one).
    Raises RangeNotSatisfiable when the header is valid but no range-spec is satisfiable.
    """
    if size < 0:
        raise ValueError("size must not be negative")
    if header is None or len(header) > MAX_RANGE_HEADER_LENGTH:
        return None
    simple = _SIMPLE_RANGE_RE.fullmatch(header)
    if simple is not None:
        first = int(simple.group(1))
        last = int(simple.group(2)) if simple.group(2) else None
        if last is not None and last < first:
            return None
        if first >= size:
            raise RangeNotSatisfiable(size)
        return ByteRange(first, size - 1 if last is None else min(last, size - 1))
    unit, equals, range_set = header.strip(_OWS).partition("=")
    if not equals or not _TOKEN_RE.fullmatch(unit) or unit.lower() != "bytes":
        return None

    elements = range_set.split(",")
    if len(elements) > _MAX_LIST_ELEMENTS:
        return None
    # (first, last) for int-ranges with last None when open; (None, n) for suffix-ranges.
    specs: list[tuple[int | None, int | None]] = []
    for raw in elements:
        element = raw.strip(_OWS)
        if not element:
            continue
        if match := _INT_RANGE_RE.fullmatch(element):
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) else None
            if last is not None and last < first:
                return None
            specs.append((first, last))
        elif match := _SUFFIX_RANGE_RE.fullmatch(element):
            specs.append((None, int(match.group(1))))
        else:
            return None
    if not specs or len(specs) > MAX_RANGE_SPECS:
        return None

    satisfiable: list[tuple[int, int]] = []
    suffix_on_empty = False
    for first_pos, last_or_suffix in specs:
        if first_pos is None:
            suffix_length = last_or_suffix or 0
            if suffix_length == 0:
                continue
            if size == 0:
                suffix_on_empty = True
                continue
            satisfiable.append((max(size - suffix_length, 0), size - 1))
        elif first_pos < size:
            last_pos = size - 1 if last_or_suffix is None else min(last_or_suffix, size - 1)
            satisfiable.append((first_pos, last_pos))

    if not satisfiable:
        if suffix_on_empty:
            return None
        raise RangeNotSatisfiable(size)

    satisfiable.sort()
    start, end = satisfiable[0]
    for next_start, next_end in satisfiable[1:]:
        if next_start > end + 1:
            return None  # disjoint ranges would need multipart/byteranges: send it all
        end = max(end, next_end)
    return ByteRange(start, end)


def http_date(moment: datetime) -> str:
    """IMF-fixdate of ``moment`` (RFC 9110 §5.6.7); naive datetimes are taken as UTC."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def parse_http_date(value: str | None) -> datetime | None:
    """An aware UTC datetime from an HTTP-date, or None when it does not parse as one."""
    if value is None or len(value) > 64:
        return None
    try:
        parsed = parsedate_to_datetime(value.strip(_OWS))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed is None:
        return None
    if parsed.tzinfo is None:
        # HTTP-dates are always GMT; the obsolete asctime form carries no zone at all.
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _whole_seconds(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


_ETAG_ELEMENT_RE = re.compile(r'[ \t]*((?:W/)?"[\x21\x23-\x7e\x80-\xff]*")[ \t]*(?:,|$)')


def _parse_etag_list(value: str) -> list[str] | None:
    """Entity-tags of an If-Match / If-None-Match list (``*`` excluded), None if malformed."""
    tags: list[str] = []
    position = 0
    value = value.strip(_OWS)
    while position < len(value):
        if value[position] == ",":
            position += 1
            continue
        match = _ETAG_ELEMENT_RE.match(value, position)
        if match is None or match.end() == position:
            return None
        tags.append(match.group(1))
        position = match.end()
        if len(tags) > MAX_RANGE_SPECS:
            return None
    return tags


def _strong_match(tag: str, etag: str) -> bool:
    return not tag.startswith("W/") and not etag.startswith("W/") and tag == etag


def _weak_match(tag: str, etag: str) -> bool:
    return tag.removeprefix("W/") == etag.removeprefix("W/")


def if_range_allows(if_range: str | None, etag: str, last_modified: datetime | None) -> bool:
    """Whether an If-Range condition holds, so the Range may be honoured (RFC 9110 §13.1.5).

    An entity-tag must equal ``etag`` by strong comparison (a weak tag never matches); an
    HTTP-date must equal Last-Modified to the second. Anything else, including an absent header
    or one that parses as neither, is false: the caller then sends the whole representation.
    """
    if if_range is None:
        return False
    value = if_range.strip(_OWS)
    if value.startswith(('"', "W/")):
        return _strong_match(value, etag)
    if last_modified is None:
        return False
    date = parse_http_date(value)
    return date is not None and _whole_seconds(date) == _whole_seconds(last_modified)


def evaluate_preconditions(
    *,
    method: str,
    etag: str,
    last_modified: datetime | None,
    if_match: str | None = None,
    if_none_match: str | None = None,
    if_modified_since: str | None = None,
    if_unmodified_since: str | None = None,
) -> int | None:
    """The status a conditional GET/HEAD ends with (304 or 412), or None to proceed.

    Follows the order of RFC 9110 §13.2.2; If-Range (its step 5) is separate, see
    ``if_range_allows``. Unparsable dates are ignored, as the RFC requires.
    """
    is_get_or_head = method in ("GET", "HEAD")
    if if_match is not None:
        if if_match.strip(_OWS) != "*":
            tags = _parse_etag_list(if_match) or []
            if not any(_strong_match(tag, etag) for tag in tags):
                return 412
    elif if_unmodified_since is not None and last_modified is not None:
        date = parse_http_date(if_unmodified_since)
        if date is not None and _whole_seconds(last_modified) > _whole_seconds(date):
            return 412

    if if_none_match is not None:
        if if_none_match.strip(_OWS) == "*":
            matched = True
        else:
            tags = _parse_etag_list(if_none_match) or []
            matched = any(_weak_match(tag, etag) for tag in tags)
        if matched:
            return 304 if is_get_or_head else 412
    elif is_get_or_head and if_modified_since is not None and last_modified is not None:
        date = parse_http_date(if_modified_since)
        if date is not None and _whole_seconds(last_modified) <= _whole_seconds(date):
            return 304
    return None


# Bidirectional embedding/override/isolate controls and marks: they can make "evil‮txt.exe"
# display as "evilexe.txt". Zero-width joiners stay, emoji sequences need them.
_BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)
_MAX_FILENAME_CHARS = 255
_FALLBACK_FILENAME = "download"
_UNSAFE_IN_QUOTED = frozenset('"\\%')


def sanitize_filename(name: str) -> str:
    """A file name without path separators, control, bidi-control or line-separator characters.

    Never empty: a name with nothing left (or only dots) becomes "download". Long names keep
    their extension and are cut to 255 characters.
    """
    kept = []
    for char in name:
        if char in "/\\" or char in _BIDI_CONTROLS:
            continue
        if unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp"):
            continue
        kept.append(char)
    cleaned = "".join(kept).strip()
    if not cleaned.strip("."):
        return _FALLBACK_FILENAME
    if len(cleaned) > _MAX_FILENAME_CHARS:
        stem, dot, extension = cleaned.rpartition(".")
        if dot and stem and len(extension) <= 16:
            keep = _MAX_FILENAME_CHARS - len(extension) - 1
            cleaned = f"{stem[:keep]}.{extension}"
        else:
            cleaned = cleaned[:_MAX_FILENAME_CHARS]
    return cleaned


def _ascii_fallback(name: str) -> str:
    # "%" is replaced too: some user agents percent-decode the plain filename (RFC 6266 App. D).
    chars = [
        "_" if ord(char) > 0x7E or ord(char) < 0x20 or char in _UNSAFE_IN_QUOTED else char
        for char in name
    ]
    return "".join(chars)


def content_disposition(filename: str, *, inline: bool) -> str:
    """A Content-Disposition value (RFC 6266) carrying the sanitised name twice.

    ``filename="..."`` is an ASCII fallback for old agents; ``filename*=UTF-8''...`` (RFC 8187)
    carries the exact name, percent-encoded, and wins wherever it is understood.
    """
    name = sanitize_filename(filename)
    disposition = "inline" if inline else "attachment"
    encoded = quote(name, safe="!#$&+-.^_`|~", encoding="utf-8")
    return f"{disposition}; filename=\"{_ascii_fallback(name)}\"; filename*=UTF-8''{encoded}"


# Types a browser renders without running anything the file controls. Everything else goes out
# as an attachment: HTML, XHTML, SVG and XML can carry script; PDF viewers run document script and
# do not render under the sandbox policy the streamer sends.
_INLINE_TEXT_TYPES = frozenset({"text/plain"})
_NEVER_INLINE = frozenset({"image/svg+xml"})


def is_inline_safe(mime: str) -> bool:
    """Whether a browser may display this media type in place rather than download it."""
    essence = mime.split(";", 1)[0].strip(_OWS).lower()
    if essence in _NEVER_INLINE:
        return False
    top, slash, sub = essence.partition("/")
    if not slash or not sub or not _TOKEN_RE.fullmatch(top) or not _TOKEN_RE.fullmatch(sub):
        return False
    return top in ("video", "audio", "image") or essence in _INLINE_TEXT_TYPES


_MIME_TYPES = mimetypes.MimeTypes()  # built-in table only: the same answer on every machine
for _mime, _extension in (
    ("video/x-matroska", ".mkv"),
    ("audio/x-matroska", ".mka"),
    ("video/mp4", ".m4v"),
    ("audio/mp4", ".m4a"),
    ("audio/flac", ".flac"),
    ("audio/ogg", ".ogg"),
    ("audio/ogg", ".oga"),
    ("video/ogg", ".ogv"),
    ("video/mp2t", ".ts"),
    ("text/plain", ".log"),
    ("text/markdown", ".md"),
    ("application/xhtml+xml", ".xhtml"),
    ("application/x-7z-compressed", ".7z"),
    ("application/vnd.rar", ".rar"),
    ("application/epub+zip", ".epub"),
    ("application/vnd.android.package-archive", ".apk"),
    ("application/x-iso9660-image", ".iso"),
    ("application/x-bittorrent", ".torrent"),
):
    _MIME_TYPES.add_type(_mime, _extension)

# A compressed file is served as what it is (e.g. .tar.gz as gzip), never with Content-Encoding.
_COMPRESSED_TYPES = {
    "gzip": "application/gzip",
    "bzip2": "application/x-bzip2",
    "xz": "application/x-xz",
    "br": "application/x-brotli",
    "compress": "application/x-compress",
}
_DEFAULT_MIME = "application/octet-stream"


def guess_mime(name: str) -> str:
    """The media type for a file name by its extension; application/octet-stream if unknown."""
    # guess_type reads its argument as a URL: keep only the last path segment, without ":".
    base = name.replace("\\", "/").rpartition("/")[2].replace(":", "_").lower()
    mime, encoding = _MIME_TYPES.guess_type(base, strict=False)
    if encoding is not None:
        return _COMPRESSED_TYPES.get(encoding, _DEFAULT_MIME)
    return mime or _DEFAULT_MIME
