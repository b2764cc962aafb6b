"""Fan-out benchmark: one no-op job to 200 light simulated clients.

The clients live in this process and speak the real protocol through the real
driver (hello, ack, result) but run nothing, so the figures are the server's
and the transport's: p50/p95 time from submit until every result is back, and
the server's resident memory per connected client.

    python bench/fanout.py [--clients 200] [--rounds 30] [--driver grpc|nats|zmq|messaging]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from directord.config import Settings, load_settings
from directord.connect import APIClient
from directord.localcluster import LocalCluster
from directord.models import State
from directord.protocol import FROM_SERVER, PROTOCOL_VERSION, Ack, Hello, Job, Result
from directord.transports import Link, load_transport


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def sim_node(settings: Settings, ready: asyncio.Event, count: list[int]) -> None:
    transport = load_transport(settings)
    link = Link(await transport.connect(), FROM_SERVER, settings.identity)
    link.post(
        Hello(
            proto=PROTOCOL_VERSION,
            identity=settings.identity,
            version="sim",
            driver=transport.name,
            heartbeat_interval=settings.heartbeat_interval,
        )
    )
    await link.recv()  # welcome
    count[0] += 1
    if count[0] == count[1]:
        ready.set()
    try:
        while True:
            for message in await link.recv():
                if isinstance(message, Job):
                    link.post(Ack(ids=[message.id]))
                    link.post(Result(id=message.id, state=State.SUCCESS, rc=0, exec_time=0.0))
    finally:
        await link.close()
        await transport.close()


async def run(cluster: LocalCluster, args: argparse.Namespace) -> tuple[list[float], float]:
    # Every driver's options, resolved as the CLI resolves them: the selected one is used.
    flags = {
        "driver": args.driver,
        "heartbeat_interval": 60.0,
        "broker_namespace": cluster.namespace,
        "grpc_server_address": "127.0.0.1",
        "grpc_port": cluster.port,
        "zmq_server_address": "127.0.0.1",
        "job_port": cluster.port,
    }
    base = load_settings(flags, {"DIRECTORD_CONFIG_FILE": "/dev/null"})
    assert cluster.server is not None
    before = rss_kib(cluster.server.pid)
    ready = asyncio.Event()
    count = [0, args.clients]
    nodes = [
        asyncio.create_task(sim_node(replace(base, identity=f"sim{i:03d}"), ready, count))
        for i in range(args.clients)
    ]
    await asyncio.wait_for(ready.wait(), 120)
    await asyncio.sleep(1.0)
    per_client = (rss_kib(cluster.server.pid) - before) / args.clients
    times = []
    async with APIClient(cluster.socket_path) as client:
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            reply = await client.call(
                "submit",
                {
                    "orchestrations": [{"jobs": [{"verb": "ECHO", "args": "--skip-cache no-op"}]}],
                    "cwd": "/",
                },
            )
            async for _event in client.watch(
                parents=[p["id"] for p in reply["parents"]], summary=True
            ):
                pass
            times.append(time.perf_counter() - t0)
    for task in nodes:
        task.cancel()
    await asyncio.gather(*nodes, return_exceptions=True)
    return times, per_client


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--driver", default="grpc", choices=("grpc", "nats", "zmq", "messaging"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="directord-fanout-") as tmp:
        cluster = LocalCluster(Path(tmp) / "cluster", nodes=0, heartbeat=60.0, driver=args.driver)
        with cluster:
            times, per_client = asyncio.run(run(cluster, args))
    times.sort()
    p95 = times[max(0, int(len(times) * 0.95) - 1)]
    print(f"[fanout {args.driver}] {args.clients} clients, {args.rounds} rounds of one no-op job")
    print(
        f"[fanout {args.driver}] all results back: p50 {statistics.median(times) * 1000:.1f} ms"
        f"  p95 {p95 * 1000:.1f} ms"
    )
    print(f"[fanout {args.driver}] server memory per connected client: {per_client:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
