"""Helpers shared by the end-to-end tests: polling, job lookups, per-node args, processes."""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from directord.models import State
from tests.conftest import Cluster

T = TypeVar("T")
FINAL = frozenset(s.value for s in State if s.final)
DEADLINE = 30.0


def uid() -> str:
    """A short unique token, usable in commands, file names and template variable names."""
    return "u" + uuid.uuid4().hex[:10]


def wait_for(
    probe: Callable[[], T], what: str, timeout: float = DEADLINE, interval: float = 0.1
) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def nodes(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """``manage --list-nodes`` by identity."""
    return {n["identity"]: n for n in cluster.json("manage", "--list-nodes")}


def wait_status(
    cluster: Cluster,
    identity: str,
    status: str,
    timeout: float = DEADLINE,
) -> dict[str, Any]:
    """Wait until a node is listed with this status; return its row."""
    return wait_for(
        lambda: (row := nodes(cluster).get(identity)) and row["status"] == status and row,
        f"{identity} to be {status}",
        timeout,
    )


def job_count(cluster: Cluster) -> int:
    """How many jobs the server lists."""
    return len(cluster.json("manage", "--list-jobs"))


def job_info(cluster: Cluster, job_id: str) -> dict[str, Any]:
    """``manage --job-info ID --format json``."""
    info: dict[str, Any] = cluster.json("manage", "--job-info", job_id)
    return info


def wait_job(cluster: Cluster, job_id: str, timeout: float = DEADLINE) -> dict[str, Any]:
    """Wait until every target of a job is final; return its info."""
    return wait_for(
        lambda: (
            (info := job_info(cluster, job_id))
            and all(r["state"] in FINAL for r in info["results"].values())
            and info
        ),
        f"job {job_id} to end on every node",
        timeout,
    )


def states(info: dict[str, Any]) -> dict[str, str]:
    """``{node: state}`` of a job info."""
    return {node: r["state"] for node, r in info["results"].items()}


def submit(cluster: Cluster, *args: str) -> list[dict[str, Any]]:
    """Submit without waiting (``exec``/``orchestrate`` args); returns the parent records."""
    parents: list[dict[str, Any]] = cluster.json(*args)
    return parents


def name_nodes(cluster: Cluster, key: str = "node_name") -> None:
    """Give every node the cached arg ``key`` = its own identity (templates can use it)."""
    text = "- jobs:\n" + "".join(
        f'  - ARG: "{key} {ident}"\n    assign: [{ident}]\n' for ident in cluster.identities
    )
    reply = cluster.orchestrate(text, name=f"name-{key}.yaml")
    assert {r["state"] for r in reply["results"]} <= {"success", "skipped-cache"}


def pid_alive(pid: int) -> bool:
    """True if a process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_pids(pids: list[int]) -> None:
    """Best-effort SIGKILL of stray processes a test started through a job."""
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, 9)


def raw_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """``python -m directord ARGS`` with exactly the given arguments and DIRECTORD_* env."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DIRECTORD_")}
    return subprocess.run(
        [sys.executable, "-m", "directord", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**base, **(env or {})},
    )


def read_lines(path: Path) -> list[str]:
    """Lines of a file, or [] if it does not exist yet."""
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


class LiveCLI:
    """A CLI process whose stdout is read line by line as it is written."""

    def __init__(self, cluster: Cluster, *args: str) -> None:
        argv = [
            sys.executable,
            "-m",
            "directord",
            "--config-file",
            str(cluster.config),
            "--socket-path",
            cluster.socket_path,
            *args,
        ]
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cluster.env
        )
        assert self.proc.stdout is not None
        self.fd = self.proc.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.lines: list[str] = []

    def _pump(self, wait: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], wait)
        if not ready:
            return True
        data = os.read(self.fd, 65536)
        self.buffer += data
        *done, self.buffer = self.buffer.split(b"\n")
        self.lines.extend(line.decode() for line in done)
        return bool(data)

    def until(
        self,
        check: Callable[[list[str]], bool],
        what: str,
        timeout: float = 30.0,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.lines):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; got {self.lines}")
            if not self._pump(0.1) and not check(self.lines):
                raise AssertionError(f"output ended before {what}; got {self.lines}")

    def finish(self, timeout: float = 60.0) -> tuple[int, str]:
        while self._pump(0.1):
            if self.proc.poll() is not None and not select.select([self.fd], [], [], 0)[0]:
                break
        rc = self.proc.wait(timeout)
        assert self.proc.stderr is not None
        err = self.proc.stderr.read().decode()
        self.proc.stdout.close()  # type: ignore[union-attr]
        self.proc.stderr.close()
        return rc, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()
