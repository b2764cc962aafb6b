"""Fuzzing the node listener (gRPC) and the user API of a live server with hypothesis.

The server runs in this process, in a thread of its own, on loopback; hostile
peers send it random bytes, random msgpack, and envelopes of every known kind
with random fields (ids of real jobs among them). Nothing may crash it: after
every example it still answers a ping; no task outlives its connection; and
the memory held by directord's own code stays flat. ``make test`` runs a
bounded number of examples (profile ``bounded``); ``make fuzz`` runs many more
(``--hypothesis-profile fuzz``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from directord.config import Settings
from directord.protocol import PROTOCOL_VERSION, FrameDecoder, PlainBatches, frame
from directord.server.app import Server
from directord.transports.grpc import GrpcOptions

pytestmark = pytest.mark.fuzz


NODE_KINDS = ["hello", "hb", "ack", "result", "out", "req", "parked", "qrep", "zz"]
API_METHODS = [
    "ping",
    "submit",
    "nodes",
    "jobs",
    "job_info",
    "parent_info",
    "analyze",
    "watch",
    "file_put",
    "purge_nodes",
    "nope",
]
IDENTITIES = ["fz0", "fz1", "fz2", "server", "", "x" * 300]
FIELDS = ["t", "id", "ids", "state", "rc", "stdout", "stderr", "exec_time", "s", "d", "rid"]
FIELDS += ["m", "p", "missing", "value", "identity", "proto", "known", "job", "index", "offset"]
FIELDS += ["size", "sha", "identities", "sha256", "data", "parents", "jobs", "filter"]

leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


class Tracebacks(logging.Handler):
    """Keeps every log record that carries a traceback: a bug the server survived."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(self.format(record))


class LiveServer:
    """A directord server on loopback in a thread of this process."""

    def __init__(self, root: Path) -> None:
        self.bugs = Tracebacks()
        logging.getLogger("directord").addHandler(self.bugs)
        self.settings = Settings(
            datastore="memory",
            socket_path=str(root / "api.sock"),
            heartbeat_interval=30.0,
            api_idle_timeout=5.0,
            transport_options=(GrpcOptions(grpc_bind_address="127.0.0.1", grpc_port=0),),
        )
        self.loop = asyncio.new_event_loop()
        self.server = Server(self.settings)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())
        self.address = self.server.address

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout)

    def tasks(self) -> int:
        async def count() -> int:
            return len(asyncio.all_tasks())

        return int(self.run(count()))

    def close(self) -> None:
        logging.getLogger("directord").removeHandler(self.bugs)
        self.run(self.server.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def api_call(path: str, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """One request on a fresh API connection, the way the CLI does it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(path)
        sock.sendall(frame([{"t": "req", "rid": 1, "m": method, "p": params}]))
        decoder = FrameDecoder(PlainBatches())
        while True:
            data = sock.recv(65536)
            assert data, f"the server closed the API connection on {method}"
            for batch in decoder.feed(data):
                for envelope in batch:
                    if envelope.get("rid") == 1:
                        return dict(envelope)


def hello(identity: str) -> dict[str, Any]:
    return {
        "t": "hello",
        "proto": PROTOCOL_VERSION,
        "identity": identity,
        "machine_id": "m",
        "version": "0",
        "driver": "grpc",
        "heartbeat_interval": 30.0,
        "host_boot": 0.0,
        "agent_start": 0.0,
        "known": [],
    }


class NodePeer:
    """Raw gRPC streams to the node listener."""

    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.connect = self.channel.stream_stream("/directord.Agent/Connect")

    def exchange(self, messages: list[bytes], wait: float = 0.15) -> list[bytes]:
        """Send messages on one stream, then read what comes until the server ends it."""
        call = self.connect(iter(messages), timeout=wait)
        received: list[bytes] = []
        try:
            for reply in call:
                received.append(reply)
        except grpc.RpcError:
            pass  # a deadline, or the server ending a stream it refused: both expected
        return received

    def close(self) -> None:
        self.channel.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path_factory.mktemp("fuzz"))
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def job_ids(live: LiveServer) -> list[str]:
    """Real jobs for the fuzz identities (registered once so that they are known)."""
    peer = NodePeer(live.address)
    try:
        for identity in ("fz0", "fz1", "fz2"):
            peer.exchange([msgpack.packb([hello(identity)])])
    finally:
        peer.close()
    reply = api_call(
        live.settings.socket_path,
        "submit",
        {
            "orchestrations": [
                {
                    "targets": ["fz0", "fz1", "fz2"],
                    "jobs": [
                        {"verb": "RUN", "args": "true"},
                        {"verb": "QUERY", "args": "k"},
                        {"verb": "JOB_WAIT", "args": "abc"},
                    ],
                }
            ]
        },
    )
    assert reply["ok"], reply
    return [j for p in reply["r"]["parents"] for j in p["jobs"]]


def directord_bytes() -> int:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(True, "*/directord/*")]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


def chunk_params(known: st.SearchStrategy[Any]) -> dict[str, st.SearchStrategy[Any]]:
    return {"job": known | values, "index": values, "offset": values, "size": values}


def node_envelopes(job_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    known = st.sampled_from(job_ids) if job_ids else st.text(max_size=8)
    return st.fixed_dictionaries(
        {"t": st.sampled_from(NODE_KINDS)},
        optional={
            **{name: values for name in FIELDS if name != "t"},
            "id": known | values,
            "ids": st.lists(known, max_size=3) | values,
            "state": st.sampled_from(["success", "failed", "lost", "undelivered", "queued", "x"]),
            "m": st.sampled_from(["chunk", "job_status", "nope"]) | values,
            "p": st.fixed_dictionaries(
                {},
                optional={"job": known | values, "index": values, "offset": values, "size": values},
            )
            | values,
        },
    )


def node_messages(job_ids: list[str]) -> st.SearchStrategy[list[bytes]]:
    envelope_batches = st.lists(node_envelopes(job_ids), max_size=6).map(
        lambda batch: msgpack.packb(batch, use_bin_type=True)
    )
    garbage = st.binary(max_size=200) | values.map(lambda v: msgpack.packb(v, use_bin_type=True))
    first = st.sampled_from(IDENTITIES).map(lambda i: msgpack.packb([hello(i)])) | garbage
    return st.tuples(first, st.lists(envelope_batches | garbage, max_size=5)).map(
        lambda pair: [pair[0], *pair[1]]
    )


def test_node_listener_survives_hostile_nodes(live: LiveServer, job_ids: list[str]) -> None:
    peer = NodePeer(live.address)
    baseline = live.tasks()
    tracemalloc.start()
    marks: list[int] = []
    try:

        @given(data=st.data())
        def attack(data: st.DataObject) -> None:
            messages = data.draw(node_messages(job_ids))
            peer.exchange(messages)
            assert api_call(live.settings.socket_path, "ping", {})["ok"]
            if len(marks) < 2 or len(marks) % 25 == 0:
                marks.append(directord_bytes())
            else:
                marks.append(marks[-1])

        attack()
        wait_tasks(live, baseline)
        end = directord_bytes()
        assert live.bugs.records == []
    finally:
        tracemalloc.stop()
        peer.close()
    assert end - marks[min(20, len(marks) - 1)] < 2 * 1024 * 1024, (marks[:5], end)
    assert {n["identity"] for n in api_call(live.settings.socket_path, "nodes", {})["r"]} <= {
        "fz0",
        "fz1",
        "fz2",
    }


def api_requests() -> st.SearchStrategy[bytes]:
    request = st.fixed_dictionaries(
        {"t": st.just("req"), "rid": values, "m": st.sampled_from(API_METHODS) | values},
        optional={"p": st.dictionaries(st.sampled_from(FIELDS), values, max_size=5) | values},
    )
    framed = st.lists(request, min_size=1, max_size=4).map(
        lambda batch: frame(batch) if _encodable(batch) else b""
    )
    raw_frame = st.binary(max_size=300).map(lambda b: struct.pack(">I", len(b)) + b)
    oversized = st.integers(min_value=16 * 1024 * 1024 + 1, max_value=2**32 - 1).map(
        lambda n: struct.pack(">I", n)
    )
    return framed | raw_frame | st.binary(max_size=100) | oversized


def _encodable(batch: list[dict[str, Any]]) -> bool:
    try:
        frame(batch)
    except Exception:
        return False
    return True


def test_api_survives_hostile_users(live: LiveServer, job_ids: list[str]) -> None:
    baseline = live.tasks()
    path = live.settings.socket_path

    @given(chunks=st.lists(api_requests(), min_size=1, max_size=4))
    def attack(chunks: list[bytes]) -> None:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.15)
            sock.connect(path)
            try:
                for chunk in chunks:
                    sock.sendall(chunk)
                while sock.recv(65536):
                    pass
            except (TimeoutError, OSError):
                pass
        assert api_call(path, "ping", {})["ok"]

    attack()
    wait_tasks(live, baseline)
    assert live.bugs.records == []


def wait_tasks(live: LiveServer, baseline: int, timeout: float = 10.0) -> None:
    """Every connection's tasks end once it has gone."""
    deadline = time.monotonic() + timeout
    while live.tasks() > baseline:
        assert time.monotonic() < deadline, f"{live.tasks()} tasks, {baseline} before the fuzz"
        time.sleep(0.1)
