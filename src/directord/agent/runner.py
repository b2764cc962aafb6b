"""Running one job on the node: the rules before it, its component, its result.

A job is skipped when an earlier job of its orchestration failed here
(``skipped-parent``) or when its fingerprint already succeeded here and the
cache is not bypassed (``skipped-cache``). Otherwise its component runs under
the job's timeout, holding the node's lock if it asks for it. The result is
journalled before it is sent, so a crash never loses it; ``--stdout-arg`` and
``--stderr-arg`` keep what a successful job printed as cached args. A RESTART
job re-executes the client once its result is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time

from directord.agent.cache import NodeCache
from directord.agent.context import JobContext
from directord.agent.uplink import Uplink
from directord.components import get_component
from directord.components.base import Outcome
from directord.errors import DirectordError
from directord.models import State
from directord.protocol import Job, Result

log = logging.getLogger(__name__)
# While a lane still has jobs queued, results wait up to this long to share a
# message; the last result of a burst goes at once, so latency of a lone job
# is unaffected.
RESULT_LINGER = 0.025
# Components that run processes kill them at the job's timeout themselves and
# report what they captured; the generic cut-off comes a moment later.
TIMEOUT_MARGIN = 0.5
# A restart waits this long for the server to acknowledge the RESTART result.
RESTART_ACK_WAIT = 10.0


class JobRunner:
    """Runs jobs one at a time per lane (the lanes call :meth:`run`)."""

    def __init__(self, identity: str, cache: NodeCache, uplink: Uplink) -> None:
        self.identity = identity
        self.cache = cache
        self.uplink = uplink
        self._lock = asyncio.Lock()
        #: the RESTART job whose acknowledgement re-executes the client
        self.restart_after: str | None = None
        self._restart: asyncio.Task[None] | None = None

    def may_start(self) -> bool:
        """False once a RESTART waits: nothing new starts before the re-exec."""
        return self.restart_after is None

    def request_restart(self, job_id: str) -> None:
        """Re-execute the client once this job's result is acknowledged."""
        self.restart_after = job_id

    def cancel(self) -> None:
        """Drop a pending restart (the agent is stopping)."""
        if self._restart is not None:
            self._restart.cancel()

    async def run(self, job: Job, more: bool = False) -> None:
        """Run one job and report its result (``more``: others wait behind it)."""
        started = time.time()
        t0 = time.perf_counter()
        if job.parent and self.cache.parent_failed(job.parent):
            outcome = Outcome(
                State.SKIPPED_PARENT,
                None,
                "",
                "an earlier job of this orchestration failed on this node",
            )
        elif not job.skip_cache and self.cache.sha_state(job.sha) == str(State.SUCCESS):
            outcome = Outcome(State.SKIPPED_CACHE, 0, "", "")
        else:
            self.cache.set_running(job.id)
            self.cache.commit()
            outcome = await self._execute(job)
            self.cache.set_sha_state(job.sha, str(outcome.state))
        if job.parent:
            self.cache.set_parent_state(job.parent, "failed" if not outcome.state.ok else "running")
        result = Result(
            id=job.id,
            state=outcome.state,
            rc=outcome.rc,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            started=started,
            exec_time=time.perf_counter() - t0,
        )
        self.cache.set_done(result)
        if not more:
            self.cache.commit()
        # More jobs queued behind this one: let results travel together.
        self.uplink.post(result, linger=RESULT_LINGER if more else 0.0)
        if self.restart_after == job.id:
            self._restart = asyncio.create_task(self._restart_when_acked(job.id))

    async def _execute(self, job: Job) -> Outcome:
        options = dict(job.options)
        ctx = JobContext(job, self.identity, self.cache, self.uplink, self.request_restart)
        try:
            component = get_component(job.verb)
            locked = component.needs_lock or bool(options.get("force_lock"))
            async with self._lock if locked else contextlib.nullcontext():
                # asyncio.timeout, unlike wait_for, costs no extra task per job.
                async with asyncio.timeout(job.timeout + TIMEOUT_MARGIN):
                    outcome = await component.execute(options, ctx)
        except TimeoutError:
            return Outcome(
                State.TIMEOUT,
                None,
                "",
                f"timed out after {job.timeout:g}s; any process it started was killed",
            )
        except DirectordError as exc:
            return Outcome.fail(str(exc))
        except Exception as exc:  # a component bug fails the job, not the agent
            log.exception("job %s (%s) raised", job.id, job.verb)
            return Outcome.fail(f"internal error in {job.verb}: {exc!r}")
        captured = {}
        if options.get("stdout_arg") and outcome.state.ok:
            captured[options["stdout_arg"]] = outcome.stdout.strip()
        if options.get("stderr_arg") and outcome.state.ok:
            captured[options["stderr_arg"]] = outcome.stderr.strip()
        if captured:
            self.cache.update("args", captured)
        return outcome

    async def _restart_when_acked(self, job_id: str) -> None:
        """Wait (bounded) until the server stored the RESTART result, then re-exec."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESTART_ACK_WAIT
        self.cache.commit()
        while self.cache.job_status(job_id) != "acked" and loop.time() < deadline:
            await asyncio.sleep(0.05)
        log.info("restarting the client as asked by job %s", job_id)
        self.cache.close()
        # Same PID, fresh process image: systemd or any supervisor sees no exit. The
        # journal brings back every job still queued. orig_argv keeps `-m directord`.
        os.execv(sys.executable, sys.orig_argv)
