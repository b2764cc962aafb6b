"""Job analysis (``manage --analyze-*``): timings and totals over a set of jobs."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from directord.server.records import JobRecord


def analyze(jobs: list[JobRecord]) -> dict[str, Any]:
    """Directord's analysis keys over ``jobs`` (one job, one parent, or all).

    Per-node execution adds up the node's execution times. Per-node round trip
    is the node's span, from the first of these jobs sent to it until its last
    result came back (for one job: that job's round trip); adding up round
    trips would count jobs waiting in the node's queue several times over.
    """
    exec_by_node: dict[str, float] = defaultdict(float)
    first_sent: dict[str, float] = {}
    last_back: dict[str, float] = {}
    starts, ends, exec_times = [], [], []
    successes = failures = results = 0
    for job in jobs:
        starts.append(job.submitted)
        for node, target in job.results.items():
            results += 1
            if target.exec_time is not None:
                exec_by_node[node] += target.exec_time
                exec_times.append(target.exec_time)
            if target.roundtrip is not None and target.finished is not None:
                sent = target.finished - target.roundtrip
                first_sent[node] = min(first_sent.get(node, sent), sent)
                last_back[node] = max(last_back.get(node, target.finished), target.finished)
            if target.finished is not None:
                ends.append(target.finished)
            if target.state.ok:
                successes += 1
            elif target.state.final:
                failures += 1

    rtt_by_node = {node: last_back[node] - first_sent[node] for node in first_sent}

    def extreme(values: dict[str, float], pick: Any) -> dict[str, Any] | None:
        if not values:
            return None
        node = pick(values, key=values.__getitem__)
        return {"node": node, "seconds": values[node]}

    return {
        "ACTUAL_RUNTIME": (max(ends) - min(starts)) if ends and starts else None,
        "COMBINED_EXECUTION_TIME": sum(exec_times),
        "FASTEST_NODE_EXECUTION": extreme(exec_by_node, min),
        "SLOWEST_NODE_EXECUTION": extreme(exec_by_node, max),
        "FASTEST_NODE_ROUNDTRIP": extreme(rtt_by_node, min),
        "SLOWEST_NODE_ROUNDTRIP": extreme(rtt_by_node, max),
        "TOTAL_AVG_EXECUTION_TIME": (sum(exec_times) / len(exec_times)) if exec_times else None,
        "TOTAL_FAILURES": failures,
        "TOTAL_JOBS": len(jobs),
        "TOTAL_NODE_COUNT": len({n for j in jobs for n in j.results}),
        "TOTAL_RESULTS": results,
        "TOTAL_SUCCESSES": successes,
    }
