"""End-to-end: QUERY, QUERY_WAIT, JOB_WAIT and WAIT against a real server and three clients."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Cluster
from tests.e2e.component_helpers import (
    NODES,
    by_node,
    dump_cache,
    exec_wait,
    is_final,
    job_results,
    job_states,
    orch,
    poll_job,
    submit,
    token,
)

COLORS = {"node0": "red", "node1": "green", "node2": "blue"}


def _blocker(go: Path) -> str:
    """A RUN command that holds a lane until ``go`` exists (bounded: never left running)."""
    return f"for i in $(seq 1200); do [ -e {go} ] && break; sleep 0.05; done; [ -e {go} ]"


# ---- QUERY / QUERY_WAIT -------------------------------------------------------------------


def test_query_shares_each_nodes_arg_with_every_node(cluster: Cluster) -> None:
    tok = token()
    key = f"color_{tok}"
    jobs: list[dict[str, Any]] = [
        {"ARG": f"--skip-cache {key} {color}-{tok}", "assign": [node]}
        for node, color in COLORS.items()
    ]
    jobs.append({"QUERY": f"--skip-cache {key}"})
    jobs.append({"RUN": f"--skip-cache echo \"{{{{ query['node1']['{key}'] }}}}\""})
    jobs.append(
        {"ECHO": "--skip-cache " + " ".join(f"{{{{ query['{n}']['{key}'] }}}}" for n in NODES)}
    )
    reply = orch(cluster, [{"jobs": jobs}])
    assert {r["state"] for r in reply["results"]} == {"success"}
    assert {n: r["stdout"] for n, r in job_results(reply, 3).items()} == {
        n: f"{key} from 3 nodes" for n in NODES
    }
    assert {n: r["stdout"].strip() for n, r in job_results(reply, 4).items()} == {
        n: f"green-{tok}" for n in NODES
    }
    assert {n: r["stdout"] for n, r in job_results(reply, 5).items()} == {
        n: f"red-{tok} green-{tok} blue-{tok}" for n in NODES
    }
    for node in NODES:
        query = dump_cache(cluster, node)["query"]
        assert {n: query[n][key] for n in NODES} == {n: f"{c}-{tok}" for n, c in COLORS.items()}


def test_query_no_wait_then_query_wait_for_named_nodes(cluster: Cluster) -> None:
    tok = token()
    key = f"nw_{tok}"
    for node, color in COLORS.items():
        exec_wait(cluster, "ARG", f"--skip-cache {key} {color}", "--target", node)
    identities = " ".join(f"--identity {n}" for n in NODES)
    reply = orch(
        cluster,
        [
            {
                "jobs": [
                    {"QUERY": f"--skip-cache --no-wait {key}"},
                    {"QUERY_WAIT": f"--skip-cache --query-timeout 60 {identities} {key}"},
                    {
                        "ECHO": f"--skip-cache {{{{ query['node0']['{key}'] }}}}-"
                        f"{{{{ query['node2']['{key}'] }}}}"
                    },
                ]
            }
        ],
    )
    assert {r["state"] for r in reply["results"]} == {"success"}
    assert {r["stdout"] for r in job_results(reply, 0).values()} == {f"reported {key}"}
    assert {r["stdout"] for r in job_results(reply, 1).values()} == {f"{key} present"}
    assert {r["stdout"] for r in job_results(reply, 2).values()} == {"red-blue"}


def test_query_wait_times_out_when_the_value_never_arrives(cluster: Cluster) -> None:
    key = f"never_{token()}"
    reply = exec_wait(
        cluster,
        "QUERY_WAIT",
        f"--query-timeout 0.5 --identity node1 {key}",
        "--target",
        "node0",
        rc=1,
    )
    r = by_node(reply)["node0"]
    assert r["state"] == "failed"
    assert f"{key} not in the query cache after 0.5s" in r["stderr"]


def test_query_of_a_node_without_the_arg_reports_none(cluster: Cluster) -> None:
    tok = token()
    key = f"partial_{tok}"
    exec_wait(cluster, "ARG", f"--skip-cache {key} only-here", "--target", "node2")
    reply = exec_wait(cluster, "QUERY", f"--skip-cache {key}")
    assert {r["state"] for r in reply["results"]} == {"success"}
    query = dump_cache(cluster, "node0")["query"]
    assert query["node2"][key] == "only-here"
    assert query["node0"][key] is None


# ---- JOB_WAIT -----------------------------------------------------------------------------


def test_job_wait_waits_for_a_job_on_other_nodes(cluster: Cluster) -> None:
    tok = token()
    go = cluster.root / f"jw-go-{tok}"
    waited = {"jobs": [{"RUN": f"{_blocker(go)}; echo waited-{tok}"}]}
    path = cluster.root / f"jw-{tok}.yaml"
    path.write_text(yaml.safe_dump([waited]))
    rows = cluster.json("orchestrate", str(path), "--finger-print")
    sha = rows[0]["sha"]
    # node1 and node2 start the job; it cannot end before the test creates `go`.
    parents = submit(cluster, [waited], "--target", "node1", "--target", "node2")
    assert parents[0]["shas"] == [sha]  # the finger-print is the submitted job's sha
    waiter = submit(
        cluster,
        [
            {
                "jobs": [
                    {"JOB_WAIT": f"--job-timeout 120 --identity node1 --identity node2 {sha}"},
                    {"ECHO": f"after-{tok}"},
                ]
            }
        ],
        "--target",
        "node0",
    )
    wait_id, echo_id = waiter[0]["jobs"]
    try:
        # While the job runs elsewhere, node0 is still waiting (nothing can have ended it).
        states = job_states(cluster, wait_id)
        assert not is_final(states["node0"]), states
    finally:
        go.touch()  # never leave node1/node2 blocked for the tests that follow
    info = poll_job(cluster, wait_id)
    r = info["results"]["node0"]
    assert r["state"] == "success", r
    assert r["stdout"] == f"job {sha[:12]} ended on node1, node2"
    assert poll_job(cluster, echo_id)["results"]["node0"]["stdout"] == f"after-{tok}"
    waited_info = poll_job(cluster, parents[0]["jobs"][0])
    assert {n: x["state"] for n, x in waited_info["results"].items()} == {
        "node1": "success",
        "node2": "success",
    }


def test_job_wait_uses_submit_reply_shas_and_reports_failures(cluster: Cluster) -> None:
    tok = token()
    parents = submit(cluster, [{"jobs": [{"RUN": f"echo bad-{tok}; exit 5"}]}], "--target", "node2")
    sha = parents[0]["shas"][0]
    reply = exec_wait(
        cluster, "JOB_WAIT", f"--job-timeout 60 --identity node2 {sha}", "--target", "node1", rc=1
    )
    r = by_node(reply)["node1"]
    assert r["state"] == "failed"
    assert "job ended unsuccessfully on: node2 (failed)" in r["stderr"]


def test_job_wait_timeout_fails(cluster: Cluster) -> None:
    sha = "0" * 56  # no job has this fingerprint
    reply = exec_wait(cluster, "JOB_WAIT", f"--job-timeout 0.5 {sha}", "--target", "node0", rc=1)
    r = by_node(reply)["node0"]
    assert r["state"] == "failed"
    assert "still waiting for node0 after 0.5s" in r["stderr"]


# ---- WAIT ---------------------------------------------------------------------------------


class _Health(http.server.BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` requests, then 200; records every path."""

    failures = 2
    hits: list[str]
    lock = threading.Lock()

    def do_GET(self) -> None:
        with self.lock:
            self.hits.append(self.path)
            status = 503 if len(self.hits) <= self.failures else 200
        body = b"ok\n" if status == 200 else b"starting\n"
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def http_server() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []
    handler = type("Handler", (_Health,), {"hits": hits})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_wait_seconds(cluster: Cluster) -> None:
    reply = exec_wait(cluster, "WAIT", "--skip-cache --seconds 0.2")
    assert {(r["state"], r["rc"]) for r in reply["results"]} == {("success", 0)}


def test_wait_cmd_until_it_passes(cluster: Cluster) -> None:
    tok = token()
    counter = cluster.root / f"wait-cmd-{tok}"
    command = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; "
        f"echo try-$n; [ $n -ge 3 ]"
    )
    reply = exec_wait(
        cluster, "WAIT", f"--retry 10 --retry-wait 0.05 --cmd {command}", "--target", "node1"
    )
    r = by_node(reply)["node1"]
    assert r["state"] == "success", r
    assert r["stdout"].strip() == "try-3"
    assert counter.read_text().strip() == "3"


def test_wait_url_until_it_answers(cluster: Cluster, http_server: tuple[str, list[str]]) -> None:
    url, hits = http_server
    tok = token()
    reply = exec_wait(cluster, "WAIT", f"--retry 60 --retry-wait 0.1 --url {url}/health/{tok}")
    for r in by_node(reply).values():
        assert r["state"] == "success", r
        assert r["stdout"] == f"{url}/health/{tok} answered 200"
    assert len(hits) >= 2 + len(NODES)  # two refusals, then one success per node at least
    assert set(hits) == {f"/health/{tok}"}


def test_wait_fails_after_its_retries(
    cluster: Cluster,
    http_server: tuple[str, list[str]],
) -> None:
    tok = token()
    reply = exec_wait(
        cluster,
        "WAIT",
        f"--retry 3 --retry-wait 0.05 --cmd echo no-{tok} >&2; exit 1",
        "--target",
        "node2",
        rc=1,
    )
    r = by_node(reply)["node2"]
    assert r["state"] == "failed"
    assert "WAIT gave up after 3 attempts" in r["stderr"]
    assert f"no-{tok}" in r["stderr"]
    url, hits = http_server  # refuses the first two requests ...
    reply = exec_wait(
        cluster, "WAIT", f"--retry 2 --retry-wait 0.05 --url {url}/down", "--target", "node2", rc=1
    )
    r = by_node(reply)["node2"]
    assert r["state"] == "failed"
    assert f"{url}/down answered 503" in r["stderr"]  # ... so two attempts both fail
    assert hits == ["/down", "/down"]


def test_wait_url_nothing_listening(cluster: Cluster) -> None:
    closed = "http://127.0.0.1:1/never"  # port 1: nothing listens, connection refused
    reply = exec_wait(
        cluster, "WAIT", f"--retry 2 --retry-wait 0.05 --url {closed}", "--target", "node0", rc=1
    )
    r = by_node(reply)["node0"]
    assert r["state"] == "failed"
    assert f"{closed} answered nothing" in r["stderr"]


def test_wait_needs_a_mode(cluster: Cluster) -> None:
    proc = cluster.run("exec", "--verb", "WAIT", "--retry 2", "--wait", rc=2)
    assert "one of --seconds, --url or --cmd is required" in proc.stderr
