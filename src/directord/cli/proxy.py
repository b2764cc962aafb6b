"""``directord proxy start|stop NODE_UNIT``: what a ``directord-proxy@`` unit runs.

``directord-proxy@db1_postgresql.service.service`` on this node stands for
``postgresql.service`` on node ``db1``: a local unit that ``Wants=`` and
``After=`` it starts only once the remote unit has started. The instance
name is the node, ``_``, then the unit (node names in proxies must not
contain ``_``). The request goes through this node's client to the server,
which allows only the pairs of its ``unit_proxy_allow``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from directord.agent.proxysock import SOCKET_NAME, reachable
from directord.config import Settings
from directord.errors import ConfigError

REPLY_TIMEOUT = 330.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """start|stop and the proxy unit's instance name."""
    p.add_argument("op", choices=("start", "stop"), help="start or stop the remote unit")
    p.add_argument("instance", metavar="NODE_UNIT", help="the node, '_', the unit (%%i)")
    p.add_argument(
        "--run-path",
        default=argparse.SUPPRESS,
        metavar="RUN_PATH",
        help="the client's run directory, where its proxy.sock is (default: the client's)",
    )


def split_instance(instance: str) -> tuple[str, str]:
    """``db1_postgresql.service`` -> (``db1``, ``postgresql.service``)."""
    node, sep, unit = instance.partition("_")
    if not sep or not node or not unit:
        raise ConfigError(f"{instance!r} is not NODE_UNIT (e.g. db1_postgresql.service)")
    return node, unit


def run_proxy(ns: argparse.Namespace, settings: Settings) -> int:
    """Ask the local client; exit 0 when the remote unit's job is ``done``."""
    node, unit = split_instance(ns.instance)
    path = os.path.join(settings.resolved_run_path(), SOCKET_NAME)
    reply = asyncio.run(_ask(path, {"op": ns.op, "node": node, "unit": unit}))
    if not reply.get("ok"):
        print(f"directord proxy: {ns.op} {unit} on {node}: {reply.get('error')}", file=sys.stderr)
        return 1
    result = reply.get("result")
    print(f"{ns.op} {unit} on {node}: {result}")
    if result != "done":
        for line in str(reply.get("error") or "").splitlines():
            print(f"  {line}", file=sys.stderr)
        return 1
    return 0


async def _ask(path: str, request: dict[str, str]) -> dict[str, object]:
    try:
        with reachable(path) as short:
            reader, writer = await asyncio.open_unix_connection(short)
    except OSError as exc:
        raise ConfigError(
            f"cannot reach this node's directord client at {path}: {exc.strerror or exc}"
        ) from None
    try:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
    finally:
        writer.close()
    answer = json.loads(line or b"{}")
    return answer if isinstance(answer, dict) else {"ok": False, "error": "bad reply"}
