"""Cancelling jobs (manage --cancel-job/--cancel-parent, QUEUESENTINEL), in one process.

The server and its agents run together over the memory transport with real
shells; tests/e2e/test_cancel.py drives the same through the CLI.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from directord.models import State
from tests.inprocess import InProcessCluster, run, until

BUSY = """- jobs:
    - RUN: echo $$ > {pid}; while [ ! -e {gate} ]; do sleep 0.02; done; echo one >> {log}
    - RUN: echo two >> {log}
    - RUN: echo three >> {log}
"""


def _state(c: InProcessCluster, job_id: str, node: str = "node0") -> State:
    return c.server.jobs.jobs[job_id].results[node].state


def _result(c: InProcessCluster, job_id: str, node: str = "node0") -> Any:
    return c.server.jobs.jobs[job_id].results[node]


async def _busy(c: InProcessCluster, tmp: Path) -> list[str]:
    text = BUSY.format(pid=tmp / "pid", gate=tmp / "gate", log=tmp / "log")
    parents, _ = await c.run(text, wait=False, targets=["node0"])
    await until(lambda: (tmp / "pid").exists(), "step 1 to start")
    jobs: list[str] = parents[0]["jobs"]
    return jobs


def test_cancelling_a_waiting_job_drops_it_and_the_running_one_goes_on(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        one, two, three = await _busy(c, tmp_path)
        reply = await c.call("cancel", {"jobs": [two[:12]]})
        assert reply == {"cancelled": {two: {"node0": "asked"}}}
        await until(lambda: _state(c, two).final, "step 2 cancelled")
        assert _state(c, two) is State.CANCELLED
        assert "cancelled by an operator" in _result(c, two).stderr
        (tmp_path / "gate").touch()
        await until(lambda: _state(c, three).final, "step 3")
        assert _state(c, one) is State.SUCCESS
        # A cancelled step stops the rest of its orchestration, as a failed one does.
        assert _state(c, three) is State.SKIPPED_PARENT

    run(tmp_path, scenario, nodes=1)
    assert (tmp_path / "log").read_text() == "one\n"


def test_cancelling_a_running_job_kills_its_process_group(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        one, two, three = await _busy(c, tmp_path)
        pid = int((tmp_path / "pid").read_text())
        parent = c.server.jobs.jobs[one].parent_id
        await c.call("cancel", {"parents": [parent]})
        await until(lambda: all(_state(c, j).final for j in (one, two, three)), "all ended")
        assert [_state(c, j) for j in (one, two, three)] == [State.CANCELLED] * 3
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)

    run(tmp_path, scenario, nodes=1)
    (tmp_path / "gate").touch()
    assert not (tmp_path / "log").exists()


def test_no_kill_leaves_the_running_job_to_finish(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        one, two, three = await _busy(c, tmp_path)
        parent = c.server.jobs.jobs[one].parent_id
        reply = await c.call("cancel", {"parents": [parent], "kill": False})
        assert reply["cancelled"][one] == {"node0": "asked"}
        await until(lambda: _state(c, three).final, "the waiting steps cancelled")
        assert not _state(c, one).final
        (tmp_path / "gate").touch()
        await until(lambda: _state(c, one).final, "step 1")
        assert [_state(c, j) for j in (one, two, three)] == [
            State.SUCCESS,
            State.CANCELLED,
            State.CANCELLED,
        ]

    run(tmp_path, scenario, nodes=1)
    assert (tmp_path / "log").read_text() == "one\n"


def test_a_job_for_an_absent_node_is_cancelled_by_the_server_and_never_runs(
    tmp_path: Path,
) -> None:
    async def scenario(c: InProcessCluster) -> None:
        await c.stop_agent("node1")
        parents, _ = await c.run(
            f"- jobs:\n    - RUN: echo ran >> {tmp_path}/absent\n", wait=False, targets=["node1"]
        )
        [job] = parents[0]["jobs"]
        reply = await c.call("cancel", {"jobs": [job]})
        assert reply == {"cancelled": {job: {"node1": "cancelled"}}}
        await c.start_agent("node1")
        await asyncio.sleep(0.3)
        assert _state(c, job, "node1") is State.CANCELLED

    run(tmp_path, scenario, nodes=2)
    assert not (tmp_path / "absent").exists()


def test_queuesentinel_cancels_what_waits_at_once_naming_itself(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        one, two, three = await _busy(c, tmp_path)
        parents, _ = await c.run("- jobs:\n    - QUEUESENTINEL:\n", wait=False, targets=["node0"])
        [sentinel] = parents[0]["jobs"]
        # It runs at once, although step 1 still holds the node's serial lane.
        await until(lambda: _state(c, sentinel).final, "the sentinel")
        assert _result(c, sentinel).stdout == "cancelled 2 waiting jobs"
        for job in (two, three):
            assert _state(c, job) is State.CANCELLED
            assert f"QUEUESENTINEL job {sentinel}" in _result(c, job).stderr
        assert not _state(c, one).final
        (tmp_path / "gate").touch()
        await until(lambda: _state(c, one).final, "step 1")
        assert _state(c, one) is State.SUCCESS

    run(tmp_path, scenario, nodes=1)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2 :].split()[0] in ("Z", "X")
