"""A fake node speaking the wire protocol directly over gRPC, to send what an agent never would."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from directord.config import Settings
from directord.protocol import PROTOCOL_VERSION, decode_batch, encode_batch
from directord.transports.base import Connection
from directord.transports.grpc import GrpcOptions, GrpcTransport

REPLY_TIMEOUT = 30.0


class FakeNode:
    """Just enough of a node: registers, then sends requests and collects replies."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.inbox: list[dict[str, Any]] = []
        self.rid = 0

    async def send(self, *envelopes: dict[str, Any]) -> None:
        await self.conn.send(encode_batch(list(envelopes)))

    async def recv_until(self, match: Any) -> dict[str, Any]:
        """Read envelopes until one matches; keep the rest in the inbox."""
        for env in self.inbox:
            if match(env):
                self.inbox.remove(env)
                return env
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                for env in decode_batch(await self.conn.recv()):
                    if match(env):
                        return env
                    self.inbox.append(env)

    async def hello(self, identity: str) -> dict[str, Any]:
        await self.send(
            {
                "t": "hello",
                "proto": PROTOCOL_VERSION,
                "identity": identity,
                "machine_id": f"fake-{identity}",
                "version": "0",
                "driver": "grpc",
                "heartbeat_interval": 60.0,
                "host_boot": 0.0,
                "agent_start": time.time(),
                "known": [],
            }
        )
        return await self.recv_until(lambda e: e["t"] in ("welcome", "refuse"))

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """Ask the server something as this node; returns its ``rep``."""
        self.rid += 1
        rid = self.rid
        await self.send({"t": "req", "rid": rid, "m": method, "p": params})
        return await self.recv_until(lambda e: e["t"] == "rep" and e.get("rid") == rid)

    async def chunk(self, **params: Any) -> dict[str, Any]:
        return await self.request("chunk", params)

    async def close(self) -> None:
        await self.conn.close()


async def connect_grpc(port: int) -> Connection:
    """A raw gRPC connection to a server on 127.0.0.1 (no TLS)."""
    options = GrpcOptions(grpc_server_address="127.0.0.1", grpc_port=port)
    transport = GrpcTransport(Settings(), options)
    transport.connect_timeout = 30.0  # a loaded machine may be slow to answer
    return await transport.connect()
