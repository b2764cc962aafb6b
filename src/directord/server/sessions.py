"""One node's session on the server: registration, then its messages.

Every message after ``hello`` is attributed to the identity bound to this
session, never to a name field inside the message: a node can report only on
jobs that target it, and fetch only files of those jobs. Messages arrive
typed (protocol.messages) and are dispatched through a table keyed by type;
a kind a node may not send fails at decode, and ends the session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from directord import __version__
from directord.errors import ConnectionLost, DirectordError, ProtocolError
from directord.models import State
from directord.protocol import (
    PROTOCOL_VERSION,
    Ack,
    Heartbeat,
    Hello,
    Message,
    Output,
    ParkedTaken,
    QueryReport,
    Refuse,
    Reply,
    Request,
    Result,
    ResultAck,
    Welcome,
)
from directord.security.identities import identity_problem
from directord.server.dispatch import Dispatcher
from directord.server.hooks import ComponentHooks
from directord.server.jobs import JobBook
from directord.server.nodes import NodeRegistry
from directord.server.parking import ParkingLot
from directord.server.persist import Persister
from directord.server.proxies import UnitProxies
from directord.transports.base import Link

log = logging.getLogger(__name__)
HELLO_TIMEOUT = 10.0
# Requests (file chunks, job status) one node may have unanswered at once; its agent
# keeps a window of 4 chunks per transfer.
MAX_REQUESTS = 64
# Characters of one live output line forwarded to watchers (a longer one is cut).
MAX_LINE = 64 * 1024
ACK_LINGER = 0.05
# States a node may report for itself; undelivered is only ever the server's call.
NODE_STATES = frozenset(
    {
        State.SUCCESS,
        State.FAILED,
        State.TIMEOUT,
        State.SKIPPED_CACHE,
        State.SKIPPED_PARENT,
        State.LOST,
        State.CANCELLED,
    }
)


@dataclass(frozen=True, slots=True)
class SessionParts:
    """The parts of the server a node's session works with."""

    nodes: NodeRegistry
    jobs: JobBook
    persister: Persister
    parking: ParkingLot
    dispatcher: Dispatcher
    hooks: ComponentHooks
    #: cross-node unit dependencies (``unit_proxy`` requests)
    proxies: UnitProxies
    #: why an identity may not register (the allow-list), or None
    admit: Callable[[str], str | None]


class AgentSession:
    """Runs for the lifetime of one node connection."""

    def __init__(self, parts: SessionParts, link: Link) -> None:
        self.parts = parts
        self.link = link
        self.identity = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[Any] | None = None
        self._close_reason = ""
        self._handlers: dict[type[Message], Callable[[Any], str | None]] = {
            Result: self._on_result,
            Ack: self._on_ack,
            Heartbeat: self._on_heartbeat,
            Output: self._on_output,
            Request: self._on_request,
            ParkedTaken: self._on_parked,
            QueryReport: self._on_report,
            Hello: self._on_second_hello,
        }

    def post_packed(self, packed: bytes) -> None:
        """Queue an encoded message for the node."""
        self.link.post_packed(packed)

    def close(self, reason: str) -> None:
        """End the session from outside (a silent node); its stream is cancelled.

        Closing the link alone would leave :meth:`run` blocked on a read from a
        peer that says nothing, with the node still listed online.
        """
        self._close_reason = reason
        if self._task is not None:
            self._task.cancel()

    def refuse(self, reason: str) -> None:
        """Tell the peer why it is turned away (the caller then closes)."""
        log.warning("refused node from %s: %s", self.link.conn.peer, reason)
        self.link.post(Refuse(reason=reason))

    async def run(self) -> None:
        """Register the node, then handle its messages until the link drops."""
        reason = "connection closed"
        registered = False
        self._task = asyncio.current_task()
        try:
            batch = await asyncio.wait_for(self.link.recv(), HELLO_TIMEOUT)
            hello = batch[0] if batch else None
            problem = self._check_hello(hello)
            if problem or not isinstance(hello, Hello):
                self.refuse(problem or "first message must be hello")
                await self.link.flush(1.0)
                return
            parts = self.parts
            if parts.nodes.attach(self, hello) is None:
                self.refuse(f"identity {self.identity!r} is already connected")
                await self.link.flush(1.0)
                return
            registered = True
            parked = parts.parking.owed(self.identity)
            self.link.post(
                Welcome(version=__version__, proto=PROTOCOL_VERSION, parked=list(parked.items()))
            )
            parts.dispatcher.node_online(self, hello, parked)
            await self._handle(batch[1:])
            while True:
                await self._handle(await self.link.recv())
        except TimeoutError:
            reason = f"no hello within {HELLO_TIMEOUT:.0f}s"
            log.warning("node from %s: %s", self.link.conn.peer, reason)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            log.warning(
                "node %s (%s): %s; closing its stream",
                self.identity or "?",
                self.link.conn.peer,
                reason,
            )
        except asyncio.CancelledError:
            if not self._close_reason:
                raise
            # Our own close(): return normally so that the transport ends the
            # stream and the peer sees it (a cancelled handler leaves it hanging).
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
        except ConnectionLost as exc:
            reason = str(exc)
            if not registered:
                # e.g. gRPC refused an oversized message before it reached us
                log.warning(
                    "node from %s: stream closed before registering: %s",
                    self.link.conn.peer,
                    reason,
                )
        finally:
            for task in self._tasks:
                task.cancel()
            await self.link.close()
            if registered:
                self.parts.nodes.detach(self, self._close_reason or reason)

    def _check_hello(self, hello: object) -> str | None:
        if not isinstance(hello, Hello):
            return "first message must be hello"
        problem = identity_problem(hello.identity)
        if problem:
            return problem
        if hello.proto != PROTOCOL_VERSION:
            return (
                f"protocol version {hello.proto} is not this server's {PROTOCOL_VERSION}: "
                "run the same directord version on the server and the nodes"
            )
        proven = self.link.conn.peer_identity
        if proven is not None and proven != hello.identity:
            return f"identity {hello.identity!r} does not match the credential's {proven!r}"
        self.identity = hello.identity
        return self.parts.admit(hello.identity)

    async def _handle(self, batch: list[Message]) -> None:
        if not batch:
            return
        self.parts.nodes.touch(self.identity)
        acks = [job_id for message in batch if (job_id := self._handlers[type(message)](message))]
        if acks:
            link = self.link
            # Acks only let the node prune its journal: no hurry, let them batch.
            self.parts.persister.after_flush(
                lambda: link.post(ResultAck(ids=acks), linger=ACK_LINGER)
            )

    # ---- handlers: each returns the id of a result to acknowledge, or None -----------------
    def _on_result(self, result: Result) -> str:
        jobs = self.parts.jobs
        target = jobs.target_of(result.id, self.identity)
        if target is None:
            log.warning(
                "node %s reported on job %s, which does not target it; ignored",
                self.identity,
                result.id,
            )
            return result.id
        if result.state not in NODE_STATES:
            raise ProtocolError(f"state {result.state} cannot be reported by a node")
        # A result sent again (its ack was lost) is no news to the component.
        fresh = not target.state.final
        jobs.finish(
            self.identity,
            target,
            result.state,
            rc=result.rc,
            stdout=result.stdout,
            stderr=result.stderr,
            exec_time=result.exec_time,
            reported=True,
        )
        if fresh:
            self.parts.hooks.on_result(self.identity, result.id, result.state, result.started)
        self.parts.hooks.on_target_final(result.id)
        return result.id

    def _on_ack(self, ack: Ack) -> None:
        self.parts.jobs.mark_delivered(self.identity, ack.ids)

    def _on_heartbeat(self, _: Heartbeat) -> None:
        self.parts.nodes.touch(self.identity, persist=True)

    def _on_output(self, out: Output) -> None:
        self.parts.jobs.output(self.identity, out.id, out.stream, out.data[:MAX_LINE])

    def _on_request(self, request: Request) -> None:
        if len(self._tasks) >= MAX_REQUESTS:
            # Each answer may carry a 1 MiB file chunk: a node that asks and never
            # reads would otherwise pile them up in our memory.
            log.warning(
                "node %s has %d requests in flight (limit %d); refused one",
                self.identity,
                len(self._tasks),
                MAX_REQUESTS,
            )
            self.link.post(
                Reply(
                    rid=request.rid,
                    ok=False,
                    error=f"too many requests in flight (limit {MAX_REQUESTS})",
                )
            )
        else:
            self._spawn(self._answer(request))

    def _on_parked(self, parked: ParkedTaken) -> None:
        self.parts.dispatcher.parked_taken(self, parked.missing)

    def _on_report(self, report: QueryReport) -> None:
        self.parts.hooks.report(self.identity, report.id, report.value)

    def _on_second_hello(self, _: Hello) -> None:
        raise ProtocolError("hello after registration")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, request: Request) -> None:
        try:
            if request.method == "unit_proxy":  # not about a job: a proxy unit's request
                result = await self.parts.proxies.request(self.identity, request.params)
            else:
                result = await self.parts.hooks.request(
                    self.identity, request.method, request.params
                )
            self.link.post(Reply(rid=request.rid, ok=True, result=result))
        except DirectordError as exc:
            self.link.post(Reply(rid=request.rid, ok=False, error=str(exc)))
        except Exception as exc:
            log.exception("node %s: request %r failed", self.identity, request.method)
            self.link.post(Reply(rid=request.rid, ok=False, error=f"server error: {exc}"))
