"""Running one job on the node: the rules before it, its component, its result.

A job is skipped when an earlier job of its orchestration failed here
(``skipped-parent``) or when its fingerprint already succeeded here and the
cache is not bypassed (``skipped-cache``). Otherwise its component runs under
the job's timeout, holding the node's lock if it asks for it. The result is
journalled before it is sent, so a crash never loses it; ``--stdout-arg`` and
``--stderr-arg`` keep what a successful job printed as cached args. A RESTART
job re-executes the client once its result is acknowledged. A REBOOT job
runs the reboot command (``--reboot-command``) its seconds after that; if the
command fails, or the machine is still up the job's ``--timeout`` after it,
the client re-executes itself instead, so the jobs it holds run.

A RUN job's shell outlives the agent (jobprocs.py). A job that was running
when the previous agent went away is re-attached in its lane, ahead of the
jobs queued behind it, so a step never starts before the one before it
ended: its real result is reported, or ``lost`` when nobody can know it,
which stops the rest of its orchestration here as a failure does. When the
agent stops (SIGTERM, RESTART) nothing new starts; with ``--on-stop leave``
(the default) running job processes are left to the next agent, with
``--on-stop kill`` their groups are killed and they end ``cancelled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from directord.agent import executor, jobprocs
from directord.agent.cache import NodeCache
from directord.agent.context import JobContext
from directord.agent.executor import OutputCallback
from directord.agent.uplink import Uplink
from directord.components import MAX_COMPONENT_BYTES, get_component, shipped_component
from directord.components.base import Component, Outcome
from directord.errors import ComponentError, ConfigError, DirectordError
from directord.models import FileRef, State
from directord.protocol import Job, Output, Result
from directord.security.private import private_directory

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
# With --on-stop kill, a stopping agent waits this long for the killed jobs' results.
KILL_WAIT = 5.0
ON_STOP = ("leave", "kill")


class JobRunner:
    """Runs jobs one at a time per lane (the lanes call :meth:`run`)."""

    def __init__(
        self,
        identity: str,
        cache: NodeCache,
        uplink: Uplink,
        *,
        run_path: str | Path,
        on_stop: str = "leave",
        reboot_command: str = "shutdown -r now",
    ) -> None:
        self.identity = identity
        self.cache = cache
        self.uplink = uplink
        self.on_stop = on_stop
        self.reboot_command = reboot_command
        self.procs_dir = str(run_path)
        try:
            private_directory(self.procs_dir, tighten=True)
        except OSError as exc:
            raise ConfigError(f"cannot use run path {run_path}: {exc}", key="run_path") from None
        self._lock = asyncio.Lock()
        #: the RESTART job whose acknowledgement re-executes the client
        self.restart_after: str | None = None
        #: the REBOOT job whose acknowledgement reboots the node, and its delay
        self.reboot_after: tuple[str, float] | None = None
        self._restart: asyncio.Task[None] | None = None
        #: "leave" or "kill" once the agent stops; nothing new starts then
        self.stopping: str | None = None
        self._procs: dict[str, int] = {}  # job id -> pid of its running job process
        #: jobs cancelled while they ran (a stop with kill, an operator): id -> why
        self._cancelled: dict[str, str] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}  # job id -> the task running it
        #: takes every waiting job out of the lanes (QUEUESENTINEL); set by the agent
        self.drop_waiting: Callable[[], list[Job]] = list
        #: jobs an earlier agent left running: id -> (their start, their shell's pid)
        self._recovered: dict[str, tuple[float, int | None]] = {}
        self._active: set[str] = set()
        self._verified: set[str] = set()  # SHA-256 of component files checked on disk
        self._idle = asyncio.Event()
        self._idle.set()

    def may_start(self) -> bool:
        """False once the agent stops or a RESTART or REBOOT waits: nothing new starts."""
        return self.restart_after is None and self.reboot_after is None and self.stopping is None

    def request_restart(self, job_id: str) -> None:
        """Re-execute the client once this job's result is acknowledged."""
        self.restart_after = job_id

    def request_reboot(self, job_id: str, delay: float) -> None:
        """Reboot the node ``delay`` seconds after this job's result is acknowledged."""
        self.reboot_after = (job_id, delay)

    def cancel(self) -> None:
        """Drop a pending restart (the agent is stopping)."""
        if self._restart is not None:
            self._restart.cancel()

    def recover(self, running: list[tuple[Job, float]]) -> None:
        """Jobs were running when an earlier agent went away: re-attach, never re-run.

        Finds their processes (one scan of /proc) and deletes process files no
        running job owns (left by a crash after a result was committed).
        """
        found = jobprocs.find_job_processes() if running else {}
        for job, started in running:
            self._recovered[job.id] = (started, found.get(job.id))
        keep = {jobprocs.ProcFiles.of(self.procs_dir, job.id).base for job, _ in running}
        for path in Path(self.procs_dir).iterdir():
            if str(path.with_suffix("")) not in keep:
                path.unlink(missing_ok=True)

    def stop(self, how: str) -> None:
        """Stop taking jobs: ``leave`` running job processes, or ``kill`` their groups."""
        self.stopping = how
        if how == "kill":
            for job_id, pid in self._procs.items():
                self._cancelled[job_id] = "the client stopped (--on-stop kill) and killed the job"
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)

    def cancel_running(self, job_id: str, *, kill: bool, reason: str) -> bool:
        """Cancel a job if it runs here now: True if it does.

        With ``kill`` its task is cancelled (which kills its process group) and it
        ends ``cancelled``; without, it is left to finish and report its result.
        """
        task = self._tasks.get(job_id)
        if task is None:
            return False
        if kill:
            self._cancelled[job_id] = reason
            task.cancel()
        return True

    def report_cancelled(self, job_id: str, job: Job | None, reason: str) -> None:
        """A job cancelled before it ran: journal and report ``cancelled``.

        ``job`` is None when it has not arrived yet: the journal then holds the
        result alone, so that the job, when it comes, is reported and never run.
        """
        result = Result(id=job_id, state=State.CANCELLED, stderr=reason, started=time.time())
        if job is None:
            self.cache.add_cancelled(result)
        else:
            self.cache.set_done(result)
            if job.parent:
                self.cache.set_parent_state(job.parent, "failed")
        self.cache.commit()
        self.uplink.post(result)

    def cancel_waiting(self, reason: str) -> int:
        """Cancel every job waiting in the lanes (QUEUESENTINEL); returns how many."""
        dropped = self.drop_waiting()
        for job in dropped:
            self.report_cancelled(job.id, job, reason)
        return len(dropped)

    async def wait_idle(self, timeout: float) -> None:
        """Wait (bounded) until no job runs."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)

    def leaving(self) -> bool:
        """Whether a cancelled job process stays running (the agent stops, leaving them)."""
        return self.stopping == "leave"

    def spawned(self, job_id: str, pid: int) -> None:
        """A job process exists (a stop with ``kill`` kills its group)."""
        self._procs[job_id] = pid

    async def run(self, job: Job, more: bool = False) -> None:
        """Run one job and report its result (``more``: others wait behind it)."""
        self._active.add(job.id)
        self._idle.clear()
        task = asyncio.current_task()
        if task is not None:
            self._tasks[job.id] = task
        try:
            await self._run(job, more)
        finally:
            self._procs.pop(job.id, None)
            self._tasks.pop(job.id, None)
            self._cancelled.pop(job.id, None)
            self._active.discard(job.id)
            if not self._active:
                self._idle.set()

    async def _run(self, job: Job, more: bool) -> None:
        started = time.time()
        t0 = time.perf_counter()
        ended: float | None = None
        recovered = self._recovered.pop(job.id, None)
        try:
            if recovered is not None:
                started, pid = recovered
                outcome, ended = await self._reattach(job, started, pid)
                self.cache.set_sha_state(job.sha, str(outcome.state))
            elif job.parent and self.cache.parent_failed(job.parent):
                outcome = Outcome(
                    State.SKIPPED_PARENT,
                    None,
                    "",
                    "an earlier job of this orchestration failed on this node",
                )
            elif not job.skip_cache and self.cache.sha_state(job.sha) == str(State.SUCCESS):
                outcome = Outcome(State.SKIPPED_CACHE, 0, "", "")
            else:
                self.cache.set_running(job.id, started)
                self.cache.commit()
                outcome = await self._execute(job)
                self.cache.set_sha_state(job.sha, str(outcome.state))
        except asyncio.CancelledError:
            # An operator's cancel (its process group is killed on the way); a stop
            # of the agent, or anything else, goes on up.
            task = asyncio.current_task()
            if job.id not in self._cancelled or task is None or self.stopping is not None:
                raise
            task.uncancel()
            self.cache.set_sha_state(job.sha, str(State.CANCELLED))
            outcome = Outcome(State.CANCELLED, None, "", "")
        if job.id in self._cancelled:
            outcome = Outcome(
                State.CANCELLED,
                None,
                outcome.stdout,
                _line(outcome.stderr, self._cancelled[job.id]),
            )
        # A failure (or a cancel) of any job of the orchestration here stays: a job
        # that ends well afterwards (it ran beside, or before, a cancelled one) does
        # not clear it.
        if job.parent and not self.cache.parent_failed(job.parent):
            self.cache.set_parent_state(job.parent, "failed" if not outcome.state.ok else "running")
        result = Result(
            id=job.id,
            state=outcome.state,
            rc=outcome.rc,
            stdout=outcome.stdout,
            stderr=outcome.stderr,
            started=started,
            exec_time=(ended - started) if ended is not None else time.perf_counter() - t0,
        )
        self.cache.set_done(result)
        if recovered is not None or job.id in self._procs:
            # The files go once the result is on disk; until then they are the result.
            self.cache.after_commit(jobprocs.ProcFiles.of(self.procs_dir, job.id).remove)
        if not more:
            self.cache.commit()
        # More jobs queued behind this one: let results travel together.
        self.uplink.post(result, linger=RESULT_LINGER if more else 0.0)
        if self.restart_after == job.id:
            self._restart = asyncio.create_task(self._restart_when_acked(job.id))
        if self.reboot_after is not None and self.reboot_after[0] == job.id:
            if outcome.state is State.SUCCESS:
                delay = self.reboot_after[1]
                self._restart = asyncio.create_task(
                    self._reboot_when_acked(job.id, delay, job.timeout)
                )
            else:  # cancelled on its way out: no reboot, and the lanes go on
                self.reboot_after = None

    async def _reattach(
        self, job: Job, started: float, pid: int | None
    ) -> tuple[Outcome, float | None]:
        """The outcome of a job an earlier agent left running, and when it ended."""
        files = jobprocs.ProcFiles.of(self.procs_dir, job.id)
        if not files.exist():
            return (
                Outcome(
                    State.LOST,
                    None,
                    "",
                    f"the client stopped while running this {job.verb} job in its own"
                    " process; what it did is unknown",
                ),
                None,
            )
        if pid is not None:
            self._procs[job.id] = pid
            log.info("job %s: re-attaching to its process %d", job.id, pid)
        on_output = self._output_to_server(job.id) if job.stream else None
        found = await jobprocs.reattach(
            job.id,
            pid,
            files,
            deadline=started + job.timeout,
            on_output=on_output,
            leave=self.leaving,
        )
        if found is None:
            return (
                Outcome(
                    State.LOST,
                    None,
                    files.read("stdout").decode("utf-8", "replace"),
                    _line(
                        files.read("stderr").decode("utf-8", "replace"),
                        "the job's process ended without leaving an exit status while no"
                        " client watched it (killed, or the node restarted); its outcome is"
                        " unknown",
                    ),
                ),
                None,
            )
        result, ended = found
        outcome = Outcome.from_process(result)
        if outcome.state.ok:
            self._capture(dict(job.options), outcome)
        return outcome, ended

    def _output_to_server(self, job_id: str) -> OutputCallback:
        def forward(stream: str, line: str) -> None:
            self.uplink.post(Output(id=job_id, stream=stream, data=line))

        return forward

    async def _execute(self, job: Job) -> Outcome:
        options = dict(job.options)
        ctx = JobContext(job, self.identity, self.cache, self.uplink, self.request_restart, self)
        try:
            if job.component is not None:
                component = await self._shipped_component(job, job.component)
            else:
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
        if outcome.state.ok:
            self._capture(options, outcome)
        return outcome

    async def _shipped_component(self, job: Job, ref: FileRef) -> Component:
        """A user's component from the server: fetched once, checked, kept by its SHA-256.

        Raises:
            ComponentError: the file the server sent does not match the job's checksum.
            ComponentArgsError: it does not define the job's verb, or fails to load.
        """
        folder = Path(self.cache.path).parent / "components"
        path = folder / f"{ref.sha256}.py"
        if ref.sha256 not in self._verified:
            if not _file_has(path, ref.sha256):
                reply = await self.uplink.request("component", {"job": job.id})
                data = reply.get("data") if isinstance(reply, dict) else None
                if (
                    not isinstance(data, bytes)
                    or len(data) > MAX_COMPONENT_BYTES
                    or hashlib.sha256(data).hexdigest() != ref.sha256
                ):
                    raise ComponentError(
                        f"component file {ref.name} from the server does not match its checksum"
                    )
                private_directory(folder, tighten=True)
                fd, tmp = tempfile.mkstemp(prefix=".component-", dir=folder)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                os.replace(tmp, path)
                log.info("job %s: received component %s (%s)", job.id, ref.name, ref.sha256[:12])
            self._verified.add(ref.sha256)
        return shipped_component(job.verb, ref, path)

    def _capture(self, options: dict[str, object], outcome: Outcome) -> None:
        """``--stdout-arg`` / ``--stderr-arg``: keep what a successful job printed."""
        captured = {}
        if options.get("stdout_arg"):
            captured[str(options["stdout_arg"])] = outcome.stdout.strip()
        if options.get("stderr_arg"):
            captured[str(options["stderr_arg"])] = outcome.stderr.strip()
        if captured:
            self.cache.update("args", captured)

    async def _wait_acked(self, job_id: str) -> None:
        """Wait (bounded) until the server stored the job's result."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RESTART_ACK_WAIT
        self.cache.commit()
        while self.cache.job_status(job_id) != "acked" and loop.time() < deadline:
            await asyncio.sleep(0.05)

    async def _restart_when_acked(self, job_id: str) -> None:
        """Wait (bounded) until the server stored the RESTART result, then re-exec."""
        await self._wait_acked(job_id)
        await self._reexec(f"as asked by job {job_id}")

    async def _reboot_when_acked(self, job_id: str, delay: float, bound: float) -> None:
        """Once the REBOOT result is stored, wait ``delay`` and run the reboot command.

        A command that fails, or a machine still up ``bound`` seconds after it,
        means no reboot is coming: the client re-executes itself so that the jobs
        it holds run (and the server, seeing a new client, stops waiting).
        """
        await self._wait_acked(job_id)
        await asyncio.sleep(delay)
        log.info("job %s: rebooting the node: %s", job_id, self.reboot_command)
        proc = await executor.run_shell(
            self.reboot_command, executor.encoded_environment(), timeout=bound
        )
        if proc.rc == 0:
            await asyncio.sleep(bound)
            log.error(
                "job %s: the node is still up %gs after `%s`", job_id, bound, self.reboot_command
            )
        else:
            log.error(
                "job %s: `%s` failed (%s): %s",
                job_id,
                self.reboot_command,
                "timed out" if proc.timed_out else f"exit status {proc.rc}",
                proc.stderr.strip()[:1000],
            )
        await self._reexec(f"instead of the reboot job {job_id} asked for")

    async def _reexec(self, why: str) -> None:
        """Replace this process with a fresh client (same PID), as RESTART does."""
        # The same path as a stop: running job processes are left to the re-executed
        # client (they stay this process's children), or killed and reported.
        self.stop(self.on_stop)
        if self.on_stop == "kill":
            await self.wait_idle(KILL_WAIT)
        log.info("restarting the client %s", why)
        self.cache.close()
        # Same PID, fresh process image: systemd or any supervisor sees no exit. The
        # journal brings back every job still queued. orig_argv keeps `-m directord`.
        os.execv(sys.executable, sys.orig_argv)


def _file_has(path: Path, sha256: str) -> bool:
    """Whether the file at ``path`` exists with this SHA-256."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


def _line(text: str, line: str) -> str:
    """``text`` with one more line."""
    return text + ("\n" if text and not text.endswith("\n") else "") + line
