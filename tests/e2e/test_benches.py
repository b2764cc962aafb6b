"""Every benchmark under bench/ still runs, in a tiny version, and prints its figures.

The figures themselves are never asserted (they belong to the machine); a
benchmark that no longer runs against the current code is what this catches
(bench/fanout.py once went unnoticed for several releases).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench(name: str, *args: str, timeout: float = 240) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_throughput_prints_wall_floor_cpu_memory_and_idle() -> None:
    out = bench(
        "throughput.py", "--nodes", "1", "--jobs", "5", "--rounds", "2", "--idle-seconds", "1"
    )
    for figure in ("wall / floor", "CPU ms per job", "exec --wait", "memory MiB", "idle"):
        assert figure in out, out


@pytest.mark.parametrize("driver", ["grpc", "zmq"])
def test_fanout_gets_every_result_back(driver: str) -> None:
    out = bench("fanout.py", "--driver", driver, "--clients", "3", "--rounds", "2")
    assert "all results back: p50" in out, out
    assert "memory per connected client" in out, out


def test_cli_start_compares_exec_and_its_import_floor_with_bare_python() -> None:
    out = bench("cli_start.py", "--runs", "1", "--nodes", "1")
    assert "exec --wait / python -I -c pass" in out, out
    assert "import floor of exec / python -I -c pass" in out, out


def test_spawn_strategies_says_which_give_a_job_its_own_process_group() -> None:
    out = bench("spawn_strategies.py", "--jobs", "20", "--rounds", "1")
    lines = {line.split()[0]: line for line in out.splitlines() if "own process group" in line}
    assert "yes (a session)" in lines["agent"]
    assert lines["dash-fork"].endswith("NO: shares the resident's")
    assert lines["dash-pty"].endswith("own process group: yes")


def test_sweep_times_its_passes_over_queued_targets() -> None:
    out = bench("sweep.py", "--nodes", "4", "--jobs", "10", "--passes", "3")
    assert "40 pending targets on 4 nodes (3 online)" in out, out
    assert "sweep pass: first" in out, out


def test_restart_times_reading_back_a_stored_history() -> None:
    out = bench("restart.py", "--jobs", "20", "--nodes", "2", "--rounds", "1")
    assert "20 jobs x 2 nodes: 40 stored results" in out, out
    assert "us per result" in out, out
