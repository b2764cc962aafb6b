"""The write-behind Persister: batching, after_flush ordering, failures and retries."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from directord.datastores.base import Deletes, Puts
from directord.datastores.memory import MemoryDatastore
from directord.errors import DatastoreError
from directord.server import persist
from directord.server.persist import Persister

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


class Rec:
    """A mutable record, serialised only when written."""

    def __init__(self, **values: Any) -> None:
        self.values = values

    def to_dict(self) -> dict[str, Any]:
        return dict(self.values)


class LoggingStore(MemoryDatastore):
    """A memory store that logs its writes and can be told to fail or to pause."""

    def __init__(self, log: list[Any] | None = None) -> None:
        super().__init__()
        self.log: list[Any] = [] if log is None else log
        self.failures = 0
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def apply(self, puts: Puts, deletes: Deletes | None = None) -> None:
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            self.failures -= 1
            self.log.append("apply failed")
            raise DatastoreError("disk on fire")
        self.log.append(
            (
                "apply",
                {ns: dict(v) for ns, v in puts.items()},
                {ns: list(v) for ns, v in (deletes or {}).items()},
            )
        )
        await super().apply(puts, deletes)


def test_flush_writes_latest_state_once() -> None:
    async def go() -> None:
        store = LoggingStore()
        p = Persister(store)
        rec = Rec(state="queued")
        p.put("results", "j/n", rec)
        rec.values["state"] = "delivered"
        p.put("results", "j/n", rec)
        rec.values["state"] = "success"  # serialised at flush time, not at put time
        p.put("jobs", "j", Rec(v=1))
        await p.flush()
        assert store.log == [
            ("apply", {"results": {"j/n": {"state": "success"}}, "jobs": {"j": {"v": 1}}}, {})
        ]
        await p.flush()  # nothing pending: no write at all
        assert len(store.log) == 1

    run(go())


def test_put_and_delete_of_one_key_collapse_to_the_last() -> None:
    async def go() -> None:
        store = LoggingStore()
        await store.apply({"jobs": {"gone": {"v": 0}, "back": {"v": 0}}})
        store.log.clear()
        p = Persister(store)
        p.put("jobs", "gone", Rec(v=1))
        p.delete("jobs", "gone")
        p.delete("jobs", "back")
        p.put("jobs", "back", Rec(v=2))
        await p.flush()
        assert store.log == [("apply", {"jobs": {"back": {"v": 2}}}, {"jobs": ["gone"]})]
        assert await store.scan("jobs") == {"back": {"v": 2}}

    run(go())


def test_after_flush_runs_only_after_the_write() -> None:
    async def go() -> None:
        log: list[Any] = []
        store = LoggingStore(log)
        p = Persister(store)
        p.put("results", "r1", Rec(state="success"))
        p.after_flush(lambda: log.append("ack r1"))
        assert log == []  # nothing runs at registration
        await p.flush()
        assert log[0][0] == "apply" and log[1:] == ["ack r1"]

    run(go())


def test_after_flush_with_nothing_pending_runs_on_next_flush() -> None:
    async def go() -> None:
        store = LoggingStore()
        p = Persister(store)
        ran: list[str] = []
        p.after_flush(lambda: ran.append("cb"))
        await p.flush()
        assert ran == ["cb"] and store.log == []

    run(go())


def test_failing_write_keeps_the_batch_and_callbacks() -> None:
    async def go() -> None:
        log: list[Any] = []
        store = LoggingStore(log)
        store.failures = 1
        p = Persister(store)
        p.put("results", "a", Rec(v=1))
        p.put("results", "b", Rec(v=1))
        p.delete("jobs", "old")
        p.after_flush(lambda: log.append("ack 1"))
        with pytest.raises(DatastoreError):
            await p.flush()
        assert log == ["apply failed"]  # no acknowledgement for data not stored
        assert await store.scan("results") == {}
        # Marked after the failure: newer values win over the kept batch.
        p.put("results", "b", Rec(v=2))
        p.put("results", "c", Rec(v=2))
        p.after_flush(lambda: log.append("ack 2"))
        await p.flush()
        assert log[1] == (
            "apply",
            {"results": {"a": {"v": 1}, "b": {"v": 2}, "c": {"v": 2}}},
            {"jobs": ["old"]},
        )
        assert log[2:] == ["ack 1", "ack 2"]  # in registration order, after the write

    run(go())


def test_background_writer_retries_until_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persist, "RETRY_SECONDS", 0.0)

    async def go() -> None:
        log: list[Any] = []
        store = LoggingStore(log)
        store.failures = 3
        p = Persister(store)
        p.start()
        try:
            p.put("nodes", "n0", Rec(online=True))
            p.after_flush(lambda: log.append("acked"))
            await p.drain(timeout=20)
            assert log[:3] == ["apply failed"] * 3
            assert log[3] == ("apply", {"nodes": {"n0": {"online": True}}}, {})
            assert log[4:] == ["acked"]
            assert await store.get("nodes", "n0") == {"online": True}
        finally:
            await p.close()

    run(go())


def test_close_writes_what_is_pending() -> None:
    async def go() -> None:
        store = LoggingStore()
        p = Persister(store)
        p.start()
        p.put("jobs", "j", Rec(v=1))
        await p.close()
        assert await store.get("jobs", "j") == {"v": 1}
        await p.close()  # again: nothing to do

    run(go())


def test_close_with_a_failing_store_does_not_raise() -> None:
    async def go() -> None:
        store = LoggingStore()
        store.failures = 1
        p = Persister(store)
        p.put("jobs", "j", Rec(v=1))
        await p.close()  # logged, not raised: the server is going down anyway
        assert store.log == ["apply failed"]

    run(go())


def test_put_during_a_failing_write_is_not_undone_by_the_retry() -> None:
    # A store that awaits inside apply (a network store) lets the server mark new
    # changes while a write is in flight; a kept batch must not override them.
    async def go() -> None:
        store = LoggingStore()
        await store.apply({"jobs": {"k": {"v": 0}, "d": {"v": 0}}})
        p = Persister(store)
        p.delete("jobs", "k")
        p.put("jobs", "d", Rec(v=1))
        store.gate = asyncio.Event()
        store.entered.clear()
        store.failures = 1
        flushing = asyncio.create_task(p.flush())
        await store.entered.wait()
        p.put("jobs", "k", Rec(v=2))  # newer than the delete in flight
        p.delete("jobs", "d")  # newer than the put in flight
        store.gate.set()
        with pytest.raises(DatastoreError):
            await flushing
        store.gate = None
        await p.flush()
        assert await store.scan("jobs") == {"k": {"v": 2}}

    run(go())


def test_close_while_a_write_is_in_flight_keeps_the_batch() -> None:
    async def go() -> None:
        store = LoggingStore()
        store.gate = asyncio.Event()
        p = Persister(store)
        p.start()
        p.put("results", "r", Rec(state="success"))
        await store.entered.wait()  # the writer is inside apply, awaiting the store
        store.gate = None
        await p.close()  # cancels the writer mid-write, then writes what is pending
        assert await store.get("results", "r") == {"state": "success"}

    run(go())
