"""The agent (``directord client``): connect, register, take jobs, report results.

Parts: the journal and cache (cache.py), the link to the server across
reconnects (uplink.py), one connection's session (session.py), the lanes
that order jobs (lanes.py) and the runner of one job (runner.py). This
module wires them, resumes the journal, and reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from pathlib import Path

from directord.agent.cache import NodeCache
from directord.agent.lanes import Lanes
from directord.agent.proxysock import ProxySocket
from directord.agent.runner import KILL_WAIT, JobRunner
from directord.agent.session import Session
from directord.agent.uplink import Uplink
from directord.components import preload
from directord.config import Settings
from directord.errors import DirectordError, ProtocolError, Refused, RetryableError
from directord.models import State
from directord.protocol import Result
from directord.transports import Transport, load_transport

log = logging.getLogger(__name__)
MAX_BACKOFF = 5.0


class Agent:
    """A running ``directord client``."""

    def __init__(self, settings: Settings, *, transport: Transport | None = None) -> None:
        self.settings = settings
        self.identity = settings.resolved_identity()
        self.transport = transport or load_transport(settings)
        self.cache = NodeCache(settings.cache_path)
        self.uplink = Uplink(self.cache)
        self.runner = JobRunner(
            self.identity,
            self.cache,
            self.uplink,
            run_path=settings.resolved_run_path(),
            on_stop=settings.on_stop,
            reboot_command=settings.reboot_command,
        )
        self.proxy_socket = ProxySocket(settings.resolved_run_path(), self.uplink)
        self.lanes = Lanes(self.runner.run, self.runner.may_start)
        self.runner.drop_waiting = self.lanes.drop_waiting
        self.started = time.time()
        self.registered = 0  # successful registrations (tests, ready file)
        self._stop_asked = asyncio.Event()  # SIGTERM / stop()
        self._stop = asyncio.Event()  # the jobs are settled: the session may end

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self) -> None:
        """Connect (with backoff) and serve until :meth:`stop`."""
        preload()
        self._recover()
        await self.proxy_socket.start()
        backoff = 0.1
        stopping = asyncio.ensure_future(self._stop_asked.wait())
        while not self._stop_asked.is_set():
            try:
                # A stop must not wait for a connect attempt to time out.
                session = asyncio.ensure_future(self._session().run())
                await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not session.done():
                    await self._settle_jobs()
                    # Connected: let the session flush what it owes (bounded).
                    # Still connecting: give up on the attempt at once.
                    grace = 3.0 if self.uplink.connected.is_set() else 0.0
                    with contextlib.suppress(TimeoutError, DirectordError):
                        await asyncio.wait_for(asyncio.shield(session), grace)
                    session.cancel()
                    with contextlib.suppress(asyncio.CancelledError, DirectordError):
                        await session
                    break
                session.result()
                backoff = 0.1
            except (RetryableError, ProtocolError, Refused) as exc:
                if self._stop_asked.is_set():
                    break
                delay = backoff * (0.5 + random.random())
                log.warning("server unavailable (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_asked.wait(), delay)
                backoff = min(backoff * 2, MAX_BACKOFF)
        stopping.cancel()
        if not self._stop.is_set():
            await self._settle_jobs()
        await self._shutdown()

    def stop(self) -> None:
        """Ask :meth:`run` to return (SIGTERM): see ``--on-stop`` for running jobs."""
        self._stop_asked.set()

    async def _settle_jobs(self) -> None:
        """Take no new job; with ``--on-stop kill``, kill the running ones and report them."""
        self.runner.stop(self.settings.on_stop)
        if self.settings.on_stop == "kill":
            await self.runner.wait_idle(KILL_WAIT)
        self._stop.set()

    def _recover(self) -> None:
        """Resume the journal after a restart.

        Jobs that were running go first in their lanes: the runner re-attaches
        to their processes (or reports them lost); the queued ones follow.
        """
        running = self.cache.running_jobs()
        readable = {job.id for job, _ in running}
        for job_id in self.cache.ids_with_status("running"):
            if job_id not in readable:  # its journal entry is damaged
                self.cache.set_done(
                    Result(id=job_id, state=State.LOST, stderr="its journal entry was damaged")
                )
        self.runner.recover(running)
        for job, _ in running:
            log.warning("job %s was running when the client stopped; collecting it", job.id)
            self.lanes.enqueue(job)
        for job in self.cache.queued_jobs():
            self.lanes.enqueue(job)
        self.cache.commit()

    async def _shutdown(self) -> None:
        await self.proxy_socket.close()
        await self.lanes.close()
        self.runner.cancel()
        await self.transport.close()
        self.cache.close()

    def _session(self) -> Session:
        return Session(
            self.settings,
            self.transport,
            self.cache,
            self.uplink,
            self.lanes,
            self.runner,
            self._stop,
            self._registered,
            self.started,
        )

    def _registered(self) -> None:
        self.registered += 1
        self._write_ready()

    def _write_ready(self) -> None:
        if self.settings.ready_file:
            Path(self.settings.ready_file).write_text(
                json.dumps(
                    {
                        "identity": self.identity,
                        "pid": os.getpid(),
                        "started": self.started,
                        "registered": self.registered,
                    }
                )
                + "\n"
            )
