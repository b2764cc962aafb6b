"""End-to-end: a QUERY value from one node never runs as shell code on another.

The attack of the security review, on a real server and two clients: node1 holds
``$(id -un > FILE)`` as a cached arg (set by ARG, or captured by ``--stdout-arg``),
QUERY hands it to node0, and node0 renders it into a RUN. The RUN must fail naming
node1 and the key, and FILE must never appear; ``| quote`` prints the text as it is.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import Cluster
from tests.e2e.component_helpers import by_node, exec_wait, orch

B64 = "aGVsbG8gd29ybGQ="
HOST = "node1.example.com"


def _message(key: str, char: str = "$") -> str:
    return (
        f"untrusted value from node 'node1', query key '{key}', holds '{char}': "
        "render it with '| quote', or with '| trust' if you are sure it is safe"
    )


def _run_on_node0(cluster: Cluster, command: str, rc: int = 0) -> dict[str, Any]:
    result: dict[str, Any] = by_node(
        exec_wait(cluster, "RUN", command, "--target", "node0", rc=rc)
    )["node0"]
    return result


def _poisoned_cluster(make_cluster: Callable[..., Cluster]) -> tuple[Cluster, Path, Path]:
    """Two nodes; node1 reports two payloads (ARG and --stdout-arg) and two safe values."""
    cluster = make_cluster(nodes=2, driver="grpc")
    by_arg, by_stdout = cluster.root / "pwned-arg", cluster.root / "pwned-stdout"
    payload = f"$(id -un > {by_arg})"
    # printf prints its single-quoted argument as it is: the command substitution is text.
    printed = f"printf '%s\\n' '$(id -un > {by_stdout})'"
    jobs: list[dict[str, Any]] = [
        {"ARG": f"payload {payload}", "assign": ["node1"]},
        {"ARG": f"b64 {B64}", "assign": ["node1"]},
        {"ARG": f"host {HOST}", "assign": ["node1"]},
        {"RUN": f"--stdout-arg headline {printed}", "assign": ["node1"]},
        {"QUERY": "payload"},
        {"QUERY": "headline"},
        {"QUERY": "b64"},
        {"QUERY": "host"},
    ]
    reply = orch(cluster, [{"jobs": jobs}])
    assert {r["state"] for r in reply["results"]} == {"success"}, reply["results"]
    assert not by_arg.exists() and not by_stdout.exists()
    return cluster, by_arg, by_stdout


def test_query_value_with_shell_code_fails_the_job_and_never_runs(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster, by_arg, by_stdout = _poisoned_cluster(make_cluster)

    for key, witness in (("payload", by_arg), ("headline", by_stdout)):
        result = _run_on_node0(cluster, f"echo \"{{{{ query['node1']['{key}'] }}}}\"", rc=1)
        assert result["state"] == "failed", result
        assert result["stderr"] == _message(key), result
        assert not witness.exists()

    # A whole mapping renders as JSON under the same rule.
    result = _run_on_node0(cluster, "echo '{{ query['node1'] }}'", rc=1)
    assert result["state"] == "failed" and result["stderr"] == _message("payload"), result

    # Laundering through a filter or a concatenation fails the same way.
    for text in ("{{ query.node1.payload | upper }}", "{{ query.node1.payload ~ '' }}"):
        result = _run_on_node0(cluster, f"echo {text}", rc=1)
        assert result["stderr"] == _message("payload"), result

    # | quote: one shell word, printed literally.
    result = _run_on_node0(
        cluster,
        "echo \"node1 says:\" {{ query['node1']['payload'] | quote }} "
        "{{ query['node1']['headline'] | quote }}",
    )
    assert result["state"] == "success", result
    assert result["stdout"].strip() == (f"node1 says: $(id -un > {by_arg}) $(id -un > {by_stdout})")
    assert not by_arg.exists() and not by_stdout.exists()

    # Safe values (base64, host names) render unchanged, without a filter.
    result = _run_on_node0(cluster, "echo {{ query.node1.b64 }} {{ query['node1']['host'] }}")
    assert result["stdout"].strip() == f"{B64} {HOST}", result


def test_trust_passes_the_raw_value_so_the_payload_is_live(
    make_cluster: Callable[..., Cluster],
) -> None:
    # The control: the same payload rendered with | trust is run by the shell, which
    # shows the other test would see the attack if the rule let it through.
    cluster, by_arg, _ = _poisoned_cluster(make_cluster)
    result = _run_on_node0(cluster, "echo \"{{ query['node1']['payload'] | trust }}\"")
    assert result["state"] == "success", result
    assert by_arg.read_text().strip() == pwd.getpwuid(os.getuid()).pw_name
