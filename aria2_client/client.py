"""aria2 operations on top of the transport: typed, batched, and tolerant where aria2 is racy."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Mapping, Sequence
from typing import Any

from loguru import logger

from aria2_client.models import STATUS_KEYS, Aria2File, Aria2Status
from aria2_client.transport import Aria2RpcError, Aria2Transport

Options = Mapping[str, str | int | float | bool]


def _options(options: Options | None) -> dict[str, str]:
    """aria2 wants every option value as a string (booleans as "true"/"false")."""
    if not options:
        return {}
    out: dict[str, str] = {}
    for key, value in options.items():
        if isinstance(value, bool):
            out[key] = "true" if value else "false"
        else:
            out[key] = str(value)
    return out


def _to_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


class Aria2Client:
    """What MistRelay asks of aria2: one RPC request per method unless its doc says otherwise."""

    def __init__(self, transport: Aria2Transport) -> None:
        self.transport = transport

    @property
    def connected(self) -> bool:
        return self.transport.connected

    # -- adding --------------------------------------------------------------------------------

    async def add_uri(
        self, uris: Sequence[str], options: Options | None = None, *, position: int | None = None
    ) -> str:
        """Queue a download from URIs (mirrors of one file, or one magnet); returns its gid."""
        params: list[Any] = [list(uris), _options(options)]
        if position is not None:
            params.append(position)
        gid = await self.transport.call("aria2.addUri", *params)
        return str(gid)

    async def add_torrent(
        self,
        data: bytes,
        options: Options | None = None,
        *,
        web_seeds: Sequence[str] = (),
        position: int | None = None,
    ) -> str:
        """Queue a download from .torrent bytes; returns its gid."""
        encoded = base64.b64encode(data).decode("ascii")
        params: list[Any] = [encoded, list(web_seeds), _options(options)]
        if position is not None:
            params.append(position)
        gid = await self.transport.call("aria2.addTorrent", *params)
        return str(gid)

    # -- control -------------------------------------------------------------------------------

    async def pause(self, gid: str) -> None:
        """Pause at once (forcePause: no tracker goodbye). Raises if aria2 cannot pause it now."""
        await self.transport.call("aria2.forcePause", gid)

    async def unpause(self, gid: str) -> None:
        await self.transport.call("aria2.unpause", gid)

    async def remove(self, gid: str) -> bool:
        """Stop a download and forget its result; files on disk are left alone.

        Returns True when a running, waiting or paused download was stopped, False when aria2 had
        nothing to stop (already finished, or unknown): that is not an error.
        """
        stopped = True
        try:
            await self.transport.call("aria2.forceRemove", gid)
        except Aria2RpcError as exc:
            if not exc.is_not_found:
                raise
            stopped = False
        await self._remove_result_after_stop(gid, wait=stopped)
        return stopped

    async def _remove_result_after_stop(self, gid: str, *, wait: bool) -> None:
        # forceRemove returns before aria2 has moved the download to its stopped list; until then
        # removeDownloadResult refuses, so a just-removed gid gets a few short, bounded retries.
        attempts = 40 if wait else 1
        for attempt in range(attempts):
            try:
                await self.transport.call("aria2.removeDownloadResult", gid)
                return
            except Aria2RpcError as exc:
                if exc.is_not_found and not await self._still_known(gid):
                    return
                if attempt == attempts - 1:
                    logger.bind(gid=gid).warning("aria2 kept the result of {}: {}", gid, exc)
                    return
            await asyncio.sleep(0.05)

    async def _still_known(self, gid: str) -> bool:
        try:
            await self.transport.call("aria2.tellStatus", gid, ["status"])
        except Aria2RpcError as exc:
            if exc.is_not_found:
                return False
            raise
        return True

    async def remove_result(self, gid: str) -> bool:
        """Forget a stopped download's result; False when aria2 no longer has it."""
        try:
            await self.transport.call("aria2.removeDownloadResult", gid)
        except Aria2RpcError as exc:
            if exc.is_not_found:
                return False
            raise
        return True

    async def purge_stopped(self) -> None:
        """Forget every completed, failed and removed result."""
        await self.transport.call("aria2.purgeDownloadResult")

    async def change_option(self, gid: str, options: Options) -> None:
        await self.transport.call("aria2.changeOption", gid, _options(options))

    async def get_option(self, gid: str) -> dict[str, str]:
        result = await self.transport.call("aria2.getOption", gid)
        return {str(k): str(v) for k, v in (result or {}).items()}

    async def change_global_option(self, options: Options) -> None:
        await self.transport.call("aria2.changeGlobalOption", _options(options))

    async def get_global_option(self) -> dict[str, str]:
        result = await self.transport.call("aria2.getGlobalOption")
        return {str(k): str(v) for k, v in (result or {}).items()}

    # -- reading -------------------------------------------------------------------------------

    async def tell_status(self, gid: str, keys: Sequence[str] | None = STATUS_KEYS) -> Aria2Status:
        """One download's status; raises Aria2RpcError (`is_not_found`) for an unknown gid."""
        params: list[Any] = [gid]
        if keys is not None:
            params.append(list(keys))
        result = await self.transport.call("aria2.tellStatus", *params)
        return Aria2Status.from_struct(result)

    async def poll(
        self,
        max_waiting: int = 1000,
        max_stopped: int = 1000,
        keys: Sequence[str] = STATUS_KEYS,
    ) -> list[Aria2Status]:
        """Every active, then up to `max_waiting` waiting, then up to `max_stopped` stopped
        downloads, in ONE request (system.multicall)."""
        keys = list(keys)
        results = await self.transport.multicall(
            [
                ("aria2.tellActive", [keys]),
                ("aria2.tellWaiting", [0, max_waiting, keys]),
                ("aria2.tellStopped", [0, max_stopped, keys]),
            ]
        )
        statuses: list[Aria2Status] = []
        for result in results:
            if isinstance(result, Aria2RpcError):
                raise result
            statuses.extend(Aria2Status.from_struct(item) for item in result or ())
        return statuses

    async def statuses(
        self, gids: Sequence[str], keys: Sequence[str] = STATUS_KEYS
    ) -> dict[str, Aria2Status | None]:
        """Status of each gid in ONE request; None for a gid aria2 does not know."""
        unique = list(dict.fromkeys(gids))
        if not unique:
            return {}
        results = await self.transport.multicall(
            [("aria2.tellStatus", [gid, list(keys)]) for gid in unique]
        )
        out: dict[str, Aria2Status | None] = {}
        for gid, result in zip(unique, results, strict=True):
            if isinstance(result, Aria2RpcError):
                if not result.is_not_found:
                    raise result
                out[gid] = None
            else:
                out[gid] = Aria2Status.from_struct(result)
        return out

    async def get_files(self, gid: str) -> list[Aria2File]:
        result = await self.transport.call("aria2.getFiles", gid)
        return [Aria2File.from_struct(item) for item in result or ()]

    async def version(self) -> str:
        result = await self.transport.call("aria2.getVersion")
        return str((result or {}).get("version", ""))

    async def global_stat(self) -> dict[str, int]:
        """downloadSpeed, uploadSpeed, numActive, numWaiting, numStopped, numStoppedTotal."""
        result = await self.transport.call("aria2.getGlobalStat")
        return {str(k): _to_int(v) for k, v in (result or {}).items()}

    async def save_session(self) -> None:
        await self.transport.call("aria2.saveSession")
