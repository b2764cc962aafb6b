"""A server and its agents in one event loop, joined by the memory transport.

The job rules (order, parent failure, cache, run-once, timeouts, jobs for an
absent node, QUERY) live in the server and the agent, not in any driver: here
they are checked in well under a second each, with real components, real
shells, a real API socket and a real node cache, and nothing mocked but the
wire. The real-process suite (tests/e2e) still runs every driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from directord.agent.app import Agent
from directord.config import Settings
from directord.connect import APIClient, collect, submit
from directord.orchestration import load_text
from directord.server.app import Server
from directord.transports.memory import MemoryTransport

T = TypeVar("T")
TIMEOUT = 20.0


class InProcessCluster:
    """One server and some agents on a private memory hub."""

    def __init__(
        self, root: Path, nodes: int = 2, heartbeat: float = 1.0, **server_options: Any
    ) -> None:
        self.root = root
        self.hub = uuid.uuid4().hex
        self.heartbeat = heartbeat
        self.socket_path = str(root / "api.sock")
        self.server = Server(
            Settings(
                socket_path=self.socket_path,
                heartbeat_interval=heartbeat,
                **{"datastore": "memory", **server_options},
            ),
            transport=MemoryTransport(Settings(), hub=self.hub),
        )
        self.agents: dict[str, Agent] = {}
        self._runs: dict[str, asyncio.Task[None]] = {}
        self.identities = [f"node{i}" for i in range(nodes)]

    async def start(self) -> None:
        await self.server.start()
        for identity in self.identities:
            await self.start_agent(identity)

    async def start_agent(self, identity: str, **options: Any) -> Agent:
        """Start (or restart, with its journal) one agent; returns once it registered."""
        settings = Settings(
            identity=identity,
            cache_path=str(self.root / "cache" / identity),
            heartbeat_interval=self.heartbeat,
            **options,
        )
        agent = Agent(settings, transport=MemoryTransport(settings, hub=self.hub))
        self.agents[identity] = agent
        self._runs[identity] = asyncio.create_task(agent.run(), name=f"agent {identity}")
        await until(lambda: agent.registered > 0, f"{identity} to register")
        return agent

    async def stop_agent(self, identity: str) -> None:
        """Stop one agent cleanly (its journal stays)."""
        self.agents[identity].stop()
        await asyncio.wait_for(self._runs.pop(identity), TIMEOUT)
        await until(lambda: identity not in self.server.nodes.sessions, f"{identity} to be offline")

    async def close(self) -> None:
        for identity in list(self._runs):
            with contextlib.suppress(Exception):
                await self.stop_agent(identity)
        await self.server.close()

    async def run(
        self, yaml_text: str, *, wait: bool = True, **options: Any
    ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        """Submit an orchestration (file text); with ``wait``, its results by job and node."""
        async with APIClient(self.socket_path) as client:
            parents = await submit(client, load_text(yaml_text, "test.yaml"), **options)
            if not wait:
                return parents, {}
            results = await asyncio.wait_for(collect(client, [p["id"] for p in parents]), TIMEOUT)
        return parents, results

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        async with APIClient(self.socket_path) as client:
            return await client.call(method, params)


async def until(probe: Callable[[], Any], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``probe`` until it is truthy; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def cluster(
    root: Path, nodes: int = 2, heartbeat: float = 1.0, **server_options: Any
) -> AsyncIterator[InProcessCluster]:
    c = InProcessCluster(root, nodes, heartbeat, **server_options)
    try:
        await c.start()
        yield c
    finally:
        await c.close()


def run(root: Path, scenario: Callable[[InProcessCluster], Awaitable[T]], nodes: int = 2) -> T:
    """Run ``scenario`` against a fresh in-process cluster of ``nodes`` agents."""

    async def main() -> T:
        async with cluster(root, nodes) as c:
            return await scenario(c)

    return asyncio.run(main())


def states(results: dict[str, dict[str, Any]], job_id: str) -> dict[str, str]:
    """``{node: state}`` of one job."""
    return {node: r["state"] for node, r in results[job_id].items()}
