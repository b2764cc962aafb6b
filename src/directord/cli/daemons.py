"""``directord server`` and ``directord client``: run until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any

from directord.config import Settings
from directord.log import configure_logging


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run a daemon's main coroutine, on uvloop when it is installed (it is faster)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


def run_server(settings: Settings) -> int:
    """Run the server in the foreground."""
    configure_logging(settings.debug, "directord-server")

    async def main() -> None:
        from directord.config import activation_sockets
        from directord.server.app import Server

        server = Server(settings, activated=activation_sockets())
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            # Inside the try: a start that fails half-way (a bad API certificate after the
            # node listener is up) still closes what did start.
            await server.start()
            await stop.wait()
        finally:
            await server.close()

    run_loop(main())
    return 0


def run_client(settings: Settings) -> int:
    """Run the node agent in the foreground."""
    configure_logging(settings.debug, f"directord-client[{settings.resolved_identity()}]")

    async def main() -> None:
        from directord.agent.app import Agent

        agent = Agent(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        await agent.run()

    run_loop(main())
    return 0
