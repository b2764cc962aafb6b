"""Soak: mixed orchestrations on local clients while agents and the server are SIGKILLed.

Orchestrations of 2 to 5 RUN steps (some async, some with a step that fails
on purpose) go to every node, while a killer SIGKILLs a random client, or
now and then the server, and starts it again: kills land in the middle of
jobs. Every step appends ``TOKEN STEP start`` and ``TOKEN STEP end`` to its
node's own log, so the logs say what really ran, and in what order.

At the end it prints the jobs run, the final states, and three figures that
must be 0: jobs run twice, steps out of order (a step started before the one
before it ended, or after it failed or was lost), and jobs that never ended.
It exits 1 when one of them is not 0.

    python bench/soak.py [--minutes 30] [--nodes 3] [--driver grpc] [--seed N]
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from directord.connect import DirectordConnect
from directord.errors import DirectordError
from directord.localcluster import LocalCluster
from directord.models import State

FINAL = frozenset(s.value for s in State if s.final)
MAX_IN_FLIGHT = 12  # orchestrations submitted and not yet ended everywhere


class Soak:
    """The cluster, what was submitted, and the killer."""

    def __init__(self, cluster: LocalCluster, rng: random.Random, logs: Path) -> None:
        self.cluster = cluster
        self.rng = rng
        self.logs = logs
        #: token -> (job ids in order, index of the step that fails on purpose or -1)
        self.orchestrations: dict[str, tuple[list[str], int]] = {}
        self.kills = collections.Counter[str]()
        self.lock = threading.Lock()  # the killer restarts what the submitter talks to
        self.stop = threading.Event()

    def orchestration(self, token: str, steps: int, failing: int) -> dict[str, Any]:
        log = f"{self.logs}/{{{{ identity }}}}"
        jobs = []
        for step in range(steps):
            work = f"sleep {self.rng.choice((0, 0, 0.05, 0.2, 0.5, 1, 2))}"
            end = f"echo '{token} {step} end' >> {log}"
            tail = f"{end}; exit 1" if step == failing else end
            jobs.append(
                {"RUN": f"--skip-cache echo '{token} {step} start' >> {log}; {work}; {tail}"}
            )
        return {"jobs": jobs, "async": self.rng.random() < 0.3}

    def submit_one(self) -> None:
        token = "o" + uuid.uuid4().hex[:10]
        steps = self.rng.randint(2, 5)
        failing = self.rng.randrange(steps) if self.rng.random() < 0.15 else -1
        data = self.orchestration(token, steps, failing)
        with self.lock, DirectordConnect(self.cluster.socket_path) as api:
            jobs = api.orchestrate([data], defined_targets=self.cluster.identities)
        self.orchestrations[token] = (jobs, failing)

    def pending(self) -> int:
        """Orchestrations whose last job has not ended everywhere (one API call each)."""
        left = 0
        with self.lock, DirectordConnect(self.cluster.socket_path) as api:
            for jobs, _ in list(self.orchestrations.values())[-3 * MAX_IN_FLIGHT :]:
                info = api.job_info(jobs[-1])
                if any(r["state"] not in FINAL for r in info["results"].values()):
                    left += 1
        return left

    def killer(self) -> None:
        while not self.stop.wait(self.rng.uniform(2.0, 6.0)):
            victim = (
                "server" if self.rng.random() < 0.15 else self.rng.choice(self.cluster.identities)
            )
            with self.lock:
                self.cluster.stop_process(victim, signal.SIGKILL)
                self.kills[victim if victim == "server" else "client"] += 1
                time.sleep(self.rng.uniform(0.2, 2.0))
                if victim == "server":
                    self.cluster.start_server()
                else:
                    self.cluster.start_client(victim)

    def run(self, seconds: float) -> None:
        killer = threading.Thread(target=self.killer, daemon=True)
        killer.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                if self.pending() < MAX_IN_FLIGHT:
                    self.submit_one()
                else:
                    time.sleep(0.5)
            except (DirectordError, OSError) as exc:
                print(f"  (api unavailable: {exc}; retrying)", file=sys.stderr)
                time.sleep(0.5)
        self.stop.set()
        killer.join()


def drain(soak: Soak, timeout: float) -> dict[str, dict[str, dict[str, Any]]]:
    """Wait (bounded) for every job to end; return job id -> node -> result."""
    deadline = time.monotonic() + timeout
    while True:
        with DirectordConnect(soak.cluster.socket_path) as api:
            infos = {
                job: api.job_info(job)["results"]
                for jobs, _ in soak.orchestrations.values()
                for job in jobs
            }
        open_jobs = sum(
            1 for results in infos.values() for r in results.values() if r["state"] not in FINAL
        )
        if not open_jobs or time.monotonic() > deadline:
            return infos
        time.sleep(2.0)


def analyse(soak: Soak, infos: dict[str, dict[str, dict[str, Any]]]) -> dict[str, int]:
    """Compare what the logs say ran with what the server reports."""
    ran: dict[tuple[str, int, str], list[str]] = collections.defaultdict(list)
    order: dict[tuple[str, str], list[tuple[int, str]]] = collections.defaultdict(list)
    for node in soak.cluster.identities:
        path = soak.logs / node
        for line in path.read_text().splitlines() if path.exists() else ():
            token, step, what = line.split()
            ran[(token, int(step), node)].append(what)
            order[(token, node)].append((int(step), what))
    figures = collections.Counter[str]()
    for (_token, _step, _node), events in ran.items():
        if events.count("start") > 1:
            figures["run twice"] += 1
    for (token, node), events in order.items():
        _, failing = soak.orchestrations[token]
        for i, (step, what) in enumerate(events):
            if what != "start" or step == 0:
                continue
            before = events[:i]
            if (
                (step - 1, "end") not in before
                or step - 1 == failing
                or infos_state(infos, soak, token, step - 1, node) not in ("success", None)
            ):
                figures["out of order"] += 1
    states = collections.Counter[str]()
    for token, (jobs, _) in soak.orchestrations.items():
        for step, job in enumerate(jobs):
            for node, result in infos[job].items():
                states[result["state"]] += 1
                if result["state"] not in FINAL:
                    figures["never ended"] += 1
                started = "start" in ran.get((token, step, node), [])
                if result["state"] == "skipped-parent" and started:
                    figures["skipped but ran"] += 1
                if result["state"] == "success" and "end" not in ran.get((token, step, node), []):
                    figures["success without its end"] += 1
    figures["jobs run"] = sum(1 for events in ran.values() if "start" in events)
    return {**figures, **{f"state {k}": v for k, v in sorted(states.items())}}


def infos_state(
    infos: dict[str, dict[str, dict[str, Any]]], soak: Soak, token: str, step: int, node: str
) -> str | None:
    jobs, _ = soak.orchestrations[token]
    result = infos.get(jobs[step], {}).get(node)
    return None if result is None else str(result["state"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--driver", default="grpc", choices=("grpc", "zmq", "messaging", "nats"))
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--client-arg", action="append", default=[])
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="directord-soak-") as tmp:
        logs = Path(tmp) / "runs"
        logs.mkdir()
        with LocalCluster(
            Path(tmp) / "cluster",
            args.nodes,
            heartbeat=0.5,
            driver=args.driver,
            server_args=["--job-timeout-grace", "5", *args.server_arg],
            client_args=args.client_arg,
        ) as cluster:
            soak = Soak(cluster, rng, logs)
            t0 = time.monotonic()
            soak.run(args.minutes * 60)
            infos = drain(soak, 300)
            elapsed = time.monotonic() - t0
            figures = analyse(soak, infos)
            figures["collected after a kill"] = sum(
                cluster.log(node).read_text(errors="replace").count("; collecting it")
                for node in cluster.identities
            )
    print(f"soak: {args.driver}, {args.nodes} nodes, {elapsed / 60:.1f} min, seed {seed}")
    print(f"  {'orchestrations':<22} {len(soak.orchestrations)}")
    print(f"  {'kills':<22} clients {soak.kills['client']}, server {soak.kills['server']}")
    for key in ("jobs run", "run twice", "out of order", "never ended"):
        print(f"  {key:<22} {figures.get(key, 0)}")
    for key, value in figures.items():
        if key not in ("jobs run", "run twice", "out of order", "never ended"):
            print(f"  {key:<22} {value}")
    bad = sum(
        figures.get(k, 0)
        for k in (
            "run twice",
            "out of order",
            "never ended",
            "skipped but ran",
            "success without its end",
        )
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
