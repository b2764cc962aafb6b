"""Faults on real clusters: heartbeats, offline nodes, undelivered and lost jobs, restarts of
clients and server, identity conflicts, a server SIGKILLed mid-orchestration, bad peers."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Callable
from typing import Any

import grpc
import msgpack
import pytest

from tests.conftest import Cluster
from tests.e2e.helpers import (
    job_info,
    kill_pids,
    name_nodes,
    nodes,
    pid_alive,
    read_lines,
    states,
    submit,
    uid,
    wait_for,
    wait_job,
    wait_status,
)

FAST = {"heartbeat": 0.5, "server_args": ["--job-timeout-grace", "1"]}
RESULT_FIELDS = ("state", "rc", "stdout", "stderr", "exec_time")


def log_text(cluster: Cluster, name: str) -> str:
    return cluster.log(name).read_text(errors="replace")


# ---- heartbeats and offline nodes ----------------------------------------------------------
def test_heartbeats_keep_a_node_online_and_set_its_expiry(make_cluster: Any) -> None:
    c = make_cluster(nodes=1, **FAST)
    row = nodes(c)["node0"]
    assert row["status"] == "online"
    assert row["heartbeat_interval"] == 0.5
    assert row["expiry"] == pytest.approx(row["last_seen"] + 1.5)
    seen = [row["last_seen"]]

    def beat() -> bool:
        now = nodes(c)["node0"]
        assert now["status"] == "online"
        assert now["expiry"] == pytest.approx(now["last_seen"] + 1.5)
        if now["last_seen"] > seen[-1]:
            seen.append(now["last_seen"])
        return len(seen) >= 4

    wait_for(beat, "three further heartbeats")


def test_silent_node_goes_offline_then_comes_back(make_cluster: Any) -> None:
    c = make_cluster(nodes=2, **FAST)
    c.send_signal("node1", signal.SIGSTOP)  # connected but silent: only heartbeats tell
    try:
        wait_status(c, "node1", "offline")
        assert nodes(c)["node0"]["status"] == "online"
        assert "node1 silent for 3 heartbeat intervals" in log_text(c, "server")
    finally:
        c.send_signal("node1", signal.SIGCONT)
    wait_status(c, "node1", "online")
    c.wait_registered("node1", 2)
    reply = c.json("exec", "--verb", "RUN", "echo back", "--target", "node1", "--wait")
    assert [r["state"] for r in reply["results"]] == ["success"]


def test_killed_client_is_offline_and_its_jobs_undelivered(make_cluster: Any) -> None:
    c = make_cluster(nodes=2, **FAST)
    c.stop_process("node1", signal.SIGKILL)
    wait_status(c, "node1", "offline")
    # Offline nodes are not default targets.
    reply = c.json("exec", "--verb", "RUN", "echo default", "--wait")
    assert [r["node"] for r in reply["results"]] == ["node0"]
    # Named, the offline node gets the job queued, and undelivered at its deadline.
    reply = c.json(
        "exec",
        "--verb",
        "RUN",
        "--timeout 2 echo named",
        "--target",
        "node0",
        "--target",
        "node1",
        "--wait",
        rc=1,
    )
    got = {r["node"]: r for r in reply["results"]}
    assert got["node0"]["state"] == "success"
    assert got["node1"]["state"] == "undelivered"
    assert got["node1"]["rc"] is None
    assert "node1" in got["node1"]["stderr"]
    proc = c.run(
        "exec", "--verb", "RUN", "--timeout 2 echo alone", "--target", "node1", "--wait", rc=1
    )
    assert "FAILED node1" in proc.stderr and "undelivered" in proc.stderr


def test_job_queued_for_offline_node_is_delivered_when_it_returns(make_cluster: Any) -> None:
    c = make_cluster(nodes=2, **FAST)
    out = c.root / "ran"
    c.stop_process("node1", signal.SIGKILL)
    wait_status(c, "node1", "offline")
    [parent] = submit(
        c, "exec", "--verb", "RUN", f"--timeout 120 echo once >> {out}", "--target", "node1"
    )
    job_id = parent["jobs"][0]
    assert states(job_info(c, job_id)) == {"node1": "queued"}
    c.start_client("node1")
    info = wait_job(c, job_id)
    assert info["id"] == job_id
    assert states(info) == {"node1": "success"}
    assert read_lines(out) == ["once"]
    # A further client restart does not run it again.
    c.stop_process("node1")
    c.start_client("node1")
    c.json("exec", "--verb", "RUN", "--skip-cache true", "--target", "node1", "--wait")
    assert read_lines(out) == ["once"]


def test_node_vanishing_while_running_a_job_is_lost_unless_its_client_returns(
    make_cluster: Any,
) -> None:
    c = make_cluster(nodes=2, **FAST)
    pids_file = c.root / "pids"
    [parent] = submit(
        c, "exec", "--verb", "RUN", f"--timeout 8 echo $$ >> {pids_file}; exec sleep 300"
    )
    job_id = parent["jobs"][0]
    wait_for(lambda: len(read_lines(pids_file)) == 2, "the job to start on both nodes")
    try:
        c.stop_process("node0", signal.SIGKILL)
        c.stop_process("node1", signal.SIGKILL)
        # node0 comes back, finds its job still running and kills it at its stored
        # deadline; node1 stays away past the deadline, and the server calls it lost.
        c.start_client("node0")
        info = wait_job(c, job_id)
        assert states(info) == {"node0": "timeout", "node1": "lost"}
        assert "node1" in info["results"]["node1"]["stderr"]
        assert all(r["rc"] is None for r in info["results"].values())
        # node0's job was killed; node1's, with no client to watch it, still runs.
        assert sum(pid_alive(int(p)) for p in read_lines(pids_file)) == 1
    finally:
        kill_pids([int(p) for p in read_lines(pids_file)])


# ---- restarts ----------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_client_restart_keeps_its_cache(make_cluster: Any, sig: int) -> None:
    c = make_cluster(nodes=1, **FAST)
    u = uid()
    c.json("exec", "--verb", "ARG", f"{u} value-{u}", "--wait")
    c.json("exec", "--verb", "ENV", f"E_{u} env-{u}", "--wait")
    first = c.json("exec", "--verb", "RUN", f"echo cached-{u}", "--wait")
    assert first["results"][0]["state"] == "success"
    c.stop_process("node0", sig)
    c.start_client("node0")
    reply = c.json("exec", "--verb", "RUN", f"echo {{{{ {u} }}}} $E_{u}", "--wait")
    assert [(r["state"], r["stdout"].strip()) for r in reply["results"]] == [
        ("success", f"value-{u} env-{u}")
    ]
    again = c.json("exec", "--verb", "RUN", f"echo cached-{u}", "--wait")
    assert [r["state"] for r in again["results"]] == ["skipped-cache"]


def test_clients_reconnect_after_server_restart(make_cluster: Any) -> None:
    c = make_cluster(nodes=2, **FAST)
    u = uid()
    before = c.json("exec", "--verb", "RUN", f"echo before-{u}", "--wait")
    c.stop_process("server")
    c.start_server()
    c.wait_registered("node0", 2)
    c.wait_registered("node1", 2)
    after = c.json("exec", "--verb", "RUN", f"echo after-{u}", "--wait")
    assert sorted((r["node"], r["state"]) for r in after["results"]) == [
        ("node0", "success"),
        ("node1", "success"),
    ]
    # History survived on the sqlite store.
    old = job_info(c, before["results"][0]["job"])
    assert states(old) == {"node0": "success", "node1": "success"}
    assert {n: r["status"] for n, r in nodes(c).items()} == {"node0": "online", "node1": "online"}


def test_second_client_with_a_connected_identity_is_refused(make_cluster: Any) -> None:
    c = make_cluster(nodes=2, **FAST)
    caches = [c.root / "cache" / ident / "cache.db" for ident in c.identities]
    assert all(p.exists() for p in caches) and caches[0] != caches[1]
    log = c.root / "logs" / "impostor.log"
    argv = [
        *c._base(),
        "--identity",
        "node0",
        "--machine-id",
        "impostor",
        "--cache-path",
        str(c.root / "cache" / "impostor"),
        "--grpc-server-address",
        "127.0.0.1",
        "--grpc-port",
        str(c.port),
        "client",
    ]
    with open(log, "wb") as fh:
        impostor = subprocess.Popen(
            argv, stdout=fh, stderr=subprocess.STDOUT, env=c.env, start_new_session=True
        )
    try:
        wait_for(
            lambda: "already connected" in log.read_text(errors="replace"),
            "the impostor to be refused",
            timeout=60,  # a client's start on a loaded 2-core machine
        )
        assert "identity 'node0' is already connected" in log_text(c, "server")
        reply = c.json("exec", "--verb", "RUN", "echo still-me", "--wait")
        assert sorted((r["node"], r["state"]) for r in reply["results"]) == [
            ("node0", "success"),
            ("node1", "success"),
        ]
        assert nodes(c)["node0"]["machine_id"] == "machine-node0"
    finally:
        impostor.terminate()
        impostor.wait(10)


# ---- crash safety ------------------------------------------------------------------------
def test_server_sigkill_mid_orchestration_keeps_every_stored_result(
    make_cluster: Any,
) -> None:
    c = make_cluster(nodes=2, **FAST)
    name_nodes(c)
    out = c.root / "out"
    out.mkdir()
    gate = c.root / "gate"
    count, gate_at, kill_after = 200, 100, 120
    jobs = []
    for i in range(1, count + 1):
        step = f"echo {i} >> {out}/{{{{ node_name }}}}"
        if i == gate_at:
            step = f"--timeout 60 while [ ! -f {gate} ]; do sleep 0.05; done; " + step
        elif i > gate_at or i % 10 == 0:
            step = "sleep 0.03; " + step  # slow enough for the kill to land mid-way
        jobs.append(f'  - RUN: "{step}"\n')
    path = c.root / "big.yaml"
    path.write_text("- jobs:\n" + "".join(jobs))
    [parent] = submit(c, "orchestrate", str(path))
    assert len(parent["jobs"]) == count

    def lines_at_least(n: int) -> Callable[[], bool]:
        return lambda: all(len(read_lines(out / node)) >= n for node in c.identities)

    # Every node has done half of it, the results of that half have reached the server...
    wait_for(lines_at_least(gate_at - 1), "every node to reach the gate", timeout=90)
    wait_for(
        lambda: (
            sum(
                r["success"]
                for r in c.json("manage", "--list-jobs")
                if r["parent_id"] == parent["id"]
            )
            == 2 * (gate_at - 1)
        ),
        "the results before the gate to reach the server",
    )
    # ... then results flow again, and the server is killed among them.
    gate.touch()
    wait_for(lines_at_least(kill_after), "the nodes to carry on past the gate")
    export = c.root / "before.json"
    c.run("manage", "--export-jobs", str(export))
    c.stop_process("server", signal.SIGKILL)
    final_before = {
        (j["id"], node): r
        for j in json.loads(export.read_text())
        if j["parent_id"] == parent["id"]
        for node, r in j["results"].items()
        if r["state"] == "success"
    }
    assert len(final_before) >= 2 * (gate_at - 1)

    c.start_server()
    c.wait_registered("node0", 2)
    c.wait_registered("node1", 2)

    def all_final() -> bool:
        rows = [r for r in c.json("manage", "--list-jobs") if r["parent_id"] == parent["id"]]
        return len(rows) == count and all(r["processing"] == 0 for r in rows)

    wait_for(all_final, "every job to end after the restart", timeout=90)
    c.run("manage", "--export-jobs", str(c.root / "after.json"))
    after = {j["id"]: j for j in json.loads((c.root / "after.json").read_text())}
    for (jid, node), r in final_before.items():
        kept = after[jid]["results"][node]
        assert {k: kept[k] for k in RESULT_FIELDS} == {k: r[k] for k in RESULT_FIELDS}
    for jid in parent["jobs"]:
        assert states(after[jid]) == {"node0": "success", "node1": "success"}
    # Every job ran exactly once on each node, in order.
    for node in c.identities:
        assert read_lines(out / node) == [str(i) for i in range(1, count + 1)]


# ---- bad peers ---------------------------------------------------------------------------
HELLO = {
    "t": "hello",
    "proto": 1,
    "identity": "rogue",
    "machine_id": "x",
    "version": "0",
    "driver": "grpc",
    "heartbeat_interval": 1.0,
    "known": [],
}


def _bad_payload(kind: str) -> bytes:
    if kind == "garbage":
        return b"\xc1\xc1 this is not msgpack \x00\xff"
    if kind == "truncated":
        return msgpack.packb([HELLO])[:-5]
    if kind == "oversized":
        return msgpack.packb([{"t": "hello", "pad": b"x" * (17 * 1024 * 1024)}])
    return msgpack.packb([{"t": "hb"}])  # a valid message, but before hello


def _raw_stream(port: int, payload: bytes) -> tuple[list[bytes], grpc.StatusCode | None]:
    """Send one raw message on /directord.Agent/Connect and read until the server ends it.

    The request side stays open, so the stream ending is the server's doing.
    """
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]
    )
    release = threading.Event()

    def requests() -> Any:
        yield payload
        release.wait(60)

    received: list[bytes] = []
    code = None
    try:
        call = channel.stream_stream("/directord.Agent/Connect")
        for message in call(requests(), timeout=30):
            received.append(message)
    except grpc.RpcError as exc:
        code = exc.code()
    finally:
        release.set()
        channel.close()
    return received, code


# Raw gRPC peers: these need the gRPC driver, so they use a private cluster (make_cluster),
# not the shared `cluster`, which runs on every driver.
@pytest.mark.parametrize("kind", ["garbage", "truncated", "oversized", "before-hello"])
def test_bad_peer_stream_is_closed_and_server_carries_on(make_cluster: Any, kind: str) -> None:
    cluster: Cluster = make_cluster(nodes=3, heartbeat=1.0)
    log_before = len(log_text(cluster, "server"))
    received, code = _raw_stream(cluster.port, _bad_payload(kind))
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, "the server left the stream open"
    new_log = log_text(cluster, "server")[log_before:]
    if kind in ("garbage", "truncated"):
        assert "protocol error: bad node message" in new_log
        assert received == []
    elif kind == "oversized":
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        wait_for(
            lambda: "stream closed before registering" in log_text(cluster, "server")[log_before:],
            "the server to log it",
        )
    else:
        assert [msgpack.unpackb(m) for m in received] == [
            [{"t": "refuse", "reason": "first message must be hello"}]
        ]
        assert "first message must be hello" in new_log
    assert "rogue" not in nodes(cluster)
    reply = cluster.json("exec", "--verb", "RUN", f"echo after-{kind}-{uid()}", "--wait")
    assert sorted(r["state"] for r in reply["results"]) == ["success"] * 3


def test_bad_message_after_hello_closes_only_that_stream(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=3, heartbeat=1.0)
    channel = grpc.insecure_channel(f"127.0.0.1:{cluster.port}")
    release = threading.Event()
    hello = {**HELLO, "identity": f"rogue-{uid()}"}

    def requests() -> Any:
        yield msgpack.packb([hello])
        yield b"\xc1 garbage after hello"
        release.wait(60)

    kinds = []
    try:
        for message in channel.stream_stream("/directord.Agent/Connect")(requests(), timeout=30):
            kinds.extend(e["t"] for e in msgpack.unpackb(message))
    except grpc.RpcError as exc:
        assert exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        release.set()
        channel.close()
    assert kinds[:1] == ["welcome"]
    wait_status(cluster, hello["identity"], "offline")
    assert any(
        f"node {hello['identity']} (" in line and "protocol error" in line
        for line in log_text(cluster, "server").splitlines()
    )
    reply = cluster.json(
        "exec",
        "--verb",
        "RUN",
        f"echo fine-{uid()}",
        "--target",
        "node0",
        "--target",
        "node1",
        "--target",
        "node2",
        "--wait",
    )
    assert sorted(r["state"] for r in reply["results"]) == ["success"] * 3
    cluster.run("manage", "--purge-nodes")
    assert hello["identity"] not in nodes(cluster)
