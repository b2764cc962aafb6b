"""The user API's sockets: length-prefixed batches of typed messages.

A request is an ``ApiRequest``; its answer an ``ApiReply`` (``result``, or a
typed ``error``); ``watch`` streams ``ApiEvent``s ending with ``done``. What
each method does is in server/api_methods.py; this module owns the sockets,
who may connect, and for how long. The Unix socket is created mode 0660,
owned by ``--socket-group`` if given.

With ``--api-bind`` the API is served on TCP too, with TLS, to operators only:
the client's certificate must carry the operator mark (``pki issue --operator``);
a node's certificate is refused. An operator whose certificate is revoked is cut
off within about a second. On both sockets a connection that sends nothing for
``api_idle_timeout`` seconds (outside a ``watch``) is closed, and no more than
``api_max_connections`` are open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import math
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from directord.config import Settings
from directord.errors import CertificateError, ConfigError, DirectordError, ProtocolError
from directord.protocol import (
    FROM_USER,
    ApiReply,
    ApiRequest,
    Bye,
    ErrorInfo,
    FrameDecoder,
    Message,
    frame,
)
from directord.security.tls import (
    Revocations,
    RevocationWatch,
    operator_refusal,
    server_tls_context,
)
from directord.server.api_methods import ApiMethods
from directord.server.filestore import FileStore, UploadSession

if TYPE_CHECKING:
    from cryptography import x509

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Operator:
    """Who holds a TCP connection: the peer address and its certificate."""

    peer: str
    name: str
    serial: int


class APIServer:
    """Serves users (CLI, library) on the API socket."""

    def __init__(
        self,
        settings: Settings,
        methods: ApiMethods,
        files: FileStore,
        activated: socket.socket | None = None,
    ) -> None:
        self.settings = settings
        self.methods = methods
        self.files = files
        self.where = settings.socket_path
        self._activated = activated
        self._srv: asyncio.Server | None = None
        self._tcp: asyncio.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        #: the TCP connections, by the task serving each, for revocation
        self._operators: dict[asyncio.Task[Any], _Operator] = {}
        self._revocations: Revocations | None = None
        self._revocation_watch: RevocationWatch | None = None

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and serve; TCP+TLS too if asked."""
        settings = self.settings
        if settings.api_max_connections < 1:
            raise ConfigError("api_max_connections must be 1 or more", key="api_max_connections")
        if not 0 <= settings.api_idle_timeout < math.inf:
            raise ConfigError(
                "api_idle_timeout must be a finite number of seconds >= 0 (0: never)",
                key="api_idle_timeout",
            )
        await self._start_local()
        if settings.api_bind:
            context = server_tls_context(settings.ca, settings.cert, settings.key)
            # The context holds the CRL of start-up time; this one follows the file, so
            # a certificate revoked while the server runs is refused at its next
            # connection, and the watch below cuts off the connections it holds.
            self._revocations = Revocations(settings.ca)
            self._revocations.serials()
            try:
                self._tcp = await asyncio.start_server(
                    self._tcp_client,
                    settings.api_bind,
                    settings.api_port,
                    ssl=context,
                    limit=2**20,
                    ssl_handshake_timeout=10.0,
                )
            except OSError as exc:
                raise ConfigError(
                    f"cannot listen on {settings.api_bind}:{settings.api_port}: {exc.strerror}",
                    key="api_bind",
                ) from None
            port = self._tcp.sockets[0].getsockname()[1]
            self.where += f" and tls://{settings.api_bind}:{port}"
            self._revocation_watch = RevocationWatch(self._revocations, self._cut_revoked, "API")
            self._revocation_watch.start()

    async def _start_local(self) -> None:
        if self._activated is not None:
            self.where = f"{self._activated.getsockname() or '?'} (socket activation)"
            self._srv = await asyncio.start_unix_server(
                self._client, sock=self._activated, limit=2**20
            )
            return
        path = Path(self.where)
        _clear_stale_socket(path)
        try:
            old_umask = os.umask(0o117)
            try:
                self._srv = await asyncio.start_unix_server(
                    self._client, path=str(path), limit=2**20
                )
            finally:
                os.umask(old_umask)
            os.chmod(path, 0o660)
            if self.settings.socket_group:
                os.chown(path, -1, grp.getgrnam(self.settings.socket_group).gr_gid)
        except KeyError:
            raise ConfigError(
                f"group {self.settings.socket_group!r} does not exist", key="socket_group"
            ) from None
        except OSError as exc:
            raise ConfigError(
                f"{path}: cannot create API socket: {exc.strerror}", key="socket_path"
            ) from None

    async def close(self) -> None:
        """Stop serving and remove the socket."""
        watch, self._revocation_watch = self._revocation_watch, None
        if watch is not None:
            await watch.close()
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        if self._srv is not None and self._activated is not None:
            self._srv.close()
            for task in list(self._conns):
                task.cancel()
            self._srv = None
        if self._srv is not None:
            self._srv.close()
            for task in list(self._conns):
                task.cancel()
            with contextlib.suppress(Exception):
                await self._srv.wait_closed()
            self._srv = None
            with contextlib.suppress(OSError):
                os.unlink(self.where)

    def _refusal(self, writer: asyncio.StreamWriter) -> tuple[x509.Certificate | None, str]:
        """A TLS peer's certificate, and why it may not go on ('' if it may)."""
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return None, "no client certificate"
        # Imported here: a server without a TCP API need not map cryptography.
        from cryptography import x509

        from directord.security.pki import describe

        cert = x509.load_der_x509_certificate(der)
        try:
            revoked = self._revocations.serials() if self._revocations is not None else set()
        except CertificateError as exc:  # a damaged CRL refuses everyone rather than no one
            return cert, str(exc)
        if cert.serial_number in revoked:
            return cert, f"{describe(cert)} is revoked"
        # A node's certificate is as valid as an operator's to TLS: only the operator
        # mark tells them apart, and only operators may use the API.
        return cert, operator_refusal(cert)

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cert, refusal = self._refusal(writer)
        if refusal or cert is None:
            await _refuse(writer, refusal)
            return
        from directord.security.pki import common_name

        task = asyncio.current_task()
        assert task is not None
        self._operators[task] = _Operator(_peer(writer), common_name(cert), cert.serial_number)
        try:
            await self._client(reader, writer)
        finally:
            self._operators.pop(task, None)

    def _cut_revoked(self, revoked: set[int]) -> None:
        """Close the TCP connections whose operator certificate is now revoked."""
        for task, who in list(self._operators.items()):
            if who.serial in revoked:
                log.warning(
                    "API: cut off %s: certificate %r (serial %x) is revoked",
                    who.peer,
                    who.name,
                    who.serial,
                )
                del self._operators[task]
                task.cancel()

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        """The client's next bytes; b'' at its end, or once it has sent nothing for too long.

        Only the wait for a request counts: a request in progress (a ``watch`` too)
        does not read, so it is never idle.
        """
        idle = self.settings.api_idle_timeout
        try:
            async with asyncio.timeout(idle or None):
                return await reader.read(65536)
        except TimeoutError:
            log.info(
                "API: closed %s: it sent nothing for %gs (api_idle_timeout)", _peer(writer), idle
            )
            # Said before closing: a client whose next request crosses this knows that
            # the request was never read, and may send it again on a new connection.
            writer.write(frame([Bye(reason="idle")]))
            return b""

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        cap = self.settings.api_max_connections
        if len(self._conns) >= cap:
            await _refuse(writer, f"{cap} connections are open already (api_max_connections)")
            return
        self._conns.add(task)
        decoder = FrameDecoder(FROM_USER)
        uploads = UploadSession(self.files)
        try:
            while True:
                data = await self._read(reader, writer)
                if not data:
                    break
                for batch in decoder.feed(data):
                    for request in batch:
                        await self._dispatch(request, writer, uploads)
        except ProtocolError as exc:
            log.warning("API client sent a bad request: %s; closing it", exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            uploads.close()
            self._conns.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(
        self, request: ApiRequest, writer: asyncio.StreamWriter, uploads: UploadSession
    ) -> None:
        async def send(messages: list[Message]) -> None:
            writer.write(frame(messages))
            await writer.drain()

        reply: ApiReply
        try:
            if request.method == "watch":
                await self.methods.watch(request.rid, request.params, send)
                return
            result = await self.methods.call(request.method, request.params, uploads)
            reply = ApiReply(rid=request.rid, ok=True, result=result)
        except DirectordError as exc:
            error = ErrorInfo(type=type(exc).__name__, msg=str(exc), code=exc.code)
            reply = ApiReply(rid=request.rid, ok=False, error=error)
        except Exception as exc:
            log.exception("API method %r failed", request.method)
            error = ErrorInfo(type="InternalError", msg=f"server error: {exc}", code="internal")
            reply = ApiReply(rid=request.rid, ok=False, error=error)
        try:
            await send([reply])
        except ProtocolError as exc:
            # Nothing was written: the answer outgrew a frame. Clients of this version
            # ask for long lists in pages; an older one gets told why, not cut off.
            log.warning("API: the answer to %s is too large to send: %s", request.method, exc)
            error = ErrorInfo(
                type="ProtocolError",
                msg=f"the answer to {request.method!r} is too large to send ({exc}); "
                "a directord client of this version asks for it in pages",
                code=ProtocolError.code,
            )
            await send([ApiReply(rid=request.rid, ok=False, error=error)])


def _peer(writer: asyncio.StreamWriter) -> str:
    """An API client for the logs: ``HOST:PORT``, or the local process and user."""
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    sock = writer.get_extra_info("socket")
    peercred = getattr(socket, "SO_PEERCRED", None)
    if sock is not None and peercred is not None:
        with contextlib.suppress(OSError):
            size = struct.calcsize("3i")
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, peercred, size))
            return f"local pid {pid} uid {uid}"
    return "a local client"


async def _refuse(writer: asyncio.StreamWriter, reason: str) -> None:
    """Log why an API client is turned away, and close its connection."""
    log.warning("API: refused %s: %s", _peer(writer), reason)
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket file left by a dead server; refuse if one is alive there."""
    if path.exists() or path.is_symlink():
        if _socket_alive(str(path)):
            raise ConfigError(
                f"{path}: another server is already listening here", key="socket_path"
            )
        path.unlink()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"{path.parent}: cannot create: {exc.strerror}", key="socket_path"
        ) from None


def _socket_alive(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(0.5)
        sock.connect(path)
        return True
    except OSError:
        return False
    finally:
        sock.close()
