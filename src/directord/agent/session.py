"""One session of the agent with the server: register, then serve until it ends.

The agent sends ``hello``; the server answers ``welcome`` (or ``refuse``).
Then results the server has not acknowledged are sent again, parked jobs are
taken from the broker, and what the server sends is dispatched through a
table keyed by message type, while heartbeats go out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from directord import __version__
from directord.agent.cache import NodeCache
from directord.agent.lanes import Lanes
from directord.agent.runner import JobRunner
from directord.agent.uplink import Uplink
from directord.config import Settings
from directord.errors import ConnectionLost, ProtocolError, Refused
from directord.protocol import (
    FROM_SERVER,
    PROTOCOL_VERSION,
    Ack,
    Cancel,
    Heartbeat,
    Hello,
    Job,
    Message,
    ParkedTaken,
    QueryData,
    Refuse,
    Reply,
    ResultAck,
    Welcome,
    message_digest,
)
from directord.transports import Link, Transport

log = logging.getLogger(__name__)
WELCOME_TIMEOUT = 10.0
#: Verbs that run at once, past every lane.
# UNIT (`directord units`): an operator's systemctl, answered at once whatever the
# node's queues hold; a `units monitor` job never holds a lane for its long life.
RUN_AT_ONCE = frozenset({"QUEUESENTINEL", "UNIT"})


class Session:
    """The agent's side of one connection to the server."""

    def __init__(
        self,
        settings: Settings,
        transport: Transport,
        cache: NodeCache,
        uplink: Uplink,
        lanes: Lanes,
        runner: JobRunner,
        stop: asyncio.Event,
        on_registered: Callable[[], None],
        started: float,
    ) -> None:
        self.settings = settings
        self.identity = settings.resolved_identity()
        self.transport = transport
        self.cache = cache
        self.uplink = uplink
        self.lanes = lanes
        self.runner = runner
        self._stop = stop
        self._on_registered = on_registered
        self.started = started
        self._handlers: dict[type[Message], Callable[[Any], Ack | None]] = {
            Job: self._on_job,
            ResultAck: lambda m: self.cache.set_acked(m.ids),
            Reply: self.uplink.on_reply,
            QueryData: self.uplink.on_query_data,
            Cancel: self._on_cancel,
            Refuse: self._on_refuse,
            Welcome: self._on_second_welcome,
        }

    async def run(self) -> None:
        """Register and serve until the link drops or the agent stops.

        Raises:
            Refused: the server turned us away.
            ConnectError, ConnectionLost, ProtocolError: the link failed.
        """
        conn = await self.transport.connect()
        link = Link(conn, FROM_SERVER, f"server@{conn.peer}")
        try:
            link.post(self._hello())
            first = await asyncio.wait_for(link.recv(), WELCOME_TIMEOUT)
            welcome = first[0] if first else None
            if not isinstance(welcome, Welcome):
                reason = welcome.reason if isinstance(welcome, Refuse) else "no welcome"
                log.error("server refused this client: %s", reason)
                raise Refused(reason)
            self.uplink.attach(link)
            log.info("registered with %s as %s", conn.peer, self.identity)
            self._on_registered()
            link.post_many(list(self.cache.unacked_results()))
            if welcome.parked:
                await self._take_parked(dict(welcome.parked))
            self._handle(first[1:])
            await self._serve(link)
        except TimeoutError:
            raise ConnectionLost("no answer to hello") from None
        finally:
            self.uplink.detach()
            await link.close()

    def _hello(self) -> Hello:
        return Hello(
            proto=PROTOCOL_VERSION,
            identity=self.identity,
            machine_id=_machine_id(self.settings),
            version=__version__,
            driver=self.transport.name,
            heartbeat_interval=self.settings.heartbeat_interval,
            host_boot=_host_boot(),
            agent_start=self.started,
            known=self.cache.unacked_ids(),
        )

    async def _serve(self, link: Link) -> None:
        stop_wait = asyncio.ensure_future(self._stop.wait())
        heartbeats = asyncio.ensure_future(self._heartbeats(link))
        try:
            while True:
                recv = asyncio.ensure_future(link.recv())
                done, _ = await asyncio.wait({recv, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    recv.cancel()
                    await link.flush(2.0)
                    return
                self._handle(recv.result())
        finally:
            heartbeats.cancel()
            stop_wait.cancel()

    async def _heartbeats(self, link: Link) -> None:
        while not link.closed:
            await asyncio.sleep(self.settings.heartbeat_interval)
            link.post(Heartbeat())
            if self.cache.prune_acked() is not None:
                self.cache.commit()

    async def _take_parked(self, owed: dict[str, str]) -> None:
        """Run the jobs the server parked in the broker while this node was away.

        Only a message the welcome lists, with the digest it gives, is taken: the
        server's word, over this authenticated session, decides what runs.
        Anything else found there is stale or forged and is dropped.
        """
        wanted = dict(owed)

        async def take(job_id: str, message: bytes) -> None:
            sha = wanted.get(job_id)
            if sha is None:
                return
            if message_digest(message) != sha:
                log.warning("dropped a parked message for job %s: digest mismatch", job_id)
                return
            try:
                batch = FROM_SERVER.decode(message)
            except ProtocolError as exc:
                log.warning("dropped a parked message for job %s: %s", job_id, exc)
                return
            del wanted[job_id]
            self._handle(batch)

        try:
            await self.transport.take_parked(take)
        except ConnectionLost as exc:
            log.warning("could not read parked jobs (%s); the server sends them instead", exc)
        log.info("took %d of %d parked jobs from the broker", len(owed) - len(wanted), len(owed))
        self.uplink.post(ParkedTaken(missing=list(wanted)))

    # ---- what the server sends -------------------------------------------------------------
    def _handle(self, batch: list[Message]) -> None:
        acks = [ack.ids[0] for m in batch if (ack := self._handlers[type(m)](m)) is not None]
        # Commit every batch (jobs before their ack, racks, query data): an open write
        # transaction would hide the cache from, and lock out, `manage --dump-cache`.
        self.cache.commit()
        if acks:
            self.uplink.post(Ack(ids=acks))

    def _on_job(self, job: Job) -> Ack:
        status = self.cache.job_status(job.id)
        if status is None:
            self.cache.add_job(job)
            if job.verb in RUN_AT_ONCE:
                self.lanes.run_now(job)
            else:
                self.lanes.enqueue(job)
        elif status in ("done", "acked"):
            # The server re-sent a job we finished: report again, never re-run.
            result = self.cache.result_of(job.id)
            if result is not None:
                self.uplink.post(result)
        return Ack(ids=[job.id])

    def _on_cancel(self, cancel: Cancel) -> None:
        """Drop the jobs that wait; kill (or, without ``kill``, leave) the ones running."""
        reason = cancel.reason or "cancelled by an operator"
        for job_id in cancel.ids:
            if self.runner.cancel_running(job_id, kill=cancel.kill, reason=reason):
                continue
            status = self.cache.job_status(job_id)
            if status is None:
                self.runner.report_cancelled(job_id, None, reason)
            elif status == "queued" and (job := self.lanes.drop(job_id)) is not None:
                self.runner.report_cancelled(job_id, job, reason)

    def _on_refuse(self, refuse: Refuse) -> None:
        raise Refused(refuse.reason)

    def _on_second_welcome(self, _: Welcome) -> None:
        raise ProtocolError("welcome in the middle of a session")


def _host_boot() -> float:
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return time.time() - uptime


def _machine_id(settings: Settings) -> str:
    if settings.machine_id:
        return settings.machine_id
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with contextlib.suppress(OSError):
            return Path(path).read_text().strip()
    return ""
