"""The user API: length-prefixed msgpack requests on a local Unix socket.

Request ``{"rid", "m", "p"}``; reply ``{"rid", "ok": true, "r"}`` or
``{"rid", "ok": false, "err": {"type", "msg"}}``. ``watch`` replies with a
stream of ``{"rid", "ev", ...}`` events ending with ``{"ev": "done"}``.
The socket is created mode 0660, owned by ``--socket-group`` if given.

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
import functools
import grp
import logging
import math
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from directord import __version__
from directord.errors import CertificateError, ConfigError, DirectordError, ProtocolError
from directord.protocol import Envelope, FrameDecoder, frame
from directord.security.pki import common_name, describe
from directord.security.tls import (
    Revocations,
    RevocationWatch,
    operator_refusal,
    server_tls_context,
)
from directord.server import analysis
from directord.server.filestore import UploadSession

if TYPE_CHECKING:
    from directord.server.app import Server

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Operator:
    """Who holds a TCP connection: the peer address and its certificate."""

    peer: str
    name: str
    serial: int


class APIServer:
    """Serves users (CLI, library) on the API socket."""

    def __init__(self, server: Server, activated: socket.socket | None = None) -> None:
        self.server = server
        self.where = server.settings.socket_path
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
        settings = self.server.settings
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
            if self.server.settings.socket_group:
                os.chown(path, -1, grp.getgrnam(self.server.settings.socket_group).gr_gid)
        except KeyError:
            raise ConfigError(
                f"group {self.server.settings.socket_group!r} does not exist", key="socket_group"
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
        idle = self.server.settings.api_idle_timeout
        try:
            async with asyncio.timeout(idle or None):
                return await reader.read(65536)
        except TimeoutError:
            log.info(
                "API: closed %s: it sent nothing for %gs (api_idle_timeout)", _peer(writer), idle
            )
            # Said before closing: a client whose next request crosses this knows that
            # the request was never read, and may send it again on a new connection.
            writer.write(frame([{"t": "bye", "reason": "idle"}]))
            return b""

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        cap = self.server.settings.api_max_connections
        if len(self._conns) >= cap:
            await _refuse(writer, f"{cap} connections are open already (api_max_connections)")
            return
        self._conns.add(task)
        decoder = FrameDecoder()
        uploads = UploadSession(self.server.files)
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
        self, request: Envelope, writer: asyncio.StreamWriter, uploads: UploadSession
    ) -> None:
        rid = request.get("rid")
        method = str(request.get("m", ""))
        params = request.get("p") or {}
        try:
            if not isinstance(params, dict):
                raise ProtocolError("params must be a mapping")
            if method == "watch":
                await self._watch(rid, params, writer)
                return
            handler: Callable[[dict[str, Any]], Awaitable[Any]] | None
            if method == "file_put":
                handler = functools.partial(self._file_put, uploads)
            elif method == "submit":
                handler = functools.partial(self._submit, uploads)
            else:
                handler = getattr(self, f"_m_{method}", None)
            if handler is None:
                raise ProtocolError(f"unknown API method {method!r}")
            result = await handler(params)
            reply: Envelope = {"t": "rep", "rid": rid, "ok": True, "r": result}
        except DirectordError as exc:
            reply = {
                "t": "rep",
                "rid": rid,
                "ok": False,
                "err": {"type": type(exc).__name__, "msg": str(exc)},
            }
        except Exception as exc:
            log.exception("API method %r failed", method)
            reply = {
                "t": "rep",
                "rid": rid,
                "ok": False,
                "err": {"type": "InternalError", "msg": f"server error: {exc}"},
            }
        writer.write(frame([reply]))
        await writer.drain()

    async def _watch(self, rid: Any, params: dict[str, Any], writer: asyncio.StreamWriter) -> None:
        jobs = self.server.jobs
        job_ids = [str(j) for j in params.get("jobs") or []]
        for parent_id in params.get("parents") or []:
            parent = jobs.parents.get(str(parent_id))
            if parent is not None:
                job_ids.extend(parent.jobs)
        watcher = jobs.watch(job_ids, bool(params.get("output")), bool(params.get("summary")))
        try:
            while True:
                events = watcher.take()
                if events:
                    writer.write(frame([{"t": "ev", "rid": rid, **e} for e in events]))
                    await writer.drain()
                if not watcher.pending and not watcher.events:
                    break
                await watcher.wake.wait()
            writer.write(frame([{"t": "ev", "rid": rid, "ev": "done"}]))
            await writer.drain()
        finally:
            jobs.unwatch(watcher)

    # ---- methods ---------------------------------------------------------------------
    async def _m_ping(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"version": __version__, "address": self.server.address}

    async def _submit(self, uploads: UploadSession, params: dict[str, Any]) -> dict[str, Any]:
        return await self.server.submit(params, frozenset(uploads.proven))

    async def _file_put(self, uploads: UploadSession, params: dict[str, Any]) -> dict[str, Any]:
        """One piece of a file for a COPY/ADD job, uploaded by the submitting user."""
        return uploads.put(
            params.get("sha256"), params.get("size"), params.get("offset"), params.get("data")
        )

    async def _m_nodes(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.server.nodes.listing()

    async def _m_jobs(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        rows = [j.summary() for j in sorted(self.server.jobs.jobs.values(), key=lambda j: j.order)]
        wanted = params.get("filter")
        if wanted == "success":
            rows = [r for r in rows if r["success"] and not r["failed"] and not r["processing"]]
        elif wanted == "failed":
            rows = [r for r in rows if r["failed"]]
        elif wanted == "processing":
            rows = [r for r in rows if r["processing"]]
        elif wanted:
            raise ConfigError(
                f"unknown filter {wanted!r} (success, failed, processing)", key="filter"
            )
        if params.get("full"):
            by_id = self.server.jobs.jobs
            return [by_id[r["id"]].info() for r in rows]
        return rows

    async def _m_job_info(self, params: dict[str, Any]) -> dict[str, Any]:
        job = self.server.jobs.resolve(str(params.get("id", "")))
        if job is None:
            raise ConfigError(f"no job {params.get('id')!r}", key="job-info")
        return job.info()

    async def _m_parent_info(self, params: dict[str, Any]) -> dict[str, Any]:
        parent = self.server.jobs.parents.get(str(params.get("id", "")))
        if parent is None:
            raise ConfigError(f"no orchestration {params.get('id')!r}", key="parent")
        return {
            **parent.to_dict(),
            "job_info": [
                self.server.jobs.jobs[j].info() for j in parent.jobs if j in self.server.jobs.jobs
            ],
        }

    async def _m_purge_jobs(self, params: dict[str, Any]) -> dict[str, Any]:
        count = self.server.jobs.purge()
        await self.server.persister.drain()
        # Uploaded files that no remaining job carries go too.
        self.server.files.keep_only(
            f.get("sha256", "") for job in self.server.jobs.jobs.values() for f in job.files
        )
        return {"purged": count}

    async def _m_purge_nodes(self, params: dict[str, Any]) -> dict[str, Any]:
        count = self.server.nodes.purge_offline()
        await self.server.persister.drain()
        return {"purged": count}

    async def _m_analyze(self, params: dict[str, Any]) -> dict[str, Any]:
        jobs = self.server.jobs
        if params.get("job"):
            job = jobs.resolve(str(params["job"]))
            if job is None:
                raise ConfigError(f"no job {params['job']!r}", key="analyze-job")
            return analysis.analyze([job])
        if params.get("parent"):
            parent = jobs.parents.get(str(params["parent"]))
            if parent is None:
                matches = [p for k, p in jobs.parents.items() if k.startswith(params["parent"])]
                parent = matches[0] if len(matches) == 1 else None
            if parent is None:
                raise ConfigError(f"no orchestration {params['parent']!r}", key="analyze-parent")
            return analysis.analyze([jobs.jobs[j] for j in parent.jobs if j in jobs.jobs])
        return analysis.analyze(list(jobs.jobs.values()))


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
