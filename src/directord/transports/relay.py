"""Byte relay from an inherited listening socket to a driver's own listener.

gRPC cannot adopt a socket systemd already bound, so under socket activation
the driver listens on a private Unix socket and this relay accepts on the
activated one and copies bytes both ways. TLS, when on, is end to end: the
relay sees only ciphertext.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

log = logging.getLogger(__name__)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def start_relay(sock: socket.socket, target_path: str) -> asyncio.Server:
    """Accept on ``sock`` and connect each peer to the Unix socket ``target_path``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            inner_reader, inner_writer = await asyncio.open_unix_connection(target_path)
        except OSError as exc:
            log.error("relay: cannot reach %s: %s", target_path, exc)
            writer.close()
            return
        await asyncio.gather(_pipe(reader, inner_writer), _pipe(inner_reader, writer))
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    sock.setblocking(False)
    if sock.family == socket.AF_UNIX:
        return await asyncio.start_unix_server(handle, sock=sock)
    return await asyncio.start_server(handle, sock=sock)
