"""Job analysis over hand-built job records."""

from __future__ import annotations

import pytest

from directord.models import JobSpec, State
from directord.server.analysis import analyze
from directord.server.records import JobRecord, TargetRecord


def job(job_id: str, submitted: float, results: dict[str, TargetRecord]) -> JobRecord:
    rec = JobRecord(
        id=job_id,
        parent_id="p",
        parent_name="",
        spec=JobSpec(
            verb="RUN", options={}, sha="s", timeout=60.0, run_once=False, skip_cache=False
        ),
        lane="",
        stream=False,
        submitted=submitted,
        order=1,
        targets=list(results),
    )
    rec.results = results
    return rec


def target(
    node: str,
    state: State,
    exec_time: float | None = None,
    roundtrip: float | None = None,
    finished: float | None = None,
) -> TargetRecord:
    return TargetRecord(
        "j", node, state, exec_time=exec_time, roundtrip=roundtrip, finished=finished
    )


def test_empty() -> None:
    assert analyze([]) == {
        "ACTUAL_RUNTIME": None,
        "COMBINED_EXECUTION_TIME": 0,
        "FASTEST_NODE_EXECUTION": None,
        "SLOWEST_NODE_EXECUTION": None,
        "FASTEST_NODE_ROUNDTRIP": None,
        "SLOWEST_NODE_ROUNDTRIP": None,
        "TOTAL_AVG_EXECUTION_TIME": None,
        "TOTAL_FAILURES": 0,
        "TOTAL_JOBS": 0,
        "TOTAL_NODE_COUNT": 0,
        "TOTAL_RESULTS": 0,
        "TOTAL_SUCCESSES": 0,
    }


def test_one_parent_over_three_nodes() -> None:
    jobs = [
        job(
            "j1",
            100.0,
            {
                "n0": target("n0", State.SUCCESS, 1.0, 1.5, 102.0),
                "n1": target("n1", State.FAILED, 3.0, 3.25, 104.0),
                "n2": target("n2", State.SKIPPED_CACHE, 0.0, 0.25, 101.0),
            },
        ),
        job(
            "j2",
            105.0,
            {
                "n0": target("n0", State.SUCCESS, 4.0, 4.5, 110.0),
                "n1": target("n1", State.SKIPPED_PARENT, None, None, 105.5),
                "n2": target("n2", State.DELIVERED),  # still running: neither success nor failure
            },
        ),
    ]
    result = analyze(jobs)
    assert result["ACTUAL_RUNTIME"] == pytest.approx(10.0)  # 110 - 100
    assert result["COMBINED_EXECUTION_TIME"] == pytest.approx(8.0)
    assert result["TOTAL_AVG_EXECUTION_TIME"] == pytest.approx(2.0)  # 8 over 4 timed results
    # Per node: exec sums n0 5.0, n1 3.0, n2 0.0; round-trip spans (first sent to last
    # result) n0 100.5..110 = 9.5, n1 100.75..104 = 3.25, n2 100.75..101 = 0.25.
    assert result["FASTEST_NODE_EXECUTION"] == {"node": "n2", "seconds": 0.0}
    assert result["SLOWEST_NODE_EXECUTION"] == {"node": "n0", "seconds": 5.0}
    assert result["FASTEST_NODE_ROUNDTRIP"] == {"node": "n2", "seconds": 0.25}
    assert result["SLOWEST_NODE_ROUNDTRIP"] == {"node": "n0", "seconds": 9.5}
    assert result["TOTAL_SUCCESSES"] == 3  # success x2 + skipped-cache
    assert result["TOTAL_FAILURES"] == 2  # failed + skipped-parent
    assert result["TOTAL_RESULTS"] == 6
    assert result["TOTAL_JOBS"] == 2
    assert result["TOTAL_NODE_COUNT"] == 3


@pytest.mark.parametrize("state", [State.TIMEOUT, State.UNDELIVERED, State.LOST, State.FAILED])
def test_every_final_non_ok_state_is_a_failure(state: State) -> None:
    result = analyze([job("j", 0.0, {"n": target("n", state, finished=5.0)})])
    assert (result["TOTAL_FAILURES"], result["TOTAL_SUCCESSES"]) == (1, 0)
    assert result["ACTUAL_RUNTIME"] == 5.0


def test_nothing_finished_yet() -> None:
    result = analyze(
        [job("j", 10.0, {"n0": target("n0", State.QUEUED), "n1": target("n1", State.DELIVERED)})]
    )
    assert result["ACTUAL_RUNTIME"] is None
    assert (result["TOTAL_FAILURES"], result["TOTAL_SUCCESSES"]) == (0, 0)
    assert result["TOTAL_RESULTS"] == 2 and result["TOTAL_NODE_COUNT"] == 2
    assert result["FASTEST_NODE_EXECUTION"] is None


def test_job_without_targets_counts_as_a_job() -> None:
    result = analyze([job("j", 1.0, {})])
    assert result["TOTAL_JOBS"] == 1 and result["TOTAL_RESULTS"] == 0
    assert result["ACTUAL_RUNTIME"] is None
