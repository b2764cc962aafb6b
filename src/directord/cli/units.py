"""``directord units``: systemd units on the nodes, as ``bluechictl`` manages them."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from directord.cli.render import table, to_json
from directord.config import Settings
from directord.connect import client_for
from directord.units import (
    NodeReply,
    UnitsError,
    monitor,
    online_nodes,
    run_unit_job,
    unit_args,
)

# action -> (takes a NODE first, what the unit words are)
ACTIONS: dict[str, tuple[str, str]] = {
    "list": ("every unit on the nodes named, or on all online nodes", "nodes"),
    "list-unit-files": ("every unit file and its state", "nodes"),
    "status": ("state, main pid, since when, enabled state, last result", "units+"),
    "start": ("start units and wait for systemd's job", "units+"),
    "stop": ("stop units and wait for systemd's job", "units+"),
    "restart": ("restart units and wait for systemd's job", "units+"),
    "reload": ("reload units and wait for systemd's job", "units+"),
    "enable": ("enable unit files (--now: start them too)", "units+"),
    "disable": ("disable unit files (--now: stop them too)", "units+"),
    "daemon-reload": ("reload systemd's configuration", "none"),
    "kill": ("send a signal to a unit's processes", "unit"),
    "reset-failed": ("reset the failed state (of every unit without UNIT)", "units*"),
    "freeze": ("freeze a unit's processes", "unit"),
    "thaw": ("thaw a frozen unit", "unit"),
    "monitor": ("stream unit state changes until Ctrl-C", "monitor"),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One sub-action per systemctl verb."""
    sub = p.add_subparsers(dest="units_action", metavar="ACTION", required=True)
    for action, (text, words) in ACTIONS.items():
        a = sub.add_parser(action, help=text, description=text)
        if words == "nodes":
            a.add_argument("nodes", nargs="*", metavar="NODE", help="default: every online node")
            a.add_argument("--filter", metavar="GLOB", help="only units matching GLOB")
        elif words == "monitor":
            a.add_argument(
                "words",
                nargs="*",
                metavar="NODE|UNIT-GLOB",
                help="nodes (by name) and unit globs; default every online node, every unit",
            )
        else:
            a.add_argument("node", metavar="NODE")
            if words != "none":
                nargs = {"units+": "+", "units*": "*", "unit": None}[words]
                a.add_argument("units", nargs=nargs, metavar="UNIT")
        if action in ("enable", "disable"):
            a.add_argument("--now", action="store_true", help="also start (stop) them")
        if action == "kill":
            a.add_argument("--signal", default="15", metavar="N", help="signal (15)")
            a.add_argument("--whom", choices=("main", "control", "all"), default="all")
        if action != "monitor":
            a.add_argument(
                "--timeout",
                type=float,
                default=600.0,
                metavar="S",
                help="seconds to wait for the nodes and systemd (600)",
            )
        a.add_argument("--format", choices=("table", "json"), default="table")


def run_units(ns: argparse.Namespace, settings: Settings) -> int:
    """Run one units action."""
    try:
        return asyncio.run(_run_until_signal(ns, settings))
    except KeyboardInterrupt:
        return 130


async def _run_until_signal(ns: argparse.Namespace, settings: Settings) -> int:
    """Run the action; SIGINT (Ctrl-C) or SIGTERM stops it cleanly (monitor's only way out).

    The handlers are installed here rather than left to Python: a process started
    in the background by a shell inherits SIGINT ignored, and `monitor` must stop
    on it all the same.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    got: list[int] = []

    def stop(sig: int) -> None:
        got.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await _run(ns, settings)
    except asyncio.CancelledError:
        if not got:
            raise
        return 128 + got[0]
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(ns: argparse.Namespace, settings: Settings) -> int:
    action: str = ns.units_action
    async with client_for(settings) as client:
        if action == "monitor":
            return await _monitor(client, ns)
        if ACTIONS[action][1] == "nodes":
            nodes = await online_nodes(client, ns.nodes)
            if not nodes:
                raise UnitsError("no node is online")
            args = unit_args(action, filter=ns.filter)
        else:
            nodes = await online_nodes(client, [ns.node])
            units = ns.units if isinstance(getattr(ns, "units", None), list) else (
                [ns.units] if getattr(ns, "units", None) else []
            )  # fmt: skip
            options: dict[str, Any] = {}
            if action in ("enable", "disable"):
                options["now"] = ns.now
            if action == "kill":
                options.update(signal=ns.signal, whom=ns.whom)
            args = unit_args(action, units, **options)
        replies = await run_unit_job(client, nodes, args, timeout=ns.timeout)
    _print(action, replies, ns.format)
    failed = [r for r in replies if not r.ok]
    for reply in failed:
        lines = reply.error.splitlines() or [f"failed on {reply.node}"]
        print(f"directord: {reply.node}: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(f"  {line}", file=sys.stderr)
    return 1 if failed else 0


def _print(action: str, replies: list[NodeReply], fmt: str) -> None:
    rows: list[dict[str, Any]] = []
    for reply in replies:
        doc = reply.document
        if action in ("list", "list-unit-files", "status"):
            rows += [{"node": reply.node, **row} for row in doc.get("units", [])]
        elif "jobs" in doc:
            rows += [
                {"node": reply.node, "unit": unit, "result": result}
                for unit, result in doc["jobs"].items()
            ]
        elif doc:
            rows.append({"node": reply.node, **doc})
    if fmt == "json":
        print(to_json(rows))
        return
    if action == "list":
        cols = ["node", "unit", "load", "active", "sub", "description"]
    elif action == "list-unit-files":
        cols = ["node", "unit", "state"]
    elif action == "status":
        cols = ["node", "unit", "active", "sub", "main_pid", "since", "unit_file_state", "result"]
    elif rows and "result" in rows[0]:
        cols = ["node", "unit", "result"]
    else:
        for row in rows:
            print(f"{row['node']}: {row.get('done', action)} {' '.join(row.get('units', []))}")
        return
    if rows:
        print(table([[_cell(row.get(c)) for c in cols] for row in rows], [c.upper() for c in cols]))


def _cell(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


async def _monitor(client: Any, ns: argparse.Namespace) -> int:
    known = {row["identity"] for row in await client.call("nodes")}
    named = [w for w in ns.words if w in known]
    patterns = [w for w in ns.words if w not in known]
    nodes = await online_nodes(client, named) if named else await online_nodes(client)
    if not nodes:
        raise UnitsError("no node is online")
    print(f"monitoring {', '.join(nodes)} ({', '.join(patterns) or 'every unit'}); Ctrl-C stops")
    async for event in monitor(client, nodes, patterns):
        if ns.format == "json":
            print(to_json(_event(event)), flush=True)
        elif event.note:
            print(f"{event.node}  -- {event.note}", flush=True)
        else:
            was = f" (was {event.previous})" if event.previous else ""
            print(f"{event.node}  {event.unit}  {event.active}/{event.sub}{was}", flush=True)
    return 0


def _event(event: Any) -> dict[str, Any]:
    return {k: getattr(event, k) for k in ("node", "unit", "active", "sub", "previous", "note")}
