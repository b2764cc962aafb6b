"""The command line against real clusters: bad input, an unreachable server, configuration
precedence, every ``manage`` action, ``--stream`` and ``--poll``."""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.e2e.helpers import (
    LiveCLI,
    job_count,
    job_info,
    name_nodes,
    nodes,
    raw_cli,
    states,
    submit,
    uid,
    wait_job,
    wait_status,
)

ALL = ["node0", "node1", "node2"]
ANALYSIS_KEYS = {
    "ACTUAL_RUNTIME",
    "COMBINED_EXECUTION_TIME",
    "FASTEST_NODE_EXECUTION",
    "SLOWEST_NODE_EXECUTION",
    "FASTEST_NODE_ROUNDTRIP",
    "SLOWEST_NODE_ROUNDTRIP",
    "TOTAL_AVG_EXECUTION_TIME",
    "TOTAL_FAILURES",
    "TOTAL_JOBS",
    "TOTAL_NODE_COUNT",
    "TOTAL_SUCCESSES",
}


@pytest.fixture(scope="module", autouse=True)
def named(cluster: Cluster) -> None:
    name_nodes(cluster)


# ---- bad orchestrations ------------------------------------------------------------------
BAD = {
    "yaml-syntax": ('- jobs:\n  - RUN: "echo ok"\n  - RUN: [unclosed\n', 4, "YAML error"),
    "unknown-verb": (
        '- jobs:\n  - RUN: "echo ok"\n  - RUNN: "echo no"\n',
        3,
        "unknown verb 'RUNN' (did you mean RUN?)",
    ),
    "job-not-mapping": (
        '- jobs:\n  - RUN: "echo ok"\n  - "echo hi"\n',
        3,
        "a job must be a mapping",
    ),
    "vars-not-mapping": (
        '- jobs:\n  - RUN: "echo ok"\n    vars: [1, 2]\n',
        3,
        "`vars` must be a mapping",
    ),
    "vars-bad-type": (
        '- jobs:\n  - RUN: "echo ok"\n  - RUN: "echo no"\n    vars: {timeout: soon}\n',
        3,
        "vars.timeout must be a number",
    ),
    "unknown-option": (
        '- jobs:\n  - RUN: "echo ok"\n  - RUN: "--bogus-flag echo no"\n',
        3,
        "unrecognized option --bogus-flag",
    ),
    "unknown-key": (
        '- name: fine\n  target: [node0]\n  jobs:\n  - RUN: "echo ok"\n',
        2,
        "unknown key 'target'",
    ),
    "two-verbs": ('- jobs:\n  - RUN: "echo ok"\n    ECHO: "hi"\n', 2, "exactly one verb"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_orchestration_exits_2_with_file_and_line(cluster: Cluster, case: str) -> None:
    text, line, what = BAD[case]
    path = cluster.root / f"bad-{case}.yaml"
    path.write_text(text)
    before = job_count(cluster)
    proc = cluster.run("orchestrate", str(path), "--wait", rc=2)
    assert proc.stdout == ""
    [message] = proc.stderr.strip().splitlines()
    assert message.startswith(f"directord: {path}:{line}: "), message
    assert what in message
    assert job_count(cluster) == before


def test_bad_exec_exits_2(cluster: Cluster) -> None:
    before = job_count(cluster)
    proc = cluster.run("exec", "--verb", "RUNN", "echo", rc=2)
    assert "did you mean RUN?" in proc.stderr
    proc = cluster.run("exec", "--verb", "RUN", "--timeout 0 echo", rc=2)
    assert "--timeout must be > 0" in proc.stderr
    assert job_count(cluster) == before


def test_exec_help_prints_and_submits_nothing(cluster: Cluster) -> None:
    before = job_count(cluster)
    proc = cluster.run("exec", "--verb", "RUN", "--exec-help")
    assert "--no-block" in proc.stdout and "--skip-cache" in proc.stdout
    assert job_count(cluster) == before


# ---- server unreachable ------------------------------------------------------------------
COMMANDS: list[list[str]] = [
    ["exec", "--verb", "RUN", "echo hi", "--wait"],
    ["orchestrate", "ORCH"],
    ["manage", "--list-nodes"],
    ["manage", "--list-jobs"],
]


def _unreachable(c: Cluster) -> None:
    orch = c.root / "o.yaml"
    orch.write_text('- jobs:\n  - RUN: "echo hi"\n')
    for argv in COMMANDS:
        proc = c.run(*[str(orch) if a == "ORCH" else a for a in argv], rc=3)
        [line] = proc.stderr.strip().splitlines()
        assert c.socket_path in line, line
        assert "Traceback" not in proc.stderr


def test_server_never_started(make_cluster: Any) -> None:
    _unreachable(make_cluster(nodes=0, start=False))


def test_server_killed_leaving_a_stale_socket(make_cluster: Any) -> None:
    c = make_cluster(nodes=1, heartbeat=0.5)
    c.stop_process("server", signal.SIGKILL)
    assert Path(c.socket_path).exists()
    _unreachable(c)


# ---- configuration -----------------------------------------------------------------------
def test_config_file_unknown_key_and_wrong_type(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("socket_path: /tmp/x.sock\nbogus_option: 1\n")
    proc = raw_cli("--config-file", str(config), "manage", "--list-nodes")
    assert proc.returncode == 2
    assert str(config) in proc.stderr and "bogus_option" in proc.stderr

    config.write_text("heartbeat_interval: [1, 2]\n")
    proc = raw_cli("--config-file", str(config), "manage", "--list-nodes")
    assert proc.returncode == 2
    assert str(config) in proc.stderr and "heartbeat_interval" in proc.stderr

    config.write_text("grpc_port: not-a-port\n")
    proc = raw_cli("--config-file", str(config), "server")
    assert proc.returncode == 2
    assert str(config) in proc.stderr and "grpc_port" in proc.stderr

    proc = raw_cli("--config-file", str(tmp_path / "missing.yaml"), "manage", "--list-nodes")
    assert proc.returncode == 2 and "missing.yaml" in proc.stderr

    proc = raw_cli(
        "manage",
        "--list-nodes",
        env={"DIRECTORD_HEARTBEAT_INTERVAL": "often", "DIRECTORD_CONFIG_FILE": str(config)},
    )
    assert proc.returncode == 2
    # The file is read after the env var names it; either error names its source.
    assert "DIRECTORD_HEARTBEAT_INTERVAL" in proc.stderr or str(config) in proc.stderr


def test_flag_beats_env_beats_file(cluster: Cluster, tmp_path: Path) -> None:
    from_file, from_env = "/nonexistent-file-dir/d.sock", "/nonexistent-env-dir/d.sock"
    config = tmp_path / "config.yaml"
    config.write_text(f"socket_path: {from_file}\n")
    base = ["--config-file", str(config)]

    proc = raw_cli(*base, "manage", "--list-nodes")
    assert proc.returncode == 3 and from_file in proc.stderr

    env = {"DIRECTORD_SOCKET_PATH": from_env}
    proc = raw_cli(*base, "manage", "--list-nodes", env=env)
    assert proc.returncode == 3 and from_env in proc.stderr and from_file not in proc.stderr

    proc = raw_cli(*base, "manage", "--list-nodes", "--socket-path", cluster.socket_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "node0" in proc.stdout

    config.write_text(f"socket_path: {cluster.socket_path}\n")
    proc = raw_cli(*base, "manage", "--list-nodes", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert sorted(n["identity"] for n in json.loads(proc.stdout)) == ALL
    proc = raw_cli("manage", "--list-nodes", env={"DIRECTORD_CONFIG_FILE": str(config)})
    assert proc.returncode == 0 and "node2" in proc.stdout


# ---- manage: listings --------------------------------------------------------------------
def test_list_nodes(cluster: Cluster) -> None:
    table = cluster.run("manage", "--list-nodes").stdout.splitlines()
    header = re.split(r"\s{2,}", table[0].strip())
    assert header == [
        "IDENTITY",
        "STATUS",
        "VERSION",
        "DRIVER",
        "HOST UPTIME",
        "AGENT UPTIME",
        "LAST HEARTBEAT",
        "EXPIRY",
        "MACHINE ID",
    ]
    rows = {line.split()[0]: line for line in table[1:]}
    assert sorted(rows) == ALL
    for ident, line in rows.items():
        assert "online" in line and f"machine-{ident}" in line and cluster.driver in line
    data = nodes(cluster)
    for ident in ALL:
        row = data[ident]
        assert row["status"] == "online" and row["machine_id"] == f"machine-{ident}"
        assert row["driver"] == cluster.driver and row["version"]
        assert row["agent_uptime"] >= 0 and row["host_uptime"] > 0
        assert row["expiry"] == pytest.approx(row["last_seen"] + 3 * row["heartbeat_interval"])


def test_list_jobs_and_filters(cluster: Cluster) -> None:
    u = uid()
    gate = cluster.root / f"gate-{u}"
    ok = cluster.json("exec", "--verb", "RUN", f"echo ok-{u}", "--wait")["results"][0]["job"]
    bad = cluster.json(
        "exec", "--verb", "RUN", f"echo bad-{u}; exit 1", "--target", "node1", "--wait", rc=1
    )["results"][0]["job"]
    [running] = submit(
        cluster,
        "exec",
        "--verb",
        "RUN",
        "--target",
        "node2",
        f"--timeout 60 until [ -f {gate} ]; do sleep 0.05; done",
    )
    slow = running["jobs"][0]
    try:

        def ids(*filters: str) -> list[str]:
            return [j["id"] for j in cluster.json("manage", "--list-jobs", *filters)]

        listed = ids()
        assert {ok, bad, slow} <= set(listed)
        assert listed.index(ok) < listed.index(bad) < listed.index(slow)
        success, failed = ids("--filter", "success"), ids("--filter", "failed")
        assert ok in success and bad not in success and slow not in success
        assert bad in failed and ok not in failed
        assert slow in ids("--filter", "processing") and ok not in ids("--filter", "processing")
        row = {j["id"]: j for j in cluster.json("manage", "--list-jobs")}[ok]
        assert (row["success"], row["failed"], row["processing"]) == (3, 0, 0)
        assert row["verb"] == "RUN" and row["execution_time"] > 0
        table = cluster.run("manage", "--list-jobs", "--filter", "failed").stdout.splitlines()
        assert re.split(r"\s{2,}", table[0].strip()) == [
            "ID",
            "PARENT NAME",
            "NAME",
            "VERB",
            "EXEC TIME",
            "PROCESSING",
            "SUCCESS",
            "FAILED",
        ]
        assert any(line.startswith(bad) for line in table[1:])
        assert not any(line.startswith(ok) for line in table[1:])
    finally:
        gate.touch()
    wait_job(cluster, slow)
    assert slow not in [
        j["id"] for j in cluster.json("manage", "--list-jobs", "--filter", "processing")
    ]


def test_job_info_by_id_prefix_and_last(cluster: Cluster) -> None:
    u = uid()
    reply = cluster.json("exec", "--verb", "RUN", f"echo info-{u}; echo warn-{u} >&2", "--wait")
    job_id = reply["results"][0]["job"]
    for ref in (job_id, job_id[:13], "last"):
        info = job_info(cluster, ref)
        assert info["id"] == job_id
        assert info["verb"] == "RUN" and len(info["sha"]) == 56
        assert sorted(info["results"]) == ALL
        for r in info["results"].values():
            assert r["state"] == "success" and r["rc"] == 0
            assert r["stdout"].strip() == f"info-{u}" and r["stderr"].strip() == f"warn-{u}"
            assert r["exec_time"] >= 0 and r["roundtrip"] >= r["exec_time"]
    text = cluster.run("manage", "--job-info", "last").stdout
    assert job_id in text and f"info-{u}" in text and f"warn-{u}" in text
    for ident in ALL:
        assert re.search(rf"^{ident}\s+success\s+0\s", text, re.M)
    proc = cluster.run("manage", "--job-info", "no-such-job", rc=2)
    assert "no-such-job" in proc.stderr


def test_export_jobs_and_nodes(cluster: Cluster) -> None:
    cluster.json("exec", "--verb", "RUN", f"echo export-{uid()}", "--wait")
    jobs_file, nodes_file = cluster.root / "jobs.json", cluster.root / "nodes.json"
    out = cluster.run("manage", "--export-jobs", str(jobs_file)).stdout
    exported = json.loads(jobs_file.read_text())
    assert f"exported {len(exported)} jobs" in out
    assert [j["id"] for j in exported] == [j["id"] for j in cluster.json("manage", "--list-jobs")]
    assert all({"id", "verb", "sha", "results", "options"} <= set(j) for j in exported)
    assert job_info(cluster, "last") == exported[-1]
    cluster.run("manage", "--export-nodes", str(nodes_file))
    assert sorted(n["identity"] for n in json.loads(nodes_file.read_text())) == ALL
    proc = cluster.run("manage", "--export-jobs", "/nonexistent-dir/x.json", rc=2)
    assert "/nonexistent-dir/x.json" in proc.stderr


def test_analyze_job_parent_and_all(cluster: Cluster) -> None:
    u = uid()
    text = f'- jobs:\n  - RUN: "echo a-{u}"\n  - RUN: "echo b-{u}"\n  - RUN: "exit 3"\n'
    reply = cluster.orchestrate(text, "--ignore-cache", rc=1)
    parent, job = reply["parents"][0]["id"], reply["parents"][0]["jobs"][0]

    one = cluster.json("manage", "--analyze-job", job)
    assert set(one) >= ANALYSIS_KEYS
    assert (one["TOTAL_JOBS"], one["TOTAL_NODE_COUNT"]) == (1, 3)
    assert (one["TOTAL_SUCCESSES"], one["TOTAL_FAILURES"]) == (3, 0)
    for key in (
        "FASTEST_NODE_EXECUTION",
        "SLOWEST_NODE_EXECUTION",
        "FASTEST_NODE_ROUNDTRIP",
        "SLOWEST_NODE_ROUNDTRIP",
    ):
        assert one[key]["node"] in ALL and one[key]["seconds"] >= 0
    assert one["FASTEST_NODE_EXECUTION"]["seconds"] <= one["SLOWEST_NODE_EXECUTION"]["seconds"]
    assert one["COMBINED_EXECUTION_TIME"] == pytest.approx(3 * one["TOTAL_AVG_EXECUTION_TIME"])
    assert one["ACTUAL_RUNTIME"] > 0

    whole = cluster.json("manage", "--analyze-parent", parent)
    assert (whole["TOTAL_JOBS"], whole["TOTAL_NODE_COUNT"]) == (3, 3)
    assert (whole["TOTAL_SUCCESSES"], whole["TOTAL_FAILURES"]) == (6, 3)

    everything = cluster.json("manage", "--analyze-all")
    assert everything["TOTAL_JOBS"] == job_count(cluster)
    assert everything["TOTAL_FAILURES"] >= 3

    table = cluster.run("manage", "--analyze-parent", parent).stdout
    for key in ANALYSIS_KEYS:
        assert re.search(rf"^{key}\s+\S", table, re.M), key
    cluster.run("manage", "--analyze-job", "no-such-job", rc=2)


def test_dump_cache_shows_this_machines_client_cache(cluster: Cluster) -> None:
    dump = json.loads(cluster.run("manage", "--dump-cache").stdout)
    assert dump["args"]["node_name"] == "node0"  # the CLI runs with node0's --cache-path
    assert {"args", "envs", "query", "jobs", "parents"} <= set(dump)


# ---- manage: purging ---------------------------------------------------------------------
def test_purge_jobs_keeps_unfinished_ones(make_cluster: Any) -> None:
    c = make_cluster(nodes=2, heartbeat=0.5)
    gate = c.root / "gate"
    for i in range(3):
        c.json("exec", "--verb", "RUN", f"echo {i}", "--wait")
    [running] = submit(
        c,
        "exec",
        "--verb",
        "RUN",
        "--target",
        "node0",
        f"--timeout 60 until [ -f {gate} ]; do sleep 0.05; done",
    )
    assert c.json("manage", "--purge-jobs") == {"purged": 3}
    assert [j["id"] for j in c.json("manage", "--list-jobs")] == running["jobs"]
    gate.touch()
    wait_job(c, running["jobs"][0])
    assert c.run("manage", "--purge-jobs").stdout.strip() == "purged 1 jobs"
    assert c.json("manage", "--list-jobs") == []
    # Purged for good: a server restart does not bring them back.
    c.stop_process("server")
    c.start_server()
    assert c.json("manage", "--list-jobs") == []


def test_purge_nodes_forgets_only_offline_nodes(make_cluster: Any) -> None:
    c = make_cluster(nodes=3, heartbeat=0.5)
    assert c.json("manage", "--purge-nodes") == {"purged": 0}
    c.stop_process("node2", signal.SIGKILL)
    wait_status(c, "node2", "offline")
    assert c.run("manage", "--purge-nodes").stdout.strip() == "purged 1 nodes"
    assert sorted(nodes(c)) == ["node0", "node1"]
    proc = c.run("exec", "--verb", "RUN", "echo x", "--target", "node2", rc=2)
    assert "node2" in proc.stderr


# ---- live output -------------------------------------------------------------------------
def test_stream_prints_lines_while_the_job_runs(cluster: Cluster) -> None:
    u = uid()
    gate = cluster.root / f"gate-{u}"
    live = LiveCLI(
        cluster,
        "exec",
        "--verb",
        "RUN",
        "--stream",
        "--target",
        "node0",
        "--target",
        "node1",
        f"--timeout 60 echo first-{u}; until [ -f {gate} ]; do sleep 0.05; done; echo second-{u}",
    )
    try:
        live.until(
            lambda ls: {f"node0 | first-{u}", f"node1 | first-{u}"} <= set(ls),
            "the first line from both nodes",
        )
        assert live.proc.poll() is None, "the job cannot have ended: it waits for the gate"
        assert not any(f"second-{u}" in line for line in live.lines)
        gate.touch()
        rc, err = live.finish()
    except BaseException:
        gate.touch()
        live.kill()
        raise
    assert rc == 0, err
    assert {f"node0 | second-{u}", f"node1 | second-{u}"} <= set(live.lines)
    assert live.lines.index(f"node0 | first-{u}") < live.lines.index(f"node0 | second-{u}")


def test_poll_prints_each_result_as_it_arrives(cluster: Cluster) -> None:
    u = uid()
    gate = cluster.root / f"gate-{u}"
    live = LiveCLI(
        cluster,
        "exec",
        "--verb",
        "RUN",
        "--poll",
        f"--timeout 60 test {{{{ node_name }}}} != node0 || "
        f"until [ -f {gate} ]; do sleep 0.05; done; echo polled-{u}",
    )

    def result_line(node: str) -> Callable[[list[str]], bool]:
        return lambda ls: any(
            re.match(rf"{node}\s+RUN\s+success\s.*polled-{u}", line) for line in ls
        )

    try:
        live.until(result_line("node1"), "node1's result")
        live.until(result_line("node2"), "node2's result")
        assert live.proc.poll() is None and not result_line("node0")(live.lines)
        gate.touch()
        live.until(result_line("node0"), "node0's result")
        rc, err = live.finish()
    except BaseException:
        gate.touch()
        live.kill()
        raise
    assert rc == 0, err
    assert any(line.startswith("3 results: 3 success") for line in live.lines)


def test_no_wait_prints_job_ids(cluster: Cluster) -> None:
    proc = cluster.run("exec", "--verb", "RUN", f"echo {uid()}")
    [job_id] = proc.stdout.split()
    assert states(wait_job(cluster, job_id)) == dict.fromkeys(ALL, "success")


def test_directord_style_targets_and_check(cluster: Cluster) -> None:
    u = uid()
    # Several IDs after one --target, at the end of an exec line, as Directord takes them.
    reply = cluster.json(
        "exec", "--verb", "RUN", f"echo {u}", "--wait", "--target", "node0", "node2"
    )
    assert sorted((r["node"], r["state"], r["stdout"]) for r in reply["results"]) == [
        ("node0", "success", f"{u}\n"),
        ("node2", "success", f"{u}\n"),
    ]
    # `orchestrate FILE --poll --check`, as Directord's own CI runs it: non-zero on a failure.
    path = cluster.root / f"check-{u}.yaml"
    path.write_text(f"- jobs:\n    - RUN: test {{{{ node_name }}}} != node1 || exit 4 # {u}\n")
    proc = cluster.run("orchestrate", str(path), "--poll", "--check", rc=1)
    assert re.search(r"FAILED node1: .* failed rc=4", proc.stderr), proc.stderr
    path.write_text(f"- jobs:\n    - RUN: echo fine-{u}\n")
    cluster.run("orchestrate", str(path), "--poll", "--check", "--target", "node0", "node1", rc=0)
    # --debug is honoured by user commands too: they log their API calls.
    proc = cluster.run("--debug", "manage", "--list-nodes")
    assert re.search(r"DEBUG directord\.connect: API nodes: ok in [0-9.]+ ms", proc.stderr)
    assert "DEBUG" not in cluster.run("manage", "--list-nodes").stderr
