"""The job rules, with the server and its agents in one process (tests/inprocess.py).

Order on a node, an orchestration stopped by a failure, the node cache,
run-once, timeouts, asynchronous orchestrations, who is targeted, jobs for a
node that is away, QUERY and JOB_WAIT. Each test takes a fraction of a
second: no process starts but the jobs' own shells.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from directord.errors import APIError, OrchestrationError
from directord.server import jobs as jobs_module
from directord.server.jobs import JOBS, RESULTS
from tests.inprocess import InProcessCluster, cluster, run, states, until


def test_jobs_of_an_orchestration_run_in_order_on_each_node(tmp_path: Path) -> None:
    log = tmp_path / "order-{{ identity }}"
    steps = "".join(f"    - RUN: sleep 0.0{9 - i}; echo {i} >> {log}\n" for i in range(5))

    async def scenario(c: InProcessCluster) -> None:
        await c.run(f"- jobs:\n{steps}")

    run(tmp_path, scenario)
    for node in ("node0", "node1"):
        assert (tmp_path / f"order-{node}").read_text().split() == ["0", "1", "2", "3", "4"]


def test_a_failure_skips_the_rest_of_its_orchestration_on_that_node_only(tmp_path: Path) -> None:
    text = """- jobs:
    - RUN: echo first
    - RUN: '[ {{ identity }} = node1 ] || exit 3'
    - RUN: echo third
- jobs:
    - RUN: echo next orchestration
"""

    async def scenario(c: InProcessCluster) -> None:
        parents, results = await c.run(text)
        first, failing, third = parents[0]["jobs"]
        assert states(results, first) == {"node0": "success", "node1": "success"}
        assert states(results, failing) == {"node0": "failed", "node1": "success"}
        assert results[failing]["node0"]["rc"] == 3
        assert states(results, third) == {"node0": "skipped-parent", "node1": "success"}
        (nxt,) = parents[1]["jobs"]
        assert states(results, nxt) == {"node0": "success", "node1": "success"}

    run(tmp_path, scenario)


def test_the_cache_skips_what_succeeded_and_three_ways_bypass_it(tmp_path: Path) -> None:
    count = tmp_path / "count-{{ identity }}"
    job = f"- jobs:\n    - RUN: echo x >> {count}\n"

    async def scenario(c: InProcessCluster) -> None:
        _, results = await c.run(job)
        assert {r["state"] for r in results[next(iter(results))].values()} == {"success"}
        _, again = await c.run(job)
        assert {r["state"] for r in again[next(iter(again))].values()} == {"skipped-cache"}
        await c.run(job, ignore_cache=True)
        await c.run(job.replace("RUN: ", "RUN: --skip-cache "))
        await c.run(job.replace("RUN: ", "CACHEEVICT: jobs\n    - RUN: "))

    run(tmp_path, scenario)
    for node in ("node0", "node1"):
        assert len((tmp_path / f"count-{node}").read_text().split()) == 4


def test_a_failed_job_is_not_a_cache_hit(tmp_path: Path) -> None:
    flag = tmp_path / "ok"
    job = f"- jobs:\n    - RUN: test -e {flag}\n"

    async def scenario(c: InProcessCluster) -> None:
        _, first = await c.run(job)
        assert set(states(first, next(iter(first))).values()) == {"failed"}
        flag.touch()
        _, second = await c.run(job)
        assert set(states(second, next(iter(second))).values()) == {"success"}

    run(tmp_path, scenario)


def test_run_once_runs_on_exactly_one_node(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        parents, results = await c.run("- jobs:\n    - RUN: --run-once echo once\n")
        (job,) = parents[0]["jobs"]
        assert len(results[job]) == 1 and parents[0]["targets"] == ["node0"]

    run(tmp_path, scenario, nodes=3)


def test_a_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def scenario(c: InProcessCluster) -> None:
        _, results = await c.run(
            f"- jobs:\n    - RUN: --timeout 0.5 sleep 60 & echo $! > {pids}; sleep 60\n"
        )
        ((_, result),) = next(iter(results.values())).items()
        assert result["state"] == "timeout" and "killed" in result["stderr"]

    run(tmp_path, scenario, nodes=1)
    child = int(pids.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_an_async_orchestration_does_not_hold_up_the_next(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def scenario(c: InProcessCluster) -> None:
        slow, _ = await c.run(
            f"- async: true\n  jobs:\n    - RUN: while [ ! -e {gate} ]; do sleep 0.02; done\n",
            wait=False,
        )
        _, fast = await c.run("- jobs:\n    - ECHO: not held up\n")
        assert {r["state"] for r in next(iter(fast.values())).values()} == {"success"}
        gate.touch()
        await c.call("job_info", {"id": slow[0]["jobs"][0]})

    run(tmp_path, scenario)


def test_target_beats_assign_beats_targets(tmp_path: Path) -> None:
    text = """- targets: [node2]
  jobs:
    - ECHO: orchestration targets
    - ECHO: assigned
      assign: [node1]
"""

    async def scenario(c: InProcessCluster) -> None:
        parents, results = await c.run(text)
        by_targets, assigned = parents[0]["jobs"]
        assert set(results[by_targets]) == {"node2"} and set(results[assigned]) == {"node1"}
        parents, results = await c.run(text, targets=["node0"])
        assert all(set(results[j]) == {"node0"} for j in parents[0]["jobs"])

    run(tmp_path, scenario, nodes=3)


def test_an_unknown_target_is_refused_and_nothing_is_stored(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        with pytest.raises(OrchestrationError, match=r"unknown target node.s.: ghost") as info:
            await c.run("- jobs:\n    - ECHO: hi\n", targets=["ghost"])
        assert isinstance(info.value, APIError)  # a refusal, typed as the server raised it
        assert await c.call("jobs") == []

    run(tmp_path, scenario)


def test_a_job_for_an_absent_node_runs_when_it_comes_back(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        await c.stop_agent("node1")
        parents, _ = await c.run(
            "- jobs:\n    - RUN: echo late\n", wait=False, targets=["node0", "node1"]
        )
        job = parents[0]["jobs"][0]
        info = await c.call("job_info", {"id": job})
        assert info["results"]["node1"]["state"] == "queued"
        await c.start_agent("node1")
        await until(lambda: c.server.jobs.jobs[job].results["node1"].state.final, "node1's result")
        assert c.server.jobs.jobs[job].results["node1"].stdout == "late\n"

    run(tmp_path, scenario)


def test_a_restarted_agent_never_runs_a_job_twice(tmp_path: Path) -> None:
    count = tmp_path / "ran"

    async def scenario(c: InProcessCluster) -> None:
        parents, _ = await c.run(f"- jobs:\n    - RUN: echo x >> {count}\n")
        job = parents[0]["jobs"][0]
        await c.stop_agent("node0")
        await c.start_agent("node0")
        # The server sends the job again (as after its own crash): the journal answers.
        c.server.dispatcher.deliver([c.server.jobs.jobs[job]])
        await asyncio.sleep(0.3)

    run(tmp_path, scenario, nodes=1)
    assert count.read_text() == "x\n"


def test_query_gives_every_target_every_value(tmp_path: Path) -> None:
    text = """- jobs:
    - ARG: role {{ identity }}-role
    - QUERY: role
    - RUN: echo {{ query['node0']['role'] }} {{ query['node1']['role'] }}
"""

    async def scenario(c: InProcessCluster) -> None:
        parents, results = await c.run(text)
        echo = parents[0]["jobs"][2]
        assert {r["stdout"] for r in results[echo].values()} == {"node0-role node1-role\n"}

    run(tmp_path, scenario)


def test_job_wait_waits_for_a_job_on_other_nodes(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    waited = f"- jobs:\n    - RUN: while [ ! -e {gate} ]; do sleep 0.02; done; echo done\n"

    async def scenario(c: InProcessCluster) -> None:
        parents, _ = await c.run(waited, wait=False, targets=["node1"])
        sha = parents[0]["shas"][0]
        waiter, _ = await c.run(
            f"- jobs:\n    - JOB_WAIT: --job-timeout 20 --identity node1 {sha}\n",
            wait=False,
            targets=["node0"],
        )
        wait_job = waiter[0]["jobs"][0]
        await asyncio.sleep(0.3)
        assert not c.server.jobs.jobs[wait_job].results["node0"].state.final
        gate.touch()
        await until(lambda: c.server.jobs.jobs[wait_job].done, "JOB_WAIT to end")
        result = c.server.jobs.jobs[wait_job].results["node0"]
        assert result.state.value == "success" and "ended on node1" in result.stdout

    run(tmp_path, scenario)


def test_an_orchestration_file_error_names_file_and_line(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        with pytest.raises(OrchestrationError, match=r"test.yaml:3: .*unknown verb 'RUNN'"):
            await c.run("- jobs:\n    - ECHO: fine\n    - RUNN: typo\n")

    run(tmp_path, scenario, nodes=1)


def test_stdout_arg_keeps_each_components_natural_output(tmp_path: Path) -> None:
    workdir = tmp_path / "w{{ identity }}"
    text = f"""- jobs:
    - WORKDIR: --stdout-arg wrkdir {workdir}
    - ARG: --stdout-arg copied color teal
    - RUN: echo "{{{{ wrkdir }}}} {{{{ copied }}}}"
"""

    async def scenario(c: InProcessCluster) -> None:
        parents, results = await c.run(text, targets=["node0"])
        echo = parents[0]["jobs"][2]
        assert results[echo]["node0"]["stdout"] == f"{tmp_path}/wnode0 teal\n"

    run(tmp_path, scenario)
    assert (tmp_path / "wnode0").is_dir()


def test_the_server_forgets_jobs_that_ended_longer_than_the_retention_ago(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Looked for every 50 ms instead of every minute; kept 0.5 s instead of a week.
    monkeypatch.setattr(jobs_module, "FORGET_INTERVAL", 0.05)

    async def main() -> None:
        async with cluster(tmp_path, nodes=1, job_retention=0.5) as c:
            parents, results = await c.run("- jobs:\n    - RUN: echo kept a while\n")
            (job_id,) = parents[0]["jobs"]
            assert states(results, job_id) == {"node0": "success"}
            assert [row["id"] for row in await c.call("jobs")] == [job_id]
            ended = time.monotonic()
            await until(lambda: job_id not in c.server.jobs.jobs, "the job to be forgotten")
            assert time.monotonic() - ended >= 0.4  # not before the retention
            assert await c.call("jobs") == []
            await c.server.persister.flush()
            assert await c.server.store.scan(JOBS) == {}
            assert await c.server.store.scan(RESULTS) == {}

    asyncio.run(main())
