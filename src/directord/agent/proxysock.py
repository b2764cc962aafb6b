"""The client's local socket for ``directord proxy`` (cross-node unit dependencies).

A ``directord-proxy@NODE_UNIT.service`` unit on this node runs ``directord
proxy start NODE_UNIT``; that command asks this socket, and the client asks
its server (a ``unit_proxy`` request, under this node's own identity) to
start UNIT on NODE. The socket is ``proxy.sock`` in the run directory,
0600 in a 0700 directory: only root (the proxy units) may use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
from collections.abc import Iterator
from typing import Any

from directord.agent.uplink import Uplink
from directord.errors import DirectordError

log = logging.getLogger(__name__)
SOCKET_NAME = "proxy.sock"
MAX_REQUEST = 4096
READ_TIMEOUT = 10.0


# sun_path holds 108 bytes: a deeper run directory is reached through a descriptor.
SUN_PATH_MAX = 100


@contextlib.contextmanager
def reachable(path: str) -> Iterator[str]:
    """``path``, or the same socket as ``/proc/self/fd/N/NAME`` when ``path`` is too long."""
    if len(os.fsencode(path)) <= SUN_PATH_MAX:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


class ProxySocket:
    """Serves one JSON line per connection: ``{"op", "node", "unit"}`` → the server's answer."""

    def __init__(self, run_path: str, uplink: Uplink) -> None:
        self.path = os.path.join(run_path, SOCKET_NAME)
        self._uplink = uplink
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen; a client that cannot (an odd run directory) runs on without proxies."""
        try:
            await self._listen()
        except OSError as exc:
            log.warning("no proxy socket at %s (%s): directord-proxy@ units cannot reach "
                        "this client", self.path, exc.strerror or exc)  # fmt: skip

    async def _listen(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)  # the last client's: nothing listens there now
        old = os.umask(0o177)  # born 0600: no moment when another user may connect
        try:
            with reachable(self.path) as path:
                self._server = await asyncio.start_unix_server(
                    self._handle, path=path, limit=MAX_REQUEST
                )
        finally:
            os.umask(old)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                os.unlink(self.path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            reply = await self._answer(reader)
        except (ValueError, TimeoutError, asyncio.LimitOverrunError) as exc:
            reply = {"ok": False, "error": f"bad request: {exc}"}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader) -> dict[str, Any]:
        line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
        request = json.loads(line)
        if not isinstance(request, dict) or not all(
            isinstance(request.get(k), str) for k in ("op", "node", "unit")
        ):
            raise ValueError("expected a JSON object with op, node and unit")
        params = {k: request[k] for k in ("op", "node", "unit")}
        log.info("proxy: %s %s on %s", params["op"], params["unit"], params["node"])
        try:
            answer = await self._uplink.request("unit_proxy", params)
        except DirectordError as exc:
            return {"ok": False, "error": str(exc)}
        return {"ok": True, **(answer if isinstance(answer, dict) else {})}
