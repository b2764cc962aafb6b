"""Jobs left in the broker for nodes that are away (broker drivers only).

When a job targets a node without a session, the server parks its message in
the broker (a JetStream stream, a durable RabbitMQ queue) so that it waits
there. The datastore stays the record of what is owed: when the node returns,
its welcome lists the parked jobs still owed, each with the SHA-256 of its
message, and the node runs a parked message only when both match. A message
the broker lost, or one parked by someone else, is never run from the broker;
the node reports what it did not find and the server sends those jobs over the
session instead. Parking order is submission order (one worker publishes).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable

from directord.errors import ConnectionLost
from directord.models import State
from directord.protocol import join_packed
from directord.server.jobs import JobBook
from directord.transports import Transport

log = logging.getLogger(__name__)


def digest(message: bytes) -> str:
    """What a node checks a parked message against."""
    return hashlib.sha256(message).hexdigest()


class ParkingLot:
    """Parks jobs for offline nodes and remembers which ones, per node."""

    def __init__(self, transport: Transport, jobs: JobBook, online: Callable[[str], bool]) -> None:
        self.transport = transport
        self.jobs = jobs
        self.online = online
        # identity -> {job id: digest}, in parking order
        self.parked: dict[str, dict[str, str]] = {}
        self._pending: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None

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
            self.parked.setdefault(identity, {})[job_id] = digest(message)

    def owed(self, identity: str) -> dict[str, str]:
        """Parked jobs the node is still owed (job id -> digest), in parking order."""
        parked = self.parked.get(identity)
        if not parked:
            return {}
        live = {j: d for j, d in parked.items() if self.still_queued(identity, j)}
        if live:
            self.parked[identity] = live
        else:
            del self.parked[identity]
        return live

    def settle(self, identity: str) -> None:
        """The node took what it could from the broker; nothing is parked for it now."""
        self.parked.pop(identity, None)
