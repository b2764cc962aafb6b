"""End-to-end: CACHEFILE and CACHEEVICT against a real server and three clients."""

from __future__ import annotations

import json

from tests.conftest import Cluster
from tests.e2e.component_helpers import (
    NODES,
    by_node,
    dump_cache,
    exec_wait,
    job_results,
    orch,
    token,
)

# ---- CACHEFILE ----------------------------------------------------------------------------


def test_cachefile_loads_yaml_and_json_into_args(cluster: Cluster) -> None:
    tok = token()
    yaml_file = cluster.root / f"vars-{tok}.yaml"
    yaml_file.write_text(f"# comment\nalpha_{tok}: 1\nbeta_{tok}: [x, y]\ngamma_{tok}:\n  k: v\n")
    json_file = cluster.root / f"vars-{tok}.json"
    json_file.write_text(json.dumps({f"delta_{tok}": "d", f"eps_{tok}": 2.5}))
    reply = orch(
        cluster,
        [
            {
                "jobs": [
                    {"CACHEFILE": str(yaml_file)},
                    {"CACHEFILE": str(json_file)},
                    {
                        "ECHO": f"{{{{ alpha_{tok} + 1 }}}} {{{{ beta_{tok}[1] }}}} "
                        f"{{{{ gamma_{tok}.k }}}} "
                        f"{{{{ delta_{tok} }}}} {{{{ eps_{tok} * 2 }}}}"
                    },
                ]
            }
        ],
    )
    assert {r["state"] for r in reply["results"]} == {"success"}
    assert {n: r["stdout"] for n, r in job_results(reply, 0).items()} == {
        n: f"loaded 3 args from {yaml_file}" for n in NODES
    }
    assert {r["stdout"] for r in job_results(reply, 2).values()} == {"2 y v d 5.0"}
    for node in NODES:
        args = dump_cache(cluster, node)["args"]
        assert args[f"alpha_{tok}"] == 1
        assert args[f"beta_{tok}"] == ["x", "y"]
        assert args[f"gamma_{tok}"] == {"k": "v"}
        assert args[f"delta_{tok}"] == "d"
        assert args[f"eps_{tok}"] == 2.5


def test_cachefile_rejects_missing_and_non_mapping_files(cluster: Cluster) -> None:
    tok = token()
    missing = cluster.root / f"missing-{tok}.yaml"
    reply = exec_wait(cluster, "CACHEFILE", str(missing), "--target", "node0", rc=1)
    r = by_node(reply)["node0"]
    assert r["state"] == "failed" and str(missing) in r["stderr"]
    listing = cluster.root / f"list-{tok}.yaml"
    listing.write_text("- a\n- b\n")
    reply = exec_wait(cluster, "CACHEFILE", str(listing), "--target", "node0", rc=1)
    r = by_node(reply)["node0"]
    assert r["state"] == "failed" and "expected a mapping" in r["stderr"]
    broken = cluster.root / f"broken-{tok}.yaml"
    broken.write_text("a: [unclosed\n")
    reply = exec_wait(cluster, "CACHEFILE", str(broken), "--target", "node0", rc=1)
    r = by_node(reply)["node0"]
    assert r["state"] == "failed" and "not YAML/JSON" in r["stderr"]


# ---- CACHEEVICT ---------------------------------------------------------------------------


def test_cacheevict_args(cluster: Cluster) -> None:
    tok = token()
    exec_wait(cluster, "ARG", f"--skip-cache gone_{tok} here", "--target", "node0")
    exec_wait(cluster, "ARG", f"--skip-cache kept_{tok} here", "--target", "node1")
    assert dump_cache(cluster, "node0")["args"][f"gone_{tok}"] == "here"
    reply = exec_wait(cluster, "CACHEEVICT", "--skip-cache args", "--target", "node0")
    assert by_node(reply)["node0"]["stdout"] == "evicted args"
    assert dump_cache(cluster, "node0")["args"] == {}
    # Templates on that node no longer find the arg; other nodes keep theirs.
    reply = exec_wait(
        cluster, "ECHO", f"--skip-cache {{{{ gone_{tok} }}}}", "--target", "node0", rc=1
    )
    assert f"'gone_{tok}' is undefined" in by_node(reply)["node0"]["stderr"]
    assert dump_cache(cluster, "node1")["args"][f"kept_{tok}"] == "here"


def test_cacheevict_envs(cluster: Cluster) -> None:
    tok = token()
    var = f"EVICT_{tok.upper()}"
    exec_wait(cluster, "ENV", f"--skip-cache {var} set-{tok}", "--target", "node1")
    check = f'--skip-cache echo "[${{{var}-unset}}]"'
    assert (
        by_node(exec_wait(cluster, "RUN", check, "--target", "node1"))["node1"]["stdout"].strip()
        == f"[set-{tok}]"
    )
    exec_wait(cluster, "CACHEEVICT", "--skip-cache envs", "--target", "node1")
    assert dump_cache(cluster, "node1")["envs"] == {}
    assert (
        by_node(exec_wait(cluster, "RUN", check, "--target", "node1"))["node1"]["stdout"].strip()
        == "[unset]"
    )


def test_cacheevict_query(cluster: Cluster) -> None:
    tok = token()
    orch(
        cluster,
        [
            {
                "jobs": [
                    {"ARG": f"--skip-cache q_{tok} v-{tok}"},
                    {"QUERY": f"--skip-cache q_{tok}"},
                ]
            }
        ],
    )
    assert dump_cache(cluster, "node2")["query"]["node0"][f"q_{tok}"] == f"v-{tok}"
    exec_wait(cluster, "CACHEEVICT", "--skip-cache query", "--target", "node2")
    assert dump_cache(cluster, "node2")["query"] == {}
    assert dump_cache(cluster, "node0")["query"]["node2"][f"q_{tok}"] == f"v-{tok}"


def test_cacheevict_jobs_makes_a_cached_job_run_again(cluster: Cluster) -> None:
    tok = token()
    log = cluster.root / f"runs-{tok}"
    job = f"echo ran >> {log}"
    assert (
        by_node(exec_wait(cluster, "RUN", job, "--target", "node0"))["node0"]["state"] == "success"
    )
    assert (
        by_node(exec_wait(cluster, "RUN", job, "--target", "node0"))["node0"]["state"]
        == "skipped-cache"
    )
    assert log.read_text() == "ran\n"
    exec_wait(cluster, "CACHEEVICT", "--skip-cache jobs", "--target", "node0")
    assert (
        by_node(exec_wait(cluster, "RUN", job, "--target", "node0"))["node0"]["state"] == "success"
    )
    assert log.read_text() == "ran\nran\n"


def test_cacheevict_all(cluster: Cluster) -> None:
    tok = token()
    log = cluster.root / f"all-{tok}"
    orch(
        cluster,
        [
            {
                "jobs": [
                    {"ARG": f"--skip-cache a_{tok} 1"},
                    {"ENV": f"--skip-cache E_{tok} 1"},
                    {"QUERY": f"--skip-cache a_{tok}"},
                    {"RUN": f"echo ran >> {log}"},
                ]
            }
        ],
        "--target",
        "node1",
    )
    before = dump_cache(cluster, "node1")
    assert before["args"] and before["envs"] and before["query"] and before["jobs"]
    assert before["parents"]
    exec_wait(cluster, "CACHEEVICT", "--skip-cache all", "--target", "node1")
    after = dump_cache(cluster, "node1")
    assert after["args"] == {} and after["envs"] == {} and after["query"] == {}
    # Only the CACHEEVICT job itself (and its orchestration) was recorded after the eviction.
    assert len(after["jobs"]) == 1 and not set(after["jobs"]) & set(before["jobs"])
    assert len(after["parents"]) == 1 and not set(after["parents"]) & set(before["parents"])
    reply = exec_wait(cluster, "RUN", f"echo ran >> {log}", "--target", "node1")
    assert by_node(reply)["node1"]["state"] == "success"
    assert log.read_text() == "ran\nran\n"


def test_cacheevict_rejects_unknown_part(cluster: Cluster) -> None:
    proc = cluster.run("exec", "--verb", "CACHEEVICT", "everything", "--wait", rc=2)
    assert "expected one of args, envs, query, jobs, parents, all" in proc.stderr
