"""The agent: connect, register, receive jobs, run them in lanes, report results.

Lanes: jobs of ordinary orchestrations share one serial lane and run in
arrival order; each ``async`` orchestration gets its own lane, at most
``min(2 x CPUs, 16)`` of them running at once. Within an orchestration, a job
that fails makes the rest of it on this node ``skipped-parent``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

from directord import __version__
from directord.agent.cache import NodeCache
from directord.agent.context import JobContext
from directord.components import get_component, preload
from directord.components.base import Outcome
from directord.config import Settings
from directord.errors import (
    ComponentError,
    ConnectError,
    ConnectionLost,
    DirectordError,
    ProtocolError,
    Refused,
)
from directord.models import State
from directord.protocol import PROTOCOL_VERSION, Envelope, decode_batch, message_digest
from directord.transports import Link, Transport, load_transport

log = logging.getLogger(__name__)
MAX_BACKOFF = 5.0
ASYNC_LANES = min(2 * (os.cpu_count() or 1), 16)
# While a lane still has jobs queued, results wait up to this long to share a
# message; the last result of a burst goes at once, so latency of a lone job
# is unaffected.
RESULT_LINGER = 0.025
# Components that run processes kill them at the job's timeout themselves and
# report what they captured; the generic cut-off comes a moment later.
TIMEOUT_MARGIN = 0.5
# A restart waits this long for the server to acknowledge the RESTART result.
RESTART_ACK_WAIT = 10.0


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


class Lane:
    """A FIFO of jobs run one after another."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.queue: collections.deque[dict[str, Any]] = collections.deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Agent:
    """A running ``directord client``."""

    def __init__(self, settings: Settings, *, transport: Transport | None = None) -> None:
        self.settings = settings
        self.identity = settings.resolved_identity()
        self.transport = transport or load_transport(settings)
        self.cache = NodeCache(settings.cache_path)
        self.started = time.time()
        self.link: Link | None = None
        self._connected = asyncio.Event()
        self._stop = asyncio.Event()
        self._lanes: dict[str, Lane] = {}
        self._async_slots = asyncio.Semaphore(ASYNC_LANES)
        self._lock = asyncio.Lock()
        self._queued_ids: set[str] = set()
        self._rid = 0
        self._requests: dict[int, asyncio.Future[Any]] = {}
        self._query_waiters: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.registered = 0  # number of successful registrations (tests, ready file)
        self.restart_after: str | None = None  # job id whose ack triggers a re-exec

    # ---- lifecycle -----------------------------------------------------------------------
    def _recover(self) -> None:
        """Resume the journal after a restart."""
        for job_id, _ in self.cache.jobs_with_status("running"):
            log.warning("job %s was running when the client stopped; reporting it lost", job_id)
            self.cache.set_done(
                job_id,
                {
                    "t": "result",
                    "id": job_id,
                    "state": str(State.LOST),
                    "rc": None,
                    "stdout": "",
                    "stderr": "client restarted while running the job",
                },
            )
        for _job_id, body in self.cache.jobs_with_status("queued"):
            if body is not None:
                self._enqueue(body)
        self.cache.commit()

    async def run(self) -> None:
        """Connect (with backoff) and serve until :meth:`stop`."""
        preload()
        self._recover()
        backoff = 0.1
        stopping = asyncio.ensure_future(self._stop.wait())
        while not self._stop.is_set():
            try:
                # A stop must not wait for a connect attempt to time out.
                session = asyncio.ensure_future(self._session())
                await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not session.done():
                    # Connected: let the session flush what it owes (bounded).
                    # Still connecting: give up on the attempt at once.
                    grace = 3.0 if self._connected.is_set() else 0.0
                    with contextlib.suppress(TimeoutError, DirectordError):
                        await asyncio.wait_for(asyncio.shield(session), grace)
                    session.cancel()
                    with contextlib.suppress(asyncio.CancelledError, DirectordError):
                        await session
                    break
                session.result()
                backoff = 0.1
            except (ConnectError, ConnectionLost, ProtocolError, Refused) as exc:
                if self._stop.is_set():
                    break
                delay = backoff * (0.5 + random.random())
                log.warning("server unavailable (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                backoff = min(backoff * 2, MAX_BACKOFF)
        stopping.cancel()
        await self._shutdown()

    def stop(self) -> None:
        """Ask :meth:`run` to return."""
        self._stop.set()

    async def _shutdown(self) -> None:
        for lane in self._lanes.values():
            if lane.task is not None:
                lane.task.cancel()
        for task in list(self._tasks):
            task.cancel()
        for lane in self._lanes.values():
            if lane.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await lane.task
        await self.transport.close()
        self.cache.close()

    async def _session(self) -> None:
        conn = await self.transport.connect()
        link = Link(conn, f"server@{conn.peer}")
        try:
            link.post(
                {
                    "t": "hello",
                    "proto": PROTOCOL_VERSION,
                    "identity": self.identity,
                    "machine_id": _machine_id(self.settings),
                    "version": __version__,
                    "driver": self.transport.name,
                    "heartbeat_interval": self.settings.heartbeat_interval,
                    "host_boot": _host_boot(),
                    "agent_start": self.started,
                    "known": self.cache.unacked_ids(),
                }
            )
            first = await asyncio.wait_for(link.recv(), 10.0)
            if not first or first[0].get("t") != "welcome":
                reason = first[0].get("reason", "no welcome") if first else "no welcome"
                log.error("server refused this client: %s", reason)
                raise Refused(str(reason))
            self.link = link
            self.registered += 1
            self._connected.set()
            log.info("registered with %s as %s", conn.peer, self.identity)
            self._write_ready()
            self._resend_results()
            parked = first[0].get("parked")
            if parked:
                await self._take_parked({str(j): str(sha) for j, sha in parked})
            await self._handle(first[1:])
            stop_wait = asyncio.ensure_future(self._stop.wait())
            hb = asyncio.ensure_future(self._heartbeats(link))
            try:
                while True:
                    recv = asyncio.ensure_future(link.recv())
                    done, _ = await asyncio.wait(
                        {recv, stop_wait}, return_when=asyncio.FIRST_COMPLETED
                    )
                    if stop_wait in done:
                        recv.cancel()
                        await link.flush(2.0)
                        return
                    await self._handle(recv.result())
            finally:
                hb.cancel()
                stop_wait.cancel()
        except TimeoutError:
            raise ConnectionLost("no answer to hello") from None
        finally:
            self._connected.clear()
            self.link = None
            for fut in self._requests.values():
                if not fut.done():
                    fut.set_exception(ConnectionLost("link dropped"))
            self._requests.clear()
            await link.close()

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
                batch = decode_batch(message)
            except ProtocolError as exc:
                log.warning("dropped a parked message for job %s: %s", job_id, exc)
                return
            del wanted[job_id]
            await self._handle(batch)

        try:
            await self.transport.take_parked(take)
        except ConnectionLost as exc:
            log.warning("could not read parked jobs (%s); the server sends them instead", exc)
        log.info("took %d of %d parked jobs from the broker", len(owed) - len(wanted), len(owed))
        if self.link is not None:
            self.link.post({"t": "parked", "missing": list(wanted)})

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

    async def _heartbeats(self, link: Link) -> None:
        while not link.closed:
            await asyncio.sleep(self.settings.heartbeat_interval)
            link.post({"t": "hb"})

    # ---- inbound -------------------------------------------------------------------------
    async def _handle(self, batch: list[Envelope]) -> None:
        acks: list[str] = []
        for env in batch:
            kind = env.get("t")
            if kind == "job":
                if self._accept(env):
                    acks.append(str(env["id"]))
            elif kind == "rack":
                self.cache.set_acked([str(i) for i in env.get("ids", [])])
            elif kind == "rep":
                fut = self._requests.pop(int(env.get("rid", -1)), None)
                if fut is not None and not fut.done():
                    if env.get("ok"):
                        fut.set_result(env.get("r"))
                    else:
                        fut.set_exception(ComponentError(str(env.get("err"))))
            elif kind == "qdata":
                self._on_qdata(str(env["id"]), env.get("data") or {})
            elif kind == "refuse":
                raise Refused(str(env.get("reason")))
        # Commit every batch (jobs before their ack, racks, query data): an open write
        # transaction would hide the cache from, and lock out, `manage --dump-cache`.
        self.cache.commit()
        if acks and self.link is not None:
            self.link.post({"t": "ack", "ids": acks})

    def _accept(self, job: dict[str, Any]) -> bool:
        job_id = str(job["id"])
        status = self.cache.job_status(job_id)
        if status is None:
            self.cache.add_job(job)
            self._enqueue(job)
        elif status in ("done", "acked"):
            # The server re-sent a job we finished: report again, never re-run.
            result = self.cache.result_of(job_id)
            if result is not None and self.link is not None:
                self.link.post(result)
        return True

    def _enqueue(self, job: dict[str, Any]) -> None:
        job_id = str(job["id"])
        if job_id in self._queued_ids:
            return
        self._queued_ids.add(job_id)
        key = str(job.get("lane") or "")
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(key)
        lane.queue.append(job)
        lane.wake.set()
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._lane_loop(lane), name=f"lane-{key or 'serial'}")

    async def _lane_loop(self, lane: Lane) -> None:
        if lane.key:
            async with self._async_slots:
                await self._drain(lane)
            if not lane.queue:
                self._lanes.pop(lane.key, None)
        else:
            while True:
                await self._drain(lane)
                lane.wake.clear()
                await lane.wake.wait()

    async def _drain(self, lane: Lane) -> None:
        while lane.queue and self.restart_after is None:
            job = lane.queue.popleft()
            try:
                await self._run_job(job, more=bool(lane.queue))
            finally:
                self._queued_ids.discard(str(job["id"]))

    # ---- running a job --------------------------------------------------------------------
    async def _run_job(self, job: dict[str, Any], more: bool = False) -> None:
        job_id, parent, sha = str(job["id"]), str(job.get("parent", "")), str(job.get("sha", ""))
        started = time.time()
        t0 = time.perf_counter()
        if parent and self.cache.parent_failed(parent):
            outcome = Outcome(
                State.SKIPPED_PARENT,
                None,
                "",
                "an earlier job of this orchestration failed on this node",
            )
        elif not job.get("skip_cache") and self.cache.sha_state(sha) == str(State.SUCCESS):
            outcome = Outcome(State.SKIPPED_CACHE, 0, "", "")
        else:
            self.cache.set_running(job_id)
            self.cache.commit()
            outcome = await self._execute(job)
            self.cache.set_sha_state(sha, str(outcome.state))
        if parent:
            self.cache.set_parent_state(parent, "failed" if not outcome.state.ok else "running")
        result = {
            "t": "result",
            "id": job_id,
            "state": str(outcome.state),
            "rc": outcome.rc,
            "stdout": outcome.stdout,
            "stderr": outcome.stderr,
            "started": started,
            "exec_time": time.perf_counter() - t0,
        }
        self.cache.set_done(job_id, result)
        if not more:
            self.cache.commit()
        if self.link is not None:
            # More jobs queued behind this one: let results travel together.
            self.link.post(result, linger=RESULT_LINGER if more else 0.0)
        if self.restart_after == job_id:
            self._tasks.add(asyncio.create_task(self._restart(job_id)))

    async def _execute(self, job: dict[str, Any]) -> Outcome:
        options = dict(job.get("options") or {})
        ctx = JobContext(self, job)
        timeout = float(job.get("timeout", 600.0))
        try:
            component = get_component(str(job["verb"]))
            locked = component.needs_lock or bool(options.get("force_lock"))
            async with self._lock if locked else contextlib.nullcontext():
                # asyncio.timeout, unlike wait_for, costs no extra task per job.
                async with asyncio.timeout(timeout + TIMEOUT_MARGIN):
                    outcome = await component.execute(options, ctx)
        except TimeoutError:
            return Outcome(
                State.TIMEOUT,
                None,
                "",
                f"timed out after {timeout:g}s; any process it started was killed",
            )
        except DirectordError as exc:
            return Outcome.fail(str(exc))
        except Exception as exc:  # a component bug fails the job, not the agent
            log.exception("job %s (%s) raised", job.get("id"), job.get("verb"))
            return Outcome.fail(f"internal error in {job.get('verb')}: {exc!r}")
        captured = {}
        if options.get("stdout_arg") and outcome.state.ok:
            captured[options["stdout_arg"]] = outcome.stdout.strip()
        if options.get("stderr_arg") and outcome.state.ok:
            captured[options["stderr_arg"]] = outcome.stderr.strip()
        if captured:
            self.cache.update("args", captured)
        return outcome

    async def _restart(self, job_id: str) -> None:
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

    def _resend_results(self) -> None:
        assert self.link is not None
        results = [r for _, r in self.cache.jobs_with_status("done") if r is not None]
        if results:
            log.info("resending %d results the server has not acknowledged", len(results))
            self.link.post_many(results)

    def output_sink(self, job_id: str) -> Any:
        """Callback that forwards a job's output lines live (``--stream``)."""

        def emit(stream: str, line: str) -> None:
            if self.link is not None:
                self.link.post({"t": "out", "id": job_id, "s": stream, "d": line})

        return emit

    # ---- server requests ------------------------------------------------------------------
    async def request(self, method: str, params: dict[str, Any]) -> Any:
        """Ask the server; waits for (re)connection and retries if the link drops."""
        while True:
            await self._connected.wait()
            link = self.link
            if link is None:
                continue
            self._rid += 1
            rid = self._rid
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._requests[rid] = fut
            link.post({"t": "req", "rid": rid, "m": method, "p": params})
            try:
                return await fut
            except ConnectionLost:
                continue
            finally:
                self._requests.pop(rid, None)

    async def query_exchange(self, job_id: str, value: Any, wait: bool) -> dict[str, Any] | None:
        """Report a QUERY value; with ``wait``, return once every node's value arrived."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if wait:
            self._query_waiters[job_id] = fut
        try:
            while True:
                await self._connected.wait()
                if self.link is not None:
                    self.link.post({"t": "qrep", "id": job_id, "value": value})
                    break
            return await fut if wait else None
        finally:
            self._query_waiters.pop(job_id, None)

    def _on_qdata(self, job_id: str, data: dict[str, Any]) -> None:
        query = self.cache.sections["query"]
        merged = {node: {**(query.get(node) or {}), **values} for node, values in data.items()}
        self.cache.update("query", merged)
        fut = self._query_waiters.get(job_id)
        if fut is not None and not fut.done():
            fut.set_result(data)
