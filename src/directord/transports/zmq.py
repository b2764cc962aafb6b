"""ZeroMQ driver (``--driver zmq``; ``zeromq`` is accepted as an alias).

Spec sheet
----------
* One ROUTER socket on the server, bound to ``--zmq-bind-address``:``--job-port``
  (0.0.0.0:5555); each client is a DEALER dialling ``--zmq-server-address``
  (127.0.0.1). ``--backend-port`` is accepted for compatibility and unused:
  one channel carries both directions.
* A client's routing id is its identity; every connection opens with an empty
  frame. The server checks the claim there, before any session starts, and logs
  a refusal: no reserved or invalid name; under Curve, a node's own key may
  claim only its own name, and the shared ``client`` key only names that have
  no key of their own. The hello must name the routing id.
* One connection per routing id: while a client is connected, a second
  connection claiming its routing id is held unused by ZeroMQ (it receives
  nothing and disturbs nothing) and logged after ``QUIET_AFTER`` seconds. Once
  the first connection has closed, the next claim takes the routing id and the
  server retires the previous stream of that client. A restarted client is back
  at once; one whose old connection did not close (its host vanished) waits for
  the heartbeats to drop that connection, then its next attempt gets in.
* Liveness: ZMTP heartbeats; a client learns of a dead server through a socket
  monitor (disconnect) and reconnects. The server learns of a dead client from
  directord's own heartbeats (three intervals).
* Authentication, one of:
  - ``--zmq-shared-key TOKEN``: ZAP PLAIN check of a shared token. This
    authenticates, it does NOT encrypt: use it inside one trusted network only.
  - Curve25519 (``--zmq-curve-encryption``, or automatically when
    ``KEY_DIR/public_keys/server.key`` exists and no shared key is set): the
    traffic is encrypted; the server admits only client public keys found in
    ``KEY_DIR/public_keys``. A key named after a node (``--zmq-generate-keys
    --client NAME``) proves that node's identity; the shared ``client`` key
    proves membership only and may not claim an identity that has its own key.

  With a shared key, or with no authentication, nothing proves which node a
  client is: it can take the name of any node that is offline (the server says
  so in its log at start). An online node's name cannot be taken.
* Options: :class:`ZmqOptions`; each is a flag, a config key and a
  ``DIRECTORD_*`` variable. pyzmq is imported when the driver is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from directord.config import Settings, TransportOptions, option, read_secret_file
from directord.errors import ConfigError, ConnectError, ConnectionLost, MissingDependencyError
from directord.protocol import MAX_FRAME
from directord.security import curve
from directord.security.identities import identity_problem
from directord.transports.base import (
    IMPERSONATION,
    Connection,
    ConnectionHandler,
    Transport,
    is_loopback,
)

if TYPE_CHECKING:
    import zmq
    import zmq.asyncio
    from zmq.utils.monitor import parse_monitor_message

    from directord.transports._zmq_auth import Authenticator

log = logging.getLogger(__name__)
PLAIN_USER = "directord"
ZAP_DOMAIN = "directord"
HEARTBEAT_MS = 2000
CONNECT_TIMEOUT = 5.0
KEY_POLL = 1.0
# Bytes of one stream's messages not yet read by its session before it is ended.
SESSION_QUEUE_BYTES = 4 * MAX_FRAME
# A client sends its first frame right after its handshake, which it abandons after
# CONNECT_TIMEOUT: a connection silent for longer is held unused, or still shaking hands.
QUIET_AFTER = CONNECT_TIMEOUT
_EOF = None


def _url(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def _peer_of(fd: int) -> str:
    """The remote address of a connection libzmq owns, for a log line (best effort).

    Reads a duplicate of the descriptor, never the original; if the connection has
    gone (and the number is reused), the line may name another peer, or none.
    """
    try:
        dup = os.dup(fd)
    except OSError:
        return f"fd {fd}"
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return f"fd {fd}"
    with sock:
        try:
            host, port = sock.getpeername()[:2]
        except (OSError, ValueError):
            return f"fd {fd}"
    return f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class ZmqOptions(TransportOptions):
    """The ZeroMQ driver's options."""

    zmq_server_address: str = option("127.0.0.1", "server address ZeroMQ clients dial", "client")
    zmq_bind_address: str = option("0.0.0.0", "address the ZeroMQ server binds", "server")
    job_port: int = option(5555, "ZeroMQ port (0 picks a free port)", "server", "client")
    backend_port: int = option(
        5556, "accepted for compatibility; the ZeroMQ driver uses one channel", "server", "client"
    )
    zmq_shared_key: str = option(
        "", "ZeroMQ shared key: authenticates, does NOT encrypt", "server", "client"
    )
    zmq_shared_key_file: str = option(
        "",
        "file holding the ZeroMQ shared key, private to its owner (instead of --zmq-shared-key)",
        "server",
        "client",
    )
    zmq_curve_encryption: bool = option(
        False, "ZeroMQ Curve25519 encryption (on by itself when keys exist)", "server", "client"
    )
    zmq_key_dir: str = option(
        "/etc/directord", "holds public_keys/ and private_keys/", "server", "client"
    )
    zmq_highwater_mark: int = option(
        1000,
        "messages ZeroMQ queues per peer in each direction before it holds back "
        "(libzmq's high-water mark; 0: no limit)",
        "server",
        "client",
    )
    zmq_rotation_grace: float = option(
        600.0,
        "seconds a rotated server key waits for clients still on the old key to leave",
        "server",
    )

    def check(self) -> None:
        if self.zmq_highwater_mark < 0:
            raise ConfigError(
                "zmq_highwater_mark must be >= 0 (0: no limit)", key="zmq_highwater_mark"
            )
        if self.zmq_shared_key_file and self.zmq_shared_key:
            raise ConfigError(
                "zmq_shared_key and zmq_shared_key_file are both set; give one",
                key="zmq_shared_key_file",
            )

    def with_secrets(self) -> ZmqOptions:
        if not self.zmq_shared_key_file:
            return self
        key = read_secret_file("zmq_shared_key_file", self.zmq_shared_key_file)
        return replace(self, zmq_shared_key=key)


def _import_zmq() -> None:
    """Import pyzmq into this module: only the selected driver's library is imported."""
    global zmq, parse_monitor_message
    try:
        import zmq
        import zmq.asyncio
        from zmq.utils.monitor import parse_monitor_message
    except ImportError as exc:
        raise MissingDependencyError("pip install directord[zmq]") from exc


def mechanism(opts: ZmqOptions) -> str:
    """``plain``, ``curve`` or ``none``: what these options use."""
    if opts.zmq_shared_key:
        return "plain"
    if opts.zmq_curve_encryption or curve.keys_present(opts.zmq_key_dir):
        return "curve"
    return "none"


class _Rotation:
    """A server key rotation waiting for the clients connected under the old key."""

    def __init__(self, waiting: set[int], old_names: dict[bytes, str], deadline: float) -> None:
        self.waiting = waiting  # file descriptors of old-key connections still open
        self.old_names = old_names
        self.deadline = deadline
        self.keypair = (b"", b"")

    def due(self) -> bool:
        return not self.waiting or asyncio.get_running_loop().time() >= self.deadline


class _ServerConn(Connection):
    def __init__(self, transport: ZmqTransport, rid: bytes, user: str | None, fd: int) -> None:
        self._t = transport
        self.rid = rid
        self.user = user
        self.fd = fd  # the TCP connection's descriptor in libzmq
        self.peer = f"zmq:{rid.decode('utf-8', 'replace')}"
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.queued = 0  # bytes in the queue
        self.closed = False
        # The routing id is the identity, checked against the credential before this
        # connection was made (_claim_problem): the hello may name no other.
        self.peer_identity = rid.decode()

    async def send(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionLost(f"{self.peer}: closed")
        try:
            await self._t.router.send_multipart([self.rid, data], copy=False)
        except zmq.ZMQError as exc:
            self.closed = True
            raise ConnectionLost(f"{self.peer}: {exc}") from None

    async def recv(self) -> bytes:
        if self.closed and self.queue.empty():
            raise ConnectionLost(f"{self.peer}: closed")
        data = await self.queue.get()
        if data is _EOF:
            self.closed = True
            raise ConnectionLost(f"{self.peer}: replaced or closed")
        self.queued -= len(data)
        return data

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.queue.put_nowait(_EOF)
            if self._t.conns.get(self.rid) is self:
                del self._t.conns[self.rid]


class _ClientConn(Connection):
    def __init__(self, transport: ZmqTransport, sock: Any, monitor: Any, peer: str) -> None:
        self._t = transport
        self.sock = sock
        self.monitor = monitor
        self.peer = peer
        self.closed = False
        self._lost = asyncio.get_running_loop().create_future()
        self._watch = asyncio.create_task(self._watch_monitor())

    async def _watch_monitor(self) -> None:
        try:
            while True:
                event = parse_monitor_message(await self.monitor.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED:
                    if not self._lost.done():
                        self._lost.set_result(None)
                    return
        except (zmq.ZMQError, asyncio.CancelledError):
            return

    async def send(self, data: bytes) -> None:
        if self.closed or self._lost.done():
            raise ConnectionLost(f"{self.peer}: disconnected")
        try:
            await self.sock.send(data, copy=False)
        except zmq.ZMQError as exc:
            raise ConnectionLost(f"{self.peer}: {exc}") from None

    async def recv(self) -> bytes:
        if self.closed or self._lost.done():
            raise ConnectionLost(f"{self.peer}: disconnected")
        receiving = asyncio.ensure_future(self.sock.recv())
        done, _ = await asyncio.wait({receiving, self._lost}, return_when=asyncio.FIRST_COMPLETED)
        if receiving not in done:
            receiving.cancel()
            raise ConnectionLost(f"{self.peer}: server went away")
        try:
            data: bytes = receiving.result()
        except zmq.ZMQError as exc:
            raise ConnectionLost(f"{self.peer}: {exc}") from None
        return data

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._watch.cancel()
        with contextlib.suppress(Exception):
            self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=0)


class ZmqTransport(Transport):
    """The ZeroMQ messaging driver."""

    name: ClassVar[str] = "zmq"
    options: ClassVar[type[TransportOptions]] = ZmqOptions

    def __init__(self, settings: Settings, options: ZmqOptions | None = None) -> None:
        _import_zmq()
        super().__init__(settings, options)
        self.opts = options if options is not None else settings.options(ZmqOptions)
        self.ctx = zmq.asyncio.Context()
        self.router: Any = None
        self.conns: dict[bytes, _ServerConn] = {}
        self._auth: Authenticator | None = None
        self._reader: asyncio.Task[None] | None = None
        self._handler: ConnectionHandler | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connect_timeout = CONNECT_TIMEOUT
        self.binds_identity = False
        self._address = ""
        self._server_public = b""
        self._watcher: asyncio.Task[None] | None = None
        self._router_watch: asyncio.Task[None] | None = None
        self._router_monitor: Any = None
        self._open_fds: set[int] = set()
        # accepted connections not heard from yet: descriptor -> the check that logs them
        self._unheard: dict[int, asyncio.TimerHandle] = {}
        self._rotation: _Rotation | None = None

    def exposure(self) -> str | None:
        s = self.opts
        if is_loopback(s.zmq_bind_address) or mechanism(s) != "none":
            return None
        return (
            f"ZeroMQ listener on {_url(s.zmq_bind_address, s.job_port)} has no shared key "
            f"and no Curve keys: {IMPERSONATION}"
        )

    # ---- server ----------------------------------------------------------------------
    def _secure_server(self, sock: Any) -> str:
        s = self.opts
        how = mechanism(s)
        if how == "none":
            log.warning(
                "zmq: no authentication configured: any client can join, and nothing proves "
                "which node it is: it can register under the name of any node that is offline "
                "(set --zmq-shared-key or generate curve keys)"
            )
            return how
        from directord.transports._zmq_auth import Authenticator

        self._auth = Authenticator(self.ctx)
        self._auth.start()
        if how == "plain":
            self._auth.configure_plain(domain=ZAP_DOMAIN, passwords={PLAIN_USER: s.zmq_shared_key})
            sock.plain_server = True
            log.warning(
                "zmq: the shared key proves membership, not identity: a client holding it can "
                "register under the name of any node that is offline (per-node curve keys "
                "bind names)"
            )
        else:
            public, secret = curve.load_keypair(s.zmq_key_dir, curve.SERVER)
            names = curve.known_clients(s.zmq_key_dir)
            self._auth.names = names
            self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)
            sock.curve_publickey, sock.curve_secretkey = public, secret
            self._server_public = public
            sock.curve_server = True
            log.info("zmq: curve on; %d client keys known", len(names))
        sock.zap_domain = ZAP_DOMAIN.encode()
        return how

    def callback(self, domain: str, key: bytes) -> bool:
        """Check CURVE credentials: True when the client public key is one we know."""
        assert self._auth is not None
        z85 = key  # pyzmq hands the callback the Z85 form already
        # Re-read on a miss so keys added by an operator work without a restart.
        if z85 not in self._auth.names:
            with contextlib.suppress(ConfigError):
                old = self._rotation.old_names if self._rotation is not None else {}
                self._auth.names = {**old, **curve.known_clients(self.opts.zmq_key_dir)}
        known = z85 in self._auth.names
        if not known:
            log.warning("zmq: refused a client with an unknown curve key %s...", z85[:8].decode())
        return known

    async def serve(self, handler: ConnectionHandler) -> str:
        self._handler = handler
        sock = self.ctx.socket(zmq.ROUTER)
        # No handover: libzmq gives a routing id to one connection at a time. While
        # node1 is connected, a second connection claiming node1 - whatever its
        # credential - is parked by libzmq: never read, never routed to, until it
        # closes, even after node1 has left. It cannot take node1's stream, receive
        # its jobs or disconnect it. With handover, libzmq would give node1's routing
        # id to the newest claim and drop the connected node1 before directord saw
        # a frame, so anyone able to connect could knock any node offline.
        # A restarted node1 is not held up: its old process's TCP connection closed
        # when it died, and libzmq frees the routing id as soon as it reads that
        # close. If the old connection is still open (its host vanished), the ZMTP
        # heartbeats drop it after 3 * HEARTBEAT_MS; the new client, parked until
        # then, gets no welcome and dials again (the agent waits 10s for one).
        # What handover off leaves: a client refused at its first frame keeps the
        # routing id it took until it disconnects (ZeroMQ cannot close one peer of a
        # ROUTER), so under Curve a key holder can keep an offline node from coming
        # back (never impersonate it) while it stays connected; its refusal is logged.
        sock.router_handover = 0
        sock.sndhwm = sock.rcvhwm = self.opts.zmq_highwater_mark
        sock.maxmsgsize = MAX_FRAME + 1024  # libzmq drops a peer that sends more
        sock.heartbeat_ivl = HEARTBEAT_MS
        sock.heartbeat_timeout = 3 * HEARTBEAT_MS
        sock.linger = 0
        how = self._secure_server(sock)
        self.binds_identity = how == "curve"
        address = _url(self.opts.zmq_bind_address, self.opts.job_port)
        try:
            if self.opts.job_port == 0:
                port = sock.bind_to_random_port(address.rsplit(":", 1)[0])
                address = f"{address.rsplit(':', 1)[0]}:{port}"
            else:
                sock.bind(address)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConnectError(f"cannot listen on {address}: {exc}") from None
        self.router = sock
        self._address = address
        self._reader = asyncio.create_task(self._read_loop(), name="zmq-router")
        self._router_monitor = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._router_watch = asyncio.create_task(
            self._watch_router(self._router_monitor), name="zmq-router-monitor"
        )
        if how == "curve":
            self._watcher = asyncio.create_task(self._watch_keys(), name="zmq-keys")
        log.info("zmq: listening on %s (auth: %s)", address, how)
        return address.replace("tcp://", "")

    async def _read_loop(self) -> None:
        while True:
            try:
                frames = await self.router.recv_multipart(copy=False)
            except zmq.ZMQError as exc:
                log.error("zmq: receive failed: %s", exc)
                return
            if len(frames) != 2:
                continue
            rid, payload = frames[0].bytes, frames[1]
            user = payload.get("User-Id") if self._auth is not None else None
            data = payload.bytes
            if not data:
                await self._open(rid, user, payload)
                continue
            conn = self.conns.get(rid)
            if conn is None:
                continue  # from a connection refused at its first frame
            if conn.user != user:
                log.warning("zmq: dropped a message on %s from another credential", conn.peer)
                continue
            if conn.queued + len(data) > SESSION_QUEUE_BYTES:
                # A peer that sends faster than its session reads must not fill our
                # memory: its stream ends (it reconnects and re-sends what is unacked).
                log.warning(
                    "zmq: %s has over %d bytes not yet read; ending its stream",
                    conn.peer,
                    SESSION_QUEUE_BYTES,
                )
                await conn.close()
                continue
            conn.queued += len(data)
            conn.queue.put_nowait(data)

    async def _open(self, rid: bytes, user: str | None, first: Any) -> None:
        """A connection's first frame: check its claim, then start its stream."""
        fd = int(first.get(zmq.SRCFD))
        self._heard(fd)
        problem = self._claim_problem(rid, user)
        if problem:
            log.warning("zmq: refused a connection from %s: %s", _peer_of(fd), problem)
            return
        old = self.conns.get(rid)
        if old is not None:
            # libzmq gave this routing id to a new connection, so the old one has
            # closed (no handover): retire its stream now rather than at its timeout.
            await old.close()
        conn = _ServerConn(self, rid, user, fd)
        self.conns[rid] = conn
        task = asyncio.create_task(self._run_handler(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _claim_problem(self, rid: bytes, user: str | None) -> str | None:
        """Why a connection may not have the identity its routing id claims, or None."""
        claimed = rid.decode("utf-8", "replace")
        problem = identity_problem(claimed)
        if problem:
            return f"routing id: {problem}"
        if not self.binds_identity or self._auth is None or user is None:
            return None
        if user == curve.SHARED_CLIENT:
            if claimed in self._auth.names.values():
                return f"{claimed!r} has its own curve key; the shared key may not claim it"
            return None
        if user != claimed:
            return f"claims {claimed!r} with the curve key of {user!r}"
        return None

    def _expect(self, fd: int) -> None:
        """A connection was accepted: log it if it has said nothing after QUIET_AFTER."""
        self._heard(fd)
        self._unheard[fd] = asyncio.get_running_loop().call_later(QUIET_AFTER, self._silent, fd)

    def _heard(self, fd: int) -> None:
        timer = self._unheard.pop(fd, None)
        if timer is not None:
            timer.cancel()

    def _silent(self, fd: int) -> None:
        self._unheard.pop(fd, None)
        # Its first frame may have been read before its acceptance was reported.
        if any(c.fd == fd and not c.closed for c in self.conns.values()):
            return
        log.warning(
            "zmq: a connection from %s has sent nothing in %gs: either its routing id is "
            "that of a client already connected (an impostor, or a restarted client whose "
            "old connection is still open), and it is held unused until it closes, or its "
            "handshake has not finished",
            _peer_of(fd),
            QUIET_AFTER,
        )

    def _key_stamp(self) -> tuple[tuple[str, int], ...]:
        root = Path(self.opts.zmq_key_dir)
        paths = [
            *sorted((root / "public_keys").glob("*.key")),
            root / "private_keys" / f"{curve.SERVER}.key_secret",
        ]
        return tuple((p.name, p.stat().st_mtime_ns) for p in paths if p.exists())

    async def _watch_keys(self) -> None:
        """Pick up rotated keys; switch the listener once the old key is no longer needed."""
        stamp = self._key_stamp()
        while True:
            await asyncio.sleep(KEY_POLL)
            current = self._key_stamp()
            try:
                if current != stamp:
                    stamp = current
                    self._reload_keys()
                if self._rotation is not None and self._rotation.due():
                    await self._switch_server_key()
            except ConfigError as exc:
                log.error("zmq: key change ignored: %s", exc)
            except (zmq.ZMQError, OSError):
                log.exception("zmq: reloading keys failed; keeping the old ones")

    async def _watch_router(self, monitor: Any) -> None:
        """Track the listener's open connections by file descriptor.

        libzmq reports no descriptor with a successful handshake, so this counts
        every accepted connection; those that fail their handshake close soon.
        A connection held unused (its routing id taken) never shows in the
        socket's frames: only here, and :meth:`_silent` logs it.
        """
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())
                fd = int(event["value"])
                if event["event"] == zmq.EVENT_ACCEPTED:
                    self._open_fds.add(fd)
                    self._expect(fd)
                elif event["event"] == zmq.EVENT_DISCONNECTED:
                    self._open_fds.discard(fd)
                    self._heard(fd)
                    if self._rotation is not None:
                        self._rotation.waiting.discard(fd)
        except (zmq.ZMQError, asyncio.CancelledError):
            return

    def _reload_keys(self) -> None:
        public, secret = curve.load_keypair(self.opts.zmq_key_dir, curve.SERVER)
        names = curve.known_clients(self.opts.zmq_key_dir)
        assert self._auth is not None
        if public == self._server_public:
            self._rotation = None
            self._auth.names = names
            log.info("zmq: curve keys reloaded; %d client keys known", len(names))
            return
        # libzmq copies the server key into a listener when it binds, and closing
        # that listener drops every connection it accepted. Clients still on the
        # old key must first receive their new keys over those connections
        # (key-rotation.yaml), so the old key keeps serving them, and their old
        # client keys stay valid, until the last of them has left.
        if self._rotation is None:
            self._rotation = _Rotation(
                set(self._open_fds),
                dict(self._auth.names),
                asyncio.get_running_loop().time() + self.opts.zmq_rotation_grace,
            )
        self._rotation.keypair = (public, secret)
        self._auth.names = {**self._rotation.old_names, **names}
        log.info(
            "zmq: new server key; the old one serves the %d connected clients until they "
            "reconnect (at most %gs); %d client keys known",
            len(self._rotation.waiting),
            self.opts.zmq_rotation_grace,
            len(names),
        )

    async def _switch_server_key(self) -> None:
        """Re-bind the listener with the rotated server key (drops old-key connections)."""
        assert self._rotation is not None and self._auth is not None
        public, secret = self._rotation.keypair
        self.router.unbind(self._address)
        self.router.curve_publickey, self.router.curve_secretkey = public, secret
        # unbind completes in libzmq's I/O thread: retry until the port is free.
        for _ in range(250):
            try:
                self.router.bind(self._address)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE:
                    raise
                await asyncio.sleep(0.02)
        else:
            raise zmq.ZMQError(zmq.EADDRINUSE, f"{self._address} did not free up")
        self._server_public = public
        left = len(self._rotation.waiting)
        self._rotation = None
        self._auth.names = curve.known_clients(self.opts.zmq_key_dir)
        log.info(
            "zmq: now listening with the new server key (%d old-key clients cut off); "
            "old client keys are refused from now on",
            left,
        )

    async def _run_handler(self, conn: _ServerConn) -> None:
        assert self._handler is not None
        try:
            await self._handler(conn)
        except Exception:
            log.exception("zmq: connection handler for %s failed", conn.peer)
        finally:
            await conn.close()

    # ---- client ----------------------------------------------------------------------
    async def connect(self) -> Connection:
        s = self.opts
        identity = self.settings.resolved_identity()
        sock = self.ctx.socket(zmq.DEALER)
        sock.routing_id = identity.encode()
        sock.sndhwm = sock.rcvhwm = s.zmq_highwater_mark
        sock.linger = 0
        sock.maxmsgsize = MAX_FRAME + 1024  # libzmq drops a peer that sends more
        sock.heartbeat_ivl = HEARTBEAT_MS
        sock.heartbeat_timeout = 3 * HEARTBEAT_MS
        sock.reconnect_ivl = 100
        how = mechanism(s)
        if how == "plain":
            sock.plain_username = PLAIN_USER.encode()
            sock.plain_password = s.zmq_shared_key.encode()
        elif how == "curve":
            try:
                own = curve.load_keypair(s.zmq_key_dir, identity)
            except ConfigError:
                own = curve.load_keypair(s.zmq_key_dir, curve.SHARED_CLIENT)
            sock.curve_publickey, sock.curve_secretkey = own
            sock.curve_serverkey = curve.load_public(s.zmq_key_dir, curve.SERVER)
        monitor = sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
        )
        target = _url(s.zmq_server_address, s.job_port)
        sock.connect(target)
        try:
            await asyncio.wait_for(self._handshake(monitor, how), self.connect_timeout)
        except (TimeoutError, ConnectError) as exc:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            reason = str(exc) or "no answer"
            raise ConnectError(f"cannot reach server at {target}: {reason}") from None
        conn = _ClientConn(self, sock, monitor, target)
        await conn.send(b"")  # marks a new connection for the server
        return conn

    async def _handshake(self, monitor: Any, how: str) -> None:
        while True:
            event = parse_monitor_message(await monitor.recv_multipart())
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                raise ConnectError(f"server refused our {how} credentials")

    async def close(self) -> None:
        for task in (self._watcher, self._router_watch):
            if task is not None:
                task.cancel()
        self._watcher = self._router_watch = None
        for timer in self._unheard.values():
            timer.cancel()
        self._unheard.clear()
        if self._router_monitor is not None:
            with contextlib.suppress(Exception):
                self.router.disable_monitor()
            self._router_monitor.close(linger=0)
            self._router_monitor = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        for conn in list(self.conns.values()):
            await conn.close()
        for task in list(self._tasks):
            task.cancel()
        if self.router is not None:
            self.router.close(linger=0)
            self.router = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self.ctx.destroy(linger=0)
