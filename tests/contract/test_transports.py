"""Transport contract: one suite, run against every transport driver.

Each ``TransportCase`` knows how to build a serving transport and a client
transport that dials it; a new driver joins by adding one case to ``CASES``.
Server-side behaviour runs inside the connection handler, as in the server.
The broker drivers (NATS, RabbitMQ) run on this session's private brokers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from directord.config import Settings, TransportOptions
from directord.errors import ConnectError, ConnectionLost, RetryableError
from directord.models import State
from directord.protocol import (
    FROM_NODE,
    FROM_SERVER,
    MAX_FRAME,
    Ack,
    Heartbeat,
    Output,
    Refuse,
    Result,
)
from directord.transports import Connection, Link, Transport
from directord.transports.amqp import AmqpOptions, AmqpTransport
from directord.transports.base import BATCH_BYTES
from directord.transports.grpc import GrpcOptions, GrpcTransport
from directord.transports.memory import MemoryTransport
from directord.transports.nats import NatsOptions, NatsTransport
from directord.transports.zmq import ZmqOptions, ZmqTransport

T = TypeVar("T")
TIMEOUT = 20.0  # generous bound on every wait; never reached when things work
BASE = Settings(heartbeat_interval=1.0)
GRPC = GrpcOptions(grpc_server_workers=1)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


@dataclass(frozen=True)
class TransportCase:
    """How to build one driver's server and clients."""

    name: str
    server: Callable[[str], Transport]  # arg: a per-test scratch dir (short path)
    # args: scratch dir, the address serve() returned, a client identity unique per test
    client: Callable[[str, str, str], Transport]
    nowhere: Callable[[str], Transport]  # a client whose server does not exist
    # Whether each side learns that the other ended the connection (recv raises
    # ConnectionLost). ZeroMQ cannot: its server learns of a gone client only from
    # directord's own heartbeats.
    sees_peer_close: bool = True
    # Whether an empty message is delivered as one (ZeroMQ's marks a new connection).
    empty_messages: bool = True
    # Whether a client learns that the server went away while it was connected, and
    # cannot connect without one. On a broker the client talks to the broker: it
    # learns of a server restart from the reset answering its next heartbeat.
    sees_server: bool = True
    # The session fixture a broker driver needs (its ``url`` is the broker's).
    broker: str = ""


def _free_port() -> int:
    # Bind and close: nothing listens on the port afterwards.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _memory_server(scratch: str) -> Transport:
    return MemoryTransport(dataclasses.replace(BASE, driver="memory"), hub=scratch)


def _memory_client(scratch: str, address: str, identity: str) -> Transport:
    assert address == f"memory:{scratch}"
    return MemoryTransport(dataclasses.replace(BASE, driver="memory"), hub=scratch)


def _memory_nowhere(scratch: str) -> Transport:
    return MemoryTransport(dataclasses.replace(BASE, driver="memory"), hub=scratch + "-nobody")


def _grpc(**values: Any) -> GrpcTransport:
    return GrpcTransport(BASE, dataclasses.replace(GRPC, **values))


def _grpc_tcp_server(scratch: str) -> Transport:
    return _grpc(grpc_bind_address="127.0.0.1", grpc_port=0)


def _grpc_tcp_client(scratch: str, address: str, identity: str) -> Transport:
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    return _grpc(grpc_server_address=host, grpc_port=int(port))


def _grpc_tcp_nowhere(scratch: str) -> Transport:
    transport = _grpc(grpc_server_address="127.0.0.1", grpc_port=_free_port())
    transport.connect_timeout = 1.0
    return transport


def _grpc_unix_server(scratch: str) -> Transport:
    return _grpc(grpc_bind_address=f"unix:{scratch}/s.sock")


def _grpc_unix_client(scratch: str, address: str, identity: str) -> Transport:
    assert address == f"unix:{scratch}/s.sock"
    return _grpc(grpc_server_address=address)


def _grpc_unix_nowhere(scratch: str) -> Transport:
    transport = _grpc(grpc_server_address=f"unix:{scratch}/nobody.sock")
    transport.connect_timeout = 1.0
    return transport


def _zmq(scratch: str, identity: str = "", **values: Any) -> ZmqTransport:
    # The key dir is the scratch dir, so keys installed on this machine play no part.
    settings = dataclasses.replace(BASE, driver="zmq", identity=identity)
    return ZmqTransport(settings, ZmqOptions(zmq_key_dir=scratch, **values))


def _zmq_server(scratch: str) -> Transport:
    return _zmq(scratch, zmq_bind_address="127.0.0.1", job_port=0)


def _zmq_client(scratch: str, address: str, identity: str) -> Transport:
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    return _zmq(scratch, identity, zmq_server_address=host, job_port=int(port))


def _zmq_nowhere(scratch: str) -> Transport:
    transport = _zmq(scratch, zmq_server_address="127.0.0.1", job_port=_free_port())
    transport.connect_timeout = 1.0
    return transport


# Broker URLs, filled in by the ``case`` fixture from the session's private brokers.
BROKER_URLS: dict[str, str] = {}


def _broker_options(
    driver: str, kind: type[TransportOptions], scratch: str, url: str = ""
) -> TransportOptions:
    # A namespace per test: the brokers outlive tests, and old sessions must not meet.
    url_option = {"nats": "nats_url", "messaging": "messaging_url"}[driver]
    values = {
        "broker_namespace": f"contract-{os.path.basename(scratch)}",
        url_option: url or BROKER_URLS[driver],
    }
    return kind(**values)


def _broker_builders(
    driver: str, cls: type[Transport], kind: type[TransportOptions], dead_url: str
) -> tuple[
    Callable[[str], Transport], Callable[[str, str, str], Transport], Callable[[str], Transport]
]:
    """Server, client and nowhere builders of a broker driver (dead_url: {port} is free)."""
    settings = dataclasses.replace(BASE, driver=driver)

    def server(scratch: str) -> Transport:
        return cls(settings, _broker_options(driver, kind, scratch))

    def client(scratch: str, address: str, identity: str) -> Transport:
        options = _broker_options(driver, kind, scratch)
        return cls(dataclasses.replace(settings, identity=identity), options)

    def nowhere(scratch: str) -> Transport:
        url = dead_url.format(port=_free_port())
        return cls(settings, _broker_options(driver, kind, scratch, url))

    return server, client, nowhere


CASES = [
    TransportCase("memory", _memory_server, _memory_client, _memory_nowhere),
    TransportCase("grpc-tcp", _grpc_tcp_server, _grpc_tcp_client, _grpc_tcp_nowhere),
    TransportCase("grpc-unix", _grpc_unix_server, _grpc_unix_client, _grpc_unix_nowhere),
    TransportCase(
        "zmq", _zmq_server, _zmq_client, _zmq_nowhere, sees_peer_close=False, empty_messages=False
    ),
    TransportCase(
        "nats",
        *_broker_builders("nats", NatsTransport, NatsOptions, "nats://127.0.0.1:{port}"),
        sees_server=False,
        broker="nats",
    ),
    TransportCase(
        "messaging",
        *_broker_builders(
            "messaging", AmqpTransport, AmqpOptions, "amqp://guest:guest@127.0.0.1:{port}/"
        ),
        sees_server=False,
        broker="messaging",
    ),
]
# Tests of a capability some drivers lack run over the drivers that have it.
closing = pytest.mark.parametrize(
    "case", [c for c in CASES if c.sees_peer_close], ids=lambda c: c.name
)
empty_messages = pytest.mark.parametrize(
    "case", [c for c in CASES if c.empty_messages], ids=lambda c: c.name
)
sees_server = pytest.mark.parametrize(
    "case", [c for c in CASES if c.sees_server], ids=lambda c: c.name
)
sees_server_close = pytest.mark.parametrize(
    "case", [c for c in CASES if c.sees_server and c.sees_peer_close], ids=lambda c: c.name
)
BROKER_FIXTURES = {"nats": "nats_broker", "messaging": "rabbitmq_broker"}


@pytest.fixture(autouse=True)
def broker_urls(request: pytest.FixtureRequest) -> None:
    """Start (once) the private broker a broker case needs; fail if it cannot run."""
    params = getattr(request.node, "callspec", None)
    case = params.params.get("case") if params is not None else None
    if isinstance(case, TransportCase) and case.broker:
        broker = request.getfixturevalue(BROKER_FIXTURES[case.broker])
        BROKER_URLS[case.broker] = broker.url if case.broker == "nats" else broker.url()


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request: pytest.FixtureRequest) -> TransportCase:
    return request.param


@pytest.fixture
def scratch() -> Iterator[str]:
    # Unix socket paths are limited to ~107 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="dtt-", dir="/tmp")
    try:
        yield path
    finally:
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)


ServerScript = Callable[[Connection], Awaitable[Any]]


class Pair:
    """A serving transport running ``script`` per connection; a client transport per connect.

    Each connection comes from its own client transport with its own identity, as
    each node is its own process (a driver may route by identity).
    """

    def __init__(self, case: TransportCase, scratch: str, script: ServerScript) -> None:
        self.case = case
        self.scratch = scratch
        self.script = script
        self.server: Transport | None = None
        self.clients: list[Transport] = []
        self.address = ""
        self.outcomes: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.conns: list[Connection] = []

    async def _handle(self, conn: Connection) -> None:
        try:
            value = await self.script(conn)
        except asyncio.CancelledError:
            self.outcomes.put_nowait(("cancelled", None))
            raise
        except Exception as exc:
            self.outcomes.put_nowait(("error", exc))
        else:
            self.outcomes.put_nowait(("ok", value))

    async def __aenter__(self) -> Pair:
        self.server = self.case.server(self.scratch)
        self.address = await self.server.serve(self._handle)
        return self

    async def connect(self) -> Connection:
        client = self.case.client(self.scratch, self.address, f"node{len(self.clients)}")
        self.clients.append(client)
        conn = await client.connect()
        self.conns.append(conn)
        return conn

    async def outcome(self) -> tuple[str, Any]:
        return await asyncio.wait_for(self.outcomes.get(), TIMEOUT)

    async def result(self) -> Any:
        kind, value = await self.outcome()
        if kind == "error":
            raise value
        assert kind == "ok", kind
        return value

    async def __aexit__(self, *exc: object) -> None:
        for conn in self.conns:
            await conn.close()
        for client in self.clients:
            await client.close()
        if self.server is not None:
            await self.server.close()


async def _echo(conn: Connection) -> int:
    count = 0
    while True:
        try:
            data = await conn.recv()
        except ConnectionLost:
            return count
        await conn.send(data)
        count += 1


async def _recv_n(conn: Connection, n: int) -> list[bytes]:
    return [await asyncio.wait_for(conn.recv(), TIMEOUT) for _ in range(n)]


# ---- serve / connect ------------------------------------------------------------------------


def test_serve_returns_address_and_client_connects(case: TransportCase, scratch: str) -> None:
    async def go() -> None:
        async with Pair(case, scratch, _echo) as pair:
            assert isinstance(pair.address, str) and pair.address
            conn = await pair.connect()
            await conn.send(b"ping")
            assert await asyncio.wait_for(conn.recv(), TIMEOUT) == b"ping"

    run(go())


def test_messages_both_ways_in_order(case: TransportCase, scratch: str) -> None:
    async def server(conn: Connection) -> list[bytes]:
        got = await _recv_n(conn, 50)
        for i in range(50):
            await conn.send(b"s%d" % i)
        return got

    async def go() -> None:
        async with Pair(case, scratch, server) as pair:
            conn = await pair.connect()
            for i in range(50):
                await conn.send(b"c%d" % i)
            assert await _recv_n(conn, 50) == [b"s%d" % i for i in range(50)]
            assert await pair.result() == [b"c%d" % i for i in range(50)]

    run(go())


def test_many_messages_concurrently_both_ways(case: TransportCase, scratch: str) -> None:
    count = 2000

    async def server(conn: Connection) -> list[bytes]:
        async def send_all() -> None:
            for i in range(count):
                await conn.send(b"down-%d" % i)

        sender = asyncio.create_task(send_all())
        got = await _recv_n(conn, count)
        await sender
        return got

    async def go() -> None:
        async with Pair(case, scratch, server) as pair:
            conn = await pair.connect()

            async def send_all() -> None:
                for i in range(count):
                    await conn.send(b"up-%d" % i)

            sender = asyncio.create_task(send_all())
            got = await _recv_n(conn, count)
            await sender
            assert got == [b"down-%d" % i for i in range(count)]
            assert await pair.result() == [b"up-%d" % i for i in range(count)]

    run(go())


def test_large_message_round_trip(case: TransportCase, scratch: str) -> None:
    big = os.urandom(8 * 1024 * 1024)  # incompressible, so compression cannot shrink it

    async def go() -> None:
        async with Pair(case, scratch, _echo) as pair:
            conn = await pair.connect()
            await conn.send(big)
            echoed = await asyncio.wait_for(conn.recv(), TIMEOUT)
            assert len(echoed) == len(big) and echoed == big
            await conn.send(b"after")  # the stream is still usable
            assert await asyncio.wait_for(conn.recv(), TIMEOUT) == b"after"

    run(go())


@empty_messages
def test_empty_message_is_delivered(case: TransportCase, scratch: str) -> None:
    async def go() -> None:
        async with Pair(case, scratch, _echo) as pair:
            conn = await pair.connect()
            await conn.send(b"")
            await conn.send(b"x")
            assert await _recv_n(conn, 2) == [b"", b"x"]

    run(go())


def test_connections_are_independent(case: TransportCase, scratch: str) -> None:
    async def go() -> None:
        async with Pair(case, scratch, _echo) as pair:
            a = await pair.connect()
            b = await pair.connect()
            await a.send(b"for-a")
            await b.send(b"for-b")
            assert await asyncio.wait_for(b.recv(), TIMEOUT) == b"for-b"
            assert await asyncio.wait_for(a.recv(), TIMEOUT) == b"for-a"
            await a.close()
            await b.send(b"still")  # b survives a's close
            assert await asyncio.wait_for(b.recv(), TIMEOUT) == b"still"

    run(go())


# ---- ends of connections --------------------------------------------------------------------


@closing
def test_client_close_is_connection_lost_on_the_server(case: TransportCase, scratch: str) -> None:
    async def server(conn: Connection) -> str:
        assert await conn.recv() == b"hello"
        try:
            await conn.recv()
        except ConnectionLost:
            return "lost"
        return "no error"

    async def go() -> None:
        async with Pair(case, scratch, server) as pair:
            conn = await pair.connect()
            await conn.send(b"hello")
            await conn.close()
            assert await pair.outcome() == ("ok", "lost")

    run(go())


@closing
def test_messages_sent_just_before_close_are_delivered(case: TransportCase, scratch: str) -> None:
    async def server(conn: Connection) -> list[bytes]:
        got = []
        try:
            while True:
                got.append(await conn.recv())
        except ConnectionLost:
            return got

    async def go() -> None:
        async with Pair(case, scratch, server) as pair:
            for round_ in range(5):
                conn = await pair.connect()
                for i in range(5):
                    await conn.send(b"%d-%d" % (round_, i))
                await conn.close()
                assert await pair.result() == [b"%d-%d" % (round_, i) for i in range(5)]

    run(go())


@closing
def test_server_close_is_connection_lost_on_the_client(case: TransportCase, scratch: str) -> None:
    async def server(conn: Connection) -> None:
        await conn.send(b"bye")
        await conn.close()

    async def go() -> None:
        async with Pair(case, scratch, server) as pair:
            conn = await pair.connect()
            # Starts the gRPC call on the server; the server may have answered and closed
            # before this write lands, and then the write fails: the answer still came.
            with contextlib.suppress(ConnectionLost):
                await conn.send(b"hi")
            assert await asyncio.wait_for(conn.recv(), TIMEOUT) == b"bye"
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(conn.recv(), TIMEOUT)
            with pytest.raises(ConnectionLost):  # and it stays lost
                await asyncio.wait_for(conn.recv(), TIMEOUT)

    run(go())


@closing
def test_handler_return_ends_the_connection(case: TransportCase, scratch: str) -> None:
    async def server(conn: Connection) -> str:
        return "done"  # returns without closing: the connection ends with the handler

    async def go() -> None:
        async with Pair(case, scratch, server) as pair:
            conn = await pair.connect()
            # Starts the call on the server (gRPC); the handler may be done before this
            # write lands, and the write then fails: both are the connection ending.
            with contextlib.suppress(ConnectionLost):
                await conn.send(b"hi")
            assert await pair.result() == "done"
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(conn.recv(), TIMEOUT)

    run(go())


@sees_server_close
def test_server_transport_close_ends_live_connections(case: TransportCase, scratch: str) -> None:
    async def server(conn: Connection) -> str:
        assert await conn.recv() == b"hi"
        await conn.send(b"welcome")
        try:
            await conn.recv()  # blocks until the transport closes under it
        except ConnectionLost:
            return "lost"
        return "no error"

    async def go() -> None:
        async with Pair(case, scratch, server) as pair:
            conn = await pair.connect()
            await conn.send(b"hi")
            assert await asyncio.wait_for(conn.recv(), TIMEOUT) == b"welcome"
            assert pair.server is not None
            await pair.server.close()
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(conn.recv(), TIMEOUT)
            # The handler saw ConnectionLost too and finished on its own, not cancelled.
            assert await pair.outcome() == ("ok", "lost")

    run(go())


def test_own_close_makes_send_and_recv_raise(case: TransportCase, scratch: str) -> None:
    async def go() -> None:
        async with Pair(case, scratch, _echo) as pair:
            conn = await pair.connect()
            await conn.send(b"x")
            assert await asyncio.wait_for(conn.recv(), TIMEOUT) == b"x"
            await conn.close()
            await conn.close()  # idempotent
            with pytest.raises(ConnectionLost):
                await conn.send(b"y")
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(conn.recv(), TIMEOUT)

    run(go())


def test_connect_to_nothing_raises_connect_error(case: TransportCase, scratch: str) -> None:
    async def go() -> None:
        transport = case.nowhere(scratch)
        try:
            with pytest.raises(ConnectError) as info:
                await transport.connect()
            assert isinstance(info.value, RetryableError)
        finally:
            await transport.close()

    run(go())


@sees_server
def test_connect_after_server_closed_raises_connect_error(
    case: TransportCase, scratch: str
) -> None:
    async def go() -> None:
        server = case.server(scratch)
        address = await server.serve(_echo)
        await server.close()
        client = case.client(scratch, address, "node0")
        if isinstance(client, GrpcTransport | ZmqTransport):
            client.connect_timeout = 1.0
        try:
            with pytest.raises(ConnectError):
                await client.connect()
        finally:
            await client.close()

    run(go())


def test_transport_close_is_idempotent(case: TransportCase, scratch: str) -> None:
    async def go() -> None:
        async with Pair(case, scratch, _echo) as pair:
            conn = await pair.connect()
            await conn.send(b"x")
            assert await asyncio.wait_for(conn.recv(), TIMEOUT) == b"x"
            assert pair.server is not None
            await conn.close()
            await pair.clients[0].close()
            await pair.clients[0].close()
            await pair.server.close()
            await pair.server.close()
        unused = case.server(scratch)  # closing a transport that never served is fine
        await unused.close()
        await unused.close()

    run(go())


# ---- Link over every driver -----------------------------------------------------------------


async def _collect_messages(conn: Connection, count: int) -> tuple[list[Any], int]:
    link = Link(conn, FROM_NODE, "server")
    got: list[Any] = []
    batches = 0
    try:
        while len(got) < count:
            batch = await asyncio.wait_for(link.recv(), TIMEOUT)
            batches += 1
            got.extend(batch)
    finally:
        await link.close()
    return got, batches


def test_link_batches_messages_in_order(case: TransportCase, scratch: str) -> None:
    count = 1000

    async def go() -> None:
        async with Pair(case, scratch, lambda c: _collect_messages(c, count)) as pair:
            link = Link(await pair.connect(), FROM_SERVER, "client")
            try:
                for i in range(count // 2):
                    link.post(Result(id=f"job-{i}", state=State.SUCCESS, rc=i))
                link.post_many(
                    [
                        Output(id=f"job-{i}", stream="stdout", data=str(i))
                        for i in range(count // 2, count)
                    ]
                )
                await link.flush(TIMEOUT)
                got, batches = await pair.result()
            finally:
                await link.close()
            assert [m.id for m in got] == [f"job-{i}" for i in range(count)]
            assert got[0] == Result(id="job-0", state=State.SUCCESS, rc=0)
            assert got[-1] == Output(id=f"job-{count - 1}", stream="stdout", data=str(count - 1))
            # Posted without yielding to the loop, they travel as far fewer messages.
            assert batches < 10

    run(go())


def test_link_lingering_posts_arrive(case: TransportCase, scratch: str) -> None:
    async def go() -> None:
        async with Pair(case, scratch, lambda c: _collect_messages(c, 3)) as pair:
            link = Link(await pair.connect(), FROM_SERVER, "client")
            try:
                for i in range(3):
                    link.post(Ack(ids=[str(i)]), linger=0.05)
                got, _ = await pair.result()
            finally:
                await link.close()
            assert [m.ids for m in got] == [["0"], ["1"], ["2"]]

    run(go())


def test_link_cuts_big_bursts_into_bounded_batches(case: TransportCase, scratch: str) -> None:
    payload = "x" * (BATCH_BYTES // 3)
    count = 12

    async def go() -> None:
        async with Pair(case, scratch, lambda c: _collect_messages(c, count)) as pair:
            link = Link(await pair.connect(), FROM_SERVER, "client")
            try:
                link.post_many(
                    [Output(id=str(i), stream="stdout", data=payload) for i in range(count)]
                )
                got, batches = await pair.result()
            finally:
                await link.close()
            assert [m.id for m in got] == [str(i) for i in range(count)]
            assert all(m.data == payload for m in got)
            assert batches >= count * len(payload) // BATCH_BYTES
            assert count * len(payload) < MAX_FRAME

    run(go())


@closing
def test_link_recv_after_peer_close_raises_connection_lost(
    case: TransportCase, scratch: str
) -> None:
    async def server(conn: Connection) -> None:
        link = Link(conn, FROM_NODE, "server")
        link.post(Refuse(reason="test"))
        await link.flush(TIMEOUT)
        await link.close()

    async def go() -> None:
        async with Pair(case, scratch, server) as pair:
            conn = await pair.connect()
            link = Link(conn, FROM_SERVER, "client")
            try:
                link.post(Heartbeat())
                assert await asyncio.wait_for(link.recv(), TIMEOUT) == [Refuse(reason="test")]
                with pytest.raises(ConnectionLost):
                    await asyncio.wait_for(link.recv(), TIMEOUT)
            finally:
                await link.close()
            assert await pair.result() is None
            with contextlib.suppress(ConnectionLost):
                await link.recv()

    run(go())


# ---- jobs parked for offline nodes ------------------------------------------------------------


def test_parked_messages_wait_for_their_node_in_order(case: TransportCase, scratch: str) -> None:
    """A driver that parks keeps messages for a node until it takes them, once and in order;
    one that cannot says so, and a node then finds nothing."""

    async def go() -> None:
        async with Pair(case, scratch, _echo) as pair:
            assert pair.server is not None
            if not pair.server.parks:
                with pytest.raises(ConnectionLost):
                    await pair.server.park("node0", "job-1", b"m1")
            else:
                for i in range(1, 4):
                    await pair.server.park("node0", f"job-{i}", b"m%d" % i)
                await pair.server.park("node1", "job-x", b"other node")
            await pair.connect()  # node0
            taken: list[tuple[str, bytes]] = []

            async def take(job_id: str, message: bytes) -> None:
                taken.append((job_id, message))

            await pair.clients[0].take_parked(take)
            expected = [(f"job-{i}", b"m%d" % i) for i in range(1, 4)]
            assert taken == (expected if pair.server.parks else [])
            taken.clear()
            await pair.clients[0].take_parked(take)  # taken means gone
            assert taken == []

    run(go())
