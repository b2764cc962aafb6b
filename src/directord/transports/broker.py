"""Virtual connections over a message broker, shared by the AMQP and NATS drivers.

A broker has no connections between server and node, only inboxes: the
server reads ``<ns>.server``, each node reads ``<ns>.node.<id>``, where
``<ns>`` is ``--broker-namespace`` (``directord``), so several clusters can
share one broker.
This layer rebuilds the Transport contract on top:

* Each client session has an id; its first message is an ``open`` marker.
  The server starts a handler per session, and the newest session of an
  identity retires the older ones (a restarted client, a reconnect).
* Every message carries ``s`` (session) and ``n`` (node identity) headers.
  A node drops messages for sessions it no longer has; the server answers a
  message from an unknown session (after a server restart) with ``reset``,
  which makes the client reconnect and register again, and then the server
  re-sends whatever it still owes: no job is lost or run twice (the node's
  journal refuses a second run of a job id).
* Jobs for a node without a session wait in the broker, in
  ``<ns>.parked.<id>`` (see ``Transport.park`` and server/parking.py).
* A driver proves identities when the broker does: ``proven_identity``
  returns the broker-authenticated user of a message, or None.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from abc import abstractmethod
from collections.abc import Coroutine
from typing import Any

from directord.config import Settings
from directord.errors import ConnectError, ConnectionLost
from directord.transports.base import Connection, ConnectionHandler, Transport

log = logging.getLogger(__name__)
Headers = dict[str, str]
CLOSE_NOTICE_WAIT = 1.0


class _ServerConn(Connection):
    def __init__(
        self, transport: BrokerTransport, sid: str, identity: str, proven: str | None
    ) -> None:
        self._t = transport
        self.sid = sid
        self.identity = identity
        self.peer = f"{transport.name}:{identity}/{sid[:8]}"
        self.peer_identity = proven
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLost(f"{self.peer}: closed")
        await self._t.publish_node(self.identity, {"s": self.sid, "k": "data"}, data)

    async def recv(self) -> bytes:
        data = await self.queue.get()
        if data is None:
            self.closed = True
            raise ConnectionLost(f"{self.peer}: session ended")
        return data

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.queue.put_nowait(None)
        self._t.sessions.pop(self.sid, None)
        await self._t.say_closed(
            self._t.publish_node(self.identity, {"s": self.sid, "k": "close"}, b"")
        )


class _ClientConn(Connection):
    def __init__(self, transport: BrokerTransport, sid: str) -> None:
        self._t = transport
        self.sid = sid
        self.peer = f"{transport.name}:{transport.server_inbox}"
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.closed = False

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLost("session closed")
        await self._t.publish_server({"s": self.sid, "k": "data"}, data)

    async def recv(self) -> bytes:
        if self.closed and self.queue.empty():
            raise ConnectionLost("session closed")
        data = await self.queue.get()
        if data is None:
            self.closed = True
            raise ConnectionLost("the server ended the session (restart or broker loss)")
        return data

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(None)
            if self._t.client_conn is self:
                self._t.client_conn = None
            # Tell the server at once; without it, it finds out from heartbeats.
            await self._t.say_closed(self._t.publish_server({"s": self.sid, "k": "close"}, b""))


class BrokerTransport(Transport):
    """Base of broker drivers: subclasses move bytes with headers, this keeps sessions."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.sessions: dict[str, _ServerConn] = {}
        self.by_node: dict[str, _ServerConn] = {}
        self.client_conn: _ClientConn | None = None
        self._handler: ConnectionHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._listening_node = False
        self.server_inbox = f"{settings.broker_namespace}.server"

    def node_inbox(self, identity: str) -> str:
        """The inbox (queue / subject) of one node."""
        return f"{self.settings.broker_namespace}.node.{identity}"

    def parked_inbox(self, identity: str) -> str:
        """Where jobs wait for one node while it is away (see :meth:`Transport.park`)."""
        return f"{self.settings.broker_namespace}.parked.{identity}"

    async def say_closed(self, publish: Coroutine[Any, Any, None]) -> None:
        """Best effort: a close marker must not hold anything up when the broker is away."""
        try:
            await asyncio.wait_for(publish, CLOSE_NOTICE_WAIT)
        except (ConnectionLost, TimeoutError) as exc:
            log.debug("%s: close not announced: %s", self.name, exc)

    # ---- what a driver implements --------------------------------------------------------
    @abstractmethod
    async def open_broker(self) -> None:
        """Connect to the broker (idempotent). Raises ConnectError."""

    @abstractmethod
    async def listen_server(self) -> None:
        """Consume the server inbox, calling :meth:`on_server_message`."""

    @abstractmethod
    async def listen_node(self, identity: str) -> None:
        """Consume this node's inbox, calling :meth:`on_node_message`."""

    @abstractmethod
    async def publish_server(self, headers: Headers, body: bytes) -> None:
        """Send to the server inbox (adds the ``n`` header). Raises ConnectionLost."""

    @abstractmethod
    async def publish_node(self, identity: str, headers: Headers, body: bytes) -> None:
        """Send to a node's inbox. Raises ConnectionLost."""

    @abstractmethod
    async def close_broker(self) -> None:
        """Disconnect from the broker."""

    # ---- server ----------------------------------------------------------------------------
    async def serve(self, handler: ConnectionHandler) -> str:
        self._handler = handler
        await self.open_broker()
        await self.listen_server()
        return self.describe()

    def describe(self) -> str:
        """Where this driver meets its peers (for logs)."""
        return f"{self.name} {self.server_inbox}"

    async def on_server_message(
        self, headers: dict[str, Any], body: bytes, proven: str | None
    ) -> None:
        """A message reached the server inbox."""
        sid, kind, node = str(headers.get("s", "")), headers.get("k"), str(headers.get("n", ""))
        if not sid or not node:
            log.warning("%s: dropped a message without session or node headers", self.name)
            return
        if proven is not None and proven != node:
            log.warning(
                "%s: dropped a message claiming node %r from broker user %r",
                self.name,
                node,
                proven,
            )
            return
        if kind == "open":
            old = self.by_node.get(node)
            if old is not None:
                await old.close()
            conn = _ServerConn(self, sid, node, proven)
            self.sessions[sid] = conn
            self.by_node[node] = conn
            task = asyncio.create_task(self._run_handler(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        session = self.sessions.get(sid)
        if session is None:
            # A session from before a server restart: make the node start over.
            with contextlib.suppress(ConnectionLost):
                await self.publish_node(node, {"s": sid, "k": "reset"}, b"")
            return
        if kind == "data":
            session.queue.put_nowait(body)
        elif kind == "close":
            await session.close()

    async def _run_handler(self, conn: _ServerConn) -> None:
        assert self._handler is not None
        try:
            await self._handler(conn)
        except Exception:
            log.exception("%s: connection handler for %s failed", self.name, conn.peer)
        finally:
            await conn.close()
            if self.by_node.get(conn.identity) is conn:
                del self.by_node[conn.identity]

    # ---- client ----------------------------------------------------------------------------
    async def connect(self) -> Connection:
        await self.open_broker()
        if not self._listening_node:
            await self.listen_node(self.settings.resolved_identity())
            self._listening_node = True
        if self.client_conn is not None:
            await self.client_conn.close()
        conn = _ClientConn(self, uuid.uuid4().hex)
        self.client_conn = conn
        try:
            await self.publish_server({"s": conn.sid, "k": "open"}, b"")
        except ConnectionLost as exc:
            raise ConnectError(str(exc)) from None
        return conn

    def on_node_message(self, headers: dict[str, Any], body: bytes) -> None:
        """A message reached this node's inbox."""
        conn = self.client_conn
        if conn is None or headers.get("s") != conn.sid:
            return  # for a session this client no longer has
        kind = headers.get("k")
        if kind == "data":
            conn.queue.put_nowait(body)
        elif kind in ("reset", "close"):
            conn.queue.put_nowait(None)

    def broker_lost(self) -> None:
        """The broker connection dropped: every session is over."""
        if self.client_conn is not None:
            self.client_conn.queue.put_nowait(None)
        for conn in list(self.sessions.values()):
            conn.queue.put_nowait(None)

    async def close(self) -> None:
        # Nodes are not told: a node told would retry at once and keep retrying,
        # piling opens and hellos into the server's durable inbox for as long as
        # the server is down. Each finds out on the server's return, from the
        # ``reset`` answering its next heartbeat.
        for conn in list(self.sessions.values()):
            conn.closed = True
            conn.queue.put_nowait(None)
        self.sessions.clear()
        for task in list(self._tasks):
            task.cancel()
        if self.client_conn is not None:
            await self.client_conn.close()
        await self.close_broker()
