"""Transport interface: how server and nodes exchange batches of envelopes.

A driver supplies two things: a server side that accepts connections and runs
a handler per connection, and a client side that dials the server. Both yield
:class:`Connection` objects that move opaque byte messages. Everything above
bytes (batching, envelope encoding, ordering of sends) is the :class:`Link`
here, shared by every driver.

Drivers translate their library's exceptions at the edge: ``recv`` raises
:class:`ConnectionLost` when the peer goes away, ``connect`` raises
:class:`ConnectError`; nothing else escapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from directord.config import Settings, TransportOptions
from directord.errors import ConfigError, ConnectionLost, ProtocolError
from directord.protocol import BatchDecoder, Message, encode, join_packed

log = logging.getLogger(__name__)

# A batch is cut before it grows past this, keeping latency low for the
# envelopes behind it and every message far under MAX_FRAME.
BATCH_BYTES = 1024 * 1024
# Lingering envelopes are sent at once when this many are waiting.
LINGER_MAX = 256


class Connection(ABC):
    """One bidirectional message pipe between the server and one node."""

    #: printable peer address for logs
    peer: str = "?"
    #: identity proven by the transport (certificate name, curve key), if any
    peer_identity: str | None = None
    #: serial of the certificate the peer proved, if any: revoking it cuts the connection
    peer_serial: int | None = None

    @abstractmethod
    async def send(self, data: bytes) -> None:
        """Send one message. Raises ConnectionLost."""

    @abstractmethod
    async def recv(self) -> bytes:
        """Receive one message. Raises ConnectionLost at end of stream."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection; idempotent."""


ConnectionHandler = Callable[[Connection], Awaitable[None]]
#: Called with (job id, message) for each job a node finds parked for it.
ParkedHandler = Callable[[str, bytes], Awaitable[None]]


class Transport(ABC):
    """A messaging driver. ``name`` is what ``--driver`` selects.

    ``options`` is the driver's :class:`TransportOptions` subclass: its fields
    become config keys, ``DIRECTORD_*`` env vars and flags (see config.py). The
    driver's module must import without the driver's library, which the
    constructor imports (raising :class:`MissingDependencyError` if it is
    absent), so that reading every driver's options imports no library.
    """

    name: ClassVar[str]
    options: ClassVar[type[TransportOptions]] = TransportOptions

    def __init__(self, settings: Settings, options: TransportOptions | None = None) -> None:
        """Build the driver.

        Args:
            settings: the common settings (identity, heartbeat ...).
            options: this driver's resolved options, an instance of :attr:`options`;
                a driver uses ``settings.options(...)`` when it is None.
        """
        self.settings = settings

    def adopt(self, sock: socket.socket) -> None:
        """Serve on an inherited listening socket (systemd socket activation).

        Raises:
            ConfigError: this driver cannot (the default).
        """
        raise ConfigError(f"the {self.name} driver cannot use an activated socket", key="driver")

    def exposure(self) -> str | None:
        """What anyone who can reach this server's listener could do, or None.

        None when the listener authenticates its peers, or is reachable from this
        machine only. The server refuses to start on an exposure unless the
        operator passed ``--insecure`` (then it logs it as a warning).
        """
        return None

    @abstractmethod
    async def serve(self, handler: ConnectionHandler) -> str:
        """Start accepting nodes; run ``handler`` per connection. Returns the bound address."""

    @abstractmethod
    async def connect(self) -> Connection:
        """Dial the server. Raises ConnectError."""

    @abstractmethod
    async def close(self) -> None:
        """Stop serving / drop client resources; idempotent."""

    # ---- jobs for an offline node (brokers only) -------------------------------------------
    # A broker can keep a message for a node that is away. The server parks each job
    # it cannot deliver there; the node takes its parked jobs once welcomed. The
    # server's datastore stays the record: it lists in the welcome which parked jobs
    # it still owes, the node runs only those, and anything the broker lost is
    # re-sent over the session.
    @property
    def parks(self) -> bool:
        """True when :meth:`park` keeps messages for offline nodes."""
        return False

    async def park(self, identity: str, job_id: str, message: bytes) -> None:
        """Keep one job message in the broker for an offline node. Raises ConnectionLost."""
        raise ConnectionLost(f"the {self.name} driver cannot keep jobs for offline nodes")

    async def take_parked(self, handler: ParkedHandler) -> None:
        """Hand this node's parked jobs to ``handler`` in order, then forget them.

        Raises:
            ConnectionLost: the broker could not be read; what is left stays parked.
        """
        return None

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Link:
    """Message-level duplex over a Connection, batching sends.

    ``post`` never blocks: each message is encoded at once and queued, and one
    sender task joins whatever has accumulated into one message of at most
    BATCH_BYTES. A send failure closes the link; the owner learns of it from
    ``closed`` or from ``recv`` raising ConnectionLost.
    """

    def __init__(self, conn: Connection, decoder: BatchDecoder, name: str = "link") -> None:
        self.conn = conn
        self.name = name
        self._decoder = decoder
        self._queue: list[bytes] = []
        self._timer: asyncio.TimerHandle | None = None
        self._wake = asyncio.Event()
        self._closed = asyncio.Event()
        self._sending = False  # a batch is on its way out
        self._sender = asyncio.create_task(self._send_loop(), name=f"{name}-sender")

    @property
    def closed(self) -> bool:
        """True once the link is down."""
        return self._closed.is_set()

    def post(self, message: Message, linger: float = 0.0) -> None:
        """Queue a message for sending.

        With ``linger`` > 0 the envelope may wait that many seconds for company,
        so a busy sender makes one message of many (the caller knows more is
        coming); an idle one still sends at once.
        """
        self.post_packed(encode(message), linger)

    def post_packed(self, packed: bytes, linger: float = 0.0) -> None:
        """Queue a message already encoded with ``protocol.encode`` (shared by many links)."""
        if self._closed.is_set():
            return
        self._queue.append(packed)
        if linger <= 0 or len(self._queue) >= LINGER_MAX:
            self._wake.set()
        elif self._timer is None and not self._wake.is_set():
            self._timer = asyncio.get_running_loop().call_later(linger, self._wake.set)

    def post_many(self, messages: list[Message]) -> None:
        """Queue several messages."""
        for message in messages:
            self.post(message)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything posted is sent (best effort, bounded).

        Sent, not only taken from the queue: closing the link while a send is half
        way would cancel it, and a broker client cancelled mid-publish may lose
        what follows (the close marker) as well.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (self._queue or self._sending) and not self._closed.is_set() and loop.time() < end:
            await asyncio.sleep(0.005)

    async def _send_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                while self._queue:
                    batch, self._queue = _cut_batch(self._queue)
                    self._sending = True
                    try:
                        await self.conn.send(join_packed(batch))
                    finally:
                        self._sending = False
        except (ConnectionLost, ProtocolError) as exc:
            log.debug("%s: send failed: %s", self.name, exc)
        except asyncio.CancelledError:
            raise
        finally:
            self._closed.set()

    async def recv(self) -> list[Any]:
        """Receive one batch of typed messages. Raises ConnectionLost or ProtocolError."""
        if self._closed.is_set() and self._sender.done():
            raise ConnectionLost(f"{self.name}: link closed")
        data = await self.conn.recv()
        return self._decoder.decode(data)

    async def close(self) -> None:
        """Stop the sender and close the connection."""
        self._closed.set()
        if self._timer is not None:
            self._timer.cancel()
        self._sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._sender
        with contextlib.suppress(Exception):
            await self.conn.close()


def _cut_batch(queue: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Take packed envelopes from the front of the queue up to BATCH_BYTES."""
    size = 0
    for i, part in enumerate(queue):
        size += len(part)
        if size > BATCH_BYTES and i > 0:
            return queue[:i], queue[i:]
    return queue, []


def is_loopback(host: str) -> bool:
    """True for a Unix socket path, ``localhost`` or an address in 127.0.0.0/8 or ::1."""
    host = host.strip().strip("[]")
    if host.startswith(("unix:", "/")) or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name may resolve anywhere


IMPERSONATION = (
    "anyone who can reach it can register as any node (an offline node's name "
    "included), receive that node's jobs and files, and report results for it"
)
