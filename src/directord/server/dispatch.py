"""Getting jobs to nodes: over a session, through the broker, and giving up on them.

Each job is encoded once and sent to every target that has a session; a
target without one gets it parked in the broker (brokers only) or when it
comes back. When a node (re)registers, what it lost is settled and what waits
for it is sent. A sweeper ends sessions that went silent and targets whose
node stayed away past the job's deadline; a rebooting node's targets wait
for it until the server stops waiting, and then end all at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from directord.models import State
from directord.protocol import Cancel, Hello, Message, encode
from directord.server.jobs import JobBook
from directord.server.nodes import NodeRegistry
from directord.server.parking import ParkingLot
from directord.server.records import JobRecord

log = logging.getLogger(__name__)


class Session(Protocol):
    """What the dispatcher needs of a node's session."""

    @property
    def identity(self) -> str:
        """The node's registered name."""
        ...

    def post_packed(self, packed: bytes) -> None:
        """Queue an encoded message for the node."""
        ...

    def close(self, reason: str) -> None:
        """End the session."""
        ...


class Dispatcher:
    """Sends jobs to their targets and settles the targets that cannot get them."""

    def __init__(
        self,
        jobs: JobBook,
        nodes: NodeRegistry,
        parking: ParkingLot,
        on_target_final: Callable[[str], None],
        heartbeat_interval: float,
    ) -> None:
        self._jobs = jobs
        self._nodes = nodes
        self._parking = parking
        self._on_target_final = on_target_final
        self._heartbeat = heartbeat_interval
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the sweeper."""
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="sweeper")

    async def close(self) -> None:
        """Stop the sweeper."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    def send_to(self, identity: str, message: Message) -> bool:
        """Send a message to a node if it has a session now."""
        session = self._nodes.sessions.get(identity)
        if session is None:
            return False
        session.post_packed(encode(message))
        return True

    def cancel(
        self, job_ids: Iterable[str], *, kill: bool, reason: str
    ) -> dict[str, dict[str, str]]:
        """Cancel jobs on every target where they have not ended: ``{job: {node: what}}``.

        A target whose node does not hold the job (never sent: queued here, or
        parked in the broker, which the node only takes when its welcome lists
        it) is ``cancelled`` here at once. A node that holds it, or may (sent),
        is told (``asked``): it drops the job if it waits, kills it if it runs
        (unless not ``kill``), and reports. A node away now is told when it
        comes back (the request is stored with the job, so a server restart
        keeps it); a job its client starts before that runs.
        """
        what: dict[str, dict[str, str]] = {}
        asks: dict[str, list[str]] = {}
        for job_id in job_ids:
            job = self._jobs.jobs[job_id]
            for identity, target in job.results.items():
                if target.state.final:
                    what.setdefault(job_id, {})[identity] = target.state.value
                elif target.state is State.QUEUED and target.sent is None:
                    self._jobs.finish(identity, target, State.CANCELLED, stderr=reason)
                    self._on_target_final(job_id)
                    what.setdefault(job_id, {})[identity] = State.CANCELLED.value
                else:
                    asks.setdefault(identity, []).append(job_id)
                    what.setdefault(job_id, {})[identity] = "asked"
        for identity, ids in asks.items():
            if not self.send_to(identity, Cancel(ids=ids, kill=kill, reason=reason)):
                # Told when it comes back; stored, so a server restart keeps it owed.
                for job_id in ids:
                    job = self._jobs.jobs[job_id]
                    job.cancels[identity] = [kill, reason]
                    self._jobs.store(job)
        return what

    def deliver(self, records: Iterable[JobRecord]) -> None:
        """Send new jobs to their targets, or park them for the absent ones."""
        for job in records:
            packed = encode(job.message())  # encoded once, sent to every target
            for identity in job.targets:
                session = self._nodes.sessions.get(identity)
                if session is not None:
                    self._send(session, job.id, packed)
                else:
                    self._parking.park(identity, job.id, packed)

    def node_online(self, session: Session, hello: Hello, parked: dict[str, str]) -> None:
        """A node (re)registered: settle what it lost, send what waits for it.

        Jobs in ``parked`` (listed in its welcome) it takes from the broker.
        """
        identity = session.identity
        self._owed_cancels(session)
        known = set(hello.known)
        for target in self._jobs.delivered_to(identity):
            if target.job_id not in known:
                self._jobs.finish(
                    identity,
                    target,
                    State.LOST,
                    stderr=f"node {identity} restarted without the job",
                )
                self._on_target_final(target.job_id)
        direct = 0
        for job in self._jobs.queued_for(identity):
            if job.id in parked:
                self._jobs.mark_sent(job.results[identity])
            else:
                self._send(session, job.id)
                direct += 1
        if direct:
            log.info("node %s: sending %d queued jobs", identity, direct)
        if parked:
            log.info("node %s: %d jobs wait for it in the broker", identity, len(parked))

    def _owed_cancels(self, session: Session) -> None:
        """Tell a node that came back about the cancels made while it was away."""
        identity = session.identity
        for job in self._jobs.pending_jobs(identity):
            owed = job.cancels.pop(identity, None)
            if owed is not None:
                kill, reason = owed
                session.post_packed(encode(Cancel(ids=[job.id], kill=kill, reason=reason)))
                self._jobs.store(job)

    def parked_taken(self, session: Session, missing: list[str]) -> None:
        """The node took its parked jobs; send over the session those it did not find."""
        identity = session.identity
        self._parking.settle(identity)
        resend = [j for j in missing if self._parking.still_queued(identity, j)]
        for job_id in resend:
            self._send(session, job_id)
        if resend:
            log.warning(
                "node %s: %d parked jobs were missing from the broker; sent them directly",
                identity,
                len(resend),
            )

    def _send(self, session: Session, job_id: str, packed: bytes | None = None) -> None:
        job = self._jobs.jobs[job_id]
        self._jobs.mark_sent(job.results[session.identity])
        session.post_packed(packed if packed is not None else encode(job.message()))

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._heartbeat / 2))
            try:
                self.sweep(time.time())
            except Exception:
                log.exception("sweeper pass failed")

    def sweep(self, now: float) -> None:
        """End silent sessions, overdue targets; forget jobs past the retention."""
        for session in self._nodes.expired(now):
            log.warning(
                "node %s silent for 3 heartbeat intervals; marking offline", session.identity
            )
            session.close("silent for 3 heartbeat intervals")
        changed: set[str] = set()
        for identity, until in self._nodes.rebooting().items():
            if now > until:
                changed |= self._reboot_overdue(identity)
        last_seen = {i: r.last_seen for i, r in self._nodes.records.items()}
        held = frozenset(self._nodes.rebooting())
        changed |= self._jobs.sweep(now, last_seen, set(self._nodes.sessions), held)
        for job_id in changed:
            self._on_target_final(job_id)
        self._jobs.forget_ended(now)

    def _reboot_overdue(self, identity: str) -> set[str]:
        """Stop waiting for a rebooting node; if it is away, end the jobs it owes."""
        self._nodes.end_rebooting(identity)
        grace = self._nodes.reboot_grace
        if identity in self._nodes.sessions:
            # Its client never went away: the machine did not reboot. Its jobs go on.
            log.warning(
                "node %s was to reboot but its client is still connected; no longer waiting",
                identity,
            )
            return set()
        log.error("node %s did not come back from its reboot; ending its jobs", identity)
        return self._jobs.give_up(
            identity,
            f"node {identity} did not come back from its reboot (REBOOT's seconds plus "
            f"--reboot-grace {grace:g}s)",
        )
