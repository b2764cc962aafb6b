"""Datastore contract: one suite, run against every datastore implementation.

A new store joins the suite by adding one ``StoreCase`` to ``CASES``. A store that
needs a real server names the fixture that runs it (``service``): Redis runs
against a private ``redis-server`` started by the ``redis_server`` fixture, each
test under its own key prefix.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from directord.datastores import Datastore, open_datastore
from directord.datastores.file import FileDatastore
from directord.datastores.memory import MemoryDatastore
from directord.datastores.redis import RedisDatastore
from directord.datastores.sqlite import SqliteDatastore
from directord.errors import ConfigError, DatastoreError

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@dataclass(frozen=True)
class StoreCase:
    """How to build one datastore implementation for the suite."""

    name: str
    cls: type[Datastore]
    url: Callable[[Path, Any], str]  # a fresh URL (tmp dir, service) for one test
    persistent: bool
    bad_urls: tuple[str, ...] = ()
    service: str | None = None  # the fixture running the store's server, if any


CASES = [
    StoreCase("memory", MemoryDatastore, lambda tmp, _: "memory", persistent=False),
    StoreCase(
        "file",
        FileDatastore,
        lambda tmp, _: f"file://{tmp / 'store'}",
        persistent=True,
        bad_urls=("file://", "file:/no/double/slash", "files:///x"),
    ),
    StoreCase(
        "sqlite",
        SqliteDatastore,
        lambda tmp, _: f"sqlite://{tmp / 'db' / 'd.db'}",
        persistent=True,
        bad_urls=("sqlite://", "sqlite:/x.db", "sqlite:relative.db"),
    ),
    StoreCase(
        "redis",
        RedisDatastore,
        lambda tmp, redis: redis.url(),
        persistent=True,
        bad_urls=(
            "redis://",
            "redis:/host/0",
            "redis:host",
            "redis://host/zero",
            "redis://host:port/0",
            "redis://host:0/0",
            "redis://host:70000/0",
            "redis://host/0?unknown=1",
            "redis://host/0?timeout=soon",
            "redis://host/0?timeout=0",
            "redis://host/0?ssl_cert_reqs=maybe",
            "redis://host/0?prefix=",
            "rediss://",
            "http://host/0",
        ),
        service="redis_server",
    ),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> StoreCase:
    return request.param


@pytest.fixture
def url(case: StoreCase, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    service = request.getfixturevalue(case.service) if case.service else None
    return case.url(tmp_path, service)


async def opened(url: str) -> Datastore:
    store = open_datastore(url)
    await store.start()
    return store


NESTED: dict[str, Any] = {
    "none": None,
    "true": True,
    "false": False,
    "int": -42,
    "big": 2**53 + 1,
    "float": 0.1 + 0.2,
    "tiny": 5e-324,
    "neg_float": -1.5e300,
    "text": "héllo wörld ✓ 日本語 \U0001f680",
    "empty": "",
    "list": [1, "two", 3.0, None, [4, [5]], {"six": 6}],
    "dict": {"a": {"b": {"c": [None, {"d": "deep"}]}}, "ünï": "cødé"},
    "empty_list": [],
    "empty_dict": {},
}


def test_open_datastore_builds_the_right_class(case: StoreCase, url: str) -> None:
    store = open_datastore(url)
    assert type(store) is case.cls
    assert store.url == url
    assert store.persistent is case.persistent


def test_get_missing_and_scan_empty(url: str) -> None:
    async def go() -> None:
        store = await opened(url)
        try:
            assert await store.get("jobs", "nope") is None
            assert await store.scan("jobs") == {}
            assert await store.scan("never-written") == {}
        finally:
            await store.close()

    run(go())


def test_put_get_scan_round_trip_nested_values(url: str) -> None:
    async def go() -> None:
        store = await opened(url)
        try:
            await store.apply({"jobs": {"j1": NESTED, "j2": {"n": 2}}})
            got = await store.get("jobs", "j1")
            assert got == NESTED
            assert isinstance(got["float"], float) and got["float"] == 0.1 + 0.2
            assert isinstance(got["int"], int) and not isinstance(got["int"], bool)
            assert got["true"] is True and got["none"] is None
            assert await store.scan("jobs") == {"j1": NESTED, "j2": {"n": 2}}
        finally:
            await store.close()

    run(go())


def test_keys_with_awkward_characters(url: str) -> None:
    keys = ["job-1/node0", "a.b", "with space", "100%", "ünï ✓", "x.json", "../escape"]

    async def go() -> None:
        store = await opened(url)
        try:
            await store.apply({"results": {k: {"k": k} for k in keys}})
            assert await store.scan("results") == {k: {"k": k} for k in keys}
            for k in keys:
                assert await store.get("results", k) == {"k": k}
            await store.apply({}, {"results": ["job-1/node0", "../escape"]})
            assert sorted(await store.scan("results")) == sorted(keys[1:-1])
        finally:
            await store.close()

    run(go())


def test_put_replaces_whole_value(url: str) -> None:
    async def go() -> None:
        store = await opened(url)
        try:
            await store.apply({"nodes": {"n": {"a": 1, "b": 2}}})
            await store.apply({"nodes": {"n": {"c": 3}}})
            assert await store.get("nodes", "n") == {"c": 3}
            assert await store.scan("nodes") == {"n": {"c": 3}}
        finally:
            await store.close()

    run(go())


def test_values_are_copies_not_shared(url: str) -> None:
    async def go() -> None:
        store = await opened(url)
        try:
            value: dict[str, Any] = {"list": [1], "d": {"x": 1}}
            await store.apply({"jobs": {"j": value}})
            value["list"].append(2)
            value["d"]["x"] = 99
            got = await store.get("jobs", "j")
            assert got == {"list": [1], "d": {"x": 1}}
            assert got is not None
            got["list"].append(3)
            assert await store.get("jobs", "j") == {"list": [1], "d": {"x": 1}}
            scanned = await store.scan("jobs")
            scanned["j"]["d"]["x"] = 7
            assert await store.scan("jobs") == {"j": {"list": [1], "d": {"x": 1}}}
        finally:
            await store.close()

    run(go())


def test_apply_puts_and_deletes_across_namespaces(url: str) -> None:
    async def go() -> None:
        store = await opened(url)
        try:
            await store.apply(
                {
                    "jobs": {"j1": {"v": 1}, "j2": {"v": 2}},
                    "results": {"j1/n0": {"s": "queued"}, "j2/n0": {"s": "queued"}},
                    "parents": {"p": {"jobs": ["j1", "j2"]}},
                }
            )
            await store.apply(
                {"results": {"j1/n0": {"s": "success"}}, "nodes": {"n0": {"online": True}}},
                {
                    "jobs": ["j2"],
                    "results": ["j2/n0", "missing-key"],
                    "parents": ["p"],
                    "no-such-namespace": ["x"],
                },
            )
            assert await store.scan("jobs") == {"j1": {"v": 1}}
            assert await store.scan("results") == {"j1/n0": {"s": "success"}}
            assert await store.scan("parents") == {}
            assert await store.scan("nodes") == {"n0": {"online": True}}
            assert await store.get("jobs", "j2") is None
        finally:
            await store.close()

    run(go())


def test_apply_nothing_is_a_no_op(url: str) -> None:
    async def go() -> None:
        store = await opened(url)
        try:
            await store.apply({"jobs": {"j": {"v": 1}}})
            await store.apply({})
            await store.apply({}, {})
            await store.apply({"jobs": {}}, {"jobs": []})
            assert await store.scan("jobs") == {"j": {"v": 1}}
        finally:
            await store.close()

    run(go())


def test_namespaces_are_separate(url: str) -> None:
    async def go() -> None:
        store = await opened(url)
        try:
            await store.apply({"jobs": {"k": {"ns": "jobs"}}, "results": {"k": {"ns": "results"}}})
            assert await store.get("jobs", "k") == {"ns": "jobs"}
            assert await store.get("results", "k") == {"ns": "results"}
            await store.apply({}, {"jobs": ["k"]})
            assert await store.get("jobs", "k") is None
            assert await store.get("results", "k") == {"ns": "results"}
        finally:
            await store.close()

    run(go())


def test_clear_drops_one_namespace_only(url: str) -> None:
    async def go() -> None:
        store = await opened(url)
        try:
            await store.apply({"jobs": {"a": {}, "b": {"x": 1}}, "nodes": {"n": {"y": 2}}})
            await store.clear("jobs")
            assert await store.scan("jobs") == {}
            assert await store.get("jobs", "a") is None
            assert await store.scan("nodes") == {"n": {"y": 2}}
            await store.clear("jobs")  # clearing an empty namespace is fine
            await store.clear("never-written")
            await store.apply({"jobs": {"c": {"z": 3}}})  # and it is usable again
            assert await store.scan("jobs") == {"c": {"z": 3}}
        finally:
            await store.close()

    run(go())


def test_async_context_manager_and_idempotent_close(url: str) -> None:
    async def go() -> None:
        async with open_datastore(url) as store:
            await store.apply({"jobs": {"j": {"v": 1}}})
            assert await store.get("jobs", "j") == {"v": 1}
        await store.close()  # a second close is harmless

    run(go())


def test_persistence_across_close_and_reopen(case: StoreCase, url: str) -> None:
    async def go() -> None:
        first = await opened(url)
        await first.apply(
            {"jobs": {"j1": NESTED, "gone": {"x": 1}}, "nodes": {"n0": {"online": False}}}
        )
        await first.apply({}, {"jobs": ["gone"]})
        await first.close()
        second = await opened(url)
        try:
            if case.persistent:
                assert await second.scan("jobs") == {"j1": NESTED}
                assert await second.get("nodes", "n0") == {"online": False}
            else:
                assert await second.scan("jobs") == {}
                assert await second.scan("nodes") == {}
        finally:
            await second.close()

    run(go())


def test_malformed_url_raises_config_error(case: StoreCase) -> None:
    for bad in case.bad_urls:
        with pytest.raises(ConfigError) as info:
            case.cls(bad)
        assert info.value.key == "datastore"
        assert repr(bad) in str(info.value)


def test_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        open_datastore("mongodb://localhost:27017/0")
    message = str(info.value)
    assert "'mongodb://localhost:27017/0'" in message
    for case in CASES:
        assert case.name in message
    assert info.value.key == "datastore"


# ---- sqlite specifics: a failing apply leaves no partial write ----------------------------


def _add_trigger(path: str, sql: str) -> None:
    db = sqlite3.connect(path)
    try:
        db.execute(sql)
        db.commit()
    finally:
        db.close()


def test_sqlite_failing_apply_rolls_back_everything(tmp_path: Path) -> None:
    path = str(tmp_path / "atomic.db")

    async def go() -> None:
        store = SqliteDatastore(f"sqlite://{path}")
        await store.start()
        await store.apply({"jobs": {"old": {"v": 0}}, "results": {"r": {"v": 0}}})
        # The database itself refuses one row half-way through the batch (after the puts
        # of two namespaces have been written inside the transaction).
        _add_trigger(
            path,
            "CREATE TRIGGER refuse BEFORE DELETE ON kv WHEN OLD.key = 'r'"
            " BEGIN SELECT RAISE(ABORT, 'refused by test'); END",
        )
        with pytest.raises(DatastoreError, match="refused by test"):
            await store.apply(
                {"jobs": {"new": {"v": 1}, "old": {"v": 9}}, "nodes": {"n": {"v": 1}}},
                {"results": ["r"]},
            )
        assert await store.scan("jobs") == {"old": {"v": 0}}
        assert await store.scan("nodes") == {}
        assert await store.get("results", "r") == {"v": 0}
        # The connection is not left inside a transaction: later writes work and persist.
        await store.apply({"jobs": {"later": {"v": 2}}})
        await store.close()
        again = SqliteDatastore(f"sqlite://{path}")
        await again.start()
        try:
            assert await again.scan("jobs") == {"old": {"v": 0}, "later": {"v": 2}}
            assert await again.scan("nodes") == {}
        finally:
            await again.close()

    run(go())


def test_sqlite_unserialisable_value_leaves_no_partial_write(tmp_path: Path) -> None:
    path = str(tmp_path / "atomic.db")

    async def go() -> None:
        store = SqliteDatastore(f"sqlite://{path}")
        await store.start()
        try:
            await store.apply({"jobs": {"old": {"v": 0}}})
            with pytest.raises(DatastoreError):
                # The first namespace packs fine; the second cannot be packed by msgpack.
                await store.apply({"jobs": {"new": {"v": 1}}, "results": {"bad": {"v": object()}}})
            assert await store.scan("jobs") == {"old": {"v": 0}}
            assert await store.scan("results") == {}
            await store.apply({"jobs": {"later": {"v": 2}}})
            assert await store.scan("jobs") == {"old": {"v": 0}, "later": {"v": 2}}
        finally:
            await store.close()

    run(go())


def test_sqlite_use_before_start_raises_datastore_error(tmp_path: Path) -> None:
    store = SqliteDatastore(f"sqlite://{tmp_path / 'x.db'}")
    with pytest.raises(DatastoreError):
        run(store.get("jobs", "j"))
    with pytest.raises(DatastoreError):
        run(store.apply({"jobs": {"j": {}}}))


def test_sqlite_unopenable_path_raises_datastore_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    store = SqliteDatastore(f"sqlite://{blocker / 'sub' / 'x.db'}")
    with pytest.raises(DatastoreError):
        run(store.start())
