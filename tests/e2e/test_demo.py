"""`directord demo`: runs the sample orchestration and stops everything, also on signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEADLINE = 60.0


def _demo_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIRECTORD_")}
    env["TMPDIR"] = str(tmp)  # the demo's temporary directory lands here
    return env


def _processes_under(path: Path) -> list[str]:
    """Command lines of running processes that mention ``path`` (the demo's cluster)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(path) in cmdline and int(entry.name) != os.getpid():
            found.append(f"{entry.name}: {cmdline}")
    return found


def _assert_cleaned_up(tmp: Path) -> None:
    assert _processes_under(tmp) == []
    assert [p.name for p in tmp.iterdir() if p.name.startswith("directord-demo-")] == []


def _wait_for_line(proc: subprocess.Popen[str], text: str, lines: list[str]) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return
    proc.kill()
    pytest.fail(f"demo never printed {text!r}; output:\n{''.join(lines)}")


def test_demo_runs_sample_and_cleans_up(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "directord", "demo", "--nodes", "2"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_demo_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    # 2 nodes: 1 demo-dir job, 10 setup jobs and 2 query jobs on each node.
    assert "26 results: 26 success" in out
    assert "26 results: 24 skipped-cache, 2 success" in out  # the cache-hit pass
    assert "node1 | Hello from node1, a directord demo node." in out  # COPY --blueprint
    assert "node1 | release 1.0 by directord-demo; colour from ENV: teal" in out  # CACHEFILE
    # QUERY gathered every node's headline (a --stdout-arg) for the templates.
    assert (
        "node1 | node1 sees 2 nodes (node0 node1); "
        "node0 says: Hello from node0, a directord demo node." in out
    )
    assert re.search(r"^TOTAL_SUCCESSES +20$", out, re.M)  # the analysis of demo-setup
    assert "demo passed" in out
    _assert_cleaned_up(tmp_path)


def test_demo_rejects_zero_nodes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "directord", "demo", "--nodes", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=_demo_env(tmp_path),
    )
    assert proc.returncode == 2
    assert "--nodes must be at least 1" in proc.stderr
    _assert_cleaned_up(tmp_path)


def test_demo_keep_serves_cli_until_ctrl_c(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "directord", "demo", "--nodes", "2", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_demo_env(tmp_path),
    )
    lines: list[str] = []
    try:
        _wait_for_line(proc, "press Ctrl-C", lines)
        _wait_for_line(proc, "export DIRECTORD_SOCKET_PATH=", lines)
        socket_path = lines[-1].split("=", 1)[1].strip()
        listed = subprocess.run(
            [sys.executable, "-m", "directord", "manage", "--list-nodes", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**_demo_env(tmp_path), "DIRECTORD_SOCKET_PATH": socket_path},
        )
        assert listed.returncode == 0, listed.stderr
        assert '"identity": "node1"' in listed.stdout
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGINT, "".join(lines) + rest
    assert "stopped every process" in rest
    _assert_cleaned_up(tmp_path)


def test_demo_sigterm_while_starting_stops_everything(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "directord", "demo", "--nodes", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_demo_env(tmp_path),
    )
    lines: list[str] = []
    try:
        # Printed just before the cluster starts: the signal lands somewhere in
        # start-up or in the run, and either way nothing may be left behind.
        _wait_for_line(proc, "directord demo: starting", lines)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(lines) + rest
    assert proc.returncode == 128 + signal.SIGTERM or (
        proc.returncode == 0 and "demo passed" in out
    ), out
    assert "stopped every process" in out
    _assert_cleaned_up(tmp_path)
