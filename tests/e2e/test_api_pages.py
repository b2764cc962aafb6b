"""Histories larger than one API message (16 MiB), with real processes and real frames.

Ten jobs print 900 kB each on two nodes: 18 MB of results. Every way an operator
reads them back works, and a client that asks for everything at once (as
before pages) is told why it cannot have it, on a connection that stays up.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest

from directord.connect import APIClient
from directord.errors import APIError, ProtocolError
from directord.protocol import MAX_FRAME
from tests.conftest import Cluster

JOBS, SIZE = 10, 900_000


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, dict[str, Any]]]:
    """A cluster whose one orchestration's results weigh more than a frame."""
    cluster = Cluster(tmp_path_factory.mktemp("pages"), nodes=2, heartbeat=1.0)
    cluster.start()
    try:
        steps = "".join(
            f"    - RUN: head -c {SIZE} /dev/zero | tr -c a a; echo; echo {i}\n"
            for i in range(JOBS)
        )
        reply = cluster.orchestrate(f"- jobs:\n{steps}")
        assert JOBS * 2 * SIZE > MAX_FRAME
        yield cluster, reply
    finally:
        cluster.stop()


def test_list_export_and_job_info_read_back_every_result(
    big: tuple[Cluster, dict[str, Any]],
) -> None:
    cluster, _ = big
    listed = cluster.json("manage", "--list-jobs")
    assert len(listed) == JOBS and all(row["success"] == 2 for row in listed)
    path = cluster.root / "export.json"
    proc = cluster.run("manage", "--export-jobs", str(path))
    assert f"exported {JOBS} jobs" in proc.stdout
    exported = json.loads(path.read_text())
    assert [job["id"] for job in exported] == [row["id"] for row in listed]
    for i, job in enumerate(exported):
        for node in ("node0", "node1"):
            assert job["results"][node]["stdout"] == "a" * SIZE + f"\n{i}\n"
    info = cluster.json("manage", "--job-info", listed[3]["id"])
    assert sorted(info["results"]) == ["node0", "node1"]


def test_a_replay_of_every_result_is_sent_in_frames_that_fit(
    big: tuple[Cluster, dict[str, Any]],
) -> None:
    cluster, _ = big
    parent = cluster.json("manage", "--list-jobs")[0]["parent_id"]

    async def replay() -> list[int]:
        async with APIClient(cluster.socket_path) as client:
            return [
                len(event.result["stdout"])
                async for event in client.watch(parents=[parent])
                if event.ev == "result"
            ]

    sizes = asyncio.run(replay())
    assert len(sizes) == JOBS * 2 and min(sizes) > SIZE


def test_a_client_asking_for_everything_at_once_is_told_why_not(
    big: tuple[Cluster, dict[str, Any]],
) -> None:
    cluster, _ = big

    async def unpaged() -> Any:
        async with APIClient(cluster.socket_path) as client:
            with pytest.raises(ProtocolError) as refused:
                await client.call("jobs", {"full": True})  # as a client before pages asked
            assert isinstance(refused.value, APIError)
            assert "answer to 'jobs' is too large to send" in str(refused.value)
            assert "asks for it in pages" in str(refused.value)
            return await client.call("ping")  # the same connection goes on

    assert asyncio.run(unpaged())
    assert "too large to send" in cluster.log("server").read_text()
