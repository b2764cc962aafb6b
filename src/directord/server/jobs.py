"""The job book: every job, where it stands on each node, and who is watching.

State changes flow through here: submit -> queued; node ack -> delivered;
node result -> final; deadlines (and a node not back from its reboot) ->
undelivered / lost. Each change is marked for persistence and pushed to
watchers (``--wait``/``--stream`` users).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from directord.models import JobSpec, State
from directord.server.persist import Persister
from directord.server.records import JobRecord, TargetRecord, rebuild

log = logging.getLogger(__name__)
JOBS, RESULTS, PARENTS = "jobs", "results", "parents"
# Output kept per result; more is cut (the head is kept) so that a chatty job
# cannot exhaust the server's memory.
MAX_OUTPUT = 1024 * 1024
# Output lines of a --stream job kept until its watcher subscribes (which it can
# only do once the submit reply is back, while the job may already be printing).
MAX_UNREAD_LINES = 10_000
MAX_WATCH_BACKLOG = 10_000
# Ended jobs past the retention are looked for this often, and at most this many
# forgotten in one pass: the sweep that does it never holds the loop long.
FORGET_INTERVAL = 60.0
FORGET_BATCH = 5_000
_OK = (State.SUCCESS.value, State.SKIPPED_CACHE.value)


@dataclass(slots=True)
class ParentRecord:
    """One orchestration run."""

    id: str
    name: str
    submitted: float
    jobs: list[str] = field(default_factory=list)
    is_async: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain dict."""
        return {
            "id": self.id,
            "name": self.name,
            "submitted": self.submitted,
            "jobs": self.jobs,
            "is_async": self.is_async,
        }


def _parent_from_dict(data: dict[str, Any]) -> ParentRecord:
    """A stored orchestration run; older stores may lack its name and time."""
    return msgspec.convert({"name": "", "submitted": 0.0, **data}, ParentRecord)


@dataclass(slots=True)
class PlannedJob:
    """A built job with its resolved targets, before it is recorded."""

    spec: JobSpec
    targets: list[str]


class Watcher:
    """A user-API subscriber to the results (and optionally output) of some jobs."""

    def __init__(self, job_ids: Iterable[str], output: bool, summary: bool = False) -> None:
        self.pending = set(job_ids)
        self.output = output
        # Summary watchers get successes without their output (``--wait`` on a
        # large orchestration prints counts, and full detail only for failures).
        self.summary = summary
        self.events: list[dict[str, Any]] = []
        self.dropped = 0  # output events dropped for a reader that fell behind
        self.wake = asyncio.Event()

    def push(self, event: dict[str, Any]) -> None:
        """Queue an event for the subscriber.

        Live output beyond MAX_WATCH_BACKLOG events not yet taken is dropped (a
        node's output must not fill the server's memory behind a slow reader);
        results always get through.
        """
        if event["ev"] == "out" and len(self.events) >= MAX_WATCH_BACKLOG:
            self.dropped += 1
            return
        if self.summary and event["ev"] == "result" and event["result"]["state"] in _OK:
            result = event["result"]
            event = {**event, "result": {**result, "stdout": "", "stderr": ""}}
        self.events.append(event)
        self.wake.set()

    def take(self) -> list[dict[str, Any]]:
        """Everything queued so far."""
        events, self.events = self.events, []
        self.wake.clear()
        return events


class JobBook:
    """In-memory index of jobs, backed by the datastore through the persister."""

    def __init__(self, persister: Persister, grace: float, retention: float = 0.0) -> None:
        self._persister = persister
        self.grace = grace
        #: seconds an ended job is kept before it is forgotten (0: until purged)
        self.retention = retention
        self._next_forget = 0.0
        #: in submission order (``order``), which paged listings rely on
        self.jobs: dict[str, JobRecord] = {}
        self.parents: dict[str, ParentRecord] = {}
        self._order = 0
        # Non-final (job, node) pairs per node, for dispatch on reconnect and deadlines.
        self.pending: dict[str, dict[str, TargetRecord]] = {}
        self._watchers: dict[str, set[Watcher]] = {}
        self._unread: dict[str, list[dict[str, Any]]] = {}
        # Job id -> how many of its targets are not final yet (jobs with none are not
        # here): each result asks whether its job is done, and scanning every target
        # for that cost a job to N nodes N x N checks.
        self._open: dict[str, int] = {}
        # Node -> (no target of it can pass its deadline before this time, whether the
        # node was online when that was worked out): a sweep skips the nodes whose work
        # cannot be overdue yet, so a deep queue costs a pass nothing until its first
        # deadline (100,000 queued targets took 58 ms of every pass, each second).
        self._quiet_until: dict[str, tuple[float, bool]] = {}

    # ---- loading -------------------------------------------------------------------
    def load(
        self,
        jobs: dict[str, dict[str, Any]],
        results: dict[str, dict[str, Any]],
        parents: dict[str, dict[str, Any]],
    ) -> None:
        """Adopt stored history."""
        readable = [
            (job_id, job)
            for job_id, data in jobs.items()
            if (job := rebuild(JobRecord.from_dict, JOBS, job_id, data)) is not None
        ]
        # In submission order, as recorded ones are: forgetting stops at the first job
        # submitted after its cutoff, and listings page by job number.
        for job_id, job in sorted(readable, key=lambda item: item[1].order):
            self.jobs[job_id] = job
            self._order = max(self._order, job.order)
        for key, data in results.items():
            target = rebuild(TargetRecord.from_dict, RESULTS, key, data)
            job = self.jobs.get(target.job_id) if target is not None else None
            if target is not None and job is not None:
                job.results[target.identity] = target
        # Only final results are stored; a target without one is still owed.
        for job in self.jobs.values():
            for identity in job.targets:
                stored = job.results.get(identity)
                if stored is None or not stored.state.final:
                    owed = TargetRecord(job_id=job.id, identity=identity)
                    job.results[identity] = owed
                    self.pending.setdefault(identity, {})[owed.key] = owed
            open_targets = sum(1 for t in job.results.values() if not t.state.final)
            if open_targets:
                self._open[job.id] = open_targets
        for parent_id, data in parents.items():
            parent = rebuild(_parent_from_dict, PARENTS, parent_id, {"id": parent_id, **data})
            if parent is not None:
                self.parents[parent_id] = parent

    # ---- submission ----------------------------------------------------------------
    def record(
        self, name: str, is_async: bool, planned: list[PlannedJob], stream: bool
    ) -> tuple[ParentRecord, list[JobRecord]]:
        """Create the records of one orchestration run (all targets queued)."""
        now = time.time()
        parent = ParentRecord(id=str(uuid.uuid4()), name=name, submitted=now, is_async=is_async)
        records = []
        for plan in planned:
            self._order += 1
            job = JobRecord(
                id=str(uuid.uuid4()),
                parent_id=parent.id,
                parent_name=name,
                spec=plan.spec,
                lane=parent.id if is_async else "",
                stream=stream,
                submitted=now,
                order=self._order,
                targets=list(plan.targets),
            )
            # Targets are not stored while queued: the job record lists them, and
            # load() rebuilds every target that has no final result yet.
            for identity in job.targets:
                target = TargetRecord(job_id=job.id, identity=identity)
                job.results[identity] = target
                self.pending.setdefault(identity, {})[target.key] = target
                self._expect_deadline(identity, job.submitted + job.timeout + self.grace)
            self.jobs[job.id] = job
            if job.results:
                self._open[job.id] = len(job.results)
            parent.jobs.append(job.id)
            self._persister.put(JOBS, job.id, job)
            records.append(job)
        self.parents[parent.id] = parent
        self._persister.put(PARENTS, parent.id, parent)
        log.info("orchestration %s (%s): %d jobs queued", parent.id, name or "-", len(records))
        return parent, records

    def store(self, job: JobRecord) -> None:
        """Persist a job's record after a change (its results are stored apart)."""
        self._persister.put(JOBS, job.id, job)

    def queued_for(self, identity: str) -> list[JobRecord]:
        """Jobs waiting to be sent to a node, in submission order."""
        jobs = [
            self.jobs[t.job_id]
            for t in self.pending.get(identity, {}).values()
            if t.state is State.QUEUED
        ]
        return sorted(jobs, key=lambda j: j.order)

    def pending_jobs(self, identity: str) -> list[JobRecord]:
        """Jobs that have not ended on a node."""
        return [self.jobs[t.job_id] for t in self.pending.get(identity, {}).values()]

    def delivered_to(self, identity: str) -> list[TargetRecord]:
        """Targets a node acknowledged but has not finished."""
        return [t for t in self.pending.get(identity, {}).values() if t.state is State.DELIVERED]

    # ---- node reports --------------------------------------------------------------
    def target_of(self, job_id: str, identity: str) -> TargetRecord | None:
        """The result slot of a job for a node, if that node is a target of it."""
        job = self.jobs.get(job_id)
        return job.results.get(identity) if job is not None else None

    def mark_sent(self, target: TargetRecord) -> None:
        """The job went out to the node (not yet acknowledged)."""
        target.sent = time.time()

    def mark_delivered(self, identity: str, job_ids: Iterable[str]) -> None:
        """The node acknowledged it holds these jobs.

        Not stored: after a server restart a delivered job counts as queued
        again, is re-sent, and the node's journal makes the re-send harmless.
        """
        now = time.time()
        for job_id in job_ids:
            target = self.target_of(str(job_id), identity)
            if target is not None and target.state is State.QUEUED:
                target.state = State.DELIVERED
                target.delivered = now

    def finish(
        self,
        identity: str,
        target: TargetRecord,
        state: State,
        *,
        rc: int | None = None,
        stdout: str = "",
        stderr: str = "",
        exec_time: float | None = None,
        reported: bool = False,
    ) -> None:
        """Put a (job, node) into a final state, once.

        The one exception is ``lost``, the server's call when a node went away
        holding the job: the result the node itself ``reported`` later (its
        agent re-attached to the job) replaces it, and the history keeps both.
        """
        if not state.final:
            raise ValueError(f"finish() takes a final state, not {state}")
        if target.state.final:
            if not reported or target.state is not State.LOST or state is State.LOST:
                return
            target.history = [
                *(target.history or ()),
                {"state": target.state.value, "at": target.finished, "stderr": target.stderr},
            ]
            log.info("job %s on %s: lost is now %s", target.job_id, identity, state)
        else:
            left = self._open.get(target.job_id, 0) - 1
            if left > 0:
                self._open[target.job_id] = left
            else:
                self._open.pop(target.job_id, None)
        now = time.time()
        target.state = state
        target.rc = rc
        target.stdout = stdout[:MAX_OUTPUT]
        target.stderr = stderr[:MAX_OUTPUT]
        target.exec_time = exec_time
        target.finished = now
        if target.sent is not None:
            target.roundtrip = now - target.sent
        self.pending.get(identity, {}).pop(target.key, None)
        self._persister.put(RESULTS, target.key, target)
        job = self.jobs[target.job_id]
        if not state.ok:
            log.error("job %s (%s) %s on %s", job.id, job.verb, state, identity)
        if job.id in self._watchers:
            self._notify(
                job,
                {
                    "ev": "result",
                    "job": job.id,
                    "node": identity,
                    "result": target.to_dict(),
                    "verb": job.verb,
                    "name": job.name,
                    "parent": job.parent_id,
                },
            )

    def output(self, identity: str, job_id: str, stream: str, data: str) -> None:
        """Forward live output to watchers that asked for it (only a target's own)."""
        if self.target_of(job_id, identity) is None:
            log.warning(
                "node %s sent output for job %s, which does not target it; ignored",
                identity,
                job_id,
            )
            return
        event = {"ev": "out", "job": job_id, "node": identity, "stream": stream, "data": data}
        seen = False
        for watcher in self._watchers.get(job_id, ()):
            if watcher.output:
                watcher.push(event)
                seen = True
        if not seen and self.jobs[job_id].stream:
            unread = self._unread.setdefault(job_id, [])
            if len(unread) < MAX_UNREAD_LINES:
                unread.append(event)

    # ---- deadlines -----------------------------------------------------------------
    def sweep(
        self,
        now: float,
        last_seen: dict[str, float],
        online: set[str],
        held: frozenset[str] = frozenset(),
    ) -> set[str]:
        """Give up on jobs whose node stayed away past the job's deadline.

        Returns the ids of the jobs it changed. Only pending targets are visited,
        so the cost follows the work in flight, not the size of the history. The
        jobs of ``held`` nodes (rebooting) wait for them past their deadlines.
        """
        changed: set[str] = set()
        for identity, targets in list(self.pending.items()):
            is_online = identity in online
            quiet = self._quiet_until.get(identity)
            if identity in held or (
                quiet is not None and quiet[1] == is_online and now <= quiet[0]
            ):
                continue
            seen = last_seen.get(identity, 0.0)
            soonest = math.inf
            for target in list(targets.values()):
                job = self.jobs[target.job_id]
                deadline = job.timeout + self.grace
                # Sent to a node online now (it came back, from a reboot say): it has
                # the whole deadline to take the job, not what was left of it.
                since = job.submitted
                if is_online and target.sent is not None:
                    since = max(since, target.sent)
                if target.state is State.QUEUED:
                    if now <= since + deadline:
                        soonest = min(soonest, since + deadline)
                        continue
                    self.finish(
                        identity,
                        target,
                        State.UNDELIVERED,
                        stderr=f"node {identity} did not take the job before its deadline",
                    )
                    changed.add(job.id)
                elif target.state is State.DELIVERED and not is_online:
                    if now <= seen + deadline:
                        soonest = min(soonest, seen + deadline)
                        continue
                    self.finish(
                        identity,
                        target,
                        State.LOST,
                        stderr=f"node {identity} went away while holding the job",
                    )
                    changed.add(job.id)
            if targets:
                # Valid while the node stays as online as it is now: a node going away
                # starts its held jobs' clocks, and one coming back restarts its queued
                # jobs' from when they were sent.
                self._quiet_until[identity] = (soonest, is_online)
            else:
                del self.pending[identity]
                self._quiet_until.pop(identity, None)
        return changed

    def _expect_deadline(self, identity: str, at: float) -> None:
        """A target of ``identity`` may pass its deadline as soon as ``at``."""
        quiet = self._quiet_until.get(identity)
        if quiet is not None and at < quiet[0]:
            self._quiet_until[identity] = (at, quiet[1])

    def give_up(self, identity: str, why: str) -> set[str]:
        """End every job a node still owes: ``undelivered`` if never taken, else ``lost``.

        ``why`` is the reason stored with each. Returns the ids of the jobs it changed.
        """
        changed: set[str] = set()
        for target in list(self.pending.get(identity, {}).values()):
            taken = target.state is State.DELIVERED
            self.finish(
                identity,
                target,
                State.LOST if taken else State.UNDELIVERED,
                stderr=f"{why}; " + ("it held the job" if taken else "it never took the job"),
            )
            changed.add(target.job_id)
        self.pending.pop(identity, None)
        self._quiet_until.pop(identity, None)
        return changed

    # ---- watchers ------------------------------------------------------------------
    def watch(self, job_ids: Iterable[str], output: bool, summary: bool = False) -> Watcher:
        """Subscribe to jobs; results already final are replayed at once."""
        ids = [j for j in job_ids if j in self.jobs]
        watcher = Watcher(ids, output, summary)
        for job_id in ids:
            job = self.jobs[job_id]
            if output:
                for event in self._unread.pop(job_id, ()):
                    watcher.push(event)
            for identity, target in job.results.items():
                if target.state.final:
                    watcher.push(
                        {
                            "ev": "result",
                            "job": job_id,
                            "node": identity,
                            "result": target.to_dict(),
                            "verb": job.verb,
                            "name": job.name,
                            "parent": job.parent_id,
                        }
                    )
            if self.is_done(job):
                watcher.pending.discard(job_id)
            else:
                self._watchers.setdefault(job_id, set()).add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        """Drop a subscriber."""
        for job_id in list(watcher.pending):
            subs = self._watchers.get(job_id)
            if subs is not None:
                subs.discard(watcher)
                if not subs:
                    del self._watchers[job_id]

    def is_done(self, job: JobRecord) -> bool:
        """Whether every target of the job is final (what ``job.done`` says, without a scan)."""
        return job.id not in self._open

    def _notify(self, job: JobRecord, event: dict[str, Any]) -> None:
        subs = self._watchers.get(job.id)
        if not subs:
            return
        done = self.is_done(job)
        for watcher in subs:
            watcher.push(event)
            if done:
                watcher.pending.discard(job.id)
                watcher.wake.set()
        if done:
            del self._watchers[job.id]

    # ---- listing and purging ---------------------------------------------------------
    def jobs_from(self, order: int) -> list[JobRecord]:
        """The jobs numbered ``order`` and after, oldest first."""
        jobs = list(self.jobs.values())  # in submission order: record() and load() keep it
        return jobs[bisect.bisect_left(jobs, order, key=lambda job: job.order) :]

    def resolve(self, job_id: str) -> JobRecord | None:
        """A job by id, id prefix, or ``last``."""
        if job_id == "last":
            return max(self.jobs.values(), key=lambda j: j.order, default=None)
        if job_id in self.jobs:
            return self.jobs[job_id]
        matches = [j for k, j in self.jobs.items() if k.startswith(job_id)]
        return matches[0] if len(matches) == 1 else None

    def purge(self) -> int:
        """Forget every job whose targets are all final; returns how many."""
        count = self._forget([j for j in self.jobs.values() if self.is_done(j)])
        live_parents = {j.parent_id for j in self.jobs.values()}
        for parent_id in [p for p in self.parents if p not in live_parents]:
            del self.parents[parent_id]
            self._persister.delete(PARENTS, parent_id)
        return count

    def forget_ended(self, now: float) -> int:
        """Forget jobs that ended longer than the retention ago; returns how many.

        Runs at most every FORGET_INTERVAL, and forgets at most FORGET_BATCH jobs
        a pass (the oldest first; the next pass goes on). Without a retention the
        server would hold every job it ever ran, in memory and in the datastore,
        until an operator purged them.
        """
        if self.retention <= 0 or now < self._next_forget:
            return 0
        self._next_forget = now + FORGET_INTERVAL
        cutoff = now - self.retention
        gone: list[JobRecord] = []
        for job in self.jobs.values():
            if job.submitted > cutoff or len(gone) >= FORGET_BATCH:
                break  # this one and every later one was submitted after the cutoff
            if self.is_done(job) and _ended(job) <= cutoff:
                gone.append(job)
        if gone:
            log.info(
                "forgot %d jobs that ended more than %gs ago (--job-retention)",
                len(gone),
                self.retention,
            )
        return self._forget(gone)

    def _forget(self, gone: list[JobRecord]) -> int:
        """Drop these jobs, their results, and their parents once no job of theirs is left."""
        for job in gone:
            del self.jobs[job.id]
            self._open.pop(job.id, None)
            self._unread.pop(job.id, None)
            self._persister.delete(JOBS, job.id)
            for target in job.results.values():
                self._persister.delete(RESULTS, target.key)
        for parent_id in {job.parent_id for job in gone}:
            parent = self.parents.get(parent_id)
            if parent is not None and not any(j in self.jobs for j in parent.jobs):
                del self.parents[parent_id]
                self._persister.delete(PARENTS, parent_id)
        return len(gone)

    def by_sha(self, sha: str) -> list[JobRecord]:
        """Jobs with this fingerprint, newest first."""
        return sorted(
            (j for j in self.jobs.values() if j.sha == sha), key=lambda j: j.order, reverse=True
        )


def _ended(job: JobRecord) -> float:
    """When the last of a job's targets ended (its submission if none says)."""
    return max((t.finished or 0.0 for t in job.results.values()), default=0.0) or job.submitted
