"""The smallest end-to-end check: a real server and clients run one job."""

from __future__ import annotations

from tests.conftest import Cluster


def test_exec_wait_runs_on_every_node(cluster: Cluster) -> None:
    reply = cluster.json("exec", "--verb", "RUN", "--skip-cache echo hi-$((6*7))", "--wait")
    nodes = sorted(r["node"] for r in reply["results"])
    assert nodes == ["node0", "node1", "node2"]
    assert {r["state"] for r in reply["results"]} == {"success"}
    assert {r["stdout"].strip() for r in reply["results"]} == {"hi-42"}
