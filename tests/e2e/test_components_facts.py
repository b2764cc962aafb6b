"""End-to-end: FACTS and Directord's FACTER, on a real server and a real client.

The facts are checked against this machine's own files (the client runs
here). A ``facter`` on the client's PATH is a real executable the test
writes, which prints JSON naming the arguments it got.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.e2e.component_helpers import by_node, dump_cache, exec_wait, job_results

FAKE_FACTER = """#!/bin/sh
printf '{"kernel": "FakeKernel", "args": "%s", "os": {"name": "Fake"}}\\n' "$*"
"""


@pytest.fixture(scope="module")
def facts_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Path]]:
    """One client whose PATH starts with a directory the tests put ``facter`` in (or not)."""
    root = tmp_path_factory.mktemp("facts")
    bin_dir = root / "bin"
    bin_dir.mkdir()
    cluster = Cluster(
        root / "cluster",
        nodes=1,
        heartbeat=1.0,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}"},
    )
    cluster.start()
    try:
        yield cluster, bin_dir
    finally:
        cluster.stop()


@pytest.fixture
def no_facter(facts_node: tuple[Cluster, Path]) -> Cluster:
    cluster, bin_dir = facts_node
    (bin_dir / "facter").unlink(missing_ok=True)
    return cluster


@pytest.fixture
def fake_facter(facts_node: tuple[Cluster, Path]) -> Iterator[Cluster]:
    cluster, bin_dir = facts_node
    facter = bin_dir / "facter"
    facter.write_text(FAKE_FACTER)
    facter.chmod(0o755)
    yield cluster
    facter.unlink(missing_ok=True)


def os_release_id() -> str:
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        if Path(path).exists():
            for line in Path(path).read_text().splitlines():
                if line.startswith("ID="):
                    return line.split("=", 1)[1].strip().strip("\"'")
    raise AssertionError("this machine has no os-release ID")


def mem_total_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def cached_facts(cluster: Cluster) -> dict[str, Any]:
    facts: dict[str, Any] = dump_cache(cluster, "node0")["args"]["facts"]
    return facts


def test_facts_are_stored_and_a_later_job_renders_them(no_facter: Cluster) -> None:
    cluster = no_facter
    text = "- jobs:\n    - FACTS: ''\n    - RUN: echo id={{ facts.os.id }} cpus={{ facts.cpus }}\n"
    reply = cluster.orchestrate(text)
    facts_result, run_result = job_results(reply, 0)["node0"], job_results(reply, 1)["node0"]
    assert facts_result["state"] == "success", facts_result
    assert run_result["state"] == "success", run_result
    assert run_result["stdout"].strip() == f"id={os_release_id()} cpus={os.cpu_count()}"

    facts = cached_facts(cluster)
    # The job's stdout is the facts as JSON: the same as what was stored.
    assert json.loads(facts_result["stdout"]) == facts
    assert facts["machine_id"] == Path("/etc/machine-id").read_text().strip()
    assert facts["os"]["id"] == os_release_id()
    assert isinstance(facts["os"]["id_like"], list)
    uname = os.uname()
    assert facts["kernel"] == {
        "name": uname.sysname,
        "release": uname.release,
        "version": uname.version,
        "machine": uname.machine,
    }
    assert facts["cpus"] == os.cpu_count()
    assert facts["memory"] == {"total": mem_total_bytes()}
    assert facts["hostname"] == socket.gethostname()
    assert facts["fqdn"]
    assert "127.0.0.1" in facts["addresses"]["lo"]["ipv4"]
    assert facts["facter"] is None  # no facter on this machine's PATH


def test_facts_run_every_time(no_facter: Cluster) -> None:
    # Facts change (an upgrade, a reboot): a second FACTS gathers again, no cache hit.
    first = exec_wait(no_facter, "FACTS", "")
    second = exec_wait(no_facter, "FACTS", "")
    assert by_node(first)["node0"]["state"] == by_node(second)["node0"]["state"] == "success"


def test_facter_output_is_stored_under_facts(fake_facter: Cluster) -> None:
    cluster = fake_facter
    reply = exec_wait(cluster, "FACTS", "--custom-dir '/srv/my facts'")
    assert by_node(reply)["node0"]["state"] == "success"
    facts = cached_facts(cluster)
    assert facts["facter"] == {
        "kernel": "FakeKernel",
        "args": "--json --custom-dir /srv/my facts",
        "os": {"name": "Fake"},
    }
    # Not merged: the gathered facts keep their own shape beside facter's.
    assert facts["os"]["id"] == os_release_id()


def test_directords_facter_verb_also_stores_arg_facter(fake_facter: Cluster) -> None:
    cluster = fake_facter
    text = "- jobs:\n    - FACTER: ''\n    - RUN: echo {{ facter.kernel }} {{ facts.os.id }}\n"
    reply = cluster.orchestrate(text, name="facter.yaml")
    run_result = job_results(reply, 1)["node0"]
    assert run_result["state"] == "success", run_result
    assert run_result["stdout"].strip() == f"FakeKernel {os_release_id()}"
    args = dump_cache(cluster, "node0")["args"]
    assert args["facter"] == args["facts"]["facter"]


def test_directords_facter_verb_fails_without_facter(no_facter: Cluster) -> None:
    reply = exec_wait(no_facter, "FACTER", "", rc=1)
    result = by_node(reply)["node0"]
    assert result["state"] == "failed"
    assert "facter is not installed" in result["stderr"]


def test_a_facter_that_prints_no_json_fails_the_job(facts_node: tuple[Cluster, Path]) -> None:
    cluster, bin_dir = facts_node
    facter = bin_dir / "facter"
    facter.write_text("#!/bin/sh\necho not json\n")
    facter.chmod(0o755)
    try:
        reply = exec_wait(cluster, "FACTS", "", rc=1)
    finally:
        facter.unlink()
    result = by_node(reply)["node0"]
    assert result["state"] == "failed"
    assert "printed no JSON" in result["stderr"]
