"""What a user may ask MistRelay to fetch: links, magnets and .torrent files, checked before use."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Literal
from urllib.parse import parse_qs, unquote, unquote_plus, urlsplit, urlunsplit

from records import TorrentFile

MAX_URL_LENGTH = 8192
MAX_TORRENT_SIZE = 10 * 1024 * 1024
RESOLVE_TIMEOUT = 10.0  # seconds one host name may take to resolve
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
class TorrentMeta:
    info_hash: str
    name: str
    # Paths as written on disk, relative to the job's folder (a multi-file torrent's start with
    # its folder): each element through `safe_file_name`, made unique where cleaning merged two.
    files: tuple[TorrentFile, ...]
    # The indexes of the files whose path on disk is not the torrent's own spelling.
    renamed: frozenset[int] = frozenset()

    @property
    def index_out(self) -> str:
        """aria2's `index-out` lines (INDEX=PATH) for the renamed files; empty if none."""
        return "\n".join(f"{f.index}={f.path}" for f in self.files if f.index in self.renamed)

    @property
    def total_length(self) -> int:
        return sum(f.length for f in self.files)

    @property
    def source_key(self) -> str:
        return f"btih:{self.info_hash}"


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# What safe_file_name would change: a character it drops, or spaces or a dot it strips.
_NEEDS_CLEANING = re.compile(r"[\x00-\x1f\x7f/\\\u202a-\u202e\u2066-\u2069]|^[\s.]|\s$")


def safe_file_name(name: str, fallback: str = "file") -> str:
    """A name that is one path element: no separators, NUL, control or bidi-override chars."""
    if name and not _NEEDS_CLEANING.search(name) and len(name.encode()) <= 200:
        return name  # already clean (the common case, a hundred thousand times for a torrent)
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


# --- addresses ------------------------------------------------------------------------------------


Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# Every address a host name stands for (an IP literal stands for itself).
Resolver = Callable[[str], Awaitable[Sequence[str]]]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class BlockedAddress(SourceError):
    """A host that is, or resolves to, an address of `aria2.blocked_networks`."""


def _ipv4_inside(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 form carries: mapped, compatible, NAT64 or 6to4."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _IPV4_COMPATIBLE or ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _SIX_TO_FOUR:
        return ipaddress.IPv4Address((int(ip) >> 80) & 0xFFFFFFFF)
    return None


class AddressPolicy:
    """The networks (`aria2.blocked_networks`) the jobs of users who are not admins may not reach;
    an IPv6 address that carries an IPv4 one is judged by both."""

    def __init__(self, networks: Iterable[str]) -> None:
        self.networks: tuple[Network, ...] = tuple(ipaddress.ip_network(n) for n in networks)

    def blocking_network(self, address: str) -> Network | None:
        """The blocked network `address` is in, or None when it may be reached."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        forms: list[Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address) and (inside := _ipv4_inside(ip)) is not None:
            forms.append(inside)
        for form in forms:
            for network in self.networks:
                if form.version == network.version and form in network:
                    return network
        return None

    def check(self, host: str, addresses: Iterable[str]) -> None:
        """Raise :class:`BlockedAddress` naming the first blocked one of `host`'s addresses, what
        kind of address it is, and the blocked network it is in."""
        for address in addresses:
            network = self.blocking_network(address)
            if network is not None:
                via = "" if host == address else f"{host}: "
                kind = _kind(ipaddress.ip_address(address.split("%", 1)[0]))
                raise BlockedAddress(f"{via}blocked address {address} ({kind}in {network})")


_KINDS = (
    ("is_loopback", "loopback"),
    ("is_link_local", "link-local"),
    ("is_multicast", "multicast"),
    ("is_unspecified", "unspecified"),
    ("is_private", "private"),
    ("is_reserved", "reserved"),
)


def _kind(ip: Address) -> str:
    """The kind of address for a message, as `loopback, ` (empty if none); an IPv6 form of an
    IPv4 address is of the IPv4 kind."""
    if isinstance(ip, ipaddress.IPv6Address) and (inside := _ipv4_inside(ip)) is not None:
        ip = inside
    return next((f"{word}, " for attribute, word in _KINDS if getattr(ip, attribute)), "")


async def resolve_host(host: str) -> list[str]:
    """Every address `host` stands for: an IP literal itself, else what the system resolver says
    (numeric forms such as 2130706433 or 127.1 included). Raises SourceError if none."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout=RESOLVE_TIMEOUT
        )
    except (OSError, TimeoutError, UnicodeError):
        raise SourceError(f"host {host} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise SourceError(f"host {host} does not resolve")
    return addresses


async def allowed_addresses(
    host: str, policy: AddressPolicy, resolve: Resolver = resolve_host
) -> list[str]:
    """`host`'s addresses, resolved once, each checked: raises BlockedAddress if any is blocked
    (a host with one private address among public ones is refused), SourceError if none."""
    addresses = list(await resolve(host))
    if not addresses:
        raise SourceError(f"host {host} does not resolve")
    policy.check(host, addresses)
    return addresses


async def ensure_public_host(link: ParsedLink, policy: AddressPolicy) -> None:
    """Refuse links whose host is, or resolves to, a blocked address (magnets have no host)."""
    if link.host is not None:
        await allowed_addresses(link.host, policy)


# --- .torrent files -------------------------------------------------------------------------------


# One bencode token: a string's length, an integer, a list or dictionary opening, or the end of
# one. Lengths and integers are bounded (a torrent is at most MAX_TORRENT_SIZE bytes; a length
# fits in 64 bits), so no digit run is ever read in full.
_TOKEN = re.compile(rb"(\d{1,10}):|i(0|-?[1-9]\d{0,19})e|([ld])|(e)")
_MAX_DEPTH = 64


def _bdecode(data: bytes, start: int) -> tuple[object, int]:
    """The bencoded value at `start` and the position after it. Iterative, one token at a time:
    a torrent of 100,000 files is some 800,000 tokens."""
    containers: list[list[object]] = []  # the items of each list or dictionary still open
    is_dict: list[bool] = []
    position = start
    token_at = _TOKEN.match
    while True:
        token = token_at(data, position)
        if token is None:
            if position >= len(data):
                raise SourceError("torrent ends unexpectedly")
            if data[position : position + 1] == b"i":
                raise SourceError("torrent has a malformed integer")
            raise SourceError("not a torrent file (bencode expected)")
        position = token.end()
        kind = token.lastindex
        value: object
        if kind == 1:
            end = position + int(token.group(1))
            if end > len(data):
                raise SourceError("torrent ends unexpectedly")
            value, position = data[position:end], end
        elif kind == 2:
            value = int(token.group(2))
        elif kind == 3:
            if len(containers) >= _MAX_DEPTH:
                raise SourceError("torrent nests too deeply")
            containers.append([])
            is_dict.append(token.group(3) == b"d")
            continue
        elif containers:
            items = containers.pop()
            value = _dictionary(items) if is_dict.pop() else items
        else:
            raise SourceError("not a torrent file (bencode expected)")
        if not containers:
            return value, position
        containers[-1].append(value)


def _dictionary(items: list[object]) -> dict[bytes, object]:
    if len(items) % 2:
        raise SourceError("torrent has a dictionary with a key but no value")
    decoded: dict[bytes, object] = {}
    for key, value in zip(items[0::2], items[1::2], strict=True):
        if not isinstance(key, bytes):
            raise SourceError("torrent has a dictionary key that is not a string")
        decoded[key] = value
    if len(decoded) != len(items) // 2:
        raise SourceError("torrent has a dictionary with a repeated key")
    return decoded


def _top_level(data: bytes) -> tuple[dict[bytes, object], dict[bytes, tuple[int, int]]]:
    """The torrent's dictionary and the byte span of each value (that of `info` is what the info
    hash is the SHA-1 of), read in one pass."""
    if data[:1] != b"d":
        raise SourceError("not a torrent file (a dictionary expected)")
    decoded: dict[bytes, object] = {}
    spans: dict[bytes, tuple[int, int]] = {}
    position = 1
    while data[position : position + 1] != b"e":
        if position >= len(data):
            raise SourceError("torrent ends unexpectedly")
        key, position = _bdecode(data, position)
        if not isinstance(key, bytes):
            raise SourceError("torrent has a dictionary key that is not a string")
        if key in decoded:
            raise SourceError("torrent has a dictionary with a repeated key")
        value_start = position
        decoded[key], position = _bdecode(data, position)
        spans[key] = (value_start, position)
    if position + 1 != len(data):
        raise SourceError("torrent has trailing bytes after its dictionary")
    if b"info" not in spans:
        raise SourceError("torrent has no info dictionary")
    return decoded, spans


def _text(value: object, what: str) -> str:
    if not isinstance(value, bytes):
        raise SourceError(f"torrent {what} is not a string")
    if len(value) > 255:
        raise SourceError(f"torrent {what} is longer than 255 bytes")
    text = value.decode("utf-8", errors="replace")
    if not text or "\x00" in text or text in (".", "..") or "/" in text:
        raise SourceError(f"torrent {what} {_short(text)!r} is not a safe file name")
    return text


def parse_torrent(data: bytes, *, max_files: int = 0) -> TorrentMeta:
    """Validate a .torrent file; raise :class:`SourceError` saying what is wrong with it.

    A torrent of more than `max_files` files (`aria2.max_torrent_files`; 0: no cap) is refused
    before its file list is read. Reading 100,000 files takes about a second of CPU: callers on
    the event loop run this in a thread.
    """
    if not data:
        raise SourceError("the torrent file is empty")
    if len(data) > MAX_TORRENT_SIZE:
        raise SourceError(f"torrent file larger than {MAX_TORRENT_SIZE // (1024 * 1024)} MiB")
    decoded, spans = _top_level(data)
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
    entries: list[TorrentFile] = []
    disk = _DiskPaths()
    folder = safe_file_name(name, "torrent")
    if b"files" in info:
        files = info[b"files"]
        if not isinstance(files, list) or not files:
            raise SourceError("torrent file list is empty or malformed")
        if max_files and len(files) > max_files:
            raise SourceError(
                f"torrent has {len(files)} files, more than aria2.max_torrent_files ({max_files})"
            )
        for index, entry in enumerate(files, start=1):
            if not isinstance(entry, dict):
                raise SourceError("torrent file entry is malformed")
            length, parts = entry.get(b"length"), entry.get(b"path")
            if not isinstance(length, int) or length < 0:
                raise SourceError("torrent file entry has an invalid length")
            if not isinstance(parts, list) or not parts:
                raise SourceError("torrent file entry has no path")
            elements = [_text(p, "path element") for p in parts]
            path = disk.place(index, [name, *elements], [folder, *map(safe_file_name, elements)])
            entries.append(TorrentFile(index, path, length))
    else:
        length = info.get(b"length")
        if not isinstance(length, int) or length < 0:
            raise SourceError("torrent has an invalid length")
        entries.append(TorrentFile(1, disk.place(1, [name], [folder]), length))
    expected_pieces = -(-sum(e.length for e in entries) // piece_length)
    if len(pieces) // 20 != expected_pieces:
        raise SourceError(
            f"torrent has {len(pieces) // 20} piece hashes for {expected_pieces} pieces"
        )
    start, stop = spans[b"info"]
    info_hash = hashlib.sha1(data[start:stop]).hexdigest()  # BitTorrent's own hash
    return TorrentMeta(info_hash, name, tuple(entries), frozenset(disk.renamed))


def index_out_for(files: Sequence[tuple[int, Sequence[str]]]) -> str:
    """aria2's `index-out` lines for files known by their path elements (a magnet's, once its
    metadata has arrived): the same name policy as a torrent file's; empty when none changes."""
    disk = _DiskPaths()
    for index, elements in files:
        disk.place(index, list(elements), [safe_file_name(e) for e in elements])
    renamed = set(disk.renamed)
    return "\n".join(f"{i}={p}" for i, p in disk.placed if i in renamed)


class _DiskPaths:
    """Where a torrent's files go on disk: the one name policy on each path element, and a
    number before the extension where cleaning made two paths one ("a.bin", "a.1.bin")."""

    def __init__(self) -> None:
        self.taken: set[str] = set()
        self.renamed: list[int] = []
        self.placed: list[tuple[int, str]] = []
        self._next: dict[str, int] = {}

    def place(self, index: int, elements: list[str], cleaned: list[str]) -> str:
        path = "/".join(cleaned)
        while path in self.taken:
            base = "/".join(cleaned)
            number = self._next.get(base, 1)
            self._next[base] = number + 1
            stem, dot, extension = cleaned[-1].rpartition(".")
            last = f"{stem}.{number}.{extension}" if dot and stem else f"{cleaned[-1]}.{number}"
            path = "/".join([*cleaned[:-1], last])
        self.taken.add(path)
        self.placed.append((index, path))
        if path != "/".join(elements):
            self.renamed.append(index)
        return path


# --- trackers and web seeds -----------------------------------------------------------------------

# Magnet parameters that name URLs to contact: trackers, web seeds, exact and acceptable sources
# (numbered forms such as tr.1 included).
_MAGNET_SOURCES = frozenset({"tr", "ws", "xs", "as"})
# Top-level .torrent keys that name URLs to contact: trackers and web seeds.
_TORRENT_SOURCES = (b"announce", b"announce-list", b"url-list", b"httpseeds")
MAX_SOURCE_HOSTS = 100  # the hosts of one job's trackers and web seeds checked; the rest dropped


def _magnet_parts(url: str) -> list[tuple[str, str | None]]:
    """Each `&`-separated part of a magnet's query, with its URL when it names a source."""
    query = url[len("magnet:") :].lstrip("?")
    parts: list[tuple[str, str | None]] = []
    for part in query.split("&"):
        key, _, value = part.partition("=")
        is_source = unquote_plus(key).split(".", 1)[0].lower() in _MAGNET_SOURCES
        parts.append((part, unquote_plus(value) if is_source else None))
    return parts


def magnet_sources(url: str) -> list[str]:
    """The trackers and web seeds a magnet names."""
    return [source for _, source in _magnet_parts(url) if source is not None]


def without_magnet_sources(url: str, dropped: Collection[str]) -> str:
    """The magnet without the `dropped` trackers and web seeds; every other part as it was."""
    kept = [part for part, source in _magnet_parts(url) if source is None or source not in dropped]
    return "magnet:?" + "&".join(kept)


def _source_lists(decoded: Mapping[bytes, object]) -> dict[bytes, list[object]]:
    """The torrent's source keys as lists (tiers flattened); a lone string is a list of one."""
    lists: dict[bytes, list[object]] = {}
    for key in _TORRENT_SOURCES:
        value = decoded.get(key)
        if key == b"announce-list" and isinstance(value, list):
            lists[key] = [url for tier in value if isinstance(tier, list) for url in tier]
        elif value is not None:
            lists[key] = value if isinstance(value, list) else [value]
    return lists


def _url_text(value: object) -> str | None:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else None


def torrent_sources(data: bytes) -> list[str]:
    """The trackers and web seeds a .torrent names (announce, announce-list, url-list,
    httpseeds)."""
    decoded, _ = _top_level(data)
    return [
        text
        for values in _source_lists(decoded).values()
        for value in values
        if (text := _url_text(value)) is not None
    ]


def without_torrent_sources(data: bytes, dropped: Collection[str]) -> bytes:
    """The .torrent without the `dropped` trackers and web seeds (a key left empty goes); every
    other value is copied byte for byte, so the info dictionary and its hash stay."""
    decoded, spans = _top_level(data)

    def keep(value: object) -> bool:
        return _url_text(value) not in dropped

    out = [b"d"]
    for key, (start, stop) in spans.items():
        value = decoded[key]
        if key not in _TORRENT_SOURCES or all(map(keep, _source_lists({key: value})[key])):
            out.append(_bencode(key) + data[start:stop])
            continue
        if key == b"announce-list" and isinstance(value, list):
            tiers = [[url for url in tier if keep(url)] for tier in value if isinstance(tier, list)]
            value = [tier for tier in tiers if tier]
        elif isinstance(value, list):
            value = [url for url in value if keep(url)]
        else:
            value = []
        if value:
            out.append(_bencode(key) + _bencode(value))
    out.append(b"e")
    return b"".join(out)


def _bencode(value: object) -> bytes:
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, list):
        return b"l" + b"".join(map(_bencode, value)) + b"e"
    if isinstance(value, dict):
        items = sorted(value.items())
        return b"d" + b"".join(_bencode(k) + _bencode(v) for k, v in items) + b"e"
    raise TypeError(f"cannot bencode {type(value).__name__}")


async def blocked_sources(
    urls: Iterable[str], policy: AddressPolicy, resolve: Resolver = resolve_host
) -> dict[str, str]:
    """The trackers and web seeds among `urls` a restricted job may not contact, each with the
    reason: a host that is or resolves to a blocked address, that does not resolve, or beyond the
    first MAX_SOURCE_HOSTS hosts."""
    reasons: dict[str, str] = {}
    by_host: dict[str, list[str]] = {}
    for url in dict.fromkeys(urls):
        try:
            host = urlsplit(url).hostname
        except ValueError:
            host = None
        if not host:
            reasons[url] = "no host"
        elif host in by_host or len(by_host) < MAX_SOURCE_HOSTS:
            by_host.setdefault(host, []).append(url)
        else:
            reasons[url] = f"more than {MAX_SOURCE_HOSTS} tracker and web seed hosts"
    limit = asyncio.Semaphore(16)

    async def judge(host: str) -> str | None:
        async with limit:
            try:
                await allowed_addresses(host, policy, resolve)
            except SourceError as exc:
                return str(exc)
            return None

    verdicts = await asyncio.gather(*(judge(host) for host in by_host))
    for (_host, host_urls), verdict in zip(by_host.items(), verdicts, strict=True):
        if verdict is not None:
            reasons.update(dict.fromkeys(host_urls, verdict))
    return reasons
