"""``directord server`` and ``directord client``: run until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
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
    """Run the node agent in the foreground (in provisioning mode first, if asked)."""
    configure_logging(settings.debug, f"directord-client[{settings.resolved_identity()}]")
    if settings.provision:
        return _provision(settings)

    async def main() -> None:
        from directord.agent.app import Agent
        from directord.provisioning import renewal

        agent = Agent(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)

        def renew() -> None:
            reprovision.append(True)
            agent.stop()

        renewing = asyncio.create_task(renewal.watch(settings, renew))
        try:
            await agent.run()
        finally:
            renewing.cancel()

    reprovision: list[bool] = []
    run_loop(main())
    if reprovision:
        # The certificate nears expiry: the same configuration, in provisioning mode.
        argv = [sys.executable, "-m", "directord", "--config-file", settings.config_file,
                "client", "--provision"]  # fmt: skip
        os.execv(sys.executable, argv)
    return 0


def _provision(settings: Settings) -> int:
    """Provisioning mode: wait for the provisioner, then become a client of the cluster."""
    from directord.provisioning.node import ProvisioningNode, Restart, restart_as_client

    node = ProvisioningNode(settings)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        await node.run()

    try:
        asyncio.run(main())
    except Restart:
        restart_as_client(settings.config_file)
    except asyncio.CancelledError:
        return 0
    return 0
