"""A node can fetch only the files named in a job that targets it.

A fake node speaks the wire protocol directly over the gRPC driver (hello,
then ``req`` envelopes asking for ``chunk``s) against a real server, and tries
to read files it was never given.
"""

from __future__ import annotations

import asyncio
from typing import Any

from directord.protocol import PROTOCOL_VERSION
from tests.conftest import Cluster
from tests.fakenode import FakeNode, connect_grpc

SECRET = b"top secret: only node0 may read this\n"


def _submit_copy(cluster: Cluster, src: str, target: str) -> str:
    dest = cluster.root / "dest" / target / "copy.txt"
    reply = cluster.json("exec", "--verb", "COPY", f"{src} {dest}", "--target", target)
    job_id: str = reply[0]["jobs"][0]
    return job_id


def test_node_fetches_only_files_of_its_own_jobs(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=1)
    secret = cluster.root / "secret.txt"
    secret.write_bytes(SECRET)
    mine = cluster.root / "mine.txt"
    mine.write_bytes(b"the intruder's own file\n")

    async def scenario() -> None:
        intruder = FakeNode(await connect_grpc(cluster.port))
        try:
            assert (await intruder.hello("intruder"))["t"] == "welcome"
            # A job for node0 only: the intruder knows its id but is not a target.
            foreign = await asyncio.to_thread(_submit_copy, cluster, str(secret), "node0")
            # A job that does target the intruder, carrying one file.
            own = await asyncio.to_thread(_submit_copy, cluster, str(mine), "intruder")
            job = await intruder.recv_until(lambda e: e["t"] == "job" and e["id"] == own)
            assert [f["name"] for f in job["files"]] == ["mine.txt"]

            refused = [
                await intruder.chunk(job=foreign, index=0, offset=0),
                await intruder.chunk(job="no-such-job", index=0, offset=0),
                await intruder.chunk(job=own, index=1, offset=0),  # out of range
                await intruder.chunk(job=own, index=-1, offset=0),
                await intruder.chunk(job=own, index=0, offset=-1),
            ]
            for rep in refused:
                assert rep["ok"] is False, rep
                assert "r" not in rep and SECRET not in repr(rep).encode()
            assert "no such job for this node" in refused[0]["err"]
            assert "no such job for this node" in refused[1]["err"]
            assert "no such file or offset in this job" in refused[2]["err"]

            # Its own file is served; a path smuggled into the request is ignored.
            rep = await intruder.chunk(job=own, index=0, offset=0, path=str(secret))
            assert rep["ok"] is True
            assert rep["r"]["data"] == mine.read_bytes() and rep["r"]["eof"] is True
        finally:
            await intruder.conn.close()

    asyncio.run(scenario())
    # The server carried on: the real node still runs jobs.
    reply = cluster.json(
        "exec", "--verb", "RUN", "--skip-cache echo alive", "--wait", "--target", "node0"
    )
    assert [(r["node"], r["state"]) for r in reply["results"]] == [("node0", "success")]


def test_node_cannot_take_a_connected_nodes_identity(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=1)

    async def scenario() -> dict[str, Any]:
        impostor = FakeNode(await connect_grpc(cluster.port))
        try:
            return await impostor.hello("node0")
        finally:
            await impostor.conn.close()

    reply = asyncio.run(scenario())
    assert reply["t"] == "refuse" and "already connected" in reply["reason"]


def test_requests_before_a_valid_hello_are_refused(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster(nodes=1)
    firsts: list[dict[str, Any]] = [
        {"t": "req", "rid": 1, "m": "chunk", "p": {"job": "x", "index": 0, "offset": 0}},
        {"t": "hello", "proto": 99, "identity": "old"},
        {"t": "hello", "proto": PROTOCOL_VERSION, "identity": "bad identity!"},
    ]

    async def scenario(first: dict[str, Any]) -> dict[str, Any]:
        peer = FakeNode(await connect_grpc(cluster.port))
        try:
            await peer.send(first)
            return await peer.recv_until(lambda e: True)
        finally:
            await peer.conn.close()

    for first in firsts:
        reply = asyncio.run(scenario(first))
        assert reply["t"] == "refuse", (first, reply)
        assert "data" not in reply
