"""In-process reference transport, and the test double for server/agent logic.

Supports: everything the Transport contract asks, within one event loop.
URL form: none; all MemoryTransport instances sharing one ``hub`` name meet.
Options: none. Not for production: nothing leaves the process.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from directord.config import Settings, TransportOptions
from directord.errors import ConnectError, ConnectionLost
from directord.transports.base import Connection, ConnectionHandler, Transport

_HUBS: dict[str, MemoryTransport] = {}
# End of stream is a sentinel, not b"": an empty message is a message.
_EOF = None


class MemoryConnection(Connection):
    """One end of an in-memory pipe."""

    def __init__(
        self, inbox: asyncio.Queue[bytes | None], outbox: asyncio.Queue[bytes | None], peer: str
    ) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._closed = False
        self.peer = peer

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionLost("memory connection closed")
        await self._outbox.put(data)

    async def recv(self) -> bytes:
        if self._closed:
            raise ConnectionLost("memory connection closed")
        data = await self._inbox.get()
        if data is None:
            self._closed = True
            raise ConnectionLost("peer closed")
        return data

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._outbox.put(_EOF)


class MemoryTransport(Transport):
    """Server and clients in one process, joined by asyncio queues."""

    name: ClassVar[str] = "memory"
    options: ClassVar[type[TransportOptions]] = TransportOptions

    def __init__(
        self, settings: Settings, options: TransportOptions | None = None, hub: str = "default"
    ) -> None:
        super().__init__(settings, options)
        self.hub = hub
        self._handler: ConnectionHandler | None = None
        # The serving transport owns its connections' handler tasks, as a real server does.
        self._tasks: dict[asyncio.Task[None], MemoryConnection] = {}

    async def serve(self, handler: ConnectionHandler) -> str:
        self._handler = handler
        _HUBS[self.hub] = self
        return f"memory:{self.hub}"

    async def connect(self) -> Connection:
        server = _HUBS.get(self.hub)
        if server is None:
            raise ConnectError(f"no memory server on hub {self.hub!r}")
        return server._accept()

    def _accept(self) -> Connection:
        a: asyncio.Queue[bytes | None] = asyncio.Queue()
        b: asyncio.Queue[bytes | None] = asyncio.Queue()
        server_end = MemoryConnection(a, b, "memory-client")
        client_end = MemoryConnection(b, a, "memory-server")
        task = asyncio.create_task(self._run(server_end))
        self._tasks[task] = server_end
        task.add_done_callback(self._tasks.pop)
        return client_end

    async def _run(self, conn: MemoryConnection) -> None:
        assert self._handler is not None
        try:
            await self._handler(conn)
        finally:
            # The connection lives as long as its handler, as with a real driver.
            await conn.close()

    async def close(self) -> None:
        if _HUBS.get(self.hub) is self:
            del _HUBS[self.hub]
        # End every live connection: both ends' pending recv see ConnectionLost, the
        # handlers get a moment to clean up, and whatever still runs is cancelled.
        for conn in list(self._tasks.values()):
            conn._inbox.put_nowait(_EOF)
            await conn.close()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
