"""Job states and the records the server keeps."""

from __future__ import annotations

from typing import Any

import pytest

from directord.models import FileRef, JobSpec, State
from directord.protocol import decode_batch, encode, join_packed
from directord.server.records import JobRecord, NodeRecord, TargetRecord

FINAL = {
    State.SUCCESS,
    State.FAILED,
    State.TIMEOUT,
    State.SKIPPED_CACHE,
    State.SKIPPED_PARENT,
    State.UNDELIVERED,
    State.LOST,
    State.CANCELLED,
}
OK = {State.SUCCESS, State.SKIPPED_CACHE}


@pytest.mark.parametrize("state", list(State))
def test_final_and_ok(state: State) -> None:
    assert state.final is (state in FINAL)
    assert state.ok is (state in OK)
    assert not state.ok or state.final  # ok implies final


def test_state_values_are_the_wire_names() -> None:
    assert [s.value for s in State] == [
        "queued",
        "delivered",
        "success",
        "failed",
        "timeout",
        "skipped-cache",
        "skipped-parent",
        "undelivered",
        "lost",
        "cancelled",
    ]
    assert State("skipped-cache") is State.SKIPPED_CACHE
    assert str(State.LOST) == "lost"
    with pytest.raises(ValueError):
        State("done")


def test_target_record_round_trip() -> None:
    target = TargetRecord(
        "j1",
        "node0",
        State.FAILED,
        rc=2,
        stdout="o",
        stderr="e",
        exec_time=1.5,
        roundtrip=2.0,
        sent=10.0,
        delivered=11.0,
        finished=12.0,
    )
    data = target.to_dict()
    assert data["state"] == "failed" and type(data["state"]) is str
    assert target.key == "j1/node0"
    back = TargetRecord.from_dict({**data, "unknown_future_field": 1})
    assert back == target and back.state is State.FAILED


def test_node_record_expiry_and_round_trip() -> None:
    node = NodeRecord("node0", heartbeat_interval=2.0, last_seen=100.0, online=True)
    assert node.expiry == 106.0
    assert NodeRecord.from_dict({**node.to_dict(), "extra": "ignored"}) == node


def _job(**kw: Any) -> JobRecord:
    spec: dict[str, Any] = dict(
        verb="COPY",
        sha="s" * 56,
        options={"src": "a", "dest": "/b"},
        vars={"v": 1},
        timeout=60.0,
        run_once=False,
        skip_cache=False,
        name="copy it",
        files=(FileRef("a", 3, "a" * 64),),
    )
    spec.update({k: kw.pop(k) for k in list(kw) if k in spec})
    base: dict[str, Any] = dict(
        id="j1",
        parent_id="p1",
        parent_name="deploy",
        spec=JobSpec(**spec),
        lane="",
        stream=False,
        submitted=1.0,
        order=1,
        targets=["n0", "n1"],
    )
    base.update(kw)
    return JobRecord(**base)


def test_job_record_message_is_what_a_node_needs() -> None:
    message = _job().message()
    assert (message.id, message.parent, message.verb) == ("j1", "p1", "COPY")
    assert message.files == [FileRef("a", 3, "a" * 64)]
    wire = decode_batch(join_packed([encode(message)]))[0]  # the plain map on the wire
    assert wire["t"] == "job" and wire["vars"] == {"v": 1}
    assert wire["files"] == [{"name": "a", "size": 3, "sha256": "a" * 64}]
    plain = decode_batch(join_packed([encode(_job(vars={}, files=()).message())]))[0]
    assert "vars" not in plain and "files" not in plain


def test_job_record_round_trip_and_summary() -> None:
    job = _job()
    job.results = {
        "n0": TargetRecord("j1", "n0", State.SUCCESS, exec_time=1.0),
        "n1": TargetRecord("j1", "n1", State.DELIVERED),
    }
    data = job.to_dict()
    assert "results" not in data
    assert JobRecord.from_dict(data) == _job()
    assert job.done is False
    summary = job.summary()
    assert (summary["processing"], summary["success"], summary["failed"]) == (1, 1, 0)
    assert summary["execution_time"] == 1.0
    job.results["n1"].state = State.LOST
    assert job.done is True
    assert job.summary()["failed"] == 1
    info = job.info()
    assert info["files"] == [{"name": "a", "size": 3}]  # the hash stays on the server
    assert info["results"]["n1"]["state"] == "lost"
