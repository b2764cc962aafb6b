"""Deadline sweep benchmark: what one pass costs the server with deep queues.

The server's sweep runs every second (at most) and ends the targets that passed
their deadline (``undelivered``, ``lost``). It holds the event loop while it
runs, so its cost per pass is also a latency every node and operator sees.
This builds a JobBook (the server's own, over a memory datastore) with
``--jobs`` jobs queued to each of ``--nodes`` nodes, most online and holding
their jobs, some offline with theirs still queued, none near a deadline, and
times passes.

    python bench/sweep.py [--nodes 100] [--jobs 1000] [--passes 20]
"""

from __future__ import annotations

import argparse
import statistics
import time

from directord.components import build_job
from directord.datastores.memory import MemoryDatastore
from directord.server.jobs import JobBook, PlannedJob
from directord.server.persist import Persister


def build(nodes: int, jobs: int) -> tuple[JobBook, set[str], dict[str, float]]:
    """A book with ``jobs`` jobs to every node; a tenth of the nodes are offline."""
    book = JobBook(Persister(MemoryDatastore()), grace=30.0)
    names = [f"node{i}" for i in range(nodes)]
    offline = set(names[:: max(1, 10)])
    planned = [PlannedJob(build_job("RUN", f"echo {i}"), names) for i in range(jobs)]
    _, records = book.record("bench", False, planned, False)
    for name in names:
        if name not in offline:
            book.mark_delivered(name, [r.id for r in records])
    now = time.time()
    return book, set(names) - offline, dict.fromkeys(names, now)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=20)
    args = parser.parse_args()
    book, online, last_seen = build(args.nodes, args.jobs)
    targets = sum(len(t) for t in book.pending.values())
    times = []
    for _ in range(args.passes):
        start = time.perf_counter()
        changed = book.sweep(time.time(), last_seen, online)
        times.append((time.perf_counter() - start) * 1000)
        assert not changed, "no deadline is near: nothing may end"
    print(f"{targets:,} pending targets on {args.nodes} nodes ({len(online)} online)")
    print(
        f"sweep pass: first {times[0]:.2f} ms, then median {statistics.median(times[1:]):.3f} ms"
        f" max {max(times[1:]):.3f} ms over {args.passes - 1} passes"
    )


if __name__ == "__main__":
    main()
