"""REBOOT with real processes: the node's work waits for it, and ends if it never returns.

The reboot command is overridden (``--reboot-command``): it notes that it ran
and SIGKILLs its parent, the client, as a power cut would. This machine never
reboots. The test then starts the client again on the same journal, as the
node's service manager does after a real reboot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.e2e.helpers import (
    job_info,
    nodes,
    states,
    submit,
    wait_for,
    wait_job,
    wait_status,
)


def rebooting_cluster(
    make_cluster: Callable[..., Cluster],
    grace: float,
    command: str | None = None,
    driver: str = "grpc",
) -> tuple[Cluster, Path]:
    """Two nodes whose reboot command kills the client (or runs ``command``)."""
    cluster = make_cluster(
        nodes=2,
        start=False,
        driver=driver,
        heartbeat=0.5,
        server_args=["--job-timeout-grace", "1", "--reboot-grace", str(grace)],
    )
    marker = cluster.root / "reboots"
    # `{identity}` is each client's own; $PPID of the command's shell is the client.
    command = command or f"echo {{identity}} >> {marker}; kill -KILL $PPID"
    cluster.client_args += ["--reboot-command", command]
    cluster.start()
    return cluster, marker


def client_gone(cluster: Cluster, identity: str) -> bool:
    return cluster.clients[identity].poll() is not None


# NATS: the jobs sent while the node is away wait parked in the broker.
@pytest.mark.parametrize("driver", ["grpc", "nats"])
def test_jobs_wait_for_a_rebooting_node_and_run_when_it_is_back(
    make_cluster: Callable[..., Cluster], driver: str
) -> None:
    cluster, marker = rebooting_cluster(make_cluster, grace=60, driver=driver)
    log = cluster.root / "after.log"
    path = cluster.root / "reboot.yaml"
    # The RUN after the REBOOT reaches the node before it goes down: its journal keeps it.
    path.write_text(f"- jobs:\n    - REBOOT: 0\n    - RUN: echo held >> {log}\n")
    [parent] = submit(cluster, "orchestrate", str(path), "--target", "node0")
    reboot_id, held_id = parent["jobs"]

    wait_for(lambda: client_gone(cluster, "node0"), "the reboot command to stop the client")
    assert marker.read_text() == "node0\n"
    reboot = wait_job(cluster, reboot_id)["results"]["node0"]
    assert (reboot["state"], reboot["stdout"]) == ("success", "rebooting in 0s")
    row = wait_status(cluster, "node0", "rebooting")
    assert row["rebooting_until"] > time.time() + 30
    assert nodes(cluster)["node1"]["status"] == "online"

    # Submitted while it is away: a short timeout (1s + 1s grace) that would
    # otherwise end undelivered, and one for every node (a rebooting one included).
    [short] = submit(
        cluster, "exec", "--verb", "RUN", f"--timeout 1 echo short >> {log}", "--target", "node0"
    )
    [everyone] = submit(cluster, "exec", "--verb", "ECHO", "everyone")
    assert everyone["targets"] == ["node0", "node1"]
    time.sleep(3.5)  # past the short job's own deadline
    assert states(job_info(cluster, short["jobs"][0])) == {"node0": "queued"}
    assert states(job_info(cluster, held_id)) == {"node0": "delivered"}
    assert nodes(cluster)["node0"]["status"] == "rebooting"

    cluster.start_client("node0")
    for job_id in (held_id, short["jobs"][0]):
        assert states(wait_job(cluster, job_id)) == {"node0": "success"}
    assert states(wait_job(cluster, everyone["jobs"][0])) == {
        "node0": "success",
        "node1": "success",
    }
    assert log.read_text().splitlines() == ["held", "short"]
    row = wait_status(cluster, "node0", "online")
    assert row["rebooting_until"] == 0.0
    assert "is back from its reboot" in cluster.log("server").read_text()


def test_a_node_that_never_returns_has_its_jobs_ended_with_the_reason(
    make_cluster: Callable[..., Cluster],
) -> None:
    # A grace long enough that `later` is surely submitted while the node is still
    # rebooting, even on a loaded machine (a CLI run takes a second or more there).
    cluster, _ = rebooting_cluster(make_cluster, grace=10)
    path = cluster.root / "reboot.yaml"
    path.write_text("- jobs:\n    - REBOOT: 0\n    - RUN: echo never\n")
    [parent] = submit(cluster, "orchestrate", str(path), "--target", "node0")
    reboot_id, held_id = parent["jobs"]
    wait_for(lambda: client_gone(cluster, "node0"), "the reboot command to stop the client")
    assert states(wait_job(cluster, reboot_id)) == {"node0": "success"}
    wait_status(cluster, "node0", "rebooting")
    [later] = submit(cluster, "exec", "--verb", "RUN", "echo later", "--target", "node0")

    held = wait_job(cluster, held_id, timeout=45)["results"]["node0"]
    queued = wait_job(cluster, later["jobs"][0], timeout=45)["results"]["node0"]
    # Held on the node when it went down: its outcome is unknown. Never taken: undelivered.
    assert held["state"] == "lost"
    assert queued["state"] == "undelivered"
    for result in (held, queued):
        assert "node node0 did not come back from its reboot" in result["stderr"]
        assert "--reboot-grace 10s" in result["stderr"]
    assert "it held the job" in held["stderr"]
    assert "it never took the job" in queued["stderr"]
    assert nodes(cluster)["node0"]["status"] == "offline"


def test_a_failed_reboot_command_restarts_the_client_and_its_jobs_run(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster, _ = rebooting_cluster(make_cluster, grace=60, command="echo no way >&2; exit 3")
    pid = cluster.clients["node0"].pid
    path = cluster.root / "reboot.yaml"
    path.write_text("- jobs:\n    - REBOOT: 0\n    - ECHO: after\n")
    reply = cluster.orchestrate(path.read_text(), "--target", "node0", name="fails.yaml")
    assert [r["state"] for r in reply["results"]] == ["success", "success"]
    assert cluster.clients["node0"].pid == pid  # re-executed in place, never went down
    text = cluster.log("node0").read_text()
    assert "failed (exit status 3): no way" in text
    assert "restarting the client instead of the reboot" in text
    assert wait_status(cluster, "node0", "online")["rebooting_until"] == 0.0


def test_a_server_restart_keeps_waiting_for_a_rebooting_node(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster, _ = rebooting_cluster(make_cluster, grace=60)
    [parent] = submit(cluster, "exec", "--verb", "REBOOT", "0", "--target", "node0")
    wait_for(lambda: client_gone(cluster, "node0"), "the reboot command to stop the client")
    assert states(wait_job(cluster, parent["jobs"][0])) == {"node0": "success"}
    wait_status(cluster, "node0", "rebooting")

    cluster.stop_process("server")
    cluster.start_server()
    assert nodes(cluster)["node0"]["status"] == "rebooting"
    [short] = submit(cluster, "exec", "--verb", "ECHO", "--timeout 1 back", "--target", "node0")
    time.sleep(3.5)  # past the job's own deadline (1s + 1s grace)
    assert states(job_info(cluster, short["jobs"][0])) == {"node0": "queued"}
    cluster.start_client("node0")
    result = wait_job(cluster, short["jobs"][0])["results"]["node0"]
    assert (result["state"], result["stdout"]) == ("success", "back")
    assert wait_status(cluster, "node0", "online")["rebooting_until"] == 0.0
