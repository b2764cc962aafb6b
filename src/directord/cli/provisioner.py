"""``directord provisioner``: run the provisioner, or pause/resume/status/clear the running one."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from typing import Any

from directord.config import Settings
from directord.errors import ServerUnavailable
from directord.log import configure_logging


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Without an action it runs; with one, it talks to the running provisioner."""
    p.add_argument(
        "action",
        nargs="?",
        choices=("run", "pause", "resume", "status", "clear"),
        default="run",
        help="run (default), or pause/resume/status/clear the running provisioner",
    )
    p.add_argument("name", nargs="?", help="with clear: the rejected node to clear")
    p.add_argument("--format", choices=("table", "json"), default="table")


def run_provisioner_command(ns: argparse.Namespace, settings: Settings) -> int:
    """Run the provisioner, or send its control socket one command."""
    if ns.action == "run":
        return _run(settings)
    if ns.action == "clear" and not ns.name:
        print("directord: provisioner clear needs the NAME of a rejected node", file=sys.stderr)
        return 2
    reply = asyncio.run(_control(settings.provisioner_socket, ns.action, ns.name or ""))
    if not reply.get("ok"):
        print(f"directord: {reply.get('error')}", file=sys.stderr)
        return 1
    if ns.format == "json":
        print(json.dumps(reply, indent=2, sort_keys=True))
    else:
        counters = reply.get("counters", {})
        print(f"paused:   {'yes' if reply.get('paused') else 'no'}")
        waiting, busy = len(reply.get("waiting", [])), len(reply.get("busy", []))
        print(f"waiting:  {waiting}   queue: {reply.get('queue')}   busy: {busy}   "
              f"enrolled: {reply.get('enrolled')}")  # fmt: skip
        print("counters: " + ", ".join(f"{k} {v}" for k, v in sorted(counters.items())))
        for name, why in sorted(reply.get("rejected", {}).items()):
            print(f"rejected: {name}: {why}")
    return 0


async def _control(path: str, cmd: str, name: str) -> dict[str, Any]:
    try:
        reader, writer = await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise ServerUnavailable(
            f"no provisioner answers at {path}: {exc.strerror or exc}"
        ) from None
    writer.write(json.dumps({"cmd": cmd, "name": name}).encode() + b"\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    reply = json.loads(line or b"{}")
    return reply if isinstance(reply, dict) else {"ok": False, "error": "bad reply"}


def _run(settings: Settings) -> int:
    from directord.provisioning.provisioner import run_provisioner

    configure_logging(settings.debug, "directord-provisioner")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_provisioner(settings, stop.wait())

    asyncio.run(main())
    return 0
