"""systemd units on the nodes, from the operator's side: ``directord units`` and the library.

Each operation is a UNIT job (see :mod:`directord.components.unit`) sent to
the nodes it names, beside other work (``force_async``), and read back from
the job's results. Being jobs, unit operations go through the same user API
and its rules (operators only), and their timings land in the job history
that ``manage --analyze-*`` reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shlex
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from directord.errors import DirectordError

if TYPE_CHECKING:  # connect imports this module for the library's units methods
    from directord.connect import APIClient

#: How long a monitor job runs on a node before it ends by itself (a year).
MONITOR_SECONDS = 365 * 24 * 3600.0


class UnitsError(DirectordError):
    """A units command cannot run: a node named is unknown or offline."""


@dataclass(slots=True)
class NodeReply:
    """One node's answer to a unit operation.

    Attributes:
        ok: the job succeeded there.
        document: the JSON the node printed (rows, statuses, job results); {} if none.
        error: why it failed (``no systemd on NODE``, the job results and log lines).
    """

    node: str
    ok: bool
    state: str
    document: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def unit_args(action: str, units: Sequence[str] = (), **options: Any) -> str:
    """The argument string of a UNIT job: its options first, then the action and units."""
    words: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        words += [flag] if value is True else [flag, str(value)]
    return shlex.join([*words, action, *units])


async def online_nodes(client: APIClient, names: Sequence[str] = ()) -> list[str]:
    """The nodes named (each must be online), or every online node.

    Raises:
        UnitsError: a node named is unknown or not online.
    """
    rows = {row["identity"]: row for row in await client.call("nodes")}
    if not names:
        return sorted(n for n, row in rows.items() if row["status"] == "online")
    for name in names:
        if name not in rows:
            raise UnitsError(f"unknown node {name}")
        if rows[name]["status"] != "online":
            raise UnitsError(f"node {name} is {rows[name]['status']}")
    return list(dict.fromkeys(names))


async def run_unit_job(
    client: APIClient, nodes: Sequence[str], args: str, *, timeout: float | None = None
) -> list[NodeReply]:
    """Send one UNIT job to ``nodes`` and wait for every node's answer."""
    job_args = args if timeout is None else f"--timeout {timeout:g} {args}"
    orchestration = {
        "name": "units",
        "targets": list(nodes),
        "async": True,
        "source": "<units>",
        "line": 0,
        "jobs": [{"verb": "UNIT", "args": job_args, "vars": {}, "name": "", "assign": []}],
    }
    from directord.connect import submit

    [parent] = await submit(client, [orchestration], targets=list(nodes), force_async=True)
    [job_id] = parent["jobs"]
    async for _ in client.watch(jobs=[job_id], summary=True):
        pass
    info = await client.job_info(job_id)
    return [_reply(node, result) for node, result in sorted(info["results"].items())]


def _reply(node: str, result: dict[str, Any]) -> NodeReply:
    state = str(result.get("state", ""))
    document: dict[str, Any] = {}
    stdout = str(result.get("stdout") or "").strip()
    if stdout:
        try:
            parsed = json.loads(stdout.splitlines()[-1])
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            document = parsed
    error = str(result.get("stderr") or "").strip()
    if state != "success" and not error:
        error = f"the job ended {state} on {node}"
    return NodeReply(node, state == "success", state, document, error)


@dataclass(slots=True)
class MonitorEvent:
    """A line of ``units monitor``: a unit's state on a node, or news of the node."""

    node: str
    unit: str = ""
    active: str = ""
    sub: str = ""
    previous: str | None = None
    note: str = ""


async def monitor(
    client: APIClient, nodes: Sequence[str], patterns: Sequence[str], *, poll: float = 1.0
) -> AsyncGenerator[MonitorEvent, None]:
    """Unit state changes on ``nodes`` until cancelled, or until no node is left to watch.

    Each node runs a UNIT monitor job, which first reports the current state of
    the watched units. When that job is lost (the node's client restarted, or
    the node went away), a note says so and a new job is sent once the node is
    online again, so the watcher is brought up to date instead of holding a
    stale picture. A node that cannot be watched (no systemd there) is named
    in a note and left out. Each node is followed on a connection of its own.
    """
    queue: asyncio.Queue[MonitorEvent | None] = asyncio.Queue()
    args = unit_args("monitor", patterns)
    tasks = [
        asyncio.create_task(_monitor_node(client.clone(), node, args, queue, poll))
        for node in nodes
    ]
    left = len(tasks)
    try:
        while left:
            event = await queue.get()
            if event is None:  # a node's task ended
                left -= 1
            else:
                yield event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _monitor_node(
    client: APIClient, node: str, args: str, queue: asyncio.Queue[MonitorEvent | None], poll: float
) -> None:
    try:
        async with client:
            await _watch_node(client, node, args, queue, poll)
    finally:
        queue.put_nowait(None)


async def _watch_node(
    client: APIClient, node: str, args: str, queue: asyncio.Queue[MonitorEvent | None], poll: float
) -> None:
    from directord.connect import submit

    while True:
        while node not in await online_nodes(client):
            await asyncio.sleep(poll)
        orchestration = {
            "name": "units monitor",
            "targets": [node],
            "async": True,
            "source": "<units>",
            "line": 0,
            "jobs": [
                {
                    "verb": "UNIT",
                    "args": f"--timeout {MONITOR_SECONDS:g} {args}",
                    "vars": {},
                    "name": "",
                    "assign": [],
                }
            ],
        }
        [parent] = await submit(
            client, [orchestration], targets=[node], force_async=True, stream=True
        )
        [job_id] = parent["jobs"]
        try:
            state = await _follow(client, node, job_id, queue)
        except asyncio.CancelledError:
            await _cancel_quietly(client, job_id)
            raise
        if state not in ("lost", "undelivered"):
            await queue.put(MonitorEvent(node, note=f"monitor ended ({state})"))
            return
        await queue.put(MonitorEvent(node, note=f"monitor ended ({state}); waiting for the node"))
        await asyncio.sleep(poll)


async def _follow(
    client: APIClient, node: str, job_id: str, queue: asyncio.Queue[MonitorEvent | None]
) -> str:
    state = "ended"
    async for event in client.watch(jobs=[job_id], output=True):
        if event.ev == "out":
            try:
                change = json.loads(event.data)
            except ValueError:
                continue
            if isinstance(change, dict):
                await queue.put(
                    MonitorEvent(
                        node,
                        str(change.get("unit", "")),
                        str(change.get("active", "")),
                        str(change.get("sub", "")),
                        change.get("previous"),
                    )
                )
        elif event.ev == "result" and event.result is not None:
            state = str(event.result.get("state", state))
            stderr = str(event.result.get("stderr") or "").strip()
            # A lost job is the node's client restarting: the note below says enough.
            if state not in ("success", "lost") and stderr:
                await queue.put(MonitorEvent(node, note=stderr))
    return state


async def _cancel_quietly(client: APIClient, job_id: str) -> None:
    # The watcher is leaving (Ctrl-C): stop the node's monitor job with it. On a new
    # connection: the server answers this one's requests in turn, and it is still
    # serving the watch, which ends only once the job is cancelled.
    with contextlib.suppress(DirectordError, OSError, TimeoutError):
        async with client.clone() as other:
            await asyncio.wait_for(
                other.call("cancel", {"jobs": [job_id], "parents": [], "kill": True}), 10
            )
