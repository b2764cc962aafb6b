"""Attacks through the brokers: forged identities and sessions, and memory floods.

Whoever may publish to the server's inbox (a node's broker user, or anyone on a
NATS server without permissions) is an attacker here: a raw aio-pika or nats-py
publisher, never a directord process. Every broker is this run's private one.

* With ``--messaging-bind-identity``, a message must come from the broker user it
  names, and every message must belong to the identity of its session: a forged
  result, open or close for another node's session never reaches, nor ends, it.
* Reassembly of NATS parts, and each session's queue, are bounded: a flood drops
  the message or the session it aims at, never the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.abc
import nats
import pytest

from directord.config import Settings
from directord.errors import ConnectionLost
from directord.protocol import join_packed, pack
from directord.transports.amqp import AmqpOptions, AmqpTransport
from directord.transports.base import Connection
from directord.transports.broker import SESSION_QUEUE_BYTES, BrokerTransport
from directord.transports.nats import PART_IDLE_TIMEOUT, PARTS_BYTES, NatsOptions, NatsTransport
from tests.brokers import NatsServer, RabbitNode
from tests.conftest import Cluster
from tests.e2e.helpers import nodes, uid, wait_for, wait_job
from tests.e2e.test_brokers import assert_jobs_run_on

DEADLINE = 60.0
MiB = 1024 * 1024


# ---- helpers -------------------------------------------------------------------------------


def server_log(c: Cluster) -> str:
    return c.log("server").read_text(errors="replace")


def wait_logged(c: Cluster, needle: str, timeout: float = DEADLINE) -> None:
    wait_for(lambda: needle in server_log(c), f"the server to log {needle!r}", timeout)


def registrations(c: Cluster, identity: str) -> int:
    """How many times a client registered (its ready file counts reconnects)."""
    return int(json.loads((c.root / f"{identity}.ready").read_text())["registered"])


def forged_result(job_id: str, stdout: str) -> bytes:
    """A batch with one result envelope, as a node would send it."""
    result = {
        "t": "result",
        "id": job_id,
        "state": "success",
        "rc": 0,
        "stdout": stdout,
        "stderr": "",
        "exec_time": 0.1,
    }
    return join_packed([pack(result)])


def start_slow_job(c: Cluster, target: str, tok: str) -> str:
    """Submit a job that runs a few seconds on one node; returns its id."""
    [parent] = c.json("exec", "--verb", "RUN", f"sleep 4; echo real-{tok}", "--target", target)
    job_id: str = parent["jobs"][0]
    return job_id


def assert_real_result(c: Cluster, job_id: str, target: str, tok: str) -> None:
    """The job ends with what the node really printed, not a forgery."""
    result = wait_job(c, job_id, DEADLINE)["results"][target]
    assert result["state"] == "success" and result["stdout"].strip() == f"real-{tok}", result


def assert_undisturbed(c: Cluster, first_session: bool = True) -> None:
    """Every node is online (on its first session, unless told otherwise) and runs jobs."""
    listed = nodes(c)
    assert {n: listed[n]["status"] for n in c.identities} == dict.fromkeys(c.identities, "online")
    if first_session:
        assert {n: registrations(c, n) for n in c.identities} == dict.fromkeys(c.identities, 1)
    assert_jobs_run_on(c, c.identities)


# ---- RabbitMQ with --messaging-bind-identity ------------------------------------------------


async def _amqp_spy_session(url: str, queue_name: str, trigger: Callable[[], Any]) -> str:
    """The session id of the messages in a node's queue, read as a user allowed to.

    A consumer of higher priority than the node's, with room for one message, takes
    the next one; closing its channel gives it back, and the node gets it after all.
    """
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.declare_queue(queue_name, passive=True)
        got: asyncio.Future[aio_pika.abc.AbstractIncomingMessage] = (
            asyncio.get_running_loop().create_future()
        )

        async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            if not got.done():
                got.set_result(message)

        await queue.consume(take, arguments={"x-priority": 10})
        await asyncio.to_thread(trigger)
        message = await asyncio.wait_for(got, DEADLINE)
        sid = str((message.headers or {})["s"])
        await channel.close()  # unacknowledged: back to the queue, and to the node
        return sid
    finally:
        await connection.close()


async def _amqp_publish(
    url: str, routing_key: str, messages: list[tuple[dict[str, Any], bytes, str | None]]
) -> None:
    """Publish (headers, body, user_id) messages to a queue, as the URL's user."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        for headers, body, user_id in messages:
            message = aio_pika.Message(body, headers=headers, user_id=user_id)
            await channel.default_exchange.publish(message, routing_key=routing_key)
    finally:
        await connection.close()


def test_messaging_bound_identity_refuses_forged_messages_for_another_node(
    make_cluster: Any, rabbitmq_broker: RabbitNode
) -> None:
    server = ["--messaging-url", rabbitmq_broker.url("directord"), "--messaging-bind-identity"]
    own_login = [
        "--messaging-url",
        f"amqp://{{identity}}:{{identity}}-secret@127.0.0.1:{rabbitmq_broker.port}/",
    ]
    c: Cluster = make_cluster(
        nodes=2, driver="messaging", heartbeat=1.0, server_args=server, client_args=own_login
    )
    ns, tok = c.namespace, uid()
    job_ids: list[str] = []

    def trigger() -> None:
        job_ids.append(start_slow_job(c, "node0", tok))

    # node2's login may read any queue: it learns node0's session id from its inbox.
    sid0 = asyncio.run(_amqp_spy_session(rabbitmq_broker.url("node2"), f"{ns}.node.node0", trigger))
    [job_id] = job_ids
    forged = forged_result(job_id, f"forged-{tok}")
    fresh = uuid.uuid4().hex
    # node1, logged in as node1, while node0 runs the job.
    attacks: list[tuple[dict[str, Any], bytes, str | None]] = [
        # No user_id at all, claiming node0: into node0's session, a new one, and a close.
        ({"s": sid0, "k": "data", "n": "node0"}, forged, None),
        ({"s": fresh, "k": "open", "n": "node0"}, b"", None),
        ({"s": sid0, "k": "close", "n": "node0"}, b"", None),
        # As itself (RabbitMQ checks the user_id), but in node0's session.
        ({"s": sid0, "k": "data", "n": "node1"}, forged, "node1"),
        ({"s": sid0, "k": "open", "n": "node1"}, b"", "node1"),
        ({"s": sid0, "k": "close", "n": "node1"}, b"", "node1"),
    ]
    asyncio.run(_amqp_publish(rabbitmq_broker.url("node1"), f"{ns}.server", attacks))
    assert_real_result(c, job_id, "node0", tok)
    assert_undisturbed(c)
    for needle in (
        "dropped a message claiming node 'node0' without a broker user id",
        f"dropped a data message from node node1 for a session of node node0 "
        f"(messaging:node0/{sid0[:8]})",
        f"dropped an open from node node1 for session {sid0}, which is in use",
        "dropped a close message from node node1 for a session of node node0",
    ):
        wait_logged(c, needle)


# ---- NATS: a session belongs to one identity --------------------------------------------------


async def _nats_spy_session(url: str, subject: str, trigger: Callable[[], Any]) -> str:
    """The session id of the messages on a node's subject (a plain subscriber sees copies)."""
    nc = await nats.connect(url)
    try:
        sub = await nc.subscribe(subject)
        await nc.flush()
        await asyncio.to_thread(trigger)
        msg = await sub.next_msg(timeout=DEADLINE)
        return str((msg.headers or {})["s"])
    finally:
        await nc.close()


async def _nats_publish(
    url: str, subject: str, messages: list[tuple[dict[str, str], bytes]]
) -> None:
    nc = await nats.connect(url)
    try:
        for headers, body in messages:
            await nc.publish(subject, body, headers=headers)
        await nc.flush()
    finally:
        await nc.close()


def test_nats_messages_for_another_nodes_session_are_dropped(
    make_cluster: Any, nats_broker: NatsServer
) -> None:
    c: Cluster = make_cluster(nodes=2, driver="nats", heartbeat=1.0)
    ns, tok = c.namespace, uid()
    job_ids: list[str] = []

    def trigger() -> None:
        job_ids.append(start_slow_job(c, "node0", tok))

    sid0 = asyncio.run(_nats_spy_session(nats_broker.url, f"{ns}.node.node0", trigger))
    [job_id] = job_ids
    forged = forged_result(job_id, f"forged-{tok}")
    attacks = [
        ({"s": sid0, "k": "data", "n": "node1"}, forged),
        ({"s": sid0, "k": "open", "n": "node1"}, b""),
        ({"s": sid0, "k": "close", "n": "node1"}, b""),
        # Parts of a message for node0's session, in node1's name, that never ends.
        ({"s": sid0, "k": "data", "n": "node1", "p": "1/3"}, b"x" * 1000),
    ]
    asyncio.run(_nats_publish(nats_broker.url, f"{ns}.server", attacks))
    assert_real_result(c, job_id, "node0", tok)
    assert_undisturbed(c)
    for needle in (
        f"dropped a data message from node node1 for a session of node node0 "
        f"(nats:node0/{sid0[:8]})",
        f"dropped an open from node node1 for session {sid0}, which is in use",
        "dropped a close message from node node1 for a session of node node0",
    ):
        wait_logged(c, needle)
    # The parts expire without ending node0's session, which is not node1's to end.
    wait_logged(
        c,
        f"dropped a message in parts from node 'node1', session '{sid0}': "
        f"no part for {PART_IDLE_TIMEOUT:.0f}s",
        DEADLINE + PART_IDLE_TIMEOUT,
    )
    assert_undisturbed(c)


# ---- NATS: endless parts -------------------------------------------------------------------------


def memory_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in KiB (VmRSS: now; VmHWM: the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


async def _nats_flood_parts(url: str, subject: str, endless: int, sessions: int) -> None:
    """One message whose parts never end, then many messages that never complete."""
    nc = await nats.connect(url)
    try:
        part = b"p" * (nc.max_payload - 1024)  # room for the headers
        sid = uuid.uuid4().hex
        for i in range(1, endless + 1):
            await nc.publish(
                subject, part, headers={"s": sid, "k": "data", "n": "node1", "p": f"{i}/1000"}
            )
            if i % 8 == 0:
                await nc.flush()
        for _ in range(sessions):
            headers = {"s": uuid.uuid4().hex, "k": "data", "n": "node1", "p": "1/3"}
            await nc.publish(subject, part, headers=headers)
            await nc.publish(subject, part, headers={**headers, "p": "2/3"})
            await nc.flush()
        await nc.flush()
    finally:
        await nc.close()


def test_nats_endless_parts_keep_server_memory_bounded(
    make_cluster: Any, nats_broker: NatsServer
) -> None:
    c: Cluster = make_cluster(nodes=2, driver="nats", heartbeat=1.0)
    assert c.server is not None
    pid = c.server.pid
    assert_jobs_run_on(c, c.identities)
    before = memory_kib(pid, "VmHWM")
    # 200 MiB of one message that never ends, and 2 MiB each of 100 that never do.
    asyncio.run(_nats_flood_parts(nats_broker.url, f"{c.namespace}.server", 200, 100))
    # The results of this job reach the server inbox behind the flood: once they
    # are in, the server has read all of it.
    assert_jobs_run_on(c, c.identities)
    grown = (memory_kib(pid, "VmHWM") - before) * 1024
    # The bound: what incomplete messages may hold, the flood's share of nats-py's
    # buffers, and slack for the allocator; the flood itself was 400 MiB.
    assert grown < PARTS_BYTES + 64 * MiB, f"the server grew by {grown // MiB} MiB"
    wait_logged(c, "dropped a message in parts from node 'node1'")
    wait_logged(c, f"no part for {PART_IDLE_TIMEOUT:.0f}s", DEADLINE + PART_IDLE_TIMEOUT)
    # Expired, they no longer hold room: a result in parts (over max_payload) gets through.
    tok = uid()
    reply = c.json(
        "exec",
        "--verb",
        "RUN",
        f"head -c 1500000 /dev/zero | tr '\\0' y; echo; echo {tok}",
        "--target",
        "node0",
        "--wait",
    )
    [result] = reply["results"]
    assert result["state"] == "success" and result["stdout"].count("y") >= MiB, result["state"]
    # Had nats-py dropped any of it (a slow consumer), every session would start over.
    assert_undisturbed(c, first_session=False)


# ---- a flood into one session's queue ------------------------------------------------------


def broker_transport(driver: str, url: str, namespace: str, identity: str) -> BrokerTransport:
    settings = Settings(heartbeat_interval=1.0, driver=driver, identity=identity)
    if driver == "nats":
        return NatsTransport(settings, NatsOptions(broker_namespace=namespace, nats_url=url))
    return AmqpTransport(settings, AmqpOptions(broker_namespace=namespace, messaging_url=url))


def broker_url(request: pytest.FixtureRequest, driver: str) -> str:
    if driver == "nats":
        nats_server: NatsServer = request.getfixturevalue("nats_broker")
        return nats_server.url
    rabbit: RabbitNode = request.getfixturevalue("rabbitmq_broker")
    return rabbit.url()


FLOOD = 1_000_000  # bytes per message: under NATS's max_payload, so never in parts
FLOOD_COUNT = SESSION_QUEUE_BYTES // FLOOD + 8


async def _raw_publish(driver: str, url: str, subject: str, headers: dict[str, str]) -> None:
    """FLOOD_COUNT messages of FLOOD bytes to one inbox, as a raw broker client."""
    body = b"f" * FLOOD
    if driver == "nats":
        await _nats_publish(url, subject, [(headers, body)] * FLOOD_COUNT)
    else:
        await _amqp_publish(url, subject, [(headers, body, None)] * FLOOD_COUNT)


def run(coro: Awaitable[Any]) -> Any:
    async def bounded() -> Any:
        return await asyncio.wait_for(coro, 120)

    return asyncio.run(bounded())


@pytest.mark.parametrize("driver", ["nats", "messaging"])
def test_a_flood_into_one_session_drops_that_session_not_the_server(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, driver: str
) -> None:
    url = broker_url(request, driver)
    ns = f"attack-{uuid.uuid4().hex[:12]}"
    caplog.set_level(logging.WARNING, logger="directord.transports.broker")
    reading = asyncio.Event()
    first_read: dict[str, str] = {}  # node: what its session's first read gave

    async def handler(conn: Connection) -> None:
        node = conn.peer.split(":", 1)[1].split("/")[0]
        if node == "node0":
            # A session whose handler is busy: nothing reads its queue until `reading`.
            await reading.wait()
        try:
            data = await conn.recv()
            first_read[node] = f"{len(data)} bytes"
            while True:
                await conn.send(data)
                data = await conn.recv()
        except ConnectionLost as exc:
            first_read.setdefault(node, f"lost: {exc}")

    async def logged(needle: str) -> None:
        while not any(needle in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.1)

    async def go() -> None:
        server = broker_transport(driver, url, ns, "server")
        flooder = broker_transport(driver, url, ns, "node0")
        other = broker_transport(driver, url, ns, "node1")
        try:
            await server.serve(handler)
            conn = await flooder.connect()
            for _ in range(FLOOD_COUNT):
                await conn.send(b"f" * FLOOD)
            # The server goes on serving: another node's session works, and its
            # messages, behind the flood in the server's inbox, say the flood is in.
            again = await other.connect()
            await again.send(b"ping")
            assert await asyncio.wait_for(again.recv(), 60) == b"ping"
            # Dropped: the flooding node is told at once, and its queued messages are gone.
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(conn.recv(), 30)
            reading.set()
            while "node0" not in first_read:
                await asyncio.sleep(0.05)
            assert first_read["node0"].startswith("lost:"), first_read
            await asyncio.wait_for(logged("bytes of messages waiting to be read"), 30)
        finally:
            reading.set()
            for transport in (flooder, other, server):
                await transport.close()

    run(go())


@pytest.mark.parametrize("driver", ["nats", "messaging"])
def test_a_flood_into_a_nodes_inbox_drops_its_session_only(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture, driver: str
) -> None:
    url = broker_url(request, driver)
    ns = f"attack-{uuid.uuid4().hex[:12]}"
    caplog.set_level(logging.WARNING, logger="directord.transports.broker")

    async def echo(conn: Connection) -> None:
        with contextlib.suppress(ConnectionLost):
            while True:
                await conn.send(await conn.recv())

    async def logged(needle: str) -> None:
        while not any(needle in r.getMessage() for r in caplog.records):
            await asyncio.sleep(0.1)

    async def go() -> None:
        server = broker_transport(driver, url, ns, "server")
        node = broker_transport(driver, url, ns, "node0")
        try:
            await server.serve(echo)
            conn = await node.connect()
            assert node.client_conn is not None
            sid = node.client_conn.sid
            # Someone who may publish to node0's inbox, and learned its session id.
            await _raw_publish(driver, url, f"{ns}.node.node0", {"s": sid, "k": "data"})
            await asyncio.wait_for(logged("node's session with the server"), 60)
            with pytest.raises(ConnectionLost):
                await asyncio.wait_for(conn.recv(), 30)
            # The node starts over, and its new session works.
            again = await node.connect()
            await again.send(b"ping")
            assert await asyncio.wait_for(again.recv(), 30) == b"ping"
        finally:
            await node.close()
            await server.close()

    run(go())
