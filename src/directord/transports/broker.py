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
* A driver proves identities when the broker does: it passes each message's
  broker-authenticated user to :meth:`BrokerTransport.on_server_message` and
  says so with :attr:`BrokerTransport.binds_identity`.

What the server accepts in its inbox (anyone with publish rights there may
write to it, so every header is checked before use):

* ``s`` is a session id and ``n`` has the form of a node identity, or the
  message is dropped (a reserved name is left to the session to refuse, with
  its reason). When the driver binds identities (:attr:`BrokerTransport.binds_identity`),
  ``n`` must be the broker-proven user of the message: a message without one,
  or from another user, is dropped.
* A message belongs to the identity of its session: ``data`` or ``close`` with
  another ``n`` is dropped and never reaches, nor ends, the session it names.
  An ``open`` never reuses a live session's id, and retires the identity's
  older session only once it passed these checks.
* Each session keeps at most :data:`SESSION_QUEUE_BYTES` of messages not yet
  read, on the server and on the node; a message over ``MAX_FRAME`` or one that
  would go over that bound drops the session instead (logged). Its peer
  reconnects and re-sends what is unacknowledged (jobs until the node's
  ``ack``, results until the server's ``rack``), so nothing is lost.
* Refusals are logged as warnings, at most once per :data:`DROP_LOG_INTERVAL`
  seconds for each kind and node (the rest at debug), so a flood of forged
  messages cannot flood the log as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from abc import abstractmethod
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from directord.config import Settings, TransportOptions, option
from directord.errors import ConnectError, ConnectionLost
from directord.protocol import MAX_FRAME
from directord.security.identities import IDENTITY_RE
from directord.transports.base import Connection, ConnectionHandler, Transport

log = logging.getLogger(__name__)
Headers = dict[str, str]
# Seconds a close marker may take; past that the peer finds out from heartbeats. Generous:
# a busy loop or broker must not swallow it, an absent broker must not hold a close up.
CLOSE_NOTICE_WAIT = 3.0
#: Bytes of one session's messages waiting to be read, beyond which the session is dropped.
SESSION_QUEUE_BYTES = 4 * MAX_FRAME
#: Seconds between two warnings about dropped messages of one kind and node.
DROP_LOG_INTERVAL = 10.0
# What a session id may look like (clients send uuid4 hex); it is written to logs.
SESSION_ID = re.compile(r"[0-9A-Za-z_-]{1,64}", re.ASCII)
KINDS = frozenset({"open", "data", "close"})


class _Inbox:
    """One session's messages not yet read, bounded in bytes; once ended, reads say so."""

    def __init__(self, limit: int = SESSION_QUEUE_BYTES) -> None:
        self.limit = limit
        self.size = 0
        self.ended: str | None = None  # why no more messages come, once none do
        self._items: deque[bytes] = deque()
        self._ready = asyncio.Event()

    def put(self, data: bytes) -> bool:
        """Queue a message; False, and nothing queued, when it would go over the limit."""
        if self.ended is not None:
            return True  # the session is over: what still arrives for it goes nowhere
        if self.size + len(data) > self.limit:
            return False
        self.size += len(data)
        self._items.append(data)
        self._ready.set()
        return True

    def end(self, reason: str) -> None:
        """No more messages: reads return what is queued, then None."""
        if self.ended is None:
            self.ended = reason
        self._ready.set()

    def drop(self, reason: str) -> None:
        """End at once: what is queued is discarded (its sender re-sends it)."""
        self._items.clear()
        self.size = 0
        self.end(reason)

    def empty(self) -> bool:
        return not self._items

    async def get(self) -> bytes | None:
        """The next message, or None once ended and empty."""
        while not self._items:
            if self.ended is not None:
                return None
            self._ready.clear()
            await self._ready.wait()
        data = self._items.popleft()
        self.size -= len(data)
        return data


class _ServerConn(Connection):
    def __init__(
        self, transport: BrokerTransport, sid: str, identity: str, proven: str | None
    ) -> None:
        self._t = transport
        self.sid = sid
        self.identity = identity
        self.peer = f"{transport.name}:{identity}/{sid[:8]}"
        self.peer_identity = proven
        self.inbox = _Inbox()
        self.closed = False
        self.peer_closed = False  # the node said close: no need to tell it

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLost(f"{self.peer}: closed")
        await self._t.publish_node(self.identity, {"s": self.sid, "k": "data"}, data)

    async def recv(self) -> bytes:
        data = await self.inbox.get()
        if data is None:
            raise ConnectionLost(f"{self.peer}: {self.inbox.ended}")
        return data

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.inbox.end("session ended")
        if self._t.sessions.get(self.sid) is self:
            del self._t.sessions[self.sid]
        if not self.peer_closed:
            await self._t.say_closed(
                self._t.publish_node(self.identity, {"s": self.sid, "k": "close"}, b"")
            )


class _ClientConn(Connection):
    def __init__(self, transport: BrokerTransport, sid: str) -> None:
        self._t = transport
        self.sid = sid
        self.peer = f"{transport.name}:{transport.server_inbox}"
        self.inbox = _Inbox()
        self.closed = False

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLost("session closed")
        await self._t.publish_server({"s": self.sid, "k": "data"}, data)

    async def recv(self) -> bytes:
        if self.closed and self.inbox.empty():
            raise ConnectionLost("session closed")
        data = await self.inbox.get()
        if data is None:
            self.closed = True
            raise ConnectionLost(self.inbox.ended or "session closed")
        return data

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.inbox.end("session closed")
            if self._t.client_conn is self:
                self._t.client_conn = None
            # Tell the server at once; without it, it finds out from heartbeats.
            await self._t.say_closed(self._t.publish_server({"s": self.sid, "k": "close"}, b""))


@dataclass(frozen=True, slots=True)
class BrokerOptions(TransportOptions):
    """The options every broker driver has; each driver's options class extends it."""

    broker_namespace: str = option(
        "directord",
        "prefix of queue/subject names on a broker (one per cluster)",
        "server",
        "client",
    )
    messaging_queue_ttl: float = option(
        3600.0,
        "seconds a node's queue (RabbitMQ) or parked jobs (NATS JetStream) wait for it",
        "server",
        "client",
    )


class BrokerTransport(Transport):
    """Base of broker drivers: subclasses move bytes with headers, this keeps sessions."""

    def __init__(self, settings: Settings, options: BrokerOptions) -> None:
        super().__init__(settings, options)
        #: prefix of this cluster's queue / subject names (``--broker-namespace``)
        self.namespace = options.broker_namespace
        self.sessions: dict[str, _ServerConn] = {}
        self.by_node: dict[str, _ServerConn] = {}
        self.client_conn: _ClientConn | None = None
        self._handler: ConnectionHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._listening_node = False
        self._warned: dict[tuple[str, str], float] = {}
        self.server_inbox = f"{self.namespace}.server"

    @property
    def binds_identity(self) -> bool:
        """True when every server-inbox message must come from the broker user it names."""
        return False

    def node_inbox(self, identity: str) -> str:
        """The inbox (queue / subject) of one node."""
        return f"{self.namespace}.node.{identity}"

    def parked_inbox(self, identity: str) -> str:
        """Where jobs wait for one node while it is away (see :meth:`Transport.park`)."""
        return f"{self.namespace}.parked.{identity}"

    async def say_closed(self, publish: Coroutine[Any, Any, None]) -> None:
        """Best effort: a close marker must not hold anything up when the broker is away."""
        try:
            await asyncio.wait_for(publish, CLOSE_NOTICE_WAIT)
        except (ConnectionLost, TimeoutError) as exc:
            log.debug("%s: close not announced: %s", self.name, exc)

    def dropped(self, node: object, what: str, *args: object) -> None:
        """Log a refused message: a warning per kind and node every DROP_LOG_INTERVAL, else debug.

        ``what`` is a %-format completing "dropped ..."; ``args`` its values.
        """
        key = (what, str(node)[:256])
        now = time.monotonic()
        level = logging.DEBUG
        if now - self._warned.get(key, -DROP_LOG_INTERVAL) >= DROP_LOG_INTERVAL:
            if len(self._warned) >= 1024:
                self._warned.clear()  # a forger's made-up names must not grow this
            self._warned[key] = now
            level = logging.WARNING
        if log.isEnabledFor(level):
            log.log(level, "%s: dropped %s", self.name, what % args)

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
        self, headers: Mapping[str, Any], body: bytes, proven: str | None
    ) -> None:
        """A message reached the server inbox: check whose it is, then hand it to its session.

        Args:
            headers: the message's headers, as the broker gave them (untrusted).
            body: its body.
            proven: the broker-authenticated user who published it, if the broker says.
        """
        sid, kind, node = headers.get("s"), headers.get("k"), headers.get("n")
        if not isinstance(sid, str) or not SESSION_ID.fullmatch(sid):
            self.dropped(node, "a message with the session header %.80r (node %.80r)", sid, node)
            return
        if not isinstance(node, str) or not IDENTITY_RE.fullmatch(node):
            self.dropped(node, "a message for session %s with the node header %.80r", sid, node)
            return
        if self.binds_identity and proven != node:
            if proven is None:
                self.dropped(node, "a message claiming node %r without a broker user id", node)
            else:
                self.dropped(
                    node, "a message claiming node %r from broker user %.80r", node, proven
                )
            return
        if kind not in KINDS:
            self.dropped(node, "a message of unknown kind %.40r from node %s", kind, node)
            return
        if kind == "open":
            await self._open(sid, node, proven)
            return
        session = self.sessions.get(sid)
        if session is None:
            if kind == "data":
                # A session from before a server restart: make the node start over.
                with contextlib.suppress(ConnectionLost):
                    await self.publish_node(node, {"s": sid, "k": "reset"}, b"")
            return
        if session.identity != node:
            self.dropped(
                (node, kind),
                "a %s message from node %s for a session of node %s (%s)",
                kind,
                node,
                session.identity,
                session.peer,
            )
            return
        if kind == "close":
            session.peer_closed = True
            await session.close()
        elif not self._deliver(session.inbox, body):
            self.dropped(node, "the session %s: %s", session.peer, session.inbox.ended)
            # Told at once, the node starts over now, not when the handler next reads.
            await session.close()

    async def _open(self, sid: str, node: str, proven: str | None) -> None:
        if sid in self.sessions:
            self.dropped(node, "an open from node %s for session %s, which is in use", node, sid)
            return
        conn = _ServerConn(self, sid, node, proven)
        old = self.by_node.get(node)
        # Registered before the old session is retired (which waits on the broker), so
        # that the new session's first messages, right behind this one, find it.
        self.sessions[sid] = conn
        self.by_node[node] = conn
        self._spawn(self._run_handler(conn))
        if old is not None:
            await old.close()

    @staticmethod
    def _deliver(inbox: _Inbox, body: bytes) -> bool:
        """Queue a data message; False when that dropped the session instead (inbox.ended)."""
        if len(body) > MAX_FRAME:
            inbox.drop(f"a message of {len(body)} bytes, over the {MAX_FRAME} byte limit")
            return False
        if not inbox.put(body):
            inbox.drop(
                f"over {inbox.limit} bytes of messages waiting to be read; "
                "the peer reconnects and re-sends what is unacknowledged"
            )
            return False
        return True

    def lose_message(self, headers: Mapping[str, Any], reason: str) -> None:
        """A driver could not deliver a message whole: drop the session it belongs to.

        The session is matched on its id and, on the server, on its node too, so a
        message forged in another node's name cannot end that node's session.
        """
        sid = headers.get("s")
        session = self.sessions.get(sid) if isinstance(sid, str) else None
        if session is not None and session.identity == headers.get("n"):
            session.inbox.drop(reason)
            self.dropped(session.identity, "the session %s: %s", session.peer, reason)
            self._spawn(session.close())
        conn = self.client_conn
        if conn is not None and conn.sid == sid:
            conn.inbox.drop(reason)
            self.dropped("", "this node's session with the server: %s", reason)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    def on_node_message(self, headers: Mapping[str, Any], body: bytes) -> None:
        """A message reached this node's inbox."""
        conn = self.client_conn
        if conn is None or headers.get("s") != conn.sid:
            return  # for a session this client no longer has
        kind = headers.get("k")
        if kind == "data":
            if not self._deliver(conn.inbox, body):
                self.dropped("", "this node's session with the server: %s", conn.inbox.ended)
        elif kind == "reset":
            conn.inbox.end("the server does not know this session (a restart); starting over")
        elif kind == "close":
            conn.inbox.end("the server ended the session")
        else:
            self.dropped("", "a message of unknown kind %.40r from the server", kind)

    def broker_lost(self, reason: str = "the connection to the broker was lost") -> None:
        """The broker connection dropped, or messages were lost: every session is over."""
        if self.client_conn is not None:
            self.client_conn.inbox.end(reason)
        for conn in list(self.sessions.values()):
            conn.inbox.end(reason)

    async def close(self) -> None:
        # Nodes are not told: a node told would retry at once and keep retrying,
        # piling opens and hellos into the server's durable inbox for as long as
        # the server is down. Each finds out on the server's return, from the
        # ``reset`` answering its next heartbeat.
        for conn in list(self.sessions.values()):
            conn.closed = True
            conn.inbox.end("the server is shutting down")
        self.sessions.clear()
        for task in list(self._tasks):
            task.cancel()
        if self.client_conn is not None:
            await self.client_conn.close()
        await self.close_broker()
