"""A damaged datastore record: the server starts without it, says which, and keeps it.

The datastore is a file or a service: a record read back may have been cut,
edited by hand, or written by something else. Each is checked field by field;
one that cannot be read is named in an error (namespace, key, field) and left
out, the rest of the history is served, and nothing stored is lost.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from directord.config import Settings
from directord.connect import APIClient
from directord.datastores.sqlite import SqliteDatastore
from directord.server.app import Server
from directord.transports.memory import MemoryTransport
from tests.inprocess import cluster

DAMAGED: dict[str, dict[str, Any]] = {
    "jobs": {
        "no-verb": {"id": "no-verb", "order": 50},
        "bad-order": {"id": "bad-order", "order": "first"},
    },
    "results": {"x/node0": {"job_id": "x", "identity": "node0", "state": "exploded"}},
    "parents": {"bad-parent": {"jobs": 7}},
    "nodes": {"node9": {"identity": "node9", "last_seen": "yesterday"}},
}
WHY = {
    "jobs/no-verb": "missing required field `parent_id`",
    "jobs/bad-order": "got `str` - at `$.order`",
    "results/x/node0": "Invalid enum value 'exploded' - at `$.state`",
    "parents/bad-parent": "- at `$.jobs`",
    "nodes/node9": "got `str` - at `$.last_seen`",
}


async def scan_all(url: str) -> dict[str, dict[str, Any]]:
    store = SqliteDatastore(url)
    await store.start()
    try:
        return {ns: await store.scan(ns) for ns in DAMAGED}
    finally:
        await store.close()


def test_a_damaged_record_is_named_left_out_and_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite://{tmp_path / 'directord.db'}"

    async def scenario() -> None:
        # A real history first: one job that ran on node0.
        async with cluster(tmp_path, nodes=1, datastore=url) as c:
            parents, _ = await c.run("- jobs:\n    - RUN: echo kept\n")
        [good] = parents[0]["jobs"]
        store = SqliteDatastore(url)
        await store.start()
        await store.apply(DAMAGED)
        await store.close()
        before = await scan_all(url)

        server = Server(
            Settings(datastore=url, socket_path=str(tmp_path / "again.sock")),
            transport=MemoryTransport(Settings(), hub="damaged"),
        )
        with caplog.at_level(logging.ERROR, logger="directord.server.records"):
            await server.start()
        try:
            async with APIClient(str(tmp_path / "again.sock")) as client:
                assert [row["id"] for row in await client.jobs()] == [good]
                info = await client.job_info(good)
                assert info["results"]["node0"]["stdout"] == "kept\n"
                assert [n["identity"] for n in await client.call("nodes")] == ["node0"]
        finally:
            await server.close()
        assert await scan_all(url) == before  # nothing stored was lost or rewritten

    asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    for where, why in WHY.items():
        [line] = [e for e in errors if f"datastore: {where} cannot be read" in e]
        assert why in line and "left out, and left in the store" in line, line
