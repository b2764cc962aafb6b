"""Helpers shared by the component end-to-end tests (test_components_*.py)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import yaml

from directord import DirectordConnect
from directord.models import State
from tests.conftest import Cluster

NODES = ["node0", "node1", "node2"]
DEADLINE = 60.0


def token() -> str:
    """A short unique string, so every test's jobs have fresh fingerprints and values."""
    return uuid.uuid4().hex[:10]


def orch(cluster: Cluster, data: list[dict[str, Any]], *args: str, rc: int | None = 0) -> Any:
    """Run an orchestration given as Python data with --wait --format json."""
    return cluster.orchestrate(yaml.safe_dump(data, sort_keys=False), *args, rc=rc)


def submit(cluster: Cluster, data: list[dict[str, Any]], *args: str) -> list[dict[str, Any]]:
    """Submit an orchestration without waiting; returns the parents (ids, jobs, shas)."""
    path = cluster.root / f"submit-{token()}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    parents: list[dict[str, Any]] = cluster.json("orchestrate", str(path), *args)
    return parents


def exec_wait(
    cluster: Cluster, verb: str, args: str, *extra: str, rc: int | None = 0, timeout: float = 120.0
) -> Any:
    """``directord exec --verb VERB ARGS --wait --format json``."""
    return cluster.json("exec", "--verb", verb, args, "--wait", *extra, rc=rc, timeout=timeout)


def by_node(reply: dict[str, Any], verb: str | None = None) -> dict[str, dict[str, Any]]:
    """The last result per node of a --wait reply (optionally of one verb only)."""
    out: dict[str, dict[str, Any]] = {}
    for result in reply["results"]:
        if verb is None or result["verb"] == verb:
            out[result["node"]] = result
    return out


def job_results(reply: dict[str, Any], index: int) -> dict[str, dict[str, Any]]:
    """Results per node of the index-th job of the (only) orchestration in a reply."""
    job_id = reply["parents"][0]["jobs"][index]
    return {r["node"]: r for r in reply["results"] if r["job"] == job_id}


def poll_job(cluster: Cluster, job_id: str, timeout: float = DEADLINE) -> dict[str, Any]:
    """Wait (pushed results, no sleeps) until a job ended on every target; its job info."""
    with DirectordConnect(cluster.socket_path) as conn:
        _, info = conn.wait(job_id, timeout=timeout)
    return info


def job_states(cluster: Cluster, job_id: str) -> dict[str, str]:
    """Current state of a job on each of its targets."""
    with DirectordConnect(cluster.socket_path) as conn:
        info = conn.job_info(job_id)
    return {node: r["state"] for node, r in info["results"].items()}


def is_final(state: str) -> bool:
    """True when a result state can no longer change."""
    return State(state).final


def dump_cache(cluster: Cluster, node: str) -> dict[str, Any]:
    """A running client's cache, read with ``manage --dump-cache``."""
    proc = cluster.run("manage", "--dump-cache", "--cache-path", str(cluster.root / "cache" / node))
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def seed_identity_arg(cluster: Cluster, key: str = "me") -> None:
    """Give every node a cached arg KEY holding its own identity (for per-node paths)."""
    jobs = [{"ARG": f"--skip-cache {key} {node}", "assign": [node]} for node in NODES]
    reply = orch(cluster, [{"jobs": jobs}])
    assert {r["state"] for r in reply["results"]} == {"success"}
