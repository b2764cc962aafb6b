"""UNIT: manage systemd units on the node through systemd's D-Bus API.

``directord units ACTION NODE ...`` submits a UNIT job to each node it names;
the job talks to the node's systemd (``org.freedesktop.systemd1``) with
:class:`directord.agent.systemd.SystemdManager`, never by parsing
``systemctl`` output. Its stdout is one JSON document, which the CLI and
the library read back; ``monitor`` prints one JSON line per state change.

Actions (the forms ``bluechictl`` and ``systemctl`` users know)::

    list [--filter GLOB]                 list-unit-files [--filter GLOB]
    status UNIT...                       start|stop|restart|reload UNIT...
    enable|disable [--now] UNIT...       daemon-reload
    kill [--signal N] [--whom W] UNIT    reset-failed [UNIT...]
    freeze|thaw UNIT                     monitor [GLOB...]

Every UNIT job runs, never a cache hit: units change under it.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import fnmatch
import json
import re
import shlex
import signal as signals
from collections.abc import Sequence
from datetime import datetime
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError

#: Actions, and how many unit names each takes: (at least, at most or None).
ACTIONS: dict[str, tuple[int, int | None]] = {
    "list": (0, 0),
    "list-unit-files": (0, 0),
    "status": (1, None),
    "start": (1, None),
    "stop": (1, None),
    "restart": (1, None),
    "reload": (1, None),
    "enable": (1, None),
    "disable": (1, None),
    "daemon-reload": (0, 0),
    "kill": (1, 1),
    "reset-failed": (0, None),
    "freeze": (1, 1),
    "thaw": (1, 1),
    "monitor": (0, None),
}
JOB_ACTIONS = ("start", "stop", "restart", "reload")
UNIT_TYPES = (
    "service", "socket", "device", "mount", "automount", "swap",
    "target", "path", "timer", "slice", "scope",
)  # fmt: skip
# systemd's unit name characters (plus the glob characters where globs are allowed).
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.\\@-]{1,255}")
_UNIT_GLOB = re.compile(r"[A-Za-z0-9:_.\\@*?\[\]-]{1,255}")
LOG_LINES = 10


def unit_name(word: str, *, glob: bool = False) -> str:
    """A unit name as systemd wants it: ``web`` becomes ``web.service``, as systemctl does.

    Raises:
        ComponentArgsError: not a unit name (or glob): an option, a path, shell text.
    """
    pattern = _UNIT_GLOB if glob else _UNIT_NAME
    if word.startswith("-") or not pattern.fullmatch(word):
        what = "unit name or glob" if glob else "unit name"
        raise ComponentArgsError(f"UNIT: {word!r} is not a {what}")
    if glob or word.rsplit(".", 1)[-1] in UNIT_TYPES:
        return word
    return f"{word}.service"


def signal_number(text: str) -> int:
    """``9``, ``KILL`` or ``SIGKILL`` to a signal number."""
    if text.isdigit():
        number = int(text)
        if 0 < number < signals.NSIG:
            return number
    else:
        name = text.upper() if text.upper().startswith("SIG") else f"SIG{text.upper()}"
        found = getattr(signals.Signals, name, None)
        if found is not None:
            return int(found)
    raise ComponentArgsError(f"UNIT: --signal {text!r} is not a signal")


def to_json(value: Any) -> Any:
    """Dataclasses, datetimes and enums as JSON values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


class Unit(Component):
    """``UNIT: ACTION [options] [UNIT...]``."""

    verb: ClassVar[str] = "UNIT"
    summary: ClassVar[str] = (
        "Manage systemd units through systemd's D-Bus API (list, status, start, stop, "
        "restart, reload, enable, disable, daemon-reload, kill, reset-failed, freeze, "
        "thaw, monitor); the CLI's `directord units`."
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--filter", metavar="GLOB", help="list: only units matching GLOB")
        parser.add_argument("--now", action="store_true", help="enable/disable: also start/stop")
        parser.add_argument("--signal", default="15", help="kill: signal number or name (15)")
        parser.add_argument(
            "--whom", choices=("main", "control", "all"), default="all", help="kill: which (all)"
        )

    def validate(self, options: dict[str, Any]) -> None:
        argv: list[str] = options["argv"]
        if not argv or argv[0] not in ACTIONS:
            raise ComponentArgsError(
                f"UNIT: the first word is the action, one of {', '.join(ACTIONS)}"
            )
        action, names = argv[0], argv[1:]
        least, most = ACTIONS[action]
        if len(names) < least or (most is not None and len(names) > most):
            count = str(least) if least == most else f"at least {least}"
            if most is not None and least != most:
                count = f"at most {most}"
            raise ComponentArgsError(f"UNIT {action}: takes {count} unit name(s)")
        glob = action == "monitor"
        options["action"] = action
        options["units"] = [unit_name(n, glob=glob) for n in names]
        if options.get("filter"):
            unit_name(options["filter"], glob=True)
        options["signal_number"] = signal_number(str(options["signal"]))
        options["skip_cache"] = True

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        try:
            from directord.agent.systemd import NoSuchUnit, NoSystemd, SystemdError
        except ImportError:
            return Outcome.fail(
                f"UNIT: dbus-fast is not installed on {ctx.identity} (pip install dbus-fast)"
            )
        try:
            return await _run(options, ctx)
        except NoSystemd:
            return Outcome.fail(f"no systemd on {ctx.identity}")
        except NoSuchUnit as exc:
            return Outcome.fail(f"no unit {exc.unit} on {ctx.identity}")
        except SystemdError as exc:
            return Outcome.fail(f"UNIT {options['action']} on {ctx.identity}: {exc}")


async def _run(options: dict[str, Any], ctx: ExecContext) -> Outcome:
    from directord.agent.systemd import NoSuchUnit, SystemdManager

    action: str = options["action"]
    units: list[str] = options["units"]
    async with SystemdManager(job_timeout=ctx.timeout) as sd:
        if action in ("list", "list-unit-files"):
            rows: Sequence[Any] = (
                await sd.list_units() if action == "list" else await sd.list_unit_files()
            )
            glob = options.get("filter")
            chosen = [r for r in rows if not glob or fnmatch.fnmatchcase(r.unit, glob)]
            return _json({"units": sorted(chosen, key=lambda r: r.unit)})
        if action == "status":
            statuses = [await sd.unit_status(u) for u in units]
            return _json({"units": statuses})
        if action == "monitor":
            return await _monitor(sd, units, ctx)
        if action in JOB_ACTIONS:
            results = {u: await getattr(sd, action)(u) for u in units}
            return await _jobs_outcome(action, {"jobs": results}, results, ctx)
        if action in ("enable", "disable"):
            for u in units:  # a missing unit file is named, not a bare D-Bus error
                if (await sd.unit_status(u)).load == "not-found":
                    raise NoSuchUnit(u)
            changed = await getattr(sd, action)(units, now=options["now"])
            results = dict(changed.jobs)
            document = {"changes": changed.changes, "jobs": results}
            return await _jobs_outcome("start" if action == "enable" else "stop", document,
                                       results, ctx)  # fmt: skip
        if action == "daemon-reload":
            await sd.daemon_reload()
        elif action == "kill":
            await sd.kill(units[0], options["whom"], options["signal_number"])
        elif action == "reset-failed":
            targets: list[str | None] = list(units) or [None]  # None: every failed unit
            for target in targets:
                await sd.reset_failed(target)
        elif action == "freeze":
            await sd.freeze(units[0])
        elif action == "thaw":
            await sd.thaw(units[0])
        return _json({"done": action, "units": units})


def _json(document: dict[str, Any]) -> Outcome:
    return Outcome.ok(json.dumps(to_json(document), sort_keys=True) + "\n")


async def _jobs_outcome(
    action: str, document: dict[str, Any], results: dict[str, Any], ctx: ExecContext
) -> Outcome:
    """Success when every systemd job ended ``done``; else the results and the logs."""
    stdout = json.dumps(to_json(document), sort_keys=True) + "\n"
    failed = {u: str(r) for u, r in results.items() if str(r) != "done"}
    if not failed:
        return Outcome.ok(stdout)
    lines = [f"{action} {u}: {r}" for u, r in failed.items()]
    for unit in failed:
        journal = await ctx.run_shell(
            f"journalctl --no-pager -o short-iso -n {LOG_LINES} -u {shlex.quote(unit)}",
            timeout=10,
        )
        tail = [line for line in journal.stdout.splitlines() if line.strip()]
        if tail:
            lines.append(f"last log lines of {unit}:")
            lines.extend(f"  {line}" for line in tail[-LOG_LINES:])
    outcome = Outcome.fail("\n".join(lines) + "\n")
    outcome.stdout = stdout
    return outcome


async def _monitor(sd: Any, patterns: list[str], ctx: ExecContext) -> Outcome:
    """Print the watched units' states, then each change, until the job's timeout."""
    count = 0
    try:
        async with asyncio.timeout(ctx.timeout):
            async with sd.watch(patterns, replay=True) as changes:
                async for change in changes:
                    ctx.output_line("stdout", json.dumps(to_json(change), sort_keys=True))
                    count += 1
    except TimeoutError:
        pass
    return Outcome.ok(json.dumps({"done": "monitor", "changes": count}) + "\n")
