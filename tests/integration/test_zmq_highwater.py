"""--zmq-highwater-mark (Directord's flag) reaches both ZeroMQ sockets; a bad value is refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from directord.errors import ConfigError
from directord.transports import Connection
from directord.transports.zmq import ZmqOptions, ZmqTransport
from tests.contract.test_transports import _zmq


def test_the_high_water_mark_is_set_on_the_router_and_the_dealer(tmp_path: Path) -> None:
    async def main() -> tuple[int, int, int, int]:
        async def handler(conn: Connection) -> None:
            await conn.recv()

        server = _zmq(str(tmp_path), zmq_bind_address="127.0.0.1", job_port=0, zmq_highwater_mark=7)
        address = await server.serve(handler)
        port = int(address.rsplit(":", 1)[1])
        client = _zmq(
            str(tmp_path), "n1", zmq_server_address="127.0.0.1", job_port=port, zmq_highwater_mark=9
        )
        try:
            conn = await client.connect()
            sock = conn.sock  # type: ignore[attr-defined]
            figures = (server.router.sndhwm, server.router.rcvhwm, sock.sndhwm, sock.rcvhwm)
            await conn.close()
            return figures
        finally:
            await client.close()
            await server.close()

    assert asyncio.run(asyncio.wait_for(main(), 30)) == (7, 7, 9, 9)


def test_a_negative_high_water_mark_is_refused() -> None:
    with pytest.raises(ConfigError, match="zmq_highwater_mark must be >= 0"):
        ZmqOptions(zmq_highwater_mark=-1).check()
    assert ZmqTransport.options is ZmqOptions
