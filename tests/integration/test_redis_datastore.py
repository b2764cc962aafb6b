"""Redis datastore specifics, against real redis-server processes on loopback.

The shared contract (tests/contract/test_datastores.py) covers the semantics;
this file covers what only Redis has: the key layout, prefixes and databases,
passwords and ACL users (masked in every message), TLS with client
certificates, a Redis restart under an open store, and data it cannot read.
"""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
import redis

from directord.datastores import open_datastore
from directord.datastores.redis import RedisDatastore, mask_url, parse_url
from directord.errors import ConfigError, DatastoreError, MissingDependencyError
from directord.security.pki import PKI
from tests.redis_server import RedisServer

T = TypeVar("T")
PASSWORD = "pa:ss@w/rd%"  # characters that need percent-encoding in a URL
QUOTED = "pa%3Ass%40w%2Frd%25"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def raw_client(server: RedisServer, db: int = 0) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, db=db, password=server.password)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, never listening, held by the caller)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server with a default-user password and an ACL user ``alice``."""
    server = RedisServer(
        tmp_path_factory.mktemp("redis-auth"), ["--requirepass", PASSWORD], password=PASSWORD
    ).start()
    try:
        assert server.command(f"ACL SETUSER alice on >{PASSWORD} ~* +@all") == b"+OK"
        yield server
    finally:
        server.stop()


# ---- layout -------------------------------------------------------------------------------


def test_one_msgpack_hash_per_namespace_under_the_prefix(redis_server: RedisServer) -> None:
    url = redis_server.url(db=3, prefix="layout")
    raw = raw_client(redis_server, db=3)
    raw.flushdb()

    async def go() -> None:
        async with open_datastore(url) as store:
            await store.apply({"jobs": {"j1": {"a": [1, "x"]}}, "results": {"j1/n0": {"rc": 0}}})

    run(go())
    try:
        assert sorted(raw.keys()) == [b"layout:jobs", b"layout:results"]
        assert raw.type("layout:jobs") == b"hash"
        blob = raw.hget("layout:jobs", "j1")
        assert blob is not None and msgpack.unpackb(blob) == {"a": [1, "x"]}
        assert raw.hgetall("layout:results") == {b"j1/n0": msgpack.packb({"rc": 0})}
    finally:
        raw.flushdb()
        raw.close()


def test_default_prefix_and_database(redis_server: RedisServer) -> None:
    cfg = parse_url("redis://example.org")
    assert (cfg.host, cfg.port, cfg.db, cfg.prefix, cfg.tls) == (
        "example.org",
        6379,
        0,
        "directord",
        False,
    )
    raw = raw_client(redis_server, db=5)
    raw.flushdb()

    async def go() -> None:
        async with open_datastore(f"redis://127.0.0.1:{redis_server.port}/5") as store:
            await store.apply({"nodes": {"n0": {"online": True}}})

    run(go())
    try:
        assert raw.keys() == [b"directord:nodes"]
    finally:
        raw.flushdb()
        raw.close()


def test_prefixes_and_databases_keep_stores_apart(redis_server: RedisServer) -> None:
    urls = [
        redis_server.url(db=1, prefix="apart-a"),
        redis_server.url(db=1, prefix="apart-b"),
        redis_server.url(db=2, prefix="apart-a"),
    ]

    async def go() -> None:
        stores = [open_datastore(u) for u in urls]
        for i, store in enumerate(stores):
            await store.start()
            await store.apply({"jobs": {"same-key": {"store": i}}})
        try:
            for i, store in enumerate(stores):
                assert await store.scan("jobs") == {"same-key": {"store": i}}
            await stores[0].clear("jobs")
            assert await stores[0].scan("jobs") == {}
            assert await stores[1].get("jobs", "same-key") == {"store": 1}
            assert await stores[2].get("jobs", "same-key") == {"store": 2}
        finally:
            for store in stores:
                await store.clear("jobs")
                await store.close()

    run(go())


def test_large_namespace_is_read_in_hscan_pages(redis_server: RedisServer) -> None:
    url = redis_server.url()
    values = {f"job-{i}": {"i": i, "pad": "x" * (i % 7)} for i in range(503)}

    async def go() -> None:
        async with open_datastore(url) as store:
            assert isinstance(store, RedisDatastore)
            await store.apply({"jobs": values})
            whole = await store.scan("jobs")  # under scan_chunk: one HGETALL
            store.scan_chunk = 10  # far below the size: paged HSCAN
            assert await store.scan("jobs") == whole == values
            await store.clear("jobs")

    run(go())


# ---- atomicity and bad data ---------------------------------------------------------------


def test_unserialisable_value_writes_nothing(redis_server: RedisServer) -> None:
    url = redis_server.url()

    async def go() -> None:
        async with open_datastore(url) as store:
            await store.apply({"jobs": {"old": {"v": 0}}})
            with pytest.raises(DatastoreError, match="cannot be stored"):
                await store.apply({"jobs": {"new": {"v": 1}}, "results": {"bad": {"v": object()}}})
            assert await store.scan("jobs") == {"old": {"v": 0}}
            assert await store.scan("results") == {}

    run(go())


def test_apply_is_one_multi_exec_transaction(redis_server: RedisServer) -> None:
    """A client watching the keys sees the whole batch or none of it (MULTI/EXEC)."""
    prefix = "txn"
    url = redis_server.url(db=4, prefix=prefix)
    raw = raw_client(redis_server, db=4)
    raw.flushdb()
    raw.config_resetstat()

    async def go() -> None:
        async with open_datastore(url) as store:
            await store.apply(
                {"jobs": {"j": {"v": 1}}, "results": {"r": {"v": 1}}}, {"parents": ["p"]}
            )

    run(go())
    try:
        stats = raw.info("commandstats")
        assert stats["cmdstat_multi"]["calls"] == 1
        assert stats["cmdstat_exec"]["calls"] == 1
        assert stats["cmdstat_hset"]["calls"] == 2
        assert stats["cmdstat_hdel"]["calls"] == 1
    finally:
        raw.flushdb()
        raw.close()


def test_foreign_data_raises_datastore_error(redis_server: RedisServer) -> None:
    prefix = "foreign"
    url = redis_server.url(db=6, prefix=prefix)
    raw = raw_client(redis_server, db=6)
    raw.flushdb()
    raw.set(f"{prefix}:nodes", "a string, not a hash")
    raw.hset(f"{prefix}:jobs", "garbage", b"\xc1")  # 0xc1 is never valid msgpack
    raw.hset(f"{prefix}:results", "list", msgpack.packb([1, 2]))

    async def go() -> None:
        async with open_datastore(url) as store:
            with pytest.raises(DatastoreError, match="WRONGTYPE"):
                await store.scan("nodes")
            with pytest.raises(DatastoreError, match="WRONGTYPE"):
                await store.get("nodes", "n")
            with pytest.raises(DatastoreError, match="WRONGTYPE"):
                await store.apply({"nodes": {"n": {}}})
            with pytest.raises(DatastoreError, match="jobs/garbage"):
                await store.scan("jobs")
            with pytest.raises(DatastoreError, match="not a mapping"):
                await store.get("results", "list")
            # The store stays usable after each failure.
            await store.apply({"parents": {"p": {"ok": True}}})
            assert await store.get("parents", "p") == {"ok": True}

    try:
        run(go())
    finally:
        raw.flushdb()
        raw.close()


def test_missing_library_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis...` raises ImportError
    monkeypatch.delitem(sys.modules, "directord.datastores.redis", raising=False)
    with pytest.raises(MissingDependencyError, match=re.escape("pip install directord[redis]")):
        open_datastore("redis://127.0.0.1:6379/0")


def test_use_before_start_raises_datastore_error(redis_server: RedisServer) -> None:
    store = open_datastore(redis_server.url())
    with pytest.raises(DatastoreError, match="not started"):
        run(store.get("jobs", "j"))
    with pytest.raises(DatastoreError, match="not started"):
        run(store.apply({"jobs": {"j": {}}}))


# ---- reaching the server, credentials, masking --------------------------------------------


@pytest.mark.parametrize("userinfo", [f":{QUOTED}", f"alice:{QUOTED}"])
def test_unreachable_server_raises_datastore_error_with_password_masked(userinfo: str) -> None:
    port = closed_port()
    url = f"redis://{userinfo}@127.0.0.1:{port}/0?timeout=5"
    store = open_datastore(url)
    with pytest.raises(DatastoreError) as info:
        run(store.start())
    message = str(info.value)
    assert f"127.0.0.1:{port}" in message
    assert "***@" in message
    assert QUOTED not in message and "pa:ss" not in message and "rd%" not in message
    run(store.close())


def test_malformed_url_does_not_show_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        RedisDatastore(f"redis://alice:{QUOTED}@host/not-a-db")
    assert QUOTED not in str(info.value)
    assert "redis://alice:***@host/not-a-db" in str(info.value)


def test_mask_url_forms() -> None:
    assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert mask_url("rediss://u:pw@h/0?prefix=x") == "rediss://u:***@h/0?prefix=x"
    assert mask_url("redis://u@h/0") == "redis://u@h/0"
    assert mask_url("redis://h:6379/0") == "redis://h:6379/0"


def test_password_and_acl_user(secured: RedisServer) -> None:
    async def go() -> None:
        async with open_datastore(secured.url(userinfo=f":{QUOTED}")) as store:
            await store.apply({"jobs": {"j": {"by": "default"}}})
            assert await store.get("jobs", "j") == {"by": "default"}
        async with open_datastore(secured.url(userinfo=f"alice:{QUOTED}")) as store:
            await store.apply({"jobs": {"j": {"by": "alice"}}})
            assert await store.get("jobs", "j") == {"by": "alice"}
        for userinfo in ("", ":wrong-secret", "alice:wrong-secret", f"bob:{QUOTED}"):
            store = open_datastore(secured.url(userinfo=userinfo))
            with pytest.raises(DatastoreError) as info:
                await store.start()
            assert "wrong-secret" not in str(info.value)
            assert QUOTED not in str(info.value)
            await store.close()

    run(go())


def test_store_survives_a_redis_restart(tmp_path: Path) -> None:
    """Redis goes away under an open store: writes fail with DatastoreError, then recover."""
    server = RedisServer(tmp_path / "redis", ["--requirepass", PASSWORD], password=PASSWORD)
    server.start()
    try:
        url = server.url(userinfo=f":{QUOTED}")

        async def go() -> None:
            async with open_datastore(url) as store:
                await store.apply({"jobs": {"before": {"v": 1}}})
                server.stop()
                with pytest.raises(DatastoreError) as info:
                    await store.apply({"jobs": {"during": {"v": 2}}})
                assert f"127.0.0.1:{server.port}" in str(info.value)
                assert ":***@" in str(info.value) and QUOTED not in str(info.value)
                server.start()  # same port; no persistence, so the data is gone
                await store.apply({"jobs": {"after": {"v": 3}}})
                assert await store.scan("jobs") == {"after": {"v": 3}}

        run(go())
    finally:
        server.stop()


# ---- TLS ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, PKI]]:
    """A redis-server that also listens with TLS and requires client certificates."""
    root = tmp_path_factory.mktemp("redis-tls")
    pki = PKI(root / "pki")
    pki.init()
    cert, key = pki.issue("redis", sans=["127.0.0.1", "localhost"], usage="server")
    pki.issue("directord", usage="client")
    tls_port = closed_port()
    tls = {
        "--tls-port": str(tls_port),
        "--tls-cert-file": str(cert),
        "--tls-key-file": str(key),
        "--tls-ca-cert-file": str(pki.ca_cert_path),
        "--tls-auth-clients": "yes",
    }
    server = RedisServer(root / "data", [item for pair in tls.items() for item in pair]).start()
    try:
        yield server, tls_port, pki
    finally:
        server.stop()


def test_rediss_with_client_certificate(tls_server: tuple[RedisServer, int, PKI]) -> None:
    server, tls_port, pki = tls_server
    base = f"rediss://127.0.0.1:{tls_port}/0?prefix=tls&ssl_ca_certs={pki.ca_cert_path}"
    client = f"&ssl_certfile={pki.cert_path('directord')}&ssl_keyfile={pki.key_path('directord')}"

    async def go() -> None:
        store = open_datastore(base + client)
        assert isinstance(store, RedisDatastore) and store.config.tls
        async with store:
            await store.apply({"jobs": {"j": {"tls": True}}})
        async with open_datastore(base + client) as again:
            assert await again.scan("jobs") == {"j": {"tls": True}}
            await again.clear("jobs")
        # Without a client certificate the server refuses the handshake.
        bare = open_datastore(base + "&timeout=2")
        with pytest.raises(DatastoreError, match=f"127.0.0.1:{tls_port}"):
            await bare.start()
        await bare.close()
        # The plain port of the same server does not speak TLS.
        plain = open_datastore(
            f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={pki.ca_cert_path}&timeout=1" + client
        )
        with pytest.raises(DatastoreError):
            await plain.start()
        await plain.close()

    run(go())
