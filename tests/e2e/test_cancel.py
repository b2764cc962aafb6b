"""Cancelling through the CLI on real processes: --cancel-job, --cancel-parent, QUEUESENTINEL."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import Cluster
from tests.e2e.helpers import job_info, pid_alive, states, submit, uid, wait_for, wait_job


def _busy(cluster: Cluster) -> tuple[list[str], int]:
    token = uid()
    marker = cluster.root / f"{token}.pid"
    path = cluster.root / f"{token}.yaml"
    path.write_text(
        "- jobs:\n"
        f"    - RUN: echo $$ > {marker}; sleep 60\n"
        "    - RUN: echo two\n"
        "    - RUN: echo three\n"
    )
    [parent] = submit(cluster, "orchestrate", str(path), "--target", "node0")
    wait_for(lambda: marker.exists() and marker.read_text().endswith("\n"), "step 1 to start")
    return parent["jobs"], int(marker.read_text())


def test_cancel_job_kills_a_running_job_and_the_rest_is_skipped(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(nodes=1)
    (one, two, three), pid = _busy(cluster)
    proc = cluster.run("manage", "--cancel-job", one[:8])
    assert proc.stdout.split() == [one, "node0", "asked"]
    first = wait_job(cluster, one)["results"]["node0"]
    assert first["state"] == "cancelled" and "cancelled by an operator" in first["stderr"]
    wait_for(lambda: not pid_alive(pid), "the job's process group to be killed", 10)
    assert states(wait_job(cluster, three)) == {"node0": "skipped-parent"}
    assert states(job_info(cluster, two)) == {"node0": "skipped-parent"}


def test_queuesentinel_and_cancel_parent_no_kill(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(nodes=1)
    (one, two, three), pid = _busy(cluster)
    reply = cluster.json("exec", "--verb", "QUEUESENTINEL", "--target", "node0", "--wait")
    [sentinel] = reply["results"]
    assert (sentinel["state"], sentinel["stdout"]) == ("success", "cancelled 2 waiting jobs")
    for job in (two, three):
        result = wait_job(cluster, job)["results"]["node0"]
        assert result["state"] == "cancelled"
        assert f"QUEUESENTINEL job {sentinel['job']}" in result["stderr"]
    # --no-kill: the running step is left alone.
    cluster.run(
        "manage",
        "--cancel-parent",
        cluster.json("manage", "--job-info", one)["parent_id"],
        "--no-kill",
    )
    assert pid_alive(pid) and states(job_info(cluster, one)) == {"node0": "delivered"}
    cluster.run("manage", "--cancel-job", one)
    assert states(wait_job(cluster, one)) == {"node0": "cancelled"}


def test_a_cancel_for_an_absent_node_survives_a_server_restart(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(nodes=1)
    gate = cluster.root / "gate"
    token = uid()
    marker, log = cluster.root / f"{token}.pid", cluster.root / f"{token}.log"
    path = cluster.root / f"{token}.yaml"
    path.write_text(
        "- jobs:\n"
        f"    - RUN: echo $$ > {marker}; while [ ! -e {gate} ]; do sleep 0.05; done\n"
        f"    - RUN: echo two >> {log}\n"
    )
    [parent] = submit(cluster, "orchestrate", str(path), "--target", "node0")
    one, two = parent["jobs"]
    wait_for(lambda: marker.exists() and marker.read_text().endswith("\n"), "step 1 to start")
    cluster.stop_process("node0")  # SIGTERM: step 1 is left running, step 2 waits
    assert cluster.run("manage", "--cancel-job", two).stdout.split() == [two, "node0", "asked"]
    cluster.stop_process("server")
    cluster.start_server()
    cluster.start_client("node0")
    assert states(wait_job(cluster, two)) == {"node0": "cancelled"}
    gate.touch()
    assert states(wait_job(cluster, one)) == {"node0": "success"}
    assert not log.exists()
