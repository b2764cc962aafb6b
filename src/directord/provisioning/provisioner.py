"""The provisioner: finds waiting nodes, runs the helper, configures and restarts them.

Nodes connect over TLS and announce themselves with the shared token (compared
in constant time, never logged). Each admitted node waits in a queue; a
bounded pool of workers takes them one at a time: inventory, CSR (its name
must be the node's identity), helper, configure, restart, then, when the
server's API socket is reachable, confirm that the node joined the cluster.
A periodic sweep queues again the nodes that are still waiting (deferred,
or missed after an error). Pausing stops the workers taking nodes; nodes
keep waiting and nothing is lost.

Enrolled identities (with their machine id) and rejected ones are kept in
``--provisioner-state``: an identity enrolled with another machine id is
refused, and a rejected node is refused until ``provisioner clear NAME``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import ssl
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from directord.config import Settings
from directord.errors import CertificateError, ConfigError, DirectordError, ProtocolError
from directord.protocol import FrameDecoder, frame
from directord.protocol.provisioning import (
    FROM_PROVISIONING_NODE,
    MAX_PROVISIONING_FRAME,
    Announce,
    Answer,
    Ask,
    Refused,
)
from directord.provisioning.helpers import BuiltinHelper, Decision, HelperError, run_program
from directord.provisioning.metrics import Metrics
from directord.provisioning.node import write_atomic
from directord.security.identities import identity_problem
from directord.security.pki import parse_request

log = logging.getLogger(__name__)
HELLO_TIMEOUT = 10.0  # a connection must announce itself within this
RPC_TIMEOUT = 30.0
SWEEP_EVERY = 5.0
JOIN_TIMEOUT = 60.0
MAX_WAITING = 50_000  # connections waiting at once
FLOOD = 50  # messages a node may send in FLOOD_WINDOW seconds
FLOOD_WINDOW = 5.0


class RpcError(DirectordError):
    """A request to a node failed: it answered an error, went away or said nothing."""


@dataclass(eq=False)
class NodeConn:
    """One waiting node's connection."""

    identity: str
    machine_id: str
    writer: asyncio.StreamWriter
    asks: dict[int, asyncio.Future[Answer]] = field(default_factory=dict)
    rid: int = 0
    closed: bool = False

    async def ask(self, method: str, params: dict[str, Any] | None = None) -> Any:
        if self.closed:
            raise RpcError(f"{self.identity} went away")
        self.rid += 1
        fut: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self.asks[self.rid] = fut
        try:
            self.writer.write(frame([Ask(rid=self.rid, method=method, params=params or {})]))
            await self.writer.drain()
            answer = await asyncio.wait_for(fut, RPC_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise RpcError(f"{self.identity}: {method}: {exc or 'no answer'}") from None
        finally:
            self.asks.pop(self.rid, None)
        if not answer.ok:
            raise RpcError(f"{self.identity}: {method}: {answer.error}")
        return answer.result

    def refuse(self, reason: str) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.write(frame([Refused(reason=reason)]))
        self.close()

    def close(self) -> None:
        self.closed = True
        for fut in self.asks.values():
            if not fut.done():
                fut.set_exception(RpcError(f"{self.identity} went away"))
        with contextlib.suppress(OSError, RuntimeError):
            self.writer.close()


class Book:
    """Enrolled (identity -> machine id) and rejected (identity -> why) nodes, on disk."""

    def __init__(self, folder: str) -> None:
        self.path = Path(folder) / "provisioner.json"
        self.enrolled: dict[str, str] = {}
        self.rejected: dict[str, str] = {}
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: unreadable state: {exc}",
                              key="provisioner_state") from None  # fmt: skip
        self.enrolled = dict(data.get("enrolled", {}))
        self.rejected = dict(data.get("rejected", {}))

    def save(self) -> None:
        data = {"enrolled": self.enrolled, "rejected": self.rejected}
        write_atomic(self.path, json.dumps(data, sort_keys=True).encode(), 0o600)


class Provisioner:
    """Serves provisioning-mode nodes until stopped."""

    def __init__(self, settings: Settings, *, confirm: bool = True) -> None:
        if not settings.provisioning_token:
            raise ConfigError(
                "the provisioner needs --provisioning-token", key="provisioning_token"
            )
        if not settings.provisioning_ssl_cert or not settings.provisioning_ssl_key:
            raise ConfigError(
                "the provisioner needs --provisioning-ssl-cert and --provisioning-ssl-key",
                key="provisioning_ssl_cert",
            )
        self.settings = settings
        self.token = settings.provisioning_token.encode()
        self.metrics = Metrics()
        self.book = Book(settings.provisioner_state)
        self.builtin = (
            BuiltinHelper(settings.pki_dir, settings.node_config, settings.provisioning_cert_days)
            if settings.helper == "builtin"
            else None
        )
        self.confirm = confirm
        self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.tls.load_cert_chain(settings.provisioning_ssl_cert, settings.provisioning_ssl_key)
        self.waiting: dict[str, NodeConn] = {}
        self.queue: asyncio.Queue[str] = asyncio.Queue()
        self.queued: set[str] = set()
        self.busy: set[str] = set()
        self.deferred: dict[str, float] = {}
        self.seen: set[str] = set()
        self.provisioned: dict[str, float] = {}
        self.unpaused = asyncio.Event()
        self.unpaused.set()
        self.port = 0
        self._server: asyncio.Server | None = None
        self._control: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        await asyncio.to_thread(
            Path(s.provisioner_state).mkdir, parents=True, exist_ok=True, mode=0o700
        )
        self._server = await asyncio.start_server(
            self._serve, s.provisioning_bind, s.provisioning_port, ssl=self.tls,
            limit=MAX_PROVISIONING_FRAME, ssl_handshake_timeout=HELLO_TIMEOUT,
        )  # fmt: skip
        self.port = int(self._server.sockets[0].getsockname()[1])
        await self._start_control()
        if s.metrics_port:
            self.metrics.serve(s.metrics_port, s.metrics_bind)
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(s.provisioner_workers)]
        self._tasks.append(asyncio.create_task(self._sweeper()))
        log.info(
            "provisioner on %s:%d (helper %s, %d workers)",
            s.provisioning_bind, self.port, s.helper, s.provisioner_workers,
        )  # fmt: skip

    async def stop(self) -> None:
        for server in (self._server, self._control):
            if server is not None:
                server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self.waiting.values()):
            conn.close()
        with contextlib.suppress(OSError):
            os.unlink(self.settings.provisioner_socket)

    # ---- connections -----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(FROM_PROVISIONING_NODE, MAX_PROVISIONING_FRAME)
        conn: NodeConn | None = None
        window_start, count = time.monotonic(), 0
        try:
            while True:
                timeout = HELLO_TIMEOUT if conn is None else None
                data = await asyncio.wait_for(reader.read(65536), timeout)
                if not data:
                    return
                for batch in decoder.feed(data):
                    for message in batch:
                        count += 1
                        if time.monotonic() - window_start > FLOOD_WINDOW:
                            window_start, count = time.monotonic(), 1
                        if count > FLOOD:
                            self.metrics.count("refused")
                            log.warning("a node flooded the provisioner; closed")
                            return
                        if isinstance(message, Announce):
                            conn = self._announce(message, writer, conn)
                            if conn is None:
                                return
                        elif conn is not None:
                            fut = conn.asks.get(message.rid)
                            if fut is not None and not fut.done():
                                fut.set_result(message)
                        else:
                            raise ProtocolError("an answer before any announcement")
        except (ProtocolError, TimeoutError, OSError, ssl.SSLError) as exc:
            self.metrics.count("refused")
            log.info("provisioning connection refused: %s", str(exc)[:200])
        finally:
            if conn is not None:
                conn.close()
                if self.waiting.get(conn.identity) is conn:
                    del self.waiting[conn.identity]
            else:
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()

    def _announce(
        self, message: Announce, writer: asyncio.StreamWriter, conn: NodeConn | None
    ) -> NodeConn | None:
        """Admit (or refresh) an announced node; None when it is refused."""
        if not hmac.compare_digest(message.token.encode(), self.token):
            self.metrics.count("refused")
            log.warning("refused an announcement for %r: wrong token", message.identity[:80])
            writer.write(frame([Refused(reason="wrong provisioning token")]))
            return None
        identity = message.identity
        problem = identity_problem(identity)
        if problem or (conn is not None and conn.identity != identity):
            self.metrics.count("refused")
            writer.write(frame([Refused(reason=problem or "one connection, one identity")]))
            return None
        if identity in self.book.rejected:
            writer.write(frame([Refused(reason=f"rejected: {self.book.rejected[identity]}")]))
            return None
        enrolled = self.book.enrolled.get(identity)
        if enrolled is not None and enrolled != message.machine_id:
            self.metrics.count("refused")
            log.warning("refused %s: enrolled already with another machine id", identity)
            writer.write(frame([Refused(
                reason=f"{identity} is enrolled already, with another machine id")]))  # fmt: skip
            return None
        if conn is not None:
            return conn  # the same node, still waiting
        if len(self.waiting) >= MAX_WAITING and identity not in self.waiting:
            self.metrics.count("refused")
            writer.write(frame([Refused(reason="too many nodes waiting; try again later")]))
            return None
        old = self.waiting.get(identity)
        if old is not None:
            old.close()
        conn = NodeConn(identity, message.machine_id, writer)
        self.waiting[identity] = conn
        if identity not in self.seen:
            self.seen.add(identity)
            self.metrics.count("discovered")
        self._enqueue(identity)
        return conn

    def _enqueue(self, identity: str) -> None:
        if identity in self.queued or identity in self.busy:
            return
        self.queued.add(identity)
        self.queue.put_nowait(identity)
        self.metrics.queue_depth.set(self.queue.qsize())

    async def _sweeper(self) -> None:
        """Queue again the nodes still waiting: deferred ones, and any missed."""
        while True:
            await asyncio.sleep(SWEEP_EVERY)
            now = time.monotonic()
            for identity in list(self.waiting):
                if now - self.deferred.get(identity, 0.0) >= SWEEP_EVERY:
                    self._enqueue(identity)

    # ---- workers ---------------------------------------------------------------------
    async def _worker(self) -> None:
        while True:
            await self.unpaused.wait()
            identity = await self.queue.get()
            self.queued.discard(identity)
            self.metrics.queue_depth.set(self.queue.qsize())
            if not self.unpaused.is_set():  # paused while waiting for the queue: put it back
                self._enqueue(identity)
                continue
            conn = self.waiting.get(identity)
            if conn is None or conn.closed:
                continue
            self.busy.add(identity)
            self.metrics.busy_workers.set(len(self.busy))
            try:
                await self._provision(conn)
            except RpcError as exc:
                self.metrics.count("rpc_errors")
                log.warning("provisioning %s: %s", identity, exc)
            except Exception:
                log.exception("provisioning %s failed", identity)
            finally:
                self.busy.discard(identity)
                self.metrics.busy_workers.set(len(self.busy))

    async def _provision(self, conn: NodeConn) -> None:
        identity = conn.identity
        inventory = await conn.ask("inventory")
        if not isinstance(inventory, dict):
            raise RpcError(f"{identity}: inventory is not a mapping")
        csr = (await conn.ask("gencsr") or {}).get("csr")
        try:
            request = parse_request(str(csr or "").encode(), f"{identity}'s CSR")
        except (CertificateError, ConfigError) as exc:
            self.metrics.count("refused")
            conn.refuse(f"bad CSR: {exc}")
            return
        if request.name != identity:
            self.metrics.count("refused")
            conn.refuse(f"the CSR is for {request.name!r}, not {identity!r}")
            return
        decision = await self._decide(identity, request, inventory, str(csr))
        if decision is None:
            return
        await conn.ask(
            "configure",
            {"certificate": decision.certificate, "ca": decision.ca,
             "configuration": decision.configuration},
        )  # fmt: skip
        self.book.enrolled[identity] = conn.machine_id
        await asyncio.to_thread(self.book.save)
        await conn.ask("restart")
        conn.close()
        self.waiting.pop(identity, None)
        self.deferred.pop(identity, None)
        if self.confirm and not await self._joined(identity):
            log.warning("%s restarted but did not join the cluster within %gs", identity,
                        JOIN_TIMEOUT)  # fmt: skip
            return
        self.provisioned[identity] = time.time()
        self.metrics.count("provisioned")
        log.info("provisioned %s", identity)

    async def _decide(
        self, identity: str, request: Any, inventory: dict[str, Any], csr: str
    ) -> Decision | None:
        """Run the helper; None when the node is deferred or rejected."""
        started = time.perf_counter()
        try:
            if self.builtin is not None:
                decision = await asyncio.to_thread(self.builtin.decide, request, inventory)
            else:
                decision = await run_program(
                    self.settings.helper,
                    {"identity": identity, "csr": csr, "inventory": inventory},
                    self.settings.helper_timeout,
                )
            if not (decision.defer or decision.reject):
                _check_certificate(decision.certificate, identity)
        except HelperError as exc:
            self.metrics.count("helper_errors")
            self.metrics.count("deferred")
            self.deferred[identity] = time.monotonic()
            log.error("helper failed for %s: %s; deferred", identity, exc)
            return None
        finally:
            self.metrics.helper_seconds.observe(time.perf_counter() - started)
        if decision.reject:
            self.metrics.count("rejected")
            self.book.rejected[identity] = decision.msg or "rejected by the helper"
            await asyncio.to_thread(self.book.save)
            log.warning("rejected %s: %s", identity, decision.msg)
            conn = self.waiting.pop(identity, None)
            if conn is not None:
                conn.refuse(f"rejected: {decision.msg}")
            return None
        if decision.defer:
            self.metrics.count("deferred")
            self.deferred[identity] = time.monotonic()
            log.info("deferred %s: %s", identity, decision.msg)
            return None
        return decision

    async def _joined(self, identity: str) -> bool:
        """Whether the node shows online on the server (when its API socket is here)."""
        from directord.connect import APIClient

        if not await asyncio.to_thread(os.path.exists, self.settings.socket_path):
            return True  # no server here to ask: restarting is as far as we see
        deadline = time.monotonic() + JOIN_TIMEOUT
        with contextlib.suppress(DirectordError, OSError):
            async with APIClient(self.settings.socket_path) as client:
                while time.monotonic() < deadline:
                    rows = await client.call("nodes")
                    if any(r["identity"] == identity and r["status"] == "online" for r in rows):
                        return True
                    await asyncio.sleep(0.5)
        return False

    # ---- control (pause, resume, status, clear) ---------------------------------------
    async def _start_control(self) -> None:
        path = self.settings.provisioner_socket
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self._control = await asyncio.start_unix_server(self._command, path=path, limit=4096)
        finally:
            os.umask(old)

    async def _command(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            request = json.loads(line)
            reply = await self.control(str(request.get("cmd")), str(request.get("name", "")))
        except (ValueError, TimeoutError, AttributeError) as exc:
            reply = {"ok": False, "error": f"bad command: {exc}"}
        with contextlib.suppress(OSError):
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
            writer.close()

    async def control(self, cmd: str, name: str = "") -> dict[str, Any]:
        """One control command: pause, resume, status or clear NAME."""
        if cmd == "pause":
            self.unpaused.clear()
            self.metrics.paused.set(1)
            log.warning("paused: nodes wait, none is provisioned")
        elif cmd == "resume":
            self.unpaused.set()
            self.metrics.paused.set(0)
            log.warning("resumed")
        elif cmd == "clear":
            if name not in self.book.rejected:
                return {"ok": False, "error": f"{name} is not rejected"}
            del self.book.rejected[name]
            await asyncio.to_thread(self.book.save)
        elif cmd != "status":
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        return {"ok": True, **self.status()}

    def status(self) -> dict[str, Any]:
        counters = {name: self.metrics.value(name) for name in self.metrics.counters}
        return {
            "paused": not self.unpaused.is_set(),
            "waiting": sorted(self.waiting),
            "queue": self.queue.qsize(),
            "busy": sorted(self.busy),
            "rejected": self.book.rejected,
            "enrolled": len(self.book.enrolled),
            "counters": counters,
        }


def _check_certificate(pem: str, identity: str) -> None:
    """A helper's certificate must be for the node's identity (a helper bug, else)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError:
        raise HelperError("the helper's certificate does not parse") from None
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names or names[0].value != identity:
        raise HelperError(f"the helper's certificate is not for {identity}")


async def run_provisioner(settings: Settings, stop: Awaitable[Any]) -> None:
    """Start, serve until ``stop`` completes, then stop."""
    provisioner = Provisioner(settings)
    await provisioner.start()
    ready = settings.ready_file
    if ready:
        write_atomic(Path(ready), json.dumps({"port": provisioner.port}).encode() + b"\n", 0o644)
    try:
        await stop
    finally:
        await provisioner.stop()
