"""End-to-end: RUN, ARG, ENV, ECHO and --exec-help against a real server and three clients."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.e2e.component_helpers import (
    NODES,
    by_node,
    dump_cache,
    exec_wait,
    job_results,
    orch,
    seed_identity_arg,
    token,
    wait_for,
)

# ---- RUN ----------------------------------------------------------------------------------


def test_run_success_captures_stdout_stderr_and_rc(cluster: Cluster) -> None:
    tok = token()
    reply = exec_wait(cluster, "RUN", f"echo out-{tok}; echo err-{tok} >&2")
    results = by_node(reply)
    assert sorted(results) == NODES
    for r in results.values():
        assert (r["state"], r["rc"]) == ("success", 0)
        assert r["stdout"].strip() == f"out-{tok}"
        assert r["stderr"].strip() == f"err-{tok}"
        assert r["exec_time"] is not None and r["exec_time"] >= 0


def test_run_failure_reports_rc_and_stderr(cluster: Cluster) -> None:
    tok = token()
    reply = exec_wait(cluster, "RUN", f"echo partial-{tok}; echo broke-{tok} >&2; exit 3", rc=1)
    for r in by_node(reply).values():
        assert (r["state"], r["rc"]) == ("failed", 3)
        assert r["stdout"].strip() == f"partial-{tok}"
        assert r["stderr"].strip() == f"broke-{tok}"
    # The human output names every failing node and its stderr.
    proc = cluster.run(
        "exec",
        "--verb",
        "RUN",
        f"echo again-{tok} >&2; exit 4",
        "--wait",
        "--target",
        "node1",
        rc=1,
    )
    assert "FAILED node1" in proc.stderr and f"again-{tok}" in proc.stderr
    assert "rc=4" in proc.stderr


def test_run_shell_syntax_reaches_sh_verbatim(cluster: Cluster) -> None:
    command = (
        "printf '%s|%s\\n' 'a  b' \"c'd\" | tr a-z A-Z && "
        'echo "$(echo sub)" ; x=\'  spaced  \'; echo "[$x]" | cat'
    )
    reply = exec_wait(cluster, "RUN", "--skip-cache " + command, "--target", "node0")
    r = by_node(reply)["node0"]
    assert r["state"] == "success", r
    assert r["stdout"].splitlines() == ["A  B|C'D", "sub", "[  spaced  ]"]


def test_run_shell_syntax_from_orchestration_file(cluster: Cluster) -> None:
    tok = token()
    text = (
        f"- jobs:\n  - RUN: --skip-cache echo 'one  two' \"{tok}\" | sed 's/one/1/' > /dev/stdout\n"
    )
    reply = cluster.orchestrate(text, "--target", "node2")
    r = by_node(reply)["node2"]
    assert r["state"] == "success", r
    assert r["stdout"].strip() == f"1  two {tok}"


def test_run_stdout_and_stderr_arg_feed_a_later_template(cluster: Cluster) -> None:
    tok = token()
    reply = orch(
        cluster,
        [
            {
                "jobs": [
                    {
                        "RUN": f"--stdout-arg out_{tok} --stderr-arg err_{tok} "
                        f"printf '  \\n  captured-{tok}  \\n\\n'; echo '  warned-{tok}  ' >&2"
                    },
                    {"RUN": f"echo '[{{{{ out_{tok} }}}}]' '[{{{{ err_{tok} }}}}]'"},
                ]
            }
        ],
    )
    for node, r in job_results(reply, 1).items():
        assert r["state"] == "success", (node, r)
        assert r["stdout"].strip() == f"[captured-{tok}] [warned-{tok}]"
    cache = dump_cache(cluster, "node1")
    assert cache["args"][f"out_{tok}"] == f"captured-{tok}"
    assert cache["args"][f"err_{tok}"] == f"warned-{tok}"


def test_run_no_block_succeeds_while_command_keeps_running(cluster: Cluster) -> None:
    tok = token()
    go = cluster.root / f"go-{tok}"
    out = cluster.root / f"no-block-{tok}"
    # The detached command can only finish after the test creates `go`, which it does
    # after the job has already been reported as a success. Bounded loop: never orphaned.
    command = (
        f"for i in $(seq 1200); do [ -e {go} ] && break; sleep 0.05; done; "
        f'echo "finished $NB_{tok}" > {out}'
    )
    reply = orch(
        cluster,
        [
            {
                "jobs": [
                    {"ENV": f"--skip-cache NB_{tok} env-{tok}"},
                    {"RUN": f"--no-block {command}"},
                ]
            }
        ],
        "--target",
        "node0",
    )
    r = job_results(reply, 1)["node0"]
    assert (r["state"], r["rc"]) == ("success", 0)
    assert not out.exists()
    go.touch()
    # The detached command also got the cached ENV values.
    wait_for(
        lambda: out.exists() and out.read_text() == f"finished env-{tok}\n", what="detached command"
    )


def test_run_retry(cluster: Cluster) -> None:
    tok = token()
    counter = cluster.root / f"retry-{tok}"
    # Fails on attempts 1 and 2, succeeds on attempt 3.
    command = (
        f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; "
        f"echo attempt-$n; [ $n -ge 3 ]"
    )
    reply = exec_wait(cluster, "RUN", f"--retry 1 {command}", "--target", "node0", rc=1)
    assert by_node(reply)["node0"]["state"] == "failed"
    assert counter.read_text().strip() == "2"  # one try plus one retry
    counter.unlink()
    reply = exec_wait(cluster, "RUN", f"--retry 5 {command}", "--target", "node0")
    r = by_node(reply)["node0"]
    assert r["state"] == "success"
    assert r["stdout"].strip() == "attempt-3"
    assert counter.read_text().strip() == "3"  # stopped retrying once it passed


def test_run_renders_args_into_the_command(cluster: Cluster) -> None:
    tok = token()
    reply = orch(
        cluster,
        [
            {
                "jobs": [
                    {"ARG": f"--skip-cache greeting_{tok} hello-{tok}"},
                    {"ARG": f"--skip-cache names_{tok} ['ann', 'bob']"},
                    {"RUN": f"echo '{{{{ greeting_{tok} }}}} {{{{ names_{tok} | join(\",\") }}}}'"},
                ]
            }
        ],
    )
    for r in job_results(reply, 2).values():
        assert r["state"] == "success"
        assert r["stdout"].strip() == f"hello-{tok} ann,bob"


def test_run_undefined_template_name_fails_clearly(cluster: Cluster) -> None:
    tok = token()
    reply = exec_wait(cluster, "RUN", f"echo {{{{ missing_{tok} }}}}", rc=1)
    for r in by_node(reply).values():
        assert r["state"] == "failed"
        assert "template error" in r["stderr"]
        assert f"'missing_{tok}' is undefined" in r["stderr"]
        assert r["stdout"] == ""


def test_env_values_reach_run_environment(cluster: Cluster) -> None:
    tok = token()
    var = f"DIRECTORD_T_{tok.upper()}"
    reply = orch(
        cluster,
        [
            {
                "jobs": [
                    {"ENV": f"--skip-cache {var} value with spaces-{tok}"},
                    {"ENV": f"--skip-cache {var}_N 42"},
                    {"RUN": f'echo "[${var}] [${var}_N]"'},
                ]
            }
        ],
    )
    for r in job_results(reply, 2).values():
        assert r["state"] == "success"
        assert r["stdout"].strip() == f"[value with spaces-{tok}] [42]"


# ---- ARG / ENV ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("['a']", ["a"]),
        ("1", 1),
        ('{"a": "b"}', {"a": "b"}),
        ("1.2", 1.2),
        ("true", True),
        ("plain words here", "plain words here"),
        ("not [a literal", "not [a literal"),
    ],
)
def test_arg_literal_parsing(cluster: Cluster, raw: str, expected: object) -> None:
    key = f"lit_{token()}"
    reply = exec_wait(cluster, "ARG", f"--skip-cache {key} {raw}")
    assert {r["state"] for r in reply["results"]} == {"success"}
    for node in NODES:
        value = dump_cache(cluster, node)["args"][key]
        assert value == expected and type(value) is type(expected), (node, value)
    # The typed value is usable as such in templates (e.g. arithmetic on numbers).
    if isinstance(expected, int | float) and not isinstance(expected, bool):
        reply = exec_wait(cluster, "ECHO", f"--skip-cache {{{{ {key} * 2 }}}}", "--target", "node0")
        assert by_node(reply)["node0"]["stdout"] == str(expected * 2)


def test_env_values_are_stored_as_strings(cluster: Cluster) -> None:
    key = f"E_{token()}"
    exec_wait(cluster, "ENV", f"--skip-cache {key} ['a']", "--target", "node0")
    assert dump_cache(cluster, "node0")["envs"][key] == "['a']"


def test_arg_extend_args_merges_lists_and_dicts(cluster: Cluster) -> None:
    tok = token()
    lst, dct = f"lst_{tok}", f"dct_{tok}"
    reply = orch(
        cluster,
        [
            {
                "jobs": [
                    {"ARG": f"--skip-cache {lst} ['a', 'b']"},
                    {"ARG": f"--skip-cache --extend-args {lst} ['b', 'c']"},
                    {"ARG": f"--skip-cache {dct} {{'x': 1, 'y': 2}}"},
                    {"ARG": f"--skip-cache --extend-args {dct} {{'y': 3, 'z': 4}}"},
                    {
                        "ECHO": f"{{{{ {lst} | join('-') }}}} {{{{ {dct}['x'] }}}}"
                        f"{{{{ {dct}['y'] }}}}"
                        f"{{{{ {dct}['z'] }}}}"
                    },
                ]
            }
        ],
        "--target",
        "node2",
    )
    assert job_results(reply, 4)["node2"]["stdout"] == "a-b-c 134"
    args = dump_cache(cluster, "node2")["args"]
    assert args[lst] == ["a", "b", "c"]
    assert args[dct] == {"x": 1, "y": 3, "z": 4}
    # Without --extend-args the value is replaced.
    exec_wait(cluster, "ARG", f"--skip-cache {lst} ['only']", "--target", "node2")
    assert dump_cache(cluster, "node2")["args"][lst] == ["only"]


def test_arg_per_node_values_with_assign_and_target(cluster: Cluster) -> None:
    seed_identity_arg(cluster)
    key = f"color_{token()}"
    for node, color in zip(NODES, ["red", "green", "blue"], strict=True):
        exec_wait(cluster, "ARG", f"--skip-cache {key} {color}", "--target", node)
    reply = exec_wait(cluster, "ECHO", f"--skip-cache {{{{ me }}}}={{{{ {key} }}}}")
    assert {n: r["stdout"] for n, r in by_node(reply).items()} == {
        "node0": "node0=red",
        "node1": "node1=green",
        "node2": "node2=blue",
    }


def test_arg_bad_input_is_rejected_before_submit(cluster: Cluster) -> None:
    before = len(cluster.json("manage", "--list-jobs"))
    proc = cluster.run("exec", "--verb", "ARG", "only_a_key", "--wait", rc=2)
    assert "expected KEY VALUE" in proc.stderr
    assert len(cluster.json("manage", "--list-jobs")) == before


# ---- ECHO and --exec-help ------------------------------------------------------------------


def test_echo_prints_rendered_text(cluster: Cluster) -> None:
    seed_identity_arg(cluster)
    tok = token()
    reply = exec_wait(cluster, "ECHO", f"hello {{{{ me }}}} {tok}")
    assert {n: r["stdout"] for n, r in by_node(reply).items()} == {
        n: f"hello {n} {tok}" for n in NODES
    }
    assert {(r["state"], r["rc"]) for r in reply["results"]} == {("success", 0)}


@pytest.mark.parametrize(
    ("verb", "expected"),
    [
        (
            "RUN",
            [
                "--no-block",
                "--retry",
                "--stdout-arg",
                "--stderr-arg",
                "--skip-cache",
                "--run-once",
                "--timeout",
                "--force-lock",
                "--exec-help",
            ],
        ),
        ("COPY", ["--chown", "--chmod", "--blueprint"]),
        ("WAIT", ["--seconds", "--url", "--cmd", "--retry", "--retry-wait", "--insecure"]),
        ("QUERY_WAIT", ["--query-timeout", "--identity"]),
        ("ARG", ["--extend-args"]),
    ],
)
def test_exec_help_prints_help_and_submits_nothing(
    cluster: Cluster, verb: str, expected: list[str]
) -> None:
    before = [j["id"] for j in cluster.json("manage", "--list-jobs")]
    proc = cluster.run("exec", "--verb", verb, "--exec-help")
    assert proc.stdout.startswith(f"usage: {verb}")
    for option in expected:
        assert option in proc.stdout, option
    assert [j["id"] for j in cluster.json("manage", "--list-jobs")] == before


def test_exec_help_in_orchestration_submits_nothing(cluster: Cluster) -> None:
    before = len(cluster.json("manage", "--list-jobs"))
    path = Path(cluster.root / "help.yaml")
    path.write_text("- jobs:\n  - ECHO: never-runs\n  - WORKDIR: --exec-help\n")
    proc = cluster.run("orchestrate", str(path), "--wait")
    assert "usage: WORKDIR" in proc.stdout and "--chown" in proc.stdout
    assert len(cluster.json("manage", "--list-jobs")) == before
