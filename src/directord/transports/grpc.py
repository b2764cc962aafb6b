"""gRPC driver (the default, ``--driver grpc``; ``grpcd`` is accepted as an alias).

Spec sheet
----------
* One bidirectional streaming RPC, ``/directord.Agent/Connect``, per node. Its
  messages are raw bytes (directord's own msgpack batches), so there is no
  generated protobuf code to keep in step.
* Server listens on ``--grpc-bind-address``:``--grpc-port`` (0.0.0.0:5558), or
  on a Unix socket when the bind address is ``unix:/PATH``. ``--grpc-port 0``
  picks a free port; the bound address is logged and written to ``--ready-file``.
* Clients dial ``--grpc-server-address``:``--grpc-port`` (127.0.0.1:5558) or
  ``unix:/PATH``.
* ``--grpc-server-workers`` sizes the thread pool gRPC uses for blocking work.
* ``--grpc-compression`` turns gzip message compression on (off by default;
  ``--grpc-disable-compression`` is accepted for compatibility).
* Messages over 16 MiB are refused by gRPC itself; the stream is closed.
* ``--grpc-ssl`` turns TLS on: the server presents ``--grpc-ssl-cert``/``-key``;
  clients verify it against ``--grpc-ssl-ca`` and the address they dial.
  ``--grpc-ssl-client-auth`` (mTLS) makes the server demand a client
  certificate signed by the CA; the client's identity then IS the certificate's
  common name. Refused at connection: a certificate revoked in the CRL, an
  operator's certificate (``pki issue --operator``: those are for the user API)
  and one for servers only. A node whose certificate is revoked while it is
  connected is cut off within about a second (the CRL is checked every second).
* Options: :class:`GrpcOptions`; each is a flag, a config key and a
  ``DIRECTORD_*`` variable. grpcio is imported when the driver is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from directord.config import Settings, TransportOptions, option
from directord.errors import (
    CertificateError,
    ConnectError,
    ConnectionLost,
    MissingDependencyError,
)
from directord.protocol import MAX_FRAME
from directord.security.tls import (
    Revocations,
    RevocationWatch,
    check_key_pair,
    node_refusal,
    peer_certificate,
    read_pem,
)
from directord.transports.base import (
    IMPERSONATION,
    Connection,
    ConnectionHandler,
    Transport,
    is_loopback,
)
from directord.transports.relay import start_relay

if TYPE_CHECKING:
    import grpc
    import grpc.aio

log = logging.getLogger(__name__)

SERVICE = "directord.Agent"
METHOD = f"/{SERVICE}/Connect"
CONNECT_TIMEOUT = 5.0
# Seconds a failed connect waits for gRPC to say why.
PROBE_TIMEOUT = 1.0
# Seconds a client's close() waits for the server to end the call after half-closing.
CLOSE_GRACE = 1.0
# Seconds close() lets connection handlers finish once their calls have ended.
HANDLER_GRACE = 1.0
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_FRAME + 1024),
    ("grpc.max_send_message_length", MAX_FRAME + 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
_SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]


@dataclass(frozen=True, slots=True)
class GrpcOptions(TransportOptions):
    """The gRPC driver's options."""

    grpc_port: int = option(5558, "gRPC server port (0 picks a free port)", "server", "client")
    grpc_bind_address: str = option(
        "0.0.0.0", "address the gRPC server binds, or unix:/PATH", "server"
    )
    grpc_server_address: str = option(
        "127.0.0.1", "server address clients dial, or unix:/PATH", "client"
    )
    grpc_server_workers: int = option(4, "gRPC server worker threads", "server")
    grpc_compression: bool = option(
        False,
        "gzip gRPC messages (helps slow links; costs CPU and slows file transfer)",
        "server",
        "client",
    )
    grpc_disable_compression: bool = option(
        False,
        "accepted for compatibility: compression is off unless --grpc-compression",
        "server",
        "client",
    )
    grpc_ssl: bool = option(False, "enable TLS on the gRPC driver", "server", "client")
    grpc_ssl_ca: str = option(
        "/etc/pki/ca-trust/source/anchors/cm-local-ca.pem",
        "CA certificate that signs server and client certificates",
        "server",
        "client",
    )
    grpc_ssl_cert: str = option(
        "/etc/directord/grpc/ssl/directord.crt",
        "this side's certificate (server; client with client auth)",
        "server",
        "client",
    )
    grpc_ssl_key: str = option(
        "/etc/directord/grpc/ssl/directord.key", "this side's private key", "server", "client"
    )
    grpc_ssl_client_auth: bool = option(
        False,
        "require client certificates (mTLS); a client's identity is its certificate's name",
        "server",
        "client",
    )
    grpc_ssl_crl: str = option(
        "", "CRL checked at every connection (default: crl.pem beside the CA, if present)", "server"
    )


def _import_grpc() -> None:
    """Import grpcio into this module: only the selected driver's library is imported."""
    global grpc
    try:
        import grpc
        import grpc.aio
    except ImportError as exc:  # pragma: no cover - grpcio is a core dependency
        raise MissingDependencyError("pip install grpcio") from exc


def _compression(opts: GrpcOptions) -> Any:
    # Off by default: most messages are small, file chunks do not compress, and
    # gzip made a 128 MiB COPY ten times slower on two cores.
    if opts.grpc_compression and not opts.grpc_disable_compression:
        return grpc.Compression.Gzip
    return grpc.Compression.NoCompression


def _join(host: str, port: int) -> str:
    if host.startswith("unix:"):
        return host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _describe(exc: BaseException) -> str:
    """One line for a failed call: gRPC's status and details, not its multi-line repr."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)


class _ServerStream(Connection):
    def __init__(self, context: Any) -> None:
        self._ctx = context
        self.peer = str(context.peer())
        self._closed = False
        self._write: asyncio.Future[None] | None = None
        self.certificate: bytes | None = None
        auth = context.auth_context() or {}
        pem = auth.get("x509_pem_cert")
        if pem:
            self.certificate = pem[0]

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionLost("stream closed")
        try:
            # Shielded: a write cancelled half-way, then the handler returning, leaves
            # the call with two operations at once and the peer's stream never ends.
            self._write = asyncio.ensure_future(self._ctx.write(data))
            await asyncio.shield(self._write)
        except Exception as exc:
            self._closed = True
            raise ConnectionLost(f"{self.peer}: write failed: {_describe(exc)}") from None

    async def recv(self) -> bytes:
        if self._closed:
            raise ConnectionLost("stream closed")
        try:
            msg = await self._ctx.read()
        except Exception as exc:
            self._closed = True
            raise ConnectionLost(f"{self.peer}: read failed: {_describe(exc)}") from None
        if msg is grpc.aio.EOF:
            self._closed = True
            raise ConnectionLost(f"{self.peer}: stream ended")
        return bytes(msg)

    async def close(self) -> None:
        self._closed = True
        write, self._write = self._write, None
        if write is not None and not write.done():
            # Let the write in flight finish (bounded) before the handler returns.
            await asyncio.wait({write}, timeout=2.0)
        if write is not None and write.done() and not write.cancelled():
            write.exception()  # retrieved: a failed last write is not worth a warning


class _ClientStream(Connection):
    def __init__(self, channel: Any, call: Any, peer: str) -> None:
        self._channel = channel
        self._call = call
        self.peer = peer
        self._closed = False

    async def send(self, data: bytes) -> None:
        if self._closed:
            raise ConnectionLost("stream closed")
        try:
            await self._call.write(data)
        except Exception as exc:
            self._closed = True
            raise ConnectionLost(f"{self.peer}: write failed: {_describe(exc)}") from None

    async def recv(self) -> bytes:
        if self._closed:
            raise ConnectionLost("stream closed")
        try:
            msg = await self._call.read()
        except Exception as exc:
            self._closed = True
            raise ConnectionLost(f"{self.peer}: read failed: {_describe(exc)}") from None
        if msg is grpc.aio.EOF:
            self._closed = True
            raise ConnectionLost(f"{self.peer}: server ended the stream")
        return bytes(msg)

    async def close(self) -> None:
        if self._closed and self._channel is None:
            return
        if not self._closed:
            self._closed = True
            # Half-close, then let the server end the call (bounded): cancelling at once
            # would drop messages this side has already written.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._finish(), CLOSE_GRACE)
        self._call.cancel()
        channel, self._channel = self._channel, None
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close(grace=None)

    async def _finish(self) -> None:
        await self._call.done_writing()
        await self._call.code()


async def _last_error(channel: Any) -> str:
    """Why a channel is not ready (refused, TLS handshake, server name), or ''.

    ``channel_ready`` only times out; a call that does not wait for readiness
    fails at once with gRPC's account of the last connection attempt.
    """
    call = channel.stream_stream(METHOD)()
    try:
        await asyncio.wait_for(call.code(), PROBE_TIMEOUT)
        return str(await call.details() or "")
    except Exception:
        return ""
    finally:
        call.cancel()


class GrpcTransport(Transport):
    """The gRPC messaging driver."""

    name: ClassVar[str] = "grpc"
    options: ClassVar[type[TransportOptions]] = GrpcOptions

    def __init__(self, settings: Settings, options: GrpcOptions | None = None) -> None:
        _import_grpc()
        super().__init__(settings, options)
        self.opts = options if options is not None else settings.options(GrpcOptions)
        self._server: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._handler: ConnectionHandler | None = None
        self._conn_tasks: set[asyncio.Task[None]] = set()
        self._revocations: Revocations | None = None
        self._revocation_watch: RevocationWatch | None = None
        #: live mTLS connections, each with the future that cuts it off (set to the reason)
        self._live: dict[_ServerStream, asyncio.Future[str]] = {}
        self._adopted: socket.socket | None = None
        self._relay: asyncio.Server | None = None
        self._private_dir: str | None = None
        #: seconds :meth:`connect` waits for the channel to become ready
        self.connect_timeout = CONNECT_TIMEOUT

    def adopt(self, sock: socket.socket) -> None:
        self._adopted = sock

    def exposure(self) -> str | None:
        s = self.opts
        where = _join(s.grpc_bind_address, s.grpc_port)
        if self._adopted is not None:
            # systemd bound it: what counts is where, not what the flags say.
            name = self._adopted.getsockname()
            host = name[0] if isinstance(name, tuple) else "unix:"
            where = f"{name} (socket activation)"
        else:
            host = s.grpc_bind_address
        if is_loopback(host) or (s.grpc_ssl and s.grpc_ssl_client_auth):
            return None
        what = "TLS without client certificates" if s.grpc_ssl else "no TLS and no authentication"
        return f"gRPC listener on {where} has {what}: {IMPERSONATION}"

    async def serve(self, handler: ConnectionHandler) -> str:
        self._handler = handler
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.opts.grpc_server_workers))
        server = grpc.aio.server(
            migration_thread_pool=self._pool,
            options=_SERVER_OPTIONS,
            compression=_compression(self.opts),
        )
        rpc = grpc.stream_stream_rpc_method_handler(self._connect)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Connect": rpc}),)
        )
        address = _join(self.opts.grpc_bind_address, self.opts.grpc_port)
        if self._adopted is not None:
            self._private_dir = tempfile.mkdtemp(prefix="directord-grpc-")
            address = f"unix:{self._private_dir}/grpc.sock"
        credentials = self._server_credentials()
        try:
            port = (
                server.add_secure_port(address, credentials)
                if credentials is not None
                else server.add_insecure_port(address)
            )
        except RuntimeError as exc:
            raise ConnectError(f"cannot listen on {address}: {exc}") from None
        if not address.startswith("unix:"):
            if port == 0:
                raise ConnectError(f"cannot listen on {address}: address in use or invalid")
            address = _join(self.opts.grpc_bind_address, port)
        await server.start()
        self._server = server
        if self._revocations is not None:
            self._revocation_watch = RevocationWatch(self._revocations, self._cut_revoked, "grpc")
            self._revocation_watch.start()
        if self._adopted is not None:
            self._relay = await start_relay(self._adopted, address[len("unix:") :])
            address = f"{self._adopted.getsockname() or '?'} (socket activation)"
        log.info("grpc: listening on %s", address)
        return address

    async def _connect(self, request_iterator: Any, context: Any) -> None:
        conn = _ServerStream(context)
        refusal = self._authenticate(conn)
        if refusal:
            # The peer learns why from the call's status, not from a bare end of stream.
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, refusal)
        # The handler runs in a task of its own: when the peer goes away gRPC cancels
        # this coroutine, and the handler then sees ConnectionLost from its pending
        # recv (as the Transport contract says) instead of a cancellation mid-work.
        task = asyncio.create_task(self._run_handler(conn), name=f"grpc-conn {conn.peer}")
        self._conn_tasks.add(task)
        task.add_done_callback(self._conn_tasks.discard)
        cut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if conn.peer_serial is not None:
            self._live[conn] = cut
        try:
            # As with shield: when gRPC cancels this coroutine, the handler runs on.
            either: set[asyncio.Future[Any]] = {task, cut}
            await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._live.pop(conn, None)
        if cut.done() and not task.done():
            # Ending the call ends the handler's pending recv with ConnectionLost; the
            # peer learns why from the status, and is refused when it comes back.
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, cut.result())

    def _server_credentials(self) -> Any:
        s = self.opts
        if not s.grpc_ssl:
            return None
        key = read_pem(s.grpc_ssl_key, "gRPC server key")
        cert = read_pem(s.grpc_ssl_cert, "gRPC server certificate")
        check_key_pair(s.grpc_ssl_cert, s.grpc_ssl_key)
        ca = read_pem(s.grpc_ssl_ca, "gRPC CA certificate") if s.grpc_ssl_client_auth else None
        if s.grpc_ssl_client_auth:
            self._revocations = Revocations(s.grpc_ssl_ca, s.grpc_ssl_crl)
            self._revocations.serials()  # a bad CRL is a start-up error, not a later surprise
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=s.grpc_ssl_client_auth
        )

    def _authenticate(self, conn: _ServerStream) -> str:
        """With mTLS, bind the connection to its certificate's name and serial.

        Refuses a revoked certificate, an operator's and one for servers only.
        Returns why the peer is refused ('' if it is not).
        """
        if self._revocations is None:
            return ""
        if conn.certificate is None:
            reason = "no client certificate"
            log.warning("grpc: refused %s: %s", conn.peer, reason)
            return reason
        try:
            name, cert = peer_certificate(conn.certificate)
            if cert.serial_number in self._revocations.serials():
                reason = f"certificate {name!r} (serial {cert.serial_number:x}) is revoked"
                log.warning("grpc: refused %s: %s", conn.peer, reason)
                return reason
        except CertificateError as exc:
            log.error("grpc: refused %s: %s", conn.peer, exc)
            return str(exc)
        reason = node_refusal(cert)
        if reason:
            log.warning("grpc: refused %s: %s", conn.peer, reason)
            return reason
        conn.peer_identity = name
        conn.peer_serial = cert.serial_number
        return ""

    def _cut_revoked(self, revoked: set[int]) -> None:
        """Cut off the live connections whose certificate is now revoked."""
        for conn, cut in list(self._live.items()):
            if conn.peer_serial in revoked and not cut.done():
                reason = (
                    f"certificate {conn.peer_identity!r} (serial {conn.peer_serial:x}) is revoked"
                )
                log.warning("grpc: cut off %s: %s", conn.peer, reason)
                cut.set_result(reason)

    async def _run_handler(self, conn: _ServerStream) -> None:
        assert self._handler is not None
        try:
            await self._handler(conn)
        except Exception:  # a handler bug must not take the server down
            log.exception("grpc: connection handler for %s failed", conn.peer)

    async def connect(self) -> Connection:
        s = self.opts
        target = _join(s.grpc_server_address, s.grpc_port)
        if s.grpc_ssl:
            key = cert = None
            if s.grpc_ssl_client_auth:
                key = read_pem(s.grpc_ssl_key, "gRPC client key")
                cert = read_pem(s.grpc_ssl_cert, "gRPC client certificate")
                check_key_pair(s.grpc_ssl_cert, s.grpc_ssl_key)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=read_pem(s.grpc_ssl_ca, "gRPC CA certificate"),
                private_key=key,
                certificate_chain=cert,
            )
            channel = grpc.aio.secure_channel(
                target, credentials, options=_CHANNEL_OPTIONS, compression=_compression(s)
            )
        else:
            channel = grpc.aio.insecure_channel(
                target, options=_CHANNEL_OPTIONS, compression=_compression(s)
            )
        try:
            await asyncio.wait_for(channel.channel_ready(), self.connect_timeout)
        except (TimeoutError, Exception) as exc:
            reason = await _last_error(channel) or type(exc).__name__
            await channel.close(grace=None)
            raise ConnectError(f"cannot reach server at {target}: {reason}") from None
        call = channel.stream_stream(METHOD)()
        return _ClientStream(channel, call, target)

    async def close(self) -> None:
        watch, self._revocation_watch = self._revocation_watch, None
        if watch is not None:
            await watch.close()
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.close()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=0.5)
        # Stopping ended every call, so handlers see ConnectionLost; give them a moment
        # to clean up, then cancel whatever still runs.
        tasks = list(self._conn_tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=HANDLER_GRACE)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
