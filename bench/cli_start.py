"""CLI start-up benchmark: wall time of short directord commands against bare Python.

Runs each command N times (after one unmeasured run) and prints the median and
p90 wall milliseconds of: ``python -I -c pass``, ``python -c pass`` (with this
environment's site), ``directord --version``, ``directord --help``, and
``directord exec --verb RUN true --wait`` against a local cluster of 6 clients
it starts itself; then the ratio of exec's median to bare Python's. Measure
with the .pyc files present (``python -m compileall src``), as an installed
wheel has them.

It also times the import floor of ``exec``: a bare interpreter importing only
the modules no ``exec`` can do without (argparse; yaml for the config file;
the settings; msgspec and the protocol to talk to the server; the component
that builds the job), with neither asyncio, nor any driver, nor the entry-point
scan that finds third-party drivers. Nothing short of fewer or lighter
dependencies starts ``exec`` faster than that.

    python bench/cli_start.py [--runs 15] [--nodes 6]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from directord.localcluster import LocalCluster

# What exec cannot start without (see the docstring), imported in a bare interpreter.
EXEC_FLOOR = (
    "import argparse, socket, yaml, directord.config, directord.protocol, "
    "directord.orchestration, directord.cli.render"
)


def directord_command() -> list[str]:
    """The installed ``directord`` script beside this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("directord")
    if script.exists():
        return [str(script)]
    found = shutil.which("directord")
    return [found] if found else [sys.executable, "-m", "directord"]


def wall_ms(argv: Sequence[str], runs: int) -> list[float]:
    """Wall milliseconds of ``runs`` runs of ``argv``, after one unmeasured run."""
    times: list[float] = []
    for index in range(runs + 1):
        start = time.perf_counter()
        proc = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
        elapsed = (time.perf_counter() - start) * 1000
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()}")
        if index:
            times.append(elapsed)
    return times


def p90(values: list[float]) -> float:
    """The 90th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * len(ordered) + 0.5) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="measured runs per command (15)")
    parser.add_argument("--nodes", type=int, default=6, help="clients of the local cluster (6)")
    args = parser.parse_args()
    directord = directord_command()
    rows: list[tuple[str, list[float]]] = [
        ("python -I -c pass", wall_ms([sys.executable, "-I", "-c", "pass"], args.runs)),
        ("python -c pass", wall_ms([sys.executable, "-c", "pass"], args.runs)),
        ("directord --version", wall_ms([*directord, "--version"], args.runs)),
        ("directord --help", wall_ms([*directord, "--help"], args.runs)),
        ("import floor of exec", wall_ms([sys.executable, "-c", EXEC_FLOOR], args.runs)),
    ]
    with (
        tempfile.TemporaryDirectory(prefix="directord-bench-") as tmp,
        LocalCluster(Path(tmp) / "cluster", args.nodes, heartbeat=30) as cluster,
    ):
        exec_argv = [
            *directord,
            "--config-file",
            str(cluster.config),
            "--socket-path",
            cluster.socket_path,
            "exec",
            "--verb",
            "RUN",
            "true",
            "--wait",
        ]
        rows.append((f"directord exec --wait ({args.nodes} nodes)", wall_ms(exec_argv, args.runs)))
    print(f"{'command':<36} {'median ms':>10} {'p90 ms':>10}   ({args.runs} runs each)")
    for label, times in rows:
        print(f"{label:<36} {statistics.median(times):>10.1f} {p90(times):>10.1f}")
    bare = statistics.median(rows[0][1])
    exec_median = statistics.median(rows[-1][1])
    floor = statistics.median(rows[4][1])
    print(f"exec --wait / python -I -c pass: {exec_median / bare:.1f}x")
    print(f"import floor of exec / python -I -c pass: {floor / bare:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
