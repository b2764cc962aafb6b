"""Platform rules on a real cluster: parent failure, cache hits, run-once, timeouts,
ordering, async orchestrations, --restrict, --finger-print, target precedence, --wait.

The rules belong to the server and the agent, not to a driver: they are checked
in process in tests/integration/test_job_rules.py, and here once end to end
through the CLI, on the default driver (every driver runs the rest of tests/e2e).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import Cluster, results_by_node
from tests.e2e.helpers import (
    job_count,
    job_info,
    kill_pids,
    name_nodes,
    pid_alive,
    read_lines,
    states,
    submit,
    uid,
    wait_for,
    wait_job,
)

ALL = ["node0", "node1", "node2"]
pytestmark = pytest.mark.parametrize("cluster", ["grpc"], indirect=True)


@pytest.fixture(scope="module", autouse=True)
def named(cluster: Cluster) -> None:
    """Every node knows its own name as the cached arg ``node_name``."""
    name_nodes(cluster)


def by_job_and_node(reply: dict) -> dict[tuple[str, str], dict]:
    return {(r["job"], r["node"]): r for r in reply["results"]}


# ---- parent failure ----------------------------------------------------------------------
def test_failed_job_skips_rest_of_orchestration_on_that_node_only(cluster: Cluster) -> None:
    u = uid()
    text = f"""
- name: parent-{u}
  jobs:
  - ARG: "{u} 1"
    assign: [node1]
  - ARG: "{u} 0"
    assign: [node0, node2]
  - RUN: "echo before-{u}"
  - RUN: "test {{{{ {u} }}}} -eq 0 || {{ echo bad-{u} >&2; exit 4; }}"
  - RUN: "echo after-{u}"
  - RUN: "echo last-{u}"
"""
    reply = cluster.orchestrate(text, rc=1)
    jobs = reply["parents"][0]["jobs"]
    assert len(jobs) == 6
    got = by_job_and_node(reply)
    assert len(got) == 3 + 4 * 3  # the ARG jobs target 1 and 2 nodes, the rest all 3
    check, after, last = jobs[3], jobs[4], jobs[5]
    assert got[(check, "node1")]["state"] == "failed"
    assert got[(check, "node1")]["rc"] == 4
    assert f"bad-{u}" in got[(check, "node1")]["stderr"]
    assert got[(jobs[2], "node1")]["state"] == "success"
    for job in (after, last):
        assert got[(job, "node1")]["state"] == "skipped-parent"
        assert got[(job, "node1")]["rc"] is None
    for node in ("node0", "node2"):
        assert got[(check, node)]["state"] == "success"
        assert got[(after, node)]["stdout"].strip() == f"after-{u}"
        assert got[(last, node)]["state"] == "success"
    # The failure belongs to that orchestration: the next one runs on node1 as usual.
    again = cluster.json("exec", "--verb", "RUN", f"echo again-{u}", "--target", "node1", "--wait")
    assert [r["state"] for r in again["results"]] == ["success"]


# ---- cache hits --------------------------------------------------------------------------
def test_cache_hit_and_the_three_ways_to_bypass_it(cluster: Cluster) -> None:
    u = uid()
    counter = cluster.root / f"count-{u}"
    command = f"echo {u} >> {counter}"

    first = cluster.json("exec", "--verb", "RUN", command, "--wait")
    assert sorted(r["state"] for r in first["results"]) == ["success"] * 3
    assert len(read_lines(counter)) == 3

    second = cluster.json("exec", "--verb", "RUN", command, "--wait")
    assert sorted(r["state"] for r in second["results"]) == ["skipped-cache"] * 3
    assert {r["rc"] for r in second["results"]} == {0}
    assert len(read_lines(counter)) == 3, "a cache hit must not run the command"

    forced = cluster.json("exec", "--verb", "RUN", "--skip-cache", command, "--wait")
    assert sorted(r["state"] for r in forced["results"]) == ["success"] * 3
    assert len(read_lines(counter)) == 6

    same_in_file = f'- jobs:\n  - RUN: "{command}"\n'
    cached = cluster.orchestrate(same_in_file)
    assert sorted(r["state"] for r in cached["results"]) == ["skipped-cache"] * 3
    assert len(read_lines(counter)) == 6

    ignored = cluster.orchestrate(same_in_file, "--ignore-cache")
    assert sorted(r["state"] for r in ignored["results"]) == ["success"] * 3
    assert len(read_lines(counter)) == 9

    with_vars = f'- jobs:\n  - RUN: "{command}"\n    vars: {{skip_cache: true}}\n'
    skipped = cluster.orchestrate(with_vars)
    assert sorted(r["state"] for r in skipped["results"]) == ["success"] * 3
    assert len(read_lines(counter)) == 12
    # All of these are one job definition: one fingerprint.
    assert len({r["sha"] for r in cluster.json("manage", "--list-jobs")[-6:]}) == 1


def test_failed_job_is_not_a_cache_hit(cluster: Cluster) -> None:
    u = uid()
    flag = cluster.root / f"flag-{u}"
    command = f"test -f {flag} && echo ok-{u}"
    failed = cluster.json("exec", "--verb", "RUN", command, "--target", "node0", "--wait", rc=1)
    assert [r["state"] for r in failed["results"]] == ["failed"]
    flag.touch()
    rerun = cluster.json("exec", "--verb", "RUN", command, "--target", "node0", "--wait")
    assert [(r["state"], r["stdout"].strip()) for r in rerun["results"]] == [("success", f"ok-{u}")]


# ---- run once ----------------------------------------------------------------------------
def test_run_once_runs_on_exactly_one_node(cluster: Cluster) -> None:
    u = uid()
    counter = cluster.root / f"once-{u}"
    reply = cluster.json(
        "exec", "--verb", "RUN", "--run-once", f"echo {{{{ node_name }}}} >> {counter}", "--wait"
    )
    assert len(reply["results"]) == 1
    assert reply["results"][0]["state"] == "success"
    assert read_lines(counter) == [reply["results"][0]["node"]]

    text = f"""
- jobs:
  - RUN: "echo everywhere-{u} >> {counter}"
  - RUN: "--run-once echo once-{u} >> {counter}"
"""
    reply = cluster.orchestrate(text)
    jobs = reply["parents"][0]["jobs"]
    assert sum(1 for r in reply["results"] if r["job"] == jobs[0]) == 3
    assert sum(1 for r in reply["results"] if r["job"] == jobs[1]) == 1
    lines = read_lines(counter)
    assert lines.count(f"everywhere-{u}") == 3
    assert lines.count(f"once-{u}") == 1


# ---- timeout -----------------------------------------------------------------------------
def test_timeout_kills_the_whole_process_group(cluster: Cluster) -> None:
    u = uid()
    shell_pid = cluster.root / f"sh-{u}.pid"
    child_pid = cluster.root / f"child-{u}.pid"
    command = (
        f"--timeout 5 sleep 300 & echo $! > {child_pid}; echo $$ > {shell_pid}; "
        f"echo started-{u}; sleep 300"
    )
    reply = cluster.json("exec", "--verb", "RUN", command, "--target", "node0", "--wait", rc=1)
    [result] = reply["results"]
    assert result["state"] == "timeout"
    assert result["node"] == "node0"
    assert result["rc"] is None
    assert "timed out" in result["stderr"]
    pids = [int(shell_pid.read_text()), int(child_pid.read_text())]
    try:
        wait_for(
            lambda: not any(pid_alive(p) for p in pids),
            "the job's shell and its background grandchild to be killed",
        )
    finally:
        kill_pids(pids)


# ---- ordering and async ------------------------------------------------------------------
def test_jobs_of_one_orchestration_run_in_order_on_each_node(cluster: Cluster) -> None:
    u = uid()
    out = cluster.root / f"order-{u}"
    out.mkdir()
    jobs = "".join(
        f'  - RUN: "{"sleep 0.2; " if i % 3 == 0 else ""}echo {i} >> {out}/{{{{ node_name }}}}"\n'
        for i in range(1, 10)
    )
    reply = cluster.orchestrate("- jobs:\n" + jobs)
    assert {r["state"] for r in reply["results"]} == {"success"}
    ids = reply["parents"][0]["jobs"]
    for node, results in results_by_node(reply).items():
        assert read_lines(out / node) == [str(i) for i in range(1, 10)]
        assert [r["job"] for r in results] == ids


def test_async_orchestration_does_not_block_later_jobs(cluster: Cluster) -> None:
    u = uid()
    go = cluster.root / f"go-{u}"
    text = f"""
- async: true
  jobs:
  - RUN: "--timeout 30 while [ ! -f {go} ]; do sleep 0.05; done; echo released-{u}"
"""
    (cluster.root / f"async-{u}.yaml").write_text(text)
    [parent] = submit(cluster, "orchestrate", str(cluster.root / f"async-{u}.yaml"))
    waiting_job = parent["jobs"][0]
    # A plain job submitted afterwards releases the async one: if the async job held
    # the node's lane, this one would only run after the async job timed out.
    reply = cluster.json("exec", "--verb", "RUN", f"touch {go}; echo touched-{u}", "--wait")
    assert {r["state"] for r in reply["results"]} == {"success"}
    info = wait_job(cluster, waiting_job, timeout=60)
    assert states(info) == dict.fromkeys(ALL, "success")
    assert {r["stdout"].strip() for r in info["results"].values()} == {f"released-{u}"}


def test_force_async_on_the_command_line(cluster: Cluster) -> None:
    u = uid()
    go = cluster.root / f"go-{u}"
    [parent] = submit(
        cluster,
        "exec",
        "--verb",
        "RUN",
        "--force-async",
        "--target",
        "node2",
        f"--timeout 30 while [ ! -f {go} ]; do sleep 0.05; done",
    )
    reply = cluster.json("exec", "--verb", "RUN", f"touch {go}", "--target", "node2", "--wait")
    assert [r["state"] for r in reply["results"]] == ["success"]
    assert states(wait_job(cluster, parent["jobs"][0], timeout=60)) == {"node2": "success"}


# ---- restrict and finger-print -------------------------------------------------------------
def _three_jobs(cluster: Cluster, u: str) -> Path:
    path = cluster.root / f"three-{u}.yaml"
    path.write_text(
        f'- jobs:\n  - RUN: "echo r1-{u}"\n  - RUN: "echo r2-{u}"\n  - ECHO: "r3-{u}"\n'
    )
    return path


def test_finger_print_lists_shas_and_submits_nothing(cluster: Cluster) -> None:
    u = uid()
    path = _three_jobs(cluster, u)
    before = job_count(cluster)
    rows = cluster.json("orchestrate", str(path), "--finger-print")
    assert [r["verb"] for r in rows] == ["RUN", "RUN", "ECHO"]
    assert [r["line"] for r in rows] == [2, 3, 4]
    assert all(re.fullmatch(r"[0-9a-f]{56}", r["sha"]) for r in rows)  # SHA3-224
    assert len({r["sha"] for r in rows}) == 3
    table = cluster.run("orchestrate", str(path), "--finger-print").stdout
    assert all(r["sha"] in table for r in rows)
    assert job_count(cluster) == before
    # The fingerprints are the ones the server gives the submitted jobs.
    [parent] = submit(cluster, "orchestrate", str(path))
    assert parent["shas"] == [r["sha"] for r in rows]
    for job_id in parent["jobs"]:
        wait_job(cluster, job_id)


def test_restrict_runs_only_the_named_jobs(cluster: Cluster) -> None:
    u = uid()
    path = _three_jobs(cluster, u)
    shas = [r["sha"] for r in cluster.json("orchestrate", str(path), "--finger-print")]
    reply = cluster.json("orchestrate", str(path), "--restrict", shas[1][:12], "--wait")
    assert len(reply["parents"][0]["jobs"]) == 1
    assert {r["stdout"].strip() for r in reply["results"]} == {f"r2-{u}"}
    assert len(reply["results"]) == 3

    reply = cluster.json("orchestrate", str(path), "--restrict", shas[0], shas[2], "--wait")
    assert reply["parents"][0]["shas"] == [shas[0], shas[2]]
    assert {r["verb"] for r in reply["results"]} == {"RUN", "ECHO"}

    proc = cluster.run("orchestrate", str(path), "--restrict", "0" * 56, "--wait", rc=2)
    assert "nothing to run" in proc.stderr


# ---- targets -----------------------------------------------------------------------------
def test_target_beats_assign_beats_targets(cluster: Cluster) -> None:
    u = uid()
    text = f"""
- targets: [node0]
  jobs:
  - RUN: "echo t-{u}"
  - RUN: "echo a-{u}"
    assign: [node1, node2]
- jobs:
  - RUN: "echo all-{u}"
"""
    reply = cluster.orchestrate(text, "--ignore-cache")
    per_job = {}
    for r in reply["results"]:
        per_job.setdefault(r["stdout"].strip(), set()).add(r["node"])
    assert per_job == {f"t-{u}": {"node0"}, f"a-{u}": {"node1", "node2"}, f"all-{u}": set(ALL)}

    reply = cluster.orchestrate(text, "--ignore-cache", "--target", "node2")
    assert {r["node"] for r in reply["results"]} == {"node2"}
    assert len(reply["results"]) == 3

    reply = cluster.orchestrate(text, "--ignore-cache", "--target", "node0", "--target", "node1")
    assert sorted(r["node"] for r in reply["results"]) == ["node0"] * 3 + ["node1"] * 3


@pytest.mark.parametrize("how", ["exec", "cli-target", "file-targets", "file-assign"])
def test_unknown_target_is_refused_before_submitting(cluster: Cluster, how: str) -> None:
    u = uid()
    before = job_count(cluster)
    good = f'- jobs:\n  - RUN: "echo fine-{u}"\n'
    if how == "exec":
        proc = cluster.run(
            "exec", "--verb", "RUN", f"echo {u}", "--target", "nope-9", "--wait", rc=2
        )
    elif how == "cli-target":
        (cluster.root / f"{u}.yaml").write_text(good)
        proc = cluster.run(
            "orchestrate",
            str(cluster.root / f"{u}.yaml"),
            "--target",
            "node0",
            "--target",
            "nope-9",
            rc=2,
        )
    else:
        key = "targets: [nope-9]\n  jobs" if how == "file-targets" else "jobs"
        bad = f'- {key}:\n  - RUN: "echo {u}"\n'
        if how == "file-assign":
            bad += "    assign: [node0, nope-9]\n"
        (cluster.root / f"{u}.yaml").write_text(good + bad)
        proc = cluster.run("orchestrate", str(cluster.root / f"{u}.yaml"), rc=2)
    assert "nope-9" in proc.stderr
    assert "unknown target" in proc.stderr
    assert job_count(cluster) == before


# ---- --wait ------------------------------------------------------------------------------
def test_wait_exit_code_and_failure_report(cluster: Cluster) -> None:
    u = uid()
    command = f"test {{{{ node_name }}}} != node1 || {{ echo oops-{u} >&2; exit 7; }}"
    proc = cluster.run("exec", "--verb", "RUN", command, "--wait", rc=1)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("FAILED")]
    assert len(lines) == 1
    assert "node1" in lines[0]
    assert f"oops-{u}" in lines[0]
    assert "rc=7" in lines[0]
    job_id = job_info(cluster, "last")["id"]
    assert job_id in lines[0]
    assert "2 success" in proc.stdout and "1 failed" in proc.stdout

    ok = cluster.run("exec", "--verb", "RUN", f"echo fine-{u}", "--wait")
    assert ok.stderr.strip() == ""
    assert "3 success" in ok.stdout
    # A cache hit counts as success for --wait.
    cluster.run("exec", "--verb", "RUN", f"echo fine-{u}", "--wait")
