"""Durable job processes with real shells: status files, re-attaching, deadlines, pid reuse."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from directord.agent.jobprocs import ProcFiles, find_job_processes, reattach, run_durable
from tests.integration.test_executor import alive_in_group

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


# Unique per run: a job shell of an earlier or parallel test must never match.
JOB = f"job-{uuid.uuid4().hex}"


@pytest.fixture
def files(tmp_path: Path) -> ProcFiles:
    return ProcFiles.of(tmp_path, JOB)


def _never_leave() -> bool:
    return False


def _always_leave() -> bool:
    return True


def test_files_are_named_by_a_digest_of_the_job_id(tmp_path: Path) -> None:
    hostile = ProcFiles.of(tmp_path, "../../etc/passwd")
    assert Path(hostile.out).parent == tmp_path
    assert ProcFiles.of(tmp_path, "a").base != ProcFiles.of(tmp_path, "b").base


def test_a_durable_shell_records_output_and_status_and_knows_its_job(files: ProcFiles) -> None:
    spawned: list[int] = []
    result = run(
        run_durable(
            'echo "out $DIRECTORD_JOB_ID"; echo err >&2; exit 4',
            files,
            JOB,
            timeout=30,
            on_spawn=spawned.append,
            leave=_never_leave,
        )
    )
    assert (result.rc, result.stdout, result.stderr) == (4, f"out {JOB}\n", "err\n")
    status = files.exit_status()
    assert status is not None and status[0] == 4
    assert len(spawned) == 1 and spawned[0] > 0
    assert oct(os.stat(files.out).st_mode & 0o777) == "0o600"


def test_the_users_exit_and_line_numbers_are_unchanged(files: ProcFiles) -> None:
    result = run(run_durable("missing-command-xyz", files, JOB, leave=_never_leave))
    assert result.rc == 127
    assert result.stderr.startswith("/bin/sh: 1: missing-command-xyz: not found")


def test_a_left_process_is_found_and_collected_when_it_ends(files: ProcFiles) -> None:
    spawned: list[int] = []

    async def scenario() -> tuple[Any, float] | None:
        task = asyncio.create_task(
            run_durable(
                "sleep 0.5; echo done; exit 3",
                files,
                JOB,
                on_spawn=spawned.append,
                leave=_always_leave,
            )
        )
        await asyncio.sleep(0.1)
        task.cancel()  # the agent stops, leaving the job
        with pytest.raises(asyncio.CancelledError):
            await task
        found = find_job_processes()
        assert found.get(JOB) == spawned[0]
        return await reattach(JOB, found[JOB], files, deadline=None, leave=_never_leave)

    found = run(scenario())
    assert found is not None
    result, ended = found
    assert (result.rc, result.stdout) == (3, "done\n")
    assert ended == pytest.approx(time.time(), abs=2)


def test_a_job_that_ended_unwatched_is_read_from_its_status_file(files: ProcFiles) -> None:
    Path(files.out).write_text("partial\n")
    Path(files.err).write_text("")
    Path(files.status).write_text("0\n")
    os.utime(files.status, (1000.0, 1000.0))
    found = run(reattach(JOB, None, files, deadline=None, leave=_never_leave))
    assert found is not None
    result, ended = found
    assert (result.rc, result.stdout, ended) == (0, "partial\n", 1000.0)


@pytest.mark.parametrize("status", [None, "", "garbage"])
def test_no_process_and_no_readable_status_is_unknown(files: ProcFiles, status: str | None) -> None:
    if status is not None:
        Path(files.status).write_text(status)
    gone = _dead_pid()
    assert run(reattach(JOB, gone, files, deadline=None, leave=_never_leave)) is None


def test_a_recycled_pid_is_never_taken_for_the_job(files: ProcFiles) -> None:
    # This pid is alive, but it is no job's shell (and not this job's).
    assert run(reattach(JOB, os.getpid(), files, deadline=None, leave=_never_leave)) is None


def test_a_job_past_its_deadline_is_killed_when_reattached(files: ProcFiles) -> None:
    spawned: list[int] = []

    async def scenario() -> tuple[Any, float] | None:
        started = time.time()
        task = asyncio.create_task(
            run_durable(
                "sleep 30 & sleep 30; echo late",
                files,
                JOB,
                timeout=0.3,
                on_spawn=spawned.append,
                leave=_always_leave,
            )
        )
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)  # the deadline passes with nobody watching
        return await reattach(JOB, spawned[0], files, deadline=started + 0.3, leave=_never_leave)

    found = run(scenario())
    assert found is not None
    result, _ = found
    assert result.timed_out and result.rc is None
    assert _group_dies(spawned[0])  # the whole group, the background sleep too


def test_cancelled_without_leave_kills_the_group(files: ProcFiles) -> None:
    spawned: list[int] = []

    async def scenario() -> None:
        task = asyncio.create_task(
            run_durable("sleep 30", files, JOB, on_spawn=spawned.append, leave=_never_leave)
        )
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(scenario())
    assert _group_dies(spawned[0])


def test_streamed_lines_after_reattaching_are_forwarded(files: ProcFiles, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    spawned: list[int] = []
    lines: list[tuple[str, str]] = []

    async def scenario() -> None:
        task = asyncio.create_task(
            run_durable(
                f"echo before; while [ ! -e {gate} ]; do sleep 0.02; done; echo after; echo e >&2",
                files,
                JOB,
                on_spawn=spawned.append,
                leave=_always_leave,
            )
        )
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        attached = asyncio.create_task(
            reattach(
                JOB,
                spawned[0],
                files,
                deadline=None,
                on_output=lambda s, line: lines.append((s, line)),
                leave=_never_leave,
            )
        )
        await asyncio.sleep(0.2)
        gate.touch()
        found = await attached
        assert found is not None and found[0].stdout == "before\nafter\n"

    run(scenario())
    assert lines == [("stdout", "after"), ("stderr", "e")]


def test_killed_by_a_signal_leaves_no_status(files: ProcFiles) -> None:
    result = run(run_durable("kill -KILL $$", files, JOB, leave=_never_leave))
    assert result.rc == -signal.SIGKILL
    assert files.exit_status() is None


def _group_dies(pgid: int) -> bool:
    deadline = time.monotonic() + 10
    while alive_in_group(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _dead_pid() -> int:
    """A pid that no process has (a reaped child's)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_process_of_another_user_naming_the_job_is_not_taken_for_it(
    files: ProcFiles, tmp_path: Path
) -> None:
    # A local user starts a session leader whose environment claims this job.
    impostor = subprocess.Popen(
        ["sleep", "30"],
        env={"DIRECTORD_JOB_ID": JOB, "PATH": os.environ["PATH"]},
        start_new_session=True,
        user=65534,
        group=65534,
        extra_groups=[],
    )
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not Path(f"/proc/{impostor.pid}").exists():
            time.sleep(0.01)
        assert JOB not in find_job_processes()
        assert run(reattach(JOB, impostor.pid, files, deadline=None, leave=_never_leave)) is None
        assert impostor.poll() is None  # not waited for, not killed
    finally:
        impostor.kill()
        impostor.wait()


def test_output_files_of_running_jobs_are_cut_back_on_one_shared_timer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two jobs writing without end: while they run, each file stays near the cap."""
    from directord.agent import jobprocs

    monkeypatch.setattr(jobprocs, "MAX_CAPTURE", 1000)
    monkeypatch.setattr(jobprocs, "CAP_INTERVAL", 0.05)
    line = "0123456789" * 4
    writer = f"i=0; while [ $i -lt 400 ]; do echo {line}; i=$((i+1)); sleep 0.002; done"
    sizes: list[int] = []

    async def both() -> list[Any]:
        jobs = [ProcFiles.of(tmp_path, f"{JOB}-{n}") for n in range(2)]
        tasks = [
            asyncio.create_task(
                run_durable(writer, f, f"{JOB}-{n}", timeout=30, leave=_never_leave)
            )
            for n, f in enumerate(jobs)
        ]
        while not all(t.done() for t in tasks):
            await asyncio.sleep(0.1)
            # Past the cap the writer goes on into a hole: count the blocks held.
            sizes.extend(os.stat(f.out).st_blocks * 512 for f in jobs if os.path.exists(f.out))
        return [t.result() for t in tasks]

    results = run(both())
    assert [r.rc for r in results] == [0, 0]
    assert all(len(r.stdout) == 1000 for r in results)
    assert sizes and max(sizes) < 16_000, sizes  # unbounded, each would reach 16.4 kB
