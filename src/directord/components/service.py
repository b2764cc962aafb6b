"""SERVICE: Directord's systemd verb, over systemd's D-Bus API.

``SERVICE: [--restarted | --reloaded | --stopped] [--enable | --disable |
--mask | --unmask] [--daemon-reload] [--retry N] UNIT...``

In Directord's order: daemon-reload, then mask or unmask, then enable or
disable, then start (the default), restart, reload or stop each unit,
waiting for each systemd job's result. A masked unit cannot start, so
``--mask`` alone does not try to (Directord tried, and failed). ``--retry N``
runs the whole again up to N more times while it fails (default 2: three
attempts, as Directord's). Cacheable, as Directord's: an identical SERVICE
job that succeeded is a cache hit unless ``--skip-cache``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.components.unit import to_json, unit_name
from directord.errors import ComponentArgsError

DEFAULT_RETRY = 2


class Service(Component):
    """``SERVICE: [--restarted|--reloaded|--stopped] [--enable|...] UNIT...``."""

    verb: ClassVar[str] = "SERVICE"
    summary: ClassVar[str] = (
        "Ensure systemd units are started (default), restarted, reloaded or stopped, "
        "and enabled, disabled, masked or unmasked (systemd's D-Bus API)."
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        running = parser.add_mutually_exclusive_group()
        running.add_argument("--restarted", action="store_true", help="restart the units")
        running.add_argument("--reloaded", action="store_true", help="reload the units")
        running.add_argument("--stopped", action="store_true", help="stop the units")
        state = parser.add_mutually_exclusive_group()
        state.add_argument("--enable", action="store_true", help="enable the units")
        state.add_argument("--disable", action="store_true", help="disable the units")
        state.add_argument("--mask", action="store_true", help="mask the units")
        state.add_argument("--unmask", action="store_true", help="unmask the units")
        parser.add_argument(
            "--daemon-reload", action="store_true", help="reload systemd's configuration first"
        )
        parser.add_argument(
            "--retry",
            type=int,
            default=DEFAULT_RETRY,
            metavar="N",
            help=f"run again up to N more times while it fails ({DEFAULT_RETRY})",
        )

    def validate(self, options: dict[str, Any]) -> None:
        if not options["argv"]:
            raise ComponentArgsError("SERVICE: expected at least one UNIT")
        if options["retry"] < 0:
            raise ComponentArgsError("SERVICE: --retry must be 0 or more")
        try:
            options["units"] = [unit_name(u) for u in options["argv"]]
        except ComponentArgsError as exc:
            raise ComponentArgsError(str(exc).replace("UNIT:", "SERVICE:", 1)) from None
        if options["stopped"]:
            options["running"] = "stop"
        elif options["restarted"]:
            options["running"] = "restart"
        elif options["reloaded"]:
            options["running"] = "reload"
        else:
            options["running"] = None if options["mask"] else "start"

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        try:
            from directord.agent.systemd import NoSuchUnit, NoSystemd, SystemdError
        except ImportError:
            return Outcome.fail(f"SERVICE: dbus-fast is not installed on {ctx.identity}")
        outcome = Outcome.fail("SERVICE: not run")
        for attempt in range(options["retry"] + 1):
            if attempt:
                await asyncio.sleep(min(2.0**attempt, 10.0))
            try:
                outcome = await _apply(options, ctx)
            except NoSystemd:
                return Outcome.fail(f"no systemd on {ctx.identity}")
            except NoSuchUnit as exc:
                return Outcome.fail(f"no unit {exc.unit} on {ctx.identity}")
            except SystemdError as exc:
                outcome = Outcome.fail(f"SERVICE on {ctx.identity}: {exc}")
            if outcome.state.value == "success":
                break
        return outcome


async def _apply(options: dict[str, Any], ctx: ExecContext) -> Outcome:
    from directord.agent.systemd import NoSuchUnit, SystemdManager

    units: list[str] = options["units"]
    done: dict[str, Any] = {}
    async with SystemdManager(job_timeout=ctx.timeout) as sd:
        if options["daemon_reload"]:
            await sd.daemon_reload()
            done["daemon-reload"] = True
        if not options["unmask"]:
            for unit in units:  # a missing unit is named, not a bare D-Bus error
                if (await sd.unit_status(unit)).load == "not-found":
                    raise NoSuchUnit(unit)
        if options["mask"]:
            done["mask"] = await sd.mask(units)
        elif options["unmask"]:
            done["unmask"] = await sd.unmask(units)
        elif options["enable"]:
            done["enable"] = (await sd.enable(units)).changes
        elif options["disable"]:
            done["disable"] = (await sd.disable(units)).changes
        running = options["running"]
        if running is not None:
            results = {u: await getattr(sd, running)(u) for u in units}
            done[running] = results
            failed = [f"{running} {u}: {r}" for u, r in results.items() if str(r) != "done"]
            if failed:
                outcome = Outcome.fail("\n".join(failed) + "\n")
                outcome.stdout = json.dumps(to_json(done), sort_keys=True) + "\n"
                return outcome
    return Outcome.ok(json.dumps(to_json(done), sort_keys=True) + "\n")
