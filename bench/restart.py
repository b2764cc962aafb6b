"""Restart benchmark: how long a server takes to read back its history.

A server keeps every job for ``--job-retention`` (a week by default) and reads
all of it from its datastore when it starts; nodes and operators wait that
long. This fills a sqlite datastore through the server's own job book with
``--jobs`` finished jobs on ``--nodes`` nodes, then times what a start does
with it (scan every namespace, rebuild the job book), in CPU per stored result.

    python bench/restart.py [--jobs 20000] [--nodes 6] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from directord.components import build_job
from directord.datastores.sqlite import SqliteDatastore
from directord.models import State
from directord.server.jobs import JOBS, PARENTS, RESULTS, JobBook, PlannedJob
from directord.server.persist import Persister


async def fill(url: str, jobs: int, nodes: int) -> None:
    store = SqliteDatastore(url)
    await store.start()
    persister = Persister(store)
    book = JobBook(persister, grace=30.0)
    names = [f"node{i}" for i in range(nodes)]
    for first in range(0, jobs, 1000):
        planned = [
            PlannedJob(build_job("RUN", f"echo hello {i}"), names)
            for i in range(first, min(jobs, first + 1000))
        ]
        _, records = book.record("bench", False, planned, False)
        for record in records:
            for name in names:
                book.finish(name, record.results[name], State.SUCCESS, rc=0, stdout="hello\n")
        await persister.flush()
    await store.close()


async def load(url: str) -> tuple[float, float, int]:
    """CPU seconds to scan the store and to rebuild the job book; results read."""
    store = SqliteDatastore(url)
    await store.start()
    try:
        started = time.process_time()
        jobs, results = await store.scan(JOBS), await store.scan(RESULTS)
        parents = await store.scan(PARENTS)
        scanned = time.process_time()
        JobBook(Persister(store), grace=30.0).load(jobs, results, parents)
        return scanned - started, time.process_time() - scanned, len(results)
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20000)
    parser.add_argument("--nodes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="directord-bench-") as tmp:
        url = f"sqlite://{Path(tmp) / 'directord.db'}"
        asyncio.run(fill(url, args.jobs, args.nodes))
        runs = [asyncio.run(load(url)) for _ in range(args.rounds)]
    scan, rebuild, results = min(runs, key=lambda r: r[0] + r[1])
    print(f"{args.jobs:,} jobs x {args.nodes} nodes: {results:,} stored results")
    print(
        f"restart read: {scan + rebuild:.2f} s CPU (scan {scan:.2f} s, rebuild {rebuild:.2f} s),"
        f" {(scan + rebuild) / max(results, 1) * 1e6:.1f} us per result, best of {args.rounds}"
    )


if __name__ == "__main__":
    main()
