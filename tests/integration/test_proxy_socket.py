"""The client's proxy socket: private, and reachable however deep its run directory is."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

from directord.agent.cache import NodeCache
from directord.agent.proxysock import ProxySocket, reachable
from directord.agent.uplink import Uplink


def test_a_run_directory_too_deep_for_sun_path_still_gets_a_private_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "run"  # well past the 108 bytes of sun_path
    cache = NodeCache(str(tmp_path / "cache"))

    async def scenario() -> dict[str, object]:
        sock = ProxySocket(str(deep), Uplink(cache))
        await sock.start()
        try:
            mode = os.lstat(sock.path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            with reachable(sock.path) as short:
                assert len(short) < 100
                reader, writer = await asyncio.open_unix_connection(short)
            writer.write(b'{"op": "start"}\n')  # no node, no unit: refused, never sent on
            await writer.drain()
            reply = json.loads(await reader.readline())
            writer.close()
            return reply
        finally:
            await sock.close()

    try:
        reply = asyncio.run(scenario())
    finally:
        cache.close()
    assert reply == {
        "ok": False,
        "error": "bad request: expected a JSON object with op, node and unit",
    }
    assert not (deep / "proxy.sock").exists()
