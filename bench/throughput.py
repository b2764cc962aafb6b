"""Throughput benchmark: 1000 RUN jobs on 6 local clients, plus exec --wait latency.

Prints wall seconds, jobs/s, the machine's spawn floor measured in the same run
(N times the cost of spawning /bin/sh -c "echo hello world", divided by the
cores), the CPU each kind of process spent per job (server, agents, the shells
they ran, the CLI), read from /proc, and p50/p95 of one exec --wait round trip
through the user API. CPU per job is the figure that carries between machines.
Then the memory each process holds after the run (resident, and its peak), and
what the idle cluster costs: the CPU of the server and agents over
``--idle-seconds`` with nothing to do but heartbeats (every 2 s).

    python bench/throughput.py [--nodes 6] [--jobs 1000] [--rounds 100] [--idle-seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from directord.connect import APIClient
from directord.localcluster import LocalCluster

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own CPU, CPU of its reaped children) of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def cluster_cpu(cluster: LocalCluster) -> dict[str, float]:
    """CPU so far: the server, the agents, and the shells the agents reaped."""
    assert cluster.server is not None
    server, _ = cpu_seconds(cluster.server.pid)
    agents = shells = 0.0
    for proc in cluster.clients.values():
        own, children = cpu_seconds(proc.pid)
        agents += own
        shells += children
    return {"server": server, "agents": agents, "shells": shells}


def memory_mib(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MiB of a process, from /proc."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def idle_percent(cluster: LocalCluster, seconds: float) -> float:
    """CPU of the server and every agent over ``seconds`` of idling, in % of one core."""
    before = cluster_cpu(cluster)
    time.sleep(seconds)
    after = cluster_cpu(cluster)
    return (after["server"] + after["agents"] - before["server"] - before["agents"]) / seconds * 100


def spawn_floor(total_jobs: int, samples: int = 500) -> tuple[float, float]:
    """(seconds per spawn, floor seconds for total_jobs on this machine's cores)."""
    start = time.perf_counter()
    for _ in range(samples):
        subprocess.run(["/bin/sh", "-c", "echo hello world"], capture_output=True, check=True)
    per = (time.perf_counter() - start) / samples
    return per, per * total_jobs / (os.cpu_count() or 1)


async def exec_latency(socket_path: str, rounds: int) -> list[float]:
    """Round trip of one RUN job to every node: submit, then wait for all results."""
    times = []
    async with APIClient(socket_path) as client:
        for _ in range(rounds):
            t0 = time.perf_counter()
            reply = await client.call(
                "submit",
                {
                    "orchestrations": [{"jobs": [{"verb": "RUN", "args": "--skip-cache true"}]}],
                    "cwd": "/",
                },
            )
            async for _event in client.watch(parents=[p["id"] for p in reply["parents"]]):
                pass
            times.append(time.perf_counter() - t0)
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=100, help="exec --wait samples")
    parser.add_argument(
        "--idle-seconds", type=float, default=30.0, help="how long the idle cost is measured"
    )
    parser.add_argument("--server-arg", action="append", default=[])
    parser.add_argument("--client-arg", action="append", default=[])
    parser.add_argument("--driver", default="grpc", choices=("grpc", "zmq", "messaging", "nats"))
    parser.add_argument("--label", default="")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="also run with gRPC mTLS (certificates from directord pki)",
    )
    parser.add_argument(
        "--curve",
        action="store_true",
        help="also run ZeroMQ with Curve25519 (a key per node); implies --driver zmq",
    )
    args = parser.parse_args()
    if args.curve:
        args.driver = "zmq"
    args.label = args.label or args.driver
    runs = [(args.label, args.server_arg, args.client_arg)]
    if args.tls:
        pki_dir = tempfile.mkdtemp(prefix="directord-bench-pki-")
        runs.append((f"{args.label}+mtls", *tls_args(pki_dir, args.nodes)))
    if args.curve:
        key_dir = tempfile.mkdtemp(prefix="directord-bench-keys-")
        runs.append((f"{args.label}+curve", *curve_args(key_dir, args.nodes)))
    for label, server_args, client_args in runs:
        if run(label, args, server_args, client_args):
            return 1
    return 0


def tls_args(pki_dir: str, nodes: int) -> tuple[list[str], list[str]]:
    """A throwaway PKI: server and per-node client certificates, and the options to use them."""
    from directord.security.pki import PKI

    pki = PKI(pki_dir)
    pki.init()
    pki.issue("server", ["127.0.0.1"], "server")
    for i in range(nodes):
        pki.issue(f"node{i}", None, "client")
    common = ["--grpc-ssl", "--grpc-ssl-client-auth", "--grpc-ssl-ca", str(pki.ca_cert_path)]
    server = [
        *common,
        "--grpc-ssl-cert",
        str(pki.cert_path("server")),
        "--grpc-ssl-key",
        str(pki.key_path("server")),
    ]
    client = [
        *common,
        "--grpc-ssl-cert",
        f"{pki_dir}/certs/{{identity}}.crt",
        "--grpc-ssl-key",
        f"{pki_dir}/private/{{identity}}.key",
    ]
    return server, client


def curve_args(key_dir: str, nodes: int) -> tuple[list[str], list[str]]:
    """Throwaway curve keys: server, shared client, and one per node (identity-bound)."""
    from directord.security import curve

    curve.generate(
        key_dir, [curve.SERVER, curve.SHARED_CLIENT] + [f"node{i}" for i in range(nodes)]
    )
    # Every local "node" reads the same key dir: each finds its own secret by identity.
    both = ["--zmq-curve-encryption", "--zmq-key-dir", key_dir]
    return both, both


def run(
    label: str, args: argparse.Namespace, server_args: list[str], client_args: list[str]
) -> int:
    """One measured run; prints its figures; returns non-zero on failure."""
    total = args.nodes * args.jobs
    per_spawn, floor = spawn_floor(total)
    with tempfile.TemporaryDirectory(prefix="directord-bench-") as tmp:
        orch = Path(tmp) / "bench.yaml"
        orch.write_text("- jobs:\n" + '  - RUN: "--skip-cache echo hello world"\n' * args.jobs)
        with LocalCluster(
            Path(tmp) / "cluster",
            args.nodes,
            heartbeat=2,
            driver=args.driver,
            server_args=server_args,
            client_args=client_args,
        ) as cluster:
            before = cluster_cpu(cluster)
            cli_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = cluster.cli("orchestrate", str(orch), "--wait", timeout=600)
            wall = time.perf_counter() - t0
            cli_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            after = cluster_cpu(cluster)
            cpu = {k: after[k] - before[k] for k in after}
            cpu["cli"] = (cli_after.ru_utime + cli_after.ru_stime) - (
                cli_before.ru_utime + cli_before.ru_stime
            )
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                return 1
            t0 = time.perf_counter()
            one = cluster.cli("exec", "--verb", "RUN", "--skip-cache true", "--wait")
            cli_wall = time.perf_counter() - t0
            assert one.returncode == 0, one.stderr
            lat = asyncio.run(exec_latency(cluster.socket_path, args.rounds))
            assert cluster.server is not None
            server_mem = memory_mib(cluster.server.pid)
            client_mem = max(memory_mib(p.pid) for p in cluster.clients.values())
            time.sleep(3)  # let the last results and acks settle before idling
            idle = idle_percent(cluster, args.idle_seconds)
    lat.sort()
    p50 = statistics.median(lat)
    p95 = lat[int(len(lat) * 0.95) - 1]
    print(f"[{label}] {args.jobs} jobs x {args.nodes} nodes = {total} results")
    print(f"[{label}] wall            {wall:8.2f} s   ({total / wall:,.0f} jobs/s)")
    print(
        f"[{label}] spawn floor     {floor:8.2f} s   ({per_spawn * 1000:.3f} ms/spawn, "
        f"{os.cpu_count()} cores)"
    )
    print(f"[{label}] wall / floor    {wall / floor:8.2f} x  (target <= 1.3)")
    per_job = "  ".join(f"{k} {v / total * 1000:.3f}" for k, v in cpu.items())
    print(f"[{label}] CPU ms per job  {per_job}")
    print(
        f"[{label}] exec --wait     p50 {p50 * 1000:.1f} ms  p95 {p95 * 1000:.1f} ms "
        f"over {len(lat)} rounds via the API (target p50 < 20 ms)"
    )
    print(
        f"[{label}] exec --wait CLI {cli_wall * 1000:.0f} ms wall, one run, "
        "including interpreter start"
    )
    print(
        f"[{label}] memory MiB      server {server_mem[0]:.0f} (peak {server_mem[1]:.0f})  "
        f"largest agent {client_mem[0]:.0f} (peak {client_mem[1]:.0f})"
    )
    print(
        f"[{label}] idle            {idle:.2f} % of one core, server and {args.nodes} agents, "
        f"over {args.idle_seconds:g} s (heartbeats every 2 s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
