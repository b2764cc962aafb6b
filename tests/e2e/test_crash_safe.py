"""An agent killed or stopped mid-job, with real processes: no step ever runs blind.

Step 1 of a two-step orchestration writes its shell's pid to a marker file,
then works; the agent is SIGKILLed (or SIGTERMed) while it does, and a new
agent starts on the same journal. Step 2 appends to the same log as step 1,
so the log's order is the order the steps really ran in.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.e2e.helpers import (
    LiveCLI,
    job_info,
    kill_pids,
    pid_alive,
    states,
    submit,
    uid,
    wait_for,
    wait_job,
    wait_status,
)

FAST = {"heartbeat": 0.5, "server_args": ["--job-timeout-grace", "1"]}


def wait_for_file(gate: Path) -> str:
    """Shell that blocks until the test creates ``gate``.

    A job that must still be running when the agent goes away waits on a gate,
    not on a sleep: on a loaded CI machine a stop can take longer than any sleep.
    """
    return f"while [ ! -e {gate} ]; do sleep 0.05; done"


class TwoSteps:
    """A submitted two-step orchestration on node0 and the files it writes."""

    def __init__(self, cluster: Cluster, first: str, options: str = "") -> None:
        self.cluster = cluster
        token = uid()
        self.log = cluster.root / f"{token}.log"
        self.marker = cluster.root / f"{token}.pid"
        self.gate = cluster.root / f"{token}.gate"
        path = cluster.root / f"{token}.yaml"
        first = first.format(log=self.log, wait=wait_for_file(self.gate))
        path.write_text(
            "- jobs:\n"
            f"    - RUN: {options} echo $$ > {self.marker}; {first}\n"
            f"    - RUN: echo step2 >> {self.log}\n"
        )
        parents = submit(cluster, "orchestrate", str(path), "--target", "node0")
        self.first, self.second = parents[0]["jobs"]
        self.pid = int(wait_for(self._pid, "step 1 to start"))

    def _pid(self) -> str:
        text = self.marker.read_text() if self.marker.exists() else ""
        return text.strip() if text.endswith("\n") else ""

    def lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def release(self) -> None:
        """Let step 1 go past its ``{wait}``."""
        self.gate.touch()

    def restart_agent(self, sig: int, away: float = 1.0) -> None:
        """Stop node0's agent with ``sig``, wait ``away`` seconds, start it again."""
        self.cluster.stop_process("node0", sig, timeout=20.0)
        time.sleep(away)
        self.cluster.start_client("node0")

    def result(self, job_id: str) -> dict[str, Any]:
        info = wait_job(self.cluster, job_id)
        result: dict[str, Any] = info["results"]["node0"]
        return result


@pytest.fixture
def node(make_cluster: Callable[..., Cluster]) -> Iterator[Cluster]:
    cluster = make_cluster(nodes=1, **FAST)
    yield cluster
    # A job left running by a failed test must not outlive it.
    kill_pids([int(p.read_text()) for p in cluster.root.glob("*.pid") if p.read_text().strip()])


def test_sigkilled_agent_reports_the_real_success_and_step2_runs_after(node: Cluster) -> None:
    steps = TwoSteps(node, "{wait}; echo step1-done >> {log}")
    steps.restart_agent(signal.SIGKILL)
    steps.release()
    first = steps.result(steps.first)
    assert (first["state"], first["rc"]) == ("success", 0)
    assert steps.result(steps.second)["state"] == "success"
    assert steps.lines() == ["step1-done", "step2"]
    assert first["history"] == []


def test_sigkilled_agent_reports_the_real_failure_and_skips_step2(node: Cluster) -> None:
    steps = TwoSteps(node, "{wait}; echo broken >&2; exit 3")
    steps.restart_agent(signal.SIGKILL)
    steps.release()
    first = steps.result(steps.first)
    assert (first["state"], first["rc"], first["stderr"]) == ("failed", 3, "broken\n")
    assert steps.result(steps.second)["state"] == "skipped-parent"
    assert steps.lines() == []


def test_sigtermed_agent_leaves_the_job_running_and_order_holds(node: Cluster) -> None:
    steps = TwoSteps(node, "{wait}; echo step1-done >> {log}")
    node.stop_process("node0", signal.SIGTERM, timeout=20.0)
    assert pid_alive(steps.pid), "a SIGTERM must leave the job's process running"
    time.sleep(0.5)
    node.start_client("node0")
    steps.release()
    assert steps.result(steps.first)["state"] == "success"
    assert steps.result(steps.second)["state"] == "success"
    assert steps.lines() == ["step1-done", "step2"]


def test_on_stop_kill_cancels_the_running_job(make_cluster: Callable[..., Cluster]) -> None:
    node = make_cluster(nodes=1, client_args=["--on-stop", "kill"], **FAST)
    steps = TwoSteps(node, "sleep 30")
    node.stop_process("node0", signal.SIGTERM, timeout=20.0)
    assert not pid_alive(steps.pid)
    node.start_client("node0")
    first = steps.result(steps.first)
    assert first["state"] == "cancelled" and "--on-stop kill" in first["stderr"]
    assert steps.result(steps.second)["state"] == "skipped-parent"


def test_agent_and_job_both_killed_is_lost_and_step2_never_runs(node: Cluster) -> None:
    steps = TwoSteps(node, "sleep 30")
    node.stop_process("node0", signal.SIGKILL)
    # The node "reboots": the job's process group dies with the agent.
    os.killpg(steps.pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(steps.pid), "the job's shell to die")
    node.start_client("node0")
    first = steps.result(steps.first)
    assert first["state"] == "lost"
    assert "outcome is unknown" in first["stderr"]
    assert steps.result(steps.second)["state"] == "skipped-parent"
    assert steps.lines() == []


def test_the_timeout_holds_across_an_agent_restart(node: Cluster) -> None:
    steps = TwoSteps(node, "sleep 60; echo late", options="--timeout 3")
    steps.restart_agent(signal.SIGKILL, away=0.2)
    first = steps.result(steps.first)
    assert first["state"] == "timeout"
    assert steps.result(steps.second)["state"] == "skipped-parent"
    wait_for(lambda: not pid_alive(steps.pid), "the job's process group to be killed", 10)
    assert first["exec_time"] == pytest.approx(3.0, abs=1.5)


def test_a_lost_call_is_replaced_by_the_real_result_and_kept_in_history(node: Cluster) -> None:
    steps = TwoSteps(node, "sleep 1; echo finished", options="--timeout 2")
    node.stop_process("node0", signal.SIGKILL)
    wait_status(node, "node0", "offline")
    # Away past the job's timeout and the server's grace: the server calls it lost.
    wait_for(lambda: states(job_info(node, steps.first)) == {"node0": "lost"}, "the lost call")
    node.start_client("node0")
    wait_for(
        lambda: states(job_info(node, steps.first)) == {"node0": "success"},
        "the real result to replace lost",
    )
    first = job_info(node, steps.first)["results"]["node0"]
    assert first["stdout"] == "finished\n"
    assert [h["state"] for h in first["history"]] == ["lost"]
    assert first["history"][0]["at"] < first["finished"]
    assert steps.result(steps.second)["state"] == "success"


def test_streamed_output_continues_after_the_agent_returns(node: Cluster) -> None:
    gate = node.root / "gate"
    path = node.root / "stream.yaml"
    path.write_text(
        "- jobs:\n"
        f"    - RUN: echo before; while [ ! -e {gate} ]; do sleep 0.05; done; echo after-return\n"
    )
    stream = LiveCLI(node, "orchestrate", str(path), "--stream")
    try:
        stream.until(lambda lines: any("before" in line for line in lines), "the first line")
        node.stop_process("node0", signal.SIGKILL)
        time.sleep(0.5)
        node.start_client("node0")
        time.sleep(0.5)
        gate.touch()
        stream.until(lambda lines: any("after-return" in line for line in lines), "the last line")
    finally:
        stream.kill()


def test_restart_leaves_a_running_job_to_the_restarted_client(node: Cluster) -> None:
    marker, log, gate = node.root / "long.pid", node.root / "long.log", node.root / "long.gate"
    path = node.root / "long.yaml"
    long_job = f"echo $$ > {marker}; {wait_for_file(gate)}; echo long-done >> {log}"
    path.write_text(f"- async: true\n  jobs:\n    - RUN: {long_job}\n")
    [parent] = submit(node, "orchestrate", str(path), "--target", "node0")
    wait_for(lambda: marker.exists() and marker.read_text().endswith("\n"), "the long job")
    pid_before = node.clients["node0"].pid
    reply = node.json("exec", "--verb", "RESTART", "--target", "node0", "--wait")
    assert [r["state"] for r in reply["results"]] == ["success"]
    wait_for(lambda: "re-attaching to its process" in node.log("node0").read_text(), "re-attach")
    gate.touch()
    info = wait_job(node, parent["jobs"][0])
    assert states(info) == {"node0": "success"}
    assert node.clients["node0"].pid == pid_before  # re-executed in place
    assert log.read_text() == "long-done\n"
