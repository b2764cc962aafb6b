"""Jobs outlive their agent: stop it mid-job, start another, and the order and results hold.

In one process over the memory transport, with real shells: the agent is
stopped (as SIGTERM or RESTART stop it) while step 1 runs, a new agent takes
its journal, and step 2 must start only after step 1 really ended. The
SIGKILL cases, with real processes, are in tests/e2e/test_crash_safe.py.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from directord.models import State
from tests.inprocess import InProcessCluster, run, until

STEPS = """- jobs:
    - RUN: {first}
    - RUN: echo step2 >> {log}
"""


def _target(c: InProcessCluster, job_id: str) -> State:
    return c.server.jobs.jobs[job_id].results["node0"].state


async def _two_steps(
    c: InProcessCluster, first: str, log: Path, gate: Path
) -> tuple[str, str, int]:
    """Submit step 1 (waits for ``gate``, then ``first``) and step 2; stop the agent in step 1.

    Returns both job ids and the pid of step 1's shell.
    """
    body = f"while [ ! -e {gate} ]; do sleep 0.02; done; {first}"
    parents, _ = await c.run(STEPS.format(first=body, log=log), wait=False)
    one, two = parents[0]["jobs"]
    agent = c.agents["node0"]
    await until(lambda: agent.runner._procs, "step 1 to start its process")
    pid = agent.runner._procs[one]
    await c.stop_agent("node0")
    assert not log.exists()
    return one, two, pid


def test_a_job_left_running_by_a_stopped_agent_reports_success_and_keeps_order(
    tmp_path: Path,
) -> None:
    log, gate = tmp_path / "log", tmp_path / "gate"

    async def scenario(c: InProcessCluster) -> None:
        first, second, _ = await _two_steps(c, f"echo step1-done >> {log}", log, gate)
        gate.touch()  # step 1 ends while no agent watches it
        await until(lambda: log.exists(), "step 1 to finish on its own")
        await asyncio.sleep(0.2)
        assert log.read_text() == "step1-done\n"  # step 2 waits for an agent
        await c.start_agent("node0")
        await until(lambda: _target(c, second).final, "step 2")
        assert _target(c, first) is State.SUCCESS
        assert _target(c, second) is State.SUCCESS

    run(tmp_path, scenario, nodes=1)
    assert log.read_text() == "step1-done\nstep2\n"


def test_a_job_still_running_when_the_agent_returns_is_awaited(tmp_path: Path) -> None:
    log, gate = tmp_path / "log", tmp_path / "gate"

    async def scenario(c: InProcessCluster) -> None:
        first, second, _ = await _two_steps(c, f"echo step1-done >> {log}", log, gate)
        await c.start_agent("node0")
        await asyncio.sleep(0.3)
        assert not _target(c, first).final and not log.exists()  # step 2 waits
        gate.touch()
        await until(lambda: _target(c, second).final, "step 2")
        record = c.server.jobs.jobs[first].results["node0"]
        assert record.state is State.SUCCESS and record.to_dict()["history"] == []

    run(tmp_path, scenario, nodes=1)
    assert log.read_text() == "step1-done\nstep2\n"


def test_a_job_that_fails_unwatched_is_failed_with_its_code_and_stops_the_rest(
    tmp_path: Path,
) -> None:
    log, gate = tmp_path / "log", tmp_path / "gate"

    async def scenario(c: InProcessCluster) -> None:
        first, second, _ = await _two_steps(c, "echo bad >&2; exit 7", log, gate)
        gate.touch()
        await asyncio.sleep(0.3)
        await c.start_agent("node0")
        await until(lambda: _target(c, second).final, "step 2")
        record = c.server.jobs.jobs[first].results["node0"]
        assert (record.state, record.rc, record.stderr) == (State.FAILED, 7, "bad\n")
        assert _target(c, second) is State.SKIPPED_PARENT

    run(tmp_path, scenario, nodes=1)
    assert not log.exists()


def test_the_deadline_of_a_job_holds_across_an_agent_restart(tmp_path: Path) -> None:
    log, gate = tmp_path / "log", tmp_path / "gate"

    async def scenario(c: InProcessCluster) -> None:
        parents, _ = await c.run(
            STEPS.format(first=f"--timeout 1 sleep 30; echo woke >> {log}", log=log), wait=False
        )
        first, second = parents[0]["jobs"]
        agent = c.agents["node0"]
        await until(lambda: agent.runner._procs, "step 1 to start")
        pid = agent.runner._procs[first]
        await c.stop_agent("node0")
        await asyncio.sleep(1.2)  # past the deadline, with no agent
        assert _alive(pid)
        await c.start_agent("node0")
        await until(lambda: _target(c, second).final, "step 2")
        assert _target(c, first) is State.TIMEOUT
        assert _target(c, second) is State.SKIPPED_PARENT
        assert not _alive(pid)

    run(tmp_path, scenario, nodes=1)
    assert not log.exists() and not gate.exists()


def test_on_stop_kill_cancels_the_running_job_and_the_rest(tmp_path: Path) -> None:
    log, gate = tmp_path / "log", tmp_path / "gate"

    async def scenario(c: InProcessCluster) -> None:
        await c.stop_agent("node0")
        await c.start_agent("node0", on_stop="kill")
        first, second, _ = await _two_steps(c, f"echo step1-done >> {log}", log, gate)
        await until(lambda: _target(c, first).final, "step 1's result")
        record = c.server.jobs.jobs[first].results["node0"]
        assert record.state is State.CANCELLED
        assert "--on-stop kill" in record.stderr
        await c.start_agent("node0")
        await until(lambda: _target(c, second).final, "step 2")
        assert _target(c, second) is State.SKIPPED_PARENT

    run(tmp_path, scenario, nodes=1)
    (tmp_path / "gate").touch()
    assert not log.exists()


def test_a_job_process_gone_without_a_status_is_lost_and_stops_the_rest(tmp_path: Path) -> None:
    log, gate = tmp_path / "log", tmp_path / "gate"

    async def scenario(c: InProcessCluster) -> None:
        first, second, pid = await _two_steps(c, f"echo step1-done >> {log}", log, gate)
        os.killpg(pid, 9)  # the node "rebooted" under the job
        # Reaped here: an agent that is not the job's parent finds no process.
        os.waitpid(pid, 0)
        await c.start_agent("node0")
        await until(lambda: _target(c, second).final, "step 2")
        record = c.server.jobs.jobs[first].results["node0"]
        assert record.state is State.LOST
        assert "outcome is unknown" in record.stderr
        assert _target(c, second) is State.SKIPPED_PARENT

    run(tmp_path, scenario, nodes=1)
    gate.touch()
    assert not log.exists()


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")
