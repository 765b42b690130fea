"""What a user may ask MistRelay to fetch: links, magnets and .torrent files, checked before use."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

MAX_URL_LENGTH = 8192
MAX_TORRENT_SIZE = 10 * 1024 * 1024
LinkType = Literal["http", "ftp", "magnet"]
LINK_SCHEMES: dict[str, LinkType] = {"http": "http", "https": "http", "ftp": "ftp"}
_LINK_TOKEN = re.compile(r"(?i)\b(?:[a-z][a-z0-9+.-]{1,15}://|magnet:\?)\S+")
_CONTROL = re.compile(r"[\x00-\x20\x7f]")
_BTIH_HEX = re.compile(r"^[0-9a-fA-F]{40}$")
_BTIH_BASE32 = re.compile(r"^[A-Za-z2-7]{32}$")


class SourceError(ValueError):
    """A link or torrent that MistRelay will not fetch; the message says why."""


@dataclass(frozen=True)
class ParsedLink:
    source_type: LinkType
    url: str
    source_key: str
    display_name: str
    info_hash: str | None = None
    host: str | None = None


@dataclass(frozen=True)
class TorrentEntry:
    index: int
    path: str
    length: int


@dataclass(frozen=True)
class TorrentMeta:
    info_hash: str
    name: str
    files: tuple[TorrentEntry, ...]

    @property
    def total_length(self) -> int:
        return sum(f.length for f in self.files)

    @property
    def source_key(self) -> str:
        return f"btih:{self.info_hash}"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def safe_file_name(name: str, fallback: str = "file") -> str:
    """A name that is one path element: no separators, NUL, control or bidi-override chars."""
    cleaned = "".join(
        ch
        for ch in name
        if ch >= " " and ch not in "/\\\x7f" and not ("\u202a" <= ch <= "\u202e")
        if not ("\u2066" <= ch <= "\u2069")
    ).strip()
    cleaned = cleaned.lstrip(".") or fallback
    encoded = cleaned.encode("utf-8")
    if len(encoded) > 200:
        _stem, dot, suffix = cleaned.rpartition(".")
        keep = suffix if dot and len(suffix.encode()) <= 16 else ""
        budget = 200 - len(keep.encode()) - 1
        cleaned = cleaned.encode()[:budget].decode("utf-8", "ignore") + ("." + keep if keep else "")
    return cleaned


def parse_link(text: str) -> ParsedLink:
    """Check one http/https/ftp/magnet link; raise :class:`SourceError` naming what is wrong."""
    raw = text.strip()
    if not raw:
        raise SourceError("empty link")
    if len(raw) > MAX_URL_LENGTH:
        raise SourceError(f"link longer than {MAX_URL_LENGTH} characters")
    if _CONTROL.search(raw):
        raise SourceError(f"link contains spaces or control characters: {_short(raw)!r}")
    if raw.lower().startswith("magnet:"):
        return _parse_magnet(raw)
    try:
        parts = urlsplit(raw)
        port = parts.port
    except ValueError as exc:
        raise SourceError(f"malformed link {_short(raw)!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in LINK_SCHEMES:
        shown = scheme or "none"
        raise SourceError(
            f"unsupported scheme {shown!r} in {_short(raw)!r} (use http, https, ftp or magnet)"
        )
    host = parts.hostname
    if not host:
        raise SourceError(f"link has no host: {_short(raw)!r}")
    if port == 0:
        raise SourceError(f"link has port 0: {_short(raw)!r}")
    netloc = parts.netloc.rsplit("@", 1)[-1]
    normalised = urlunsplit((scheme, netloc.lower(), parts.path or "/", parts.query, ""))
    name = PurePosixPath(unquote(parts.path)).name or host
    return ParsedLink(
        source_type=LINK_SCHEMES[scheme],
        url=urlunsplit((scheme, parts.netloc, parts.path, parts.query, "")),
        source_key=normalised,
        display_name=name,
        host=host,
    )


def _parse_magnet(raw: str) -> ParsedLink:
    query = raw[len("magnet:") :].lstrip("?")
    params = parse_qs(query, keep_blank_values=True)
    info_hash = None
    for xt in params.get("xt", []):
        if xt.lower().startswith("urn:btih:"):
            info_hash = _normalise_btih(xt[len("urn:btih:") :])
            break
    if info_hash is None:
        raise SourceError("magnet link without a valid BitTorrent info hash (xt=urn:btih:…)")
    name = (params.get("dn") or [info_hash])[0] or info_hash
    return ParsedLink(
        source_type="magnet",
        url=raw,
        source_key=f"btih:{info_hash}",
        display_name=name,
        info_hash=info_hash,
    )


def _normalise_btih(value: str) -> str:
    if _BTIH_HEX.match(value):
        return value.lower()
    if _BTIH_BASE32.match(value):
        return base64.b32decode(value.upper()).hex()
    raise SourceError(f"magnet info hash {_short(value)!r} is neither 40 hex nor 32 base32 chars")


def extract_links(text: str) -> tuple[list[ParsedLink], list[str]]:
    """Every link-like token of a chat message: (usable links, rejected tokens with reasons)."""
    links: list[ParsedLink] = []
    rejected: list[str] = []
    seen: set[str] = set()
    for match in _LINK_TOKEN.finditer(text):
        token = match.group(0).rstrip(".,;)]}>»\"'")
        try:
            link = parse_link(token)
        except SourceError as exc:
            rejected.append(str(exc))
            continue
        if link.source_key not in seen:
            seen.add(link.source_key)
            links.append(link)
    return links, rejected


def is_public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def ensure_public_host(link: ParsedLink) -> None:
    """Refuse links whose host is, or resolves to, a loopback, private or reserved address."""
    if link.host is None:
        return
    host = link.host
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        if host.lower() in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
            raise SourceError(f"{host} is a loopback address") from None
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout=10
            )
        except (OSError, TimeoutError):
            raise SourceError(f"host {host} does not resolve") from None
        addresses = sorted({str(info[4][0]) for info in infos})
    for address in addresses:
        if not is_public_address(address):
            raise SourceError(f"{host} points to a private or loopback address ({address})")


# --- .torrent files -------------------------------------------------------------------------------


def _bdecode(data: bytes, start: int = 0, depth: int = 0) -> tuple[object, int]:
    if depth > 64:
        raise SourceError("torrent nests too deeply")
    if start >= len(data):
        raise SourceError("torrent ends unexpectedly")
    lead = data[start : start + 1]
    if lead == b"i":
        end = data.index(b"e", start)
        text = data[start + 1 : end]
        if not re.fullmatch(rb"-?\d+", text) or (text.startswith((b"-0", b"0")) and text != b"0"):
            raise SourceError("torrent has a malformed integer")
        return int(text), end + 1
    if lead in (b"l", b"d"):
        items: list[object] = []
        position = start + 1
        while data[position : position + 1] != b"e":
            if position >= len(data):
                raise SourceError("torrent ends unexpectedly")
            item, position = _bdecode(data, position, depth + 1)
            items.append(item)
        if lead == b"l":
            return items, position + 1
        if len(items) % 2:
            raise SourceError("torrent has a dictionary with a key but no value")
        keys = items[0::2]
        if not all(isinstance(k, bytes) for k in keys):
            raise SourceError("torrent has a dictionary key that is not a string")
        return dict(zip(keys, items[1::2], strict=True)), position + 1
    if lead.isdigit():
        colon = data.index(b":", start)
        length = int(data[start:colon])
        end = colon + 1 + length
        if end > len(data):
            raise SourceError("torrent ends unexpectedly")
        return data[colon + 1 : end], end
    raise SourceError("not a torrent file (bencode expected)")


def _info_span(data: bytes) -> tuple[int, int]:
    """Byte span of the top-level `info` value, whose SHA-1 is the info hash."""
    if data[:1] != b"d":
        raise SourceError("not a torrent file (a dictionary expected)")
    position = 1
    while data[position : position + 1] != b"e":
        key, position = _bdecode(data, position, 1)
        value_start = position
        _, position = _bdecode(data, position, 1)
        if key == b"info":
            return value_start, position
    raise SourceError("torrent has no info dictionary")


def _text(value: object, what: str) -> str:
    if not isinstance(value, bytes):
        raise SourceError(f"torrent {what} is not a string")
    if len(value) > 255:
        raise SourceError(f"torrent {what} is longer than 255 bytes")
    text = value.decode("utf-8", errors="replace")
    if not text or "\x00" in text or text in (".", "..") or "/" in text:
        raise SourceError(f"torrent {what} {_short(text)!r} is not a safe file name")
    return text


def parse_torrent(data: bytes) -> TorrentMeta:
    """Validate a .torrent file; raise :class:`SourceError` saying what is wrong with it."""
    if not data:
        raise SourceError("the torrent file is empty")
    if len(data) > MAX_TORRENT_SIZE:
        raise SourceError(f"torrent file larger than {MAX_TORRENT_SIZE // (1024 * 1024)} MiB")
    try:
        decoded, end = _bdecode(data)
        start, stop = _info_span(data)
    except SourceError:
        raise
    except (ValueError, IndexError, RecursionError):
        raise SourceError("not a torrent file (malformed bencode)") from None
    if end != len(data):
        raise SourceError("torrent has trailing bytes after its dictionary")
    assert isinstance(decoded, dict)
    info = decoded.get(b"info")
    if not isinstance(info, dict):
        raise SourceError("torrent has no info dictionary")
    name = _text(info.get(b"name"), "name")
    pieces, piece_length = info.get(b"pieces"), info.get(b"piece length")
    if not isinstance(pieces, bytes) or not isinstance(piece_length, int):
        raise SourceError("torrent info lacks pieces or piece length")
    if piece_length <= 0:
        raise SourceError("torrent piece length must be positive")
    if len(pieces) % 20:
        raise SourceError("torrent pieces are not a list of 20-byte hashes")
    entries: list[TorrentEntry] = []
    if b"files" in info:
        files = info[b"files"]
        if not isinstance(files, list) or not files:
            raise SourceError("torrent file list is empty or malformed")
        for index, entry in enumerate(files, start=1):
            if not isinstance(entry, dict):
                raise SourceError("torrent file entry is malformed")
            length, parts = entry.get(b"length"), entry.get(b"path")
            if not isinstance(length, int) or length < 0:
                raise SourceError("torrent file entry has an invalid length")
            if not isinstance(parts, list) or not parts:
                raise SourceError("torrent file entry has no path")
            path = "/".join(_text(p, "path element") for p in parts)
            entries.append(TorrentEntry(index, f"{name}/{path}", length))
    else:
        length = info.get(b"length")
        if not isinstance(length, int) or length < 0:
            raise SourceError("torrent has an invalid length")
        entries.append(TorrentEntry(1, name, length))
    expected_pieces = -(-sum(e.length for e in entries) // piece_length)
    if len(pieces) // 20 != expected_pieces:
        raise SourceError(
            f"torrent has {len(pieces) // 20} piece hashes for {expected_pieces} pieces"
        )
    info_hash = hashlib.sha1(data[start:stop]).hexdigest()  # BitTorrent's own hash
    return TorrentMeta(info_hash=info_hash, name=name, files=tuple(entries))
