"""Jobs left in the broker for nodes that are away (broker drivers only).

When a job targets a node without a session, the server parks its message in
the broker (a JetStream stream, a durable RabbitMQ queue) so that it waits
there. The datastore stays the record of what is owed: when the node returns,
its welcome lists the parked jobs still owed, each with the SHA-256 of its
message, and the node runs a parked message only when both match. A message
the broker lost, or one parked by someone else, is never run from the broker;
the node reports what it did not find and the server sends those jobs over the
session instead. Parking order is submission order (one worker publishes).
The record of what is parked is stored too (namespace ``parked``), so after a
server restart parked jobs still come from the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from directord.errors import ConnectionLost
from directord.models import State
from directord.protocol import join_packed, message_digest
from directord.server.jobs import JobBook
from directord.server.persist import Persister
from directord.transports import Transport

log = logging.getLogger(__name__)
NS = "parked"


@dataclass(frozen=True)
class ParkedJob:
    """One job message waiting in the broker for one node."""

    identity: str
    job_id: str
    digest: str

    @property
    def key(self) -> str:
        return f"{self.identity}/{self.job_id}"  # identities hold no "/"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ParkingLot:
    """Parks jobs for offline nodes and remembers which ones, per node."""

    def __init__(
        self,
        transport: Transport,
        jobs: JobBook,
        persister: Persister,
        online: Callable[[str], bool],
    ) -> None:
        self.transport = transport
        self.jobs = jobs
        self.persister = persister
        self.online = online
        # identity -> {job id: digest}, in parking order
        self.parked: dict[str, dict[str, str]] = {}
        self._pending: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

    def load(self, records: Mapping[str, Any]) -> None:
        """Take back the stored record (server start)."""
        for key, value in records.items():
            try:
                job = ParkedJob(str(value["identity"]), str(value["job_id"]), str(value["digest"]))
            except (KeyError, TypeError) as exc:
                log.warning("ignored a malformed parked record %r: %s", key, exc)
                continue
            self.parked.setdefault(job.identity, {})[job.job_id] = job.digest

    def start(self) -> None:
        self._worker = asyncio.create_task(self._run(), name="parking")

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    def park(self, identity: str, job_id: str, packed: bytes) -> None:
        """Queue a packed job envelope for an offline node (no-op when the driver cannot)."""
        if self.transport.parks:
            self._pending.put_nowait((identity, job_id, join_packed([packed])))

    def still_queued(self, identity: str, job_id: str) -> bool:
        target = self.jobs.target_of(job_id, identity)
        return target is not None and target.state is State.QUEUED

    async def _run(self) -> None:
        while True:
            identity, job_id, message = await self._pending.get()
            # Back in the meantime: the session sends it (node_online).
            if self.online(identity) or not self.still_queued(identity, job_id):
                continue
            try:
                await self.transport.park(identity, job_id, message)
            except ConnectionLost as exc:
                log.warning(
                    "job %s for node %s stays in the datastore only (not parked: %s)",
                    job_id,
                    identity,
                    exc,
                )
                continue
            job = ParkedJob(identity, job_id, message_digest(message))
            self.parked.setdefault(identity, {})[job_id] = job.digest
            self.persister.put(NS, job.key, job)

    def owed(self, identity: str) -> dict[str, str]:
        """Parked jobs the node is still owed (job id -> digest), in parking order."""
        parked = self.parked.get(identity)
        if not parked:
            return {}
        for job_id in [j for j in parked if not self.still_queued(identity, j)]:
            del parked[job_id]
            self.persister.delete(NS, ParkedJob(identity, job_id, "").key)
        if not parked:
            del self.parked[identity]
            return {}
        # Submission order (parking order is lost in a stored record).
        order = sorted(parked, key=lambda j: self.jobs.jobs[j].order)
        return {j: parked[j] for j in order}

    def settle(self, identity: str) -> None:
        """The node took what it could from the broker; nothing is parked for it now."""
        for job_id in self.parked.pop(identity, {}):
            self.persister.delete(NS, ParkedJob(identity, job_id, "").key)
