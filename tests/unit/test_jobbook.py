"""The server's JobBook over a MemoryDatastore-backed Persister."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from directord.components import build_job
from directord.datastores.memory import MemoryDatastore
from directord.models import State
from directord.server import jobs as jobs_module
from directord.server.jobs import (
    FORGET_INTERVAL,
    JOBS,
    MAX_OUTPUT,
    PARENTS,
    RESULTS,
    JobBook,
    PlannedJob,
)
from directord.server.persist import Persister
from directord.server.records import JobRecord

GRACE = 5.0


class Book:
    """A JobBook with its store, flushed on demand."""

    def __init__(self, retention: float = 0.0) -> None:
        self.store = MemoryDatastore()
        self.persister = Persister(self.store)
        self.book = JobBook(self.persister, grace=GRACE, retention=retention)

    def restarted(self, *, reverse: bool = False) -> Book:
        """A new book (as after a server restart) loaded from this one's stored history.

        ``reverse``: the datastore hands the jobs back newest first.
        """
        jobs, results, parents = self.stored(JOBS), self.stored(RESULTS), self.stored(PARENTS)
        if reverse:
            jobs = dict(reversed(jobs.items()))
        fresh = Book(self.book.retention)
        fresh.book.load(jobs, results, parents)
        return fresh

    def submit(
        self,
        *jobs: tuple[str, str, list[str]],
        name: str = "orch",
        is_async: bool = False,
        stream: bool = False,
    ) -> list[JobRecord]:
        planned = [PlannedJob(build_job(verb, args), targets) for verb, args, targets in jobs]
        _, records = self.book.record(name, is_async, planned, stream)
        return records

    def stored(self, namespace: str) -> dict[str, Any]:
        async def go() -> dict[str, Any]:
            await self.persister.flush()
            return await self.store.scan(namespace)

        return asyncio.run(go())


@pytest.fixture
def b() -> Book:
    return Book()


def test_record_queues_every_target(b: Book) -> None:
    j1, j2 = b.submit(("RUN", "--timeout 10 echo 1", ["n0", "n1"]), ("ECHO", "x", ["n1"]))
    assert j1.order < j2.order and j1.parent_id == j2.parent_id
    assert {n: t.state for n, t in j1.results.items()} == {"n0": State.QUEUED, "n1": State.QUEUED}
    assert [j.id for j in b.book.queued_for("n1")] == [j1.id, j2.id]  # submission order
    assert [j.id for j in b.book.queued_for("n0")] == [j1.id]
    assert b.book.queued_for("nobody") == []
    assert j1.timeout == 10.0 and j1.lane == ""
    parent = b.book.parents[j1.parent_id]
    assert parent.jobs == [j1.id, j2.id] and parent.name == "orch"
    assert set(b.stored(JOBS)) == {j1.id, j2.id}
    assert set(b.stored(PARENTS)) == {j1.parent_id}
    assert b.stored(RESULTS) == {}  # queued targets are not stored, only final results


def test_async_orchestration_gets_its_own_lane(b: Book) -> None:
    (job,) = b.submit(("ECHO", "x", ["n0"]), is_async=True)
    assert job.lane == job.parent_id


def test_queued_delivered_final(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0", "n1"]))
    t0 = job.results["n0"]
    b.book.mark_sent(t0)
    assert t0.sent is not None
    b.book.mark_delivered("n0", [job.id, "unknown-job"])
    assert t0.state is State.DELIVERED and t0.delivered is not None
    assert b.book.delivered_to("n0") == [t0]
    assert b.book.queued_for("n0") == []
    b.book.mark_delivered("n2", [job.id])  # not a target: ignored
    assert "n2" not in job.results
    b.book.finish("n0", t0, State.SUCCESS, rc=0, stdout="out", stderr="", exec_time=0.5)
    assert t0.state is State.SUCCESS and t0.rc == 0 and t0.stdout == "out"
    assert t0.finished is not None and t0.roundtrip is not None and t0.roundtrip >= 0
    assert b.book.delivered_to("n0") == []
    assert job.done is False
    stored = b.stored(RESULTS)
    assert list(stored) == [t0.key]
    assert stored[t0.key]["state"] == "success" and stored[t0.key]["stdout"] == "out"
    b.book.finish("n1", job.results["n1"], State.FAILED, rc=3, stderr="bad")
    assert job.done is True
    assert b.stored(RESULTS)[job.results["n1"].key]["rc"] == 3


def test_delivered_does_not_go_back_to_queued_or_change_final(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0"]))
    target = job.results["n0"]
    b.book.mark_delivered("n0", [job.id])
    first = target.delivered
    b.book.mark_delivered("n0", [job.id])
    assert target.delivered == first
    b.book.finish("n0", target, State.SUCCESS)
    b.book.mark_delivered("n0", [job.id])
    assert target.state is State.SUCCESS


def test_finish_is_idempotent(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0"]))
    target = job.results["n0"]
    watcher = b.book.watch([job.id], output=False)
    b.book.finish("n0", target, State.SUCCESS, rc=0, stdout="first")
    assert b.stored(RESULTS)[target.key]["stdout"] == "first"
    b.book.finish("n0", target, State.LOST, stderr="late sweep")
    b.book.finish("n0", target, State.FAILED, rc=1, stdout="second")
    assert (target.state, target.rc, target.stdout) == (State.SUCCESS, 0, "first")
    assert b.stored(RESULTS)[target.key]["state"] == "success"
    assert [e["result"]["state"] for e in watcher.take()] == ["success"]


def test_finish_cuts_huge_output(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0"]))
    b.book.finish(
        "n0",
        job.results["n0"],
        State.SUCCESS,
        stdout="x" * (MAX_OUTPUT + 10),
        stderr="y" * (MAX_OUTPUT + 1),
    )
    assert len(job.results["n0"].stdout) == MAX_OUTPUT
    assert len(job.results["n0"].stderr) == MAX_OUTPUT


# ---- deadlines ------------------------------------------------------------------------------


def test_sweep_marks_undelivered_after_timeout_plus_grace(b: Book) -> None:
    (job,) = b.submit(("RUN", "--timeout 10 echo", ["n0", "n1"]))
    deadline = job.submitted + 10 + GRACE
    b.book.mark_delivered("n1", [job.id])
    online = {"n1"}
    assert b.book.sweep(deadline, {"n1": deadline}, online) == set()  # not past it yet
    assert job.results["n0"].state is State.QUEUED
    assert b.book.sweep(deadline + 0.01, {"n1": deadline}, online) == {job.id}
    assert job.results["n0"].state is State.UNDELIVERED
    assert "did not take the job" in job.results["n0"].stderr
    assert job.results["n1"].state is State.DELIVERED  # online node: still running it
    assert b.book.sweep(deadline + 10_000, {"n1": deadline}, online) == set()
    assert job.results["n1"].state is State.DELIVERED
    assert "n0" not in b.book.pending
    assert b.stored(RESULTS)[job.results["n0"].key]["state"] == "undelivered"


def test_sweep_marks_lost_from_the_nodes_last_sighting(b: Book) -> None:
    (job,) = b.submit(("RUN", "--timeout 10 echo", ["n0"]))
    b.book.mark_delivered("n0", [job.id])
    last_seen = job.submitted + 100.0  # the node was seen long after submission
    lost_at = last_seen + 10 + GRACE
    assert b.book.sweep(lost_at, {"n0": last_seen}, set()) == set()
    assert job.results["n0"].state is State.DELIVERED
    assert b.book.sweep(lost_at + 0.01, {"n0": last_seen}, set()) == {job.id}
    assert job.results["n0"].state is State.LOST
    assert "went away" in job.results["n0"].stderr
    assert job.done


def test_sweep_uses_each_jobs_own_timeout(b: Book) -> None:
    short, long_ = b.submit(
        ("RUN", "--timeout 1 echo a", ["n0"]), ("RUN", "--timeout 100 echo b", ["n0"])
    )
    now = short.submitted + 1 + GRACE + 1
    assert b.book.sweep(now, {}, set()) == {short.id}
    assert short.results["n0"].state is State.UNDELIVERED
    assert long_.results["n0"].state is State.QUEUED
    assert [j.id for j in b.book.queued_for("n0")] == [long_.id]


def test_a_job_submitted_after_a_pass_still_ends_at_its_own_deadline(b: Book) -> None:
    (long_,) = b.submit(("RUN", "--timeout 100 echo a", ["n0"]))
    assert b.book.sweep(long_.submitted + 1, {}, set()) == set()  # n0 is quiet for ~100 s
    (short,) = b.submit(("RUN", "--timeout 1 echo b", ["n0"]))
    assert b.book.sweep(short.submitted + 1 + GRACE + 0.01, {}, set()) == {short.id}
    assert short.results["n0"].state is State.UNDELIVERED
    assert long_.results["n0"].state is State.QUEUED


def test_a_node_going_away_starts_the_clock_of_the_jobs_it_holds(b: Book) -> None:
    (job,) = b.submit(("RUN", "--timeout 10 echo", ["n0"]))
    b.book.mark_delivered("n0", [job.id])
    left = job.submitted + 50.0
    for when in (job.submitted + 1, left):  # online: a job it holds never runs out
        assert b.book.sweep(when, {"n0": when}, {"n0"}) == set()
    assert b.book.sweep(left + 10 + GRACE, {"n0": left}, set()) == set()
    assert b.book.sweep(left + 10 + GRACE + 0.01, {"n0": left}, set()) == {job.id}
    assert job.results["n0"].state is State.LOST


def test_a_job_sent_to_a_node_that_went_away_counts_from_its_submission(b: Book) -> None:
    (job,) = b.submit(("RUN", "--timeout 10 echo", ["n0"]))
    b.book.mark_sent(job.results["n0"])
    job.results["n0"].sent = job.submitted + 8  # sent late, never acknowledged
    overdue = job.submitted + 10 + GRACE + 0.01
    # Online: the whole deadline counts from the sending.
    assert b.book.sweep(overdue, {"n0": overdue}, {"n0"}) == set()
    # Gone: from the submission, as for any node that never took it.
    assert b.book.sweep(overdue + 0.01, {"n0": overdue}, set()) == {job.id}
    assert job.results["n0"].state is State.UNDELIVERED


# ---- watchers -------------------------------------------------------------------------------


def test_watchers_get_results_as_they_finish(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0", "n1"]))
    watcher = b.book.watch([job.id, "no-such-job"], output=True)
    assert watcher.pending == {job.id} and watcher.take() == []
    b.book.output("n0", job.id, "stdout", "line 1")
    b.book.finish("n0", job.results["n0"], State.SUCCESS, stdout="line 1\n")
    events = watcher.take()
    assert [e["ev"] for e in events] == ["out", "result"]
    assert events[0] == {
        "ev": "out",
        "job": job.id,
        "node": "n0",
        "stream": "stdout",
        "data": "line 1",
    }
    assert events[1]["node"] == "n0" and events[1]["result"]["stdout"] == "line 1\n"
    assert events[1]["verb"] == "RUN" and events[1]["parent"] == job.parent_id
    assert watcher.pending == {job.id}
    b.book.finish("n1", job.results["n1"], State.FAILED, rc=1)
    assert [e["node"] for e in watcher.take()] == ["n1"]
    assert watcher.pending == set()  # the job is done for this watcher
    b.book.output("n1", job.id, "stdout", "after the end")
    assert watcher.take() == []


def test_output_goes_only_to_watchers_that_asked(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0"]))
    quiet = b.book.watch([job.id], output=False)
    b.book.output("n0", job.id, "stderr", "noise")
    assert quiet.take() == []


def test_watchers_get_final_results_replayed(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0", "n1"]))
    b.book.finish("n0", job.results["n0"], State.SUCCESS, stdout="early")
    late = b.book.watch([job.id], output=False)
    replayed = late.take()
    assert [(e["node"], e["result"]["stdout"]) for e in replayed] == [("n0", "early")]
    assert late.pending == {job.id}
    b.book.finish("n1", job.results["n1"], State.SUCCESS)
    assert [e["node"] for e in late.take()] == ["n1"]
    after = b.book.watch([job.id], output=False)  # a done job replays everything at once
    assert sorted(e["node"] for e in after.take()) == ["n0", "n1"]
    assert after.pending == set()


def test_summary_watchers_drop_output_of_successes_only(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0", "n1"]))
    watcher = b.book.watch([job.id], output=False, summary=True)
    b.book.finish("n0", job.results["n0"], State.SUCCESS, stdout="big", stderr="warn")
    b.book.finish("n1", job.results["n1"], State.FAILED, stdout="why", stderr="boom")
    events = {e["node"]: e["result"] for e in watcher.take()}
    assert (events["n0"]["stdout"], events["n0"]["stderr"]) == ("", "")
    assert (events["n1"]["stdout"], events["n1"]["stderr"]) == ("why", "boom")
    assert job.results["n0"].stdout == "big"  # only the event is trimmed


def test_unwatch_stops_events(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0"]))
    watcher = b.book.watch([job.id], output=True)
    b.book.unwatch(watcher)
    b.book.output("n0", job.id, "stdout", "x")
    b.book.finish("n0", job.results["n0"], State.SUCCESS)
    assert watcher.take() == []


# ---- restart, lookup, purge -----------------------------------------------------------------


def test_load_rebuilds_pending_work_from_stored_history(b: Book) -> None:
    j1, j2 = b.submit(("RUN", "echo 1", ["n0", "n1"]), ("RUN", "echo 2", ["n1"]))
    b.book.mark_delivered("n1", [j1.id])
    b.book.finish("n0", j1.results["n0"], State.SUCCESS, stdout="done")
    restarted = b.restarted()
    fresh = restarted.book
    assert fresh.jobs[j1.id].results["n0"].state is State.SUCCESS
    assert fresh.jobs[j1.id].results["n0"].stdout == "done"
    # Delivered was never stored: after a restart it is queued again (the node's
    # journal makes the re-send harmless).
    assert fresh.jobs[j1.id].results["n1"].state is State.QUEUED
    assert [j.id for j in fresh.queued_for("n1")] == [j1.id, j2.id]
    assert fresh.queued_for("n0") == []
    assert fresh.parents[j1.parent_id].jobs == [j1.id, j2.id]
    (j3,) = restarted.submit(("ECHO", "x", ["n0"]))
    assert j3.order > j2.order  # ordering continues after the stored history


def test_resolve(b: Book) -> None:
    assert b.book.resolve("last") is None
    j1, j2 = b.submit(("ECHO", "a", ["n0"]), ("ECHO", "b", ["n0"]))
    assert b.book.resolve("last") is j2
    assert b.book.resolve(j1.id) is j1
    assert b.book.resolve(j1.id[:13]) is j1  # a unique prefix
    assert b.book.resolve("") is None  # matches every job: ambiguous
    assert b.book.resolve("zzzz-not-a-job") is None


def test_by_sha_newest_first(b: Book) -> None:
    j1, _, j3 = b.submit(
        ("ECHO", "same", ["n0"]), ("ECHO", "other", ["n0"]), ("ECHO", "same", ["n1"])
    )
    assert b.book.by_sha(j1.sha) == [j3, j1]


def test_purge_forgets_only_finished_jobs(b: Book) -> None:
    done, running = b.submit(("ECHO", "a", ["n0"]), ("ECHO", "b", ["n0"]))
    (other,) = b.submit(("ECHO", "c", ["n1"]), name="second")
    b.book.finish("n0", done.results["n0"], State.SUCCESS)
    b.book.finish("n1", other.results["n1"], State.FAILED)
    assert b.book.purge() == 2
    assert set(b.book.jobs) == {running.id}
    assert set(b.book.parents) == {running.parent_id}
    assert set(b.stored(JOBS)) == {running.id}
    assert b.stored(RESULTS) == {}
    assert set(b.stored(PARENTS)) == {running.parent_id}
    assert b.book.purge() == 0


# ---- retention ------------------------------------------------------------------------------
def _ended_at(job: JobRecord, when: float) -> None:
    """Date a finished job: submitted and ended at ``when``."""
    job.submitted = when
    for target in job.results.values():
        target.finished = when


def test_jobs_that_ended_past_the_retention_are_forgotten_with_their_results() -> None:
    b = Book(retention=100.0)
    old_done, old_running = b.submit(("ECHO", "a", ["n0", "n1"]), ("ECHO", "b", ["n0"]))
    (old_alone,) = b.submit(("ECHO", "c", ["n1"]), name="second")
    (recent,) = b.submit(("ECHO", "d", ["n0"]), name="third")
    for job in (old_done, old_alone, recent):
        for identity, target in job.results.items():
            b.book.finish(identity, target, State.SUCCESS)
    now = 10_000.0
    for job in (old_done, old_running, old_alone):
        _ended_at(job, now - 500)
    _ended_at(recent, now - 50)
    assert b.book.forget_ended(now) == 2
    # A job still running stays, however old, and so does its orchestration.
    assert set(b.book.jobs) == {old_running.id, recent.id}
    assert set(b.book.parents) == {old_running.parent_id, recent.parent_id}
    assert set(b.stored(JOBS)) == {old_running.id, recent.id}
    assert set(b.stored(RESULTS)) == {f"{recent.id}/n0"}
    assert set(b.stored(PARENTS)) == {old_running.parent_id, recent.parent_id}


def test_forgetting_runs_once_an_interval_and_a_bounded_batch_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jobs_module, "FORGET_BATCH", 2)
    b = Book(retention=100.0)
    records = b.submit(*[("ECHO", str(i), ["n0"]) for i in range(5)])
    for job in records:
        b.book.finish("n0", job.results["n0"], State.SUCCESS)
        _ended_at(job, 0.0)
    now = 1_000.0
    assert b.book.forget_ended(now) == 2
    assert b.book.forget_ended(now + 1) == 0  # within the interval: not looked at
    assert b.book.forget_ended(now + FORGET_INTERVAL) == 2
    assert [j.id for j in b.book.jobs.values()] == [records[4].id]  # oldest went first
    assert b.book.forget_ended(now + 2 * FORGET_INTERVAL) == 1
    assert b.book.jobs == {} and b.book.parents == {}


def test_no_retention_keeps_every_job() -> None:
    b = Book(retention=0.0)
    (job,) = b.submit(("ECHO", "a", ["n0"]))
    b.book.finish("n0", job.results["n0"], State.SUCCESS)
    _ended_at(job, 0.0)
    assert b.book.forget_ended(1e12) == 0
    assert set(b.book.jobs) == {job.id}


def test_a_restarted_server_forgets_from_the_oldest_whatever_order_the_store_gives() -> None:
    b = Book(retention=100.0)
    old, new = b.submit(("ECHO", "a", ["n0"]), ("ECHO", "b", ["n0"]))
    for job in (old, new):
        b.book.finish("n0", job.results["n0"], State.SUCCESS)
    _ended_at(old, 0.0)
    _ended_at(new, 10_000.0)
    b.book.store(old)
    b.book.store(new)
    fresh = b.restarted(reverse=True)
    assert list(fresh.book.jobs) == [old.id, new.id]
    assert fresh.book.forget_ended(10_050.0) == 1
    assert set(fresh.book.jobs) == {new.id}


def test_a_job_is_done_exactly_when_every_target_is_final_without_scanning_them(b: Book) -> None:
    (job,) = b.submit(("ECHO", "a", ["n0", "n1", "n2"]))
    assert not b.book.is_done(job) and not job.done
    b.book.mark_sent(job.results["n0"])
    b.book.mark_delivered("n0", [job.id])
    b.book.finish("n0", job.results["n0"], State.SUCCESS)
    b.book.finish("n1", job.results["n1"], State.LOST)
    b.book.finish("n1", job.results["n1"], State.FAILED)  # a second end changes nothing
    assert not b.book.is_done(job) and not job.done
    # A restart counts again what is still owed.
    fresh = b.restarted()
    assert not fresh.book.is_done(fresh.book.jobs[job.id])
    b.book.finish("n2", job.results["n2"], State.SUCCESS)
    assert b.book.is_done(job) and job.done
    # The node's own report replacing a lost keeps the job done.
    b.book.finish("n1", job.results["n1"], State.SUCCESS, reported=True)
    assert b.book.is_done(job) and job.results["n1"].state is State.SUCCESS
    assert b.restarted().book.is_done(job)


def test_finish_refuses_a_state_that_is_not_final(b: Book) -> None:
    (job,) = b.submit(("ECHO", "a", ["n0"]))
    with pytest.raises(ValueError, match="final"):
        b.book.finish("n0", job.results["n0"], State.DELIVERED)
    assert not b.book.is_done(job)


def test_jobs_from_a_number_are_listed_oldest_first_even_after_a_restart(b: Book) -> None:
    jobs = b.submit(*[("RUN", f"echo {i}", ["n0"]) for i in range(5)])
    for book in (b.book, b.restarted(reverse=True).book):
        assert [j.id for j in book.jobs_from(0)] == [j.id for j in jobs]
        assert [j.id for j in book.jobs_from(jobs[2].order)] == [j.id for j in jobs[2:]]
        assert book.jobs_from(jobs[-1].order + 1) == []


def test_a_nodes_real_result_replaces_lost_and_the_history_keeps_it(b: Book) -> None:
    (job,) = b.submit(("RUN", "echo", ["n0"]))
    target = job.results["n0"]
    assert target.to_dict()["history"] == []  # none yet, listed as an empty one
    b.book.finish("n0", target, State.LOST, stderr="went away")
    b.book.finish("n0", target, State.SUCCESS, stdout="ok\n", reported=True)
    b.book.finish("n0", target, State.FAILED, reported=True)  # a second report changes nothing
    assert (target.state, target.stdout) == (State.SUCCESS, "ok\n")
    [lost] = target.to_dict()["history"]
    assert (lost["state"], lost["stderr"]) == ("lost", "went away")
    again = b.restarted().book.jobs[job.id].results["n0"]
    assert again.to_dict()["history"] == [lost]
