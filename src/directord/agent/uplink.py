"""The agent's side of its session with the server, across reconnects.

Jobs and components talk to the server through this: messages go out on the
current link (none while disconnected), requests wait for their reply and are
asked again after a reconnect, and QUERY values wait for everyone's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from directord.agent.cache import NodeCache
from directord.errors import ComponentError, ConnectionLost
from directord.protocol import Message, QueryData, QueryReport, Reply, Request
from directord.transports.base import Link

log = logging.getLogger(__name__)


class Uplink:
    """The current link to the server, and what waits on it."""

    def __init__(self, cache: NodeCache) -> None:
        self._cache = cache
        self.link: Link | None = None
        self.connected = asyncio.Event()
        self._rid = 0
        self._requests: dict[int, asyncio.Future[Any]] = {}
        self._query_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}

    def attach(self, link: Link) -> None:
        """A session began (the server welcomed us)."""
        self.link = link
        self.connected.set()

    def detach(self) -> None:
        """The session ended: requests in flight are asked again on the next one."""
        self.connected.clear()
        self.link = None
        for fut in self._requests.values():
            if not fut.done():
                fut.set_exception(ConnectionLost("link dropped"))
        self._requests.clear()

    def post(self, message: Message, linger: float = 0.0) -> bool:
        """Send now if connected; False (and nothing sent) otherwise."""
        if self.link is None:
            return False
        self.link.post(message, linger=linger)
        return True

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        """Ask the server; waits for (re)connection and asks again if the link drops.

        Raises:
            ComponentError: the server refused (its reason).
        """
        while True:
            await self.connected.wait()
            link = self.link
            if link is None:
                continue
            self._rid += 1
            rid = self._rid
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._requests[rid] = fut
            link.post(Request(rid=rid, method=method, params=params))
            try:
                return await fut
            except ConnectionLost:
                continue
            finally:
                self._requests.pop(rid, None)

    def on_reply(self, reply: Reply) -> None:
        """The server answered a request."""
        fut = self._requests.pop(reply.rid, None)
        if fut is not None and not fut.done():
            if reply.ok:
                fut.set_result(reply.result)
            else:
                fut.set_exception(ComponentError(reply.error))

    async def query_exchange(self, job_id: str, value: Any, wait: bool) -> dict[str, Any] | None:
        """Report a QUERY value; with ``wait``, return once every node's value arrived."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if wait:
            self._query_waiters[job_id] = fut
        try:
            while not self.post(QueryReport(id=job_id, value=value)):
                await self.connected.wait()
            return await fut if wait else None
        finally:
            self._query_waiters.pop(job_id, None)

    def on_query_data(self, data: QueryData) -> None:
        """Every target's values of a QUERY: into the cache, and to the job waiting."""
        query = self._cache.sections["query"]
        merged = {node: {**(query.get(node) or {}), **values} for node, values in data.data.items()}
        self._cache.update("query", merged)
        fut = self._query_waiters.get(data.id)
        if fut is not None and not fut.done():
            fut.set_result(data.data)
