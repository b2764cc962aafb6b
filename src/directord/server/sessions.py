"""One node's session on the server: registration, then its messages.

Every message after ``hello`` is attributed to the identity bound to this
session, never to a name field inside the message: a node can report only on
jobs that target it, and fetch only files of those jobs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from directord import __version__
from directord.errors import ConnectionLost, DirectordError, ProtocolError
from directord.models import State
from directord.protocol import PROTOCOL_VERSION, Envelope
from directord.security.identities import identity_problem
from directord.transports.base import Link

if TYPE_CHECKING:
    from directord.server.app import Server

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
    }
)


class AgentSession:
    """Runs for the lifetime of one node connection."""

    def __init__(self, server: Server, link: Link) -> None:
        self.server = server
        self.link = link
        self.identity = ""
        self._tasks: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[Any] | None = None
        self._close_reason = ""

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
        self.link.post({"t": "refuse", "reason": reason})

    async def run(self) -> None:
        """Register the node, then handle its messages until the link drops."""
        reason = "connection closed"
        registered = False
        self._task = asyncio.current_task()
        try:
            batch = await asyncio.wait_for(self.link.recv(), HELLO_TIMEOUT)
            hello = batch[0] if batch else {}
            problem = self._check_hello(hello)
            if problem:
                self.refuse(problem)
                await self.link.flush(1.0)
                return
            if self.server.nodes.attach(self, hello) is None:
                self.refuse(f"identity {self.identity!r} is already connected")
                await self.link.flush(1.0)
                return
            registered = True
            parked = self.server.parking.owed(self.identity)
            self.link.post(
                {
                    "t": "welcome",
                    "version": __version__,
                    "proto": PROTOCOL_VERSION,
                    "parked": [[job_id, sha] for job_id, sha in parked.items()],
                }
            )
            self.server.node_online(self, hello, parked)
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
                self.server.node_gone(self, self._close_reason or reason)

    def _check_hello(self, hello: Envelope) -> str | None:
        if hello.get("t") != "hello":
            return "first message must be hello"
        identity = hello.get("identity")
        problem = identity_problem(identity)
        if problem or not isinstance(identity, str):
            return problem or "invalid identity"
        if hello.get("proto") != PROTOCOL_VERSION:
            return f"protocol version {hello.get('proto')!r} unsupported (need {PROTOCOL_VERSION})"
        proven = self.link.conn.peer_identity
        if proven is not None and proven != identity:
            return f"identity {identity!r} does not match the credential's {proven!r}"
        self.identity = identity
        return self.server.check_identity(identity)

    async def _handle(self, batch: list[Envelope]) -> None:
        if not batch:
            return
        self.server.nodes.touch(self.identity)
        acks: list[str] = []
        try:
            for env in batch:
                kind = env["t"]
                if kind == "result":
                    acks.append(self._result(env))
                elif kind == "ack":
                    self.server.jobs.mark_delivered(self.identity, [str(i) for i in env["ids"]])
                elif kind == "hb":
                    self.server.nodes.touch(self.identity, persist=True)
                elif kind == "out":
                    self.server.jobs.output(
                        self.identity, str(env["id"]), str(env["s"]), str(env["d"])[:MAX_LINE]
                    )
                elif kind == "req":
                    if len(self._tasks) >= MAX_REQUESTS:
                        # Each answer may carry a 1 MiB file chunk: a node that asks and
                        # never reads would otherwise pile them up in our memory.
                        self._refuse_request(env)
                    else:
                        self._spawn(self._request(env))
                elif kind == "parked":
                    self.server.parked_taken(self, [str(i) for i in env["missing"]])
                elif kind == "qrep":
                    self.server.on_query_report(self.identity, str(env["id"]), env.get("value"))
                else:
                    log.debug("node %s: ignoring unknown message type %r", self.identity, kind)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed message: {type(exc).__name__} {exc}") from None
        if acks:
            link = self.link
            # Acks only let the node prune its journal: no hurry, let them batch.
            self.server.persister.after_flush(
                lambda: link.post({"t": "rack", "ids": acks}, linger=ACK_LINGER)
            )

    def _result(self, env: Envelope) -> str:
        job_id = str(env["id"])
        state = State(env["state"])
        target = self.server.jobs.target_of(job_id, self.identity)
        if target is None:
            log.warning(
                "node %s reported on job %s, which does not target it; ignored",
                self.identity,
                job_id,
            )
            return job_id
        if state not in NODE_STATES:
            raise ValueError(f"state {state} cannot be reported by a node")
        exec_time = env.get("exec_time")
        rc = env.get("rc")
        self.server.jobs.finish(
            self.identity,
            target,
            state,
            rc=int(rc) if rc is not None else None,
            stdout=str(env.get("stdout", "")),
            stderr=str(env.get("stderr", "")),
            exec_time=float(exec_time) if exec_time is not None else None,
        )
        self.server.on_target_final(job_id)
        return job_id

    def _refuse_request(self, env: Envelope) -> None:
        log.warning(
            "node %s has %d requests in flight (limit %d); refused one",
            self.identity,
            len(self._tasks),
            MAX_REQUESTS,
        )
        self.link.post(
            {
                "t": "rep",
                "rid": env.get("rid"),
                "ok": False,
                "err": f"too many requests in flight (limit {MAX_REQUESTS})",
            }
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _request(self, env: Envelope) -> None:
        rid = env.get("rid")
        try:
            result = await self.server.node_request(
                self.identity, str(env["m"]), dict(env.get("p") or {})
            )
            self.link.post({"t": "rep", "rid": rid, "ok": True, "r": result})
        except DirectordError as exc:
            self.link.post({"t": "rep", "rid": rid, "ok": False, "err": str(exc)})
        except Exception as exc:
            log.exception("node %s: request %r failed", self.identity, env.get("m"))
            self.link.post({"t": "rep", "rid": rid, "ok": False, "err": f"server error: {exc}"})
