"""The Python library (``from directord import DirectordConnect``) against a real cluster."""

from __future__ import annotations

import signal
import subprocess
import sys
from typing import Any

import pytest

import directord
from directord import DirectordConnect
from directord.errors import (
    APIError,
    DirectordError,
    JobTimeout,
    OrchestrationError,
    ServerUnavailable,
)
from tests.conftest import Cluster
from tests.e2e.helpers import uid, wait_for

ALL = ["node0", "node1", "node2"]


def test_public_api() -> None:
    assert "DirectordConnect" in directord.__all__
    assert directord.DirectordConnect is DirectordConnect


def test_orchestrate_and_poll(cluster: Cluster) -> None:
    u = uid()
    with DirectordConnect(cluster.socket_path) as conn:
        ids = conn.orchestrate(
            [
                {"name": f"lib-{u}", "jobs": [{"RUN": f"echo lib-{u}"}, {"ECHO": f"echo-{u}"}]},
                {"targets": ["node1"], "jobs": [{"RUN": f"echo only-{u}", "name": "single"}]},
            ]
        )
        assert len(ids) == 3
        ok, info = conn.wait(ids[0], timeout=60)
        assert ok
        assert info["id"] == ids[0] and info["parent_name"] == f"lib-{u}"
        assert sorted(info["results"]) == ALL
        assert {r["stdout"].strip() for r in info["results"].values()} == {f"lib-{u}"}
        ok, info = conn.wait(ids[1], timeout=60)
        assert ok and {r["state"] for r in info["results"].values()} == {"success"}
        ok, info = conn.wait(ids[2], timeout=60)
        assert ok and info["name"] == "single"
        assert list(info["results"]) == ["node1"]
        assert conn.job_info("last")["id"] == ids[2]


def test_poll_reports_failure_and_skipped_parent(cluster: Cluster) -> None:
    u = uid()
    with DirectordConnect(cluster.socket_path) as conn:
        ids = conn.orchestrate(
            [{"jobs": [{"RUN": f"echo {u} >&2; exit 2"}, {"RUN": f"echo never-{u}"}]}],
            defined_targets=["node2"],
        )
        ok, info = conn.wait(ids[0], timeout=60)
        assert not ok
        assert info["results"]["node2"]["state"] == "failed"
        assert info["results"]["node2"]["rc"] == 2
        assert info["results"]["node2"]["stderr"].strip() == u
        ok, info = conn.wait(ids[1], timeout=60)
        assert not ok
        assert info["results"] == {"node2": info["results"]["node2"]}
        assert info["results"]["node2"]["state"] == "skipped-parent"


def test_cache_restrict_and_ignore_cache(cluster: Cluster) -> None:
    u = uid()
    orch = [{"jobs": [{"RUN": f"echo a-{u}"}, {"RUN": f"echo b-{u}"}]}]
    with DirectordConnect(cluster.socket_path) as conn:
        for job_id in conn.orchestrate(orch):
            assert conn.wait(job_id, timeout=60)[0]
        again = conn.orchestrate(orch)
        ok, info = conn.wait(again[0], timeout=60)
        assert ok and {r["state"] for r in info["results"].values()} == {"skipped-cache"}
        sha_b = conn.job_info(again[1])["sha"]
        [only_b] = conn.orchestrate(orch, restrict=[sha_b[:10]], ignore_cache=True)
        ok, info = conn.wait(only_b, timeout=60)
        assert ok and info["sha"] == sha_b
        assert {r["state"] for r in info["results"].values()} == {"success"}


def test_list_nodes_and_jobs(cluster: Cluster) -> None:
    u = uid()
    with DirectordConnect(cluster.socket_path) as conn:
        listed = {n["identity"]: n for n in conn.nodes()}
        assert sorted(listed) == ALL
        assert all(n["status"] == "online" for n in listed.values())
        assert listed["node1"]["machine_id"] == "machine-node1"
        [good] = conn.orchestrate([{"jobs": [{"RUN": f"echo {u}"}]}])
        [bad] = conn.orchestrate([{"jobs": [{"RUN": "exit 9"}]}], defined_targets=["node0"])
        conn.wait(good, timeout=60)
        conn.wait(bad, timeout=60)
        jobs = {j["id"]: j for j in conn.jobs()}
        assert jobs[good]["success"] == 3 and jobs[bad]["failed"] == 1
        assert bad in [j["id"] for j in conn.jobs("failed")]
        assert good not in [j["id"] for j in conn.jobs("failed")]
        assert good in [j["id"] for j in conn.jobs("success")]


def test_errors_are_raised_not_submitted(cluster: Cluster) -> None:
    with DirectordConnect(cluster.socket_path) as conn:
        before = len(conn.jobs())
        with pytest.raises(DirectordError, match="did you mean RUN"):
            conn.orchestrate([{"jobs": [{"RUNN": "echo"}]}])
        with pytest.raises(APIError, match="nope-7") as info:
            conn.orchestrate([{"jobs": [{"RUN": "echo"}]}], defined_targets=["nope-7"])
        assert info.value.kind == "OrchestrationError"
        # The server's refusal comes out as the server raised it: a usage error.
        assert isinstance(info.value, OrchestrationError)
        with pytest.raises(DirectordError, match="mapping"):
            conn.orchestrate([{"jobs": ["not a mapping"]}])
        with pytest.raises(DirectordError, match="unknown key"):
            conn.orchestrate([{"jobz": [{"RUN": "echo"}]}])
        assert len(conn.jobs()) == before
        # The connection is still usable after refused requests.
        assert sorted(conn.list_nodes()) == ALL


def test_poll_gives_up_with_a_typed_timeout(cluster: Cluster) -> None:
    u = uid()
    with DirectordConnect(cluster.socket_path) as conn:
        (job,) = conn.orchestrate([{"jobs": [{"RUN": f"sleep 2; echo {u}"}]}], ["node0"])
        with pytest.raises(JobTimeout, match=f"job {job} did not end within 0.2s"):
            conn.wait(job, timeout=0.2)
        assert conn.wait(job, timeout=60)[0]  # still usable, and the job still ends


def test_unreachable_server(tmp_path: Any) -> None:
    missing = str(tmp_path / "nowhere.sock")
    with pytest.raises(ServerUnavailable, match=r"nowhere\.sock"):
        DirectordConnect(missing)


def test_purge_jobs_and_nodes(make_cluster: Any) -> None:
    c = make_cluster(nodes=2, heartbeat=0.5)
    with DirectordConnect(c.socket_path) as conn:
        ids = conn.orchestrate([{"jobs": [{"RUN": "echo one"}, {"RUN": "echo two"}]}])
        for job_id in ids:
            assert conn.wait(job_id, timeout=60)[0]
        assert conn.purge("nodes") == 0
        assert conn.purge("jobs") == 2
        assert conn.jobs() == []
        c.stop_process("node1", signal.SIGKILL)
        wait_for(
            lambda: {n["identity"]: n["status"] for n in conn.nodes()}.get("node1") == "offline",
            "node1 to go offline",
        )
        assert conn.purge("nodes") == 1
        assert [n["identity"] for n in conn.nodes()] == ["node0"]


def test_a_connection_the_server_closed_while_idle_is_reopened(make_cluster: Any) -> None:
    # The server closes API connections idle for --api-idle-timeout; a long-lived
    # DirectordConnect must not fail its next call for it.
    import time

    c = make_cluster(nodes=1, server_args=["--api-idle-timeout", "1"])
    with DirectordConnect(c.socket_path) as conn:
        assert conn.list_nodes() == ["node0"]
        wait_for(
            lambda: any("idle" in line for line in c.log("server").read_text().splitlines()),
            "the server to close the idle connection",
        )
        time.sleep(0.2)
        assert conn.list_nodes() == ["node0"]
        ids = conn.orchestrate([{"jobs": [{"RUN": "echo again"}]}])
        ok, _ = conn.wait(ids[0], timeout=60)
        assert ok


DIRECTORD_SCRIPT = """
import sys

from directord import DirectordConnect

with DirectordConnect(debug=False, socket_path=sys.argv[1], driver="zmq", force_async=False) as d:
    nodes = d.list_nodes()
    ids = d.orchestrate(
        orchestrations=[{"jobs": [{"RUN": "echo hello"}]}, {"jobs": [{"RUN": "exit 3"}]}],
        defined_targets=nodes[:1],
    )
    for job_id in ids:
        state, status = d.poll(job_id=job_id)
        print(state, status)
    jobs = d.list_jobs()
    print(sorted(nodes), all(job_id in jobs for job_id in ids))
    print(d.purge_jobs(), d.purge_nodes(), d.list_jobs())
"""


def test_a_script_written_for_directords_library_runs_unchanged(
    cluster: Cluster, tmp_path: Any
) -> None:
    script = tmp_path / "directord_script.py"
    script.write_text(DIRECTORD_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), cluster.socket_path],
        capture_output=True,
        text=True,
        timeout=120,
        env=cluster.env,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("True Job Success: ")
    assert lines[1].startswith("False Job Failed: ")
    assert lines[2] == f"{sorted(ALL)} True"
    assert lines[3] == "True True {}"
