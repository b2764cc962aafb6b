"""A real cluster on the Redis datastore: server restarts keep every job and result.

The server runs with ``--datastore redis://USER:PASSWORD@127.0.0.1:PORT/0?prefix=P``
on the test run's private redis-server, as an ACL user that may touch only keys
under its own prefix. After jobs succeed and fail, the server is stopped (SIGTERM,
then SIGKILL) and started again, and ``manage --list-jobs`` / ``--job-info`` show
exactly what they showed before.
"""

from __future__ import annotations

import json
import signal
from typing import Any

import redis

from tests.conftest import Cluster
from tests.e2e.helpers import job_info, nodes, states, uid, wait_for, wait_job
from tests.redis_server import RedisServer

PASSWORD = "e2e-s3cret-pw"
NAMESPACES = {"nodes", "jobs", "results", "parents"}
RESULT_FIELDS = ("state", "rc", "stdout", "stderr", "exec_time")


def registrations(c: Cluster, identity: str) -> int:
    """How many times a client has registered so far (from its ready file)."""
    count: int = json.loads((c.root / f"{identity}.ready").read_text())["registered"]
    return count


def snapshot(c: Cluster, job_ids: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--list-jobs`` rows and ``--job-info`` results, by job id."""
    rows = {r["id"]: r for r in c.json("manage", "--list-jobs")}
    infos = {}
    for jid in job_ids:
        info = job_info(c, jid)
        infos[jid] = {
            "verb": info["verb"],
            "parent_id": info["parent_id"],
            "results": {
                node: {k: r[k] for k in RESULT_FIELDS} for node, r in info["results"].items()
            },
        }
    return rows, infos


def test_server_restart_keeps_every_job_and_result(
    make_cluster: Any, redis_server: RedisServer
) -> None:
    u = uid()
    prefix = f"e2e-{u}"
    user = f"directord-{u}"
    reply = redis_server.command(f"ACL SETUSER {user} on >{PASSWORD} ~{prefix}:* +@all")
    assert reply == b"+OK"
    url = f"redis://{user}:{PASSWORD}@127.0.0.1:{redis_server.port}/0?prefix={prefix}"
    c: Cluster = make_cluster(nodes=2, datastore=url, heartbeat=0.5)
    assert not (c.root / "directord.db").exists()  # the default sqlite store is not used

    ok = c.json("exec", "--verb", "RUN", f"echo ok-{u}", "--wait")
    bad = c.json("exec", "--verb", "RUN", f"echo err-{u} >&2; exit 3", "--wait", rc=None)
    orch = c.orchestrate(
        "- jobs:\n"
        f"  - RUN: echo first-{u}\n"
        f"  - ECHO: second-{u}\n"
        "- targets: [node1]\n"
        "  jobs:\n"
        f"  - RUN: echo only-node1-{u}\n"
    )
    assert sorted((r["node"], r["state"], r["stdout"].strip()) for r in ok["results"]) == [
        ("node0", "success", f"ok-{u}"),
        ("node1", "success", f"ok-{u}"),
    ]
    assert {(r["state"], r["rc"], r["stderr"].strip()) for r in bad["results"]} == {
        ("failed", 3, f"err-{u}")
    }
    job_ids = sorted({r["job"] for reply in (ok, bad, orch) for r in reply["results"]})
    assert len(job_ids) == 5
    for jid in job_ids:
        wait_job(c, jid)
    before_rows, before_infos = snapshot(c, job_ids)
    assert set(job_ids) <= set(before_rows)
    assert {jid: states(job_info(c, jid)) for jid in job_ids} == {
        jid: {node: r["state"] for node, r in info["results"].items()}
        for jid, info in before_infos.items()
    }

    # Everything lives in four hashes under the prefix, nowhere else.
    raw = redis.Redis(host="127.0.0.1", port=redis_server.port, db=0)
    try:
        keys = {k.decode() for k in raw.keys(f"{prefix}:*")}
        assert keys == {f"{prefix}:{ns}" for ns in NAMESPACES}
        assert all(raw.type(k) == b"hash" for k in keys)
        assert set(job_ids) <= {f.decode() for f in raw.hkeys(f"{prefix}:jobs")}
    finally:
        raw.close()

    for sig in (signal.SIGTERM, signal.SIGKILL):
        registered = {n: registrations(c, n) for n in c.identities}
        c.stop_process("server", sig)
        c.start_server()
        for node in c.identities:
            c.wait_registered(node, registered[node] + 1)
        rows, infos = snapshot(c, job_ids)
        assert infos == before_infos, f"job info changed after a {sig.name} restart"
        for jid in job_ids:
            assert rows[jid] == before_rows[jid], f"--list-jobs row of {jid} changed"
        wait_for(
            lambda: (
                {n: r["status"] for n, r in nodes(c).items()}
                == {"node0": "online", "node1": "online"}
            ),
            "both nodes online again",
        )

    # The restarted server keeps writing to Redis: a new job joins the old ones.
    new = c.json("exec", "--verb", "RUN", f"echo after-{u}", "--wait")
    assert {r["state"] for r in new["results"]} == {"success"}
    listed = {r["id"] for r in c.json("manage", "--list-jobs")}
    assert set(job_ids) | {new["results"][0]["job"]} <= listed

    # The server's log names the datastore with the password masked.
    log = c.log("server").read_text(errors="replace")
    assert f"redis://{user}:***@127.0.0.1:{redis_server.port}/0" in log
    assert PASSWORD not in log
