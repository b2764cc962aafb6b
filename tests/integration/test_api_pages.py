"""Long API answers come in pages, and a client puts them back together.

With pages of a few items (the sizes are patched small), a history of jobs and
a job's results from several nodes take several pages each: the client gets
every job and every result, in order, whatever filter it asks for.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from directord.connect import APIClient
from directord.errors import ConfigError, ProtocolError
from directord.protocol import FROM_USER, ApiReply, FrameDecoder, frame
from directord.server import paging
from tests.inprocess import InProcessCluster, run

JOBS = 7  # the fifth fails on every node


@pytest.fixture(autouse=True)
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paging, "PAGE_ITEMS", 2)


async def history(c: InProcessCluster) -> list[str]:
    # One orchestration each: the failure skips nothing after it.
    text = "".join(
        f"- jobs:\n    - RUN: {'exit 3' if i == 4 else f'echo {i}'}\n" for i in range(JOBS)
    )
    parents, _ = await c.run(text)
    return [job for parent in parents for job in parent["jobs"]]


def test_every_job_comes_back_in_order_across_pages(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        ids = await history(c)
        async with APIClient(c.socket_path) as client:
            first = await client.call("jobs", {"from": 0})
            assert len(first["jobs"]) == 2 and first["next"] is not None  # it was paged
            assert [row["id"] for row in await client.jobs()] == ids
            assert await client.jobs() == await client.call("jobs")  # as one unpaged answer
            assert [row["id"] for row in await client.jobs("failed")] == [ids[4]]
            assert [r["id"] for r in await client.jobs("success")] == ids[:4] + ids[5:]
            assert await client.jobs("processing") == []
            full = await client.jobs(full=True)
            assert [row["id"] for row in full] == ids
            assert full[0]["results"]["node1"]["stdout"] == "0\n"

    run(tmp_path, scenario, nodes=2)


def test_a_jobs_results_come_back_whole_across_pages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(paging, "PAGE_ITEMS", 1)

    async def scenario(c: InProcessCluster) -> None:
        ids = await history(c)
        async with APIClient(c.socket_path) as client:
            first = await client.call("job_info", {"id": ids[1], "from": 0})
            assert len(first["job"]["results"]) == 1 and first["next"] == 1
            info = await client.job_info(ids[1][:8])  # a prefix resolves, later pages too
            assert info == await client.call("job_info", {"id": ids[1]})
            assert {n: r["stdout"] for n, r in info["results"].items()} == {
                "node0": "1\n",
                "node1": "1\n",
                "node2": "1\n",
            }
            assert info["success"] == 3 and info["id"] == ids[1]

    run(tmp_path, scenario, nodes=3)


def test_a_page_start_that_is_not_a_count_is_refused(tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        [job_id, *_] = await history(c)
        async with APIClient(c.socket_path) as client:
            for method, params in (("jobs", {}), ("job_info", {"id": job_id})):
                with pytest.raises(ConfigError, match="from: expected an integer >= 0"):
                    await client.call(method, {**params, "from": -1})
            with pytest.raises(ConfigError, match="unknown filter 'nope'"):
                await client.jobs("nope")
            assert len(await client.jobs()) == JOBS  # the connection still serves

    run(tmp_path, scenario, nodes=1)


# ---- a server that pages wrongly ------------------------------------------------------------

HOSTILE_PAGES = {
    "next-repeats": {"jobs": [{"id": "a"}], "next": 0},  # would be asked for ever
    "next-goes-back": {"jobs": [], "next": -5},
    "next-not-a-number": {"jobs": [], "next": "1"},
    "jobs-not-a-list": {"jobs": {"id": "a"}, "next": None},
    "job-without-results": {"job": {"id": "a"}, "next": None},
    "job-next-repeats": {"job": {"id": "a", "results": {}}, "next": 0},
}


@pytest.mark.parametrize("case", sorted(HOSTILE_PAGES))
def test_a_client_refuses_pages_that_do_not_add_up(tmp_path: Path, case: str) -> None:
    path = str(tmp_path / "fake.sock")
    asked: list[dict[str, Any]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder(FROM_USER)
        while data := await reader.read(65536):
            for batch in decoder.feed(data):
                for request in batch:
                    asked.append(request.params)
                    reply = ApiReply(rid=request.rid, ok=True, result=HOSTILE_PAGES[case])
                    writer.write(frame([reply]))
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_unix_server(answer, path)
        try:
            async with APIClient(path) as client:
                with pytest.raises(ProtocolError, match=r"the server's (next )?page of"):
                    if "jobs" in HOSTILE_PAGES[case]:
                        await client.jobs()
                    else:
                        await client.job_info("a")
        finally:
            server.close()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert len(asked) <= 2  # refused at once, never looping
