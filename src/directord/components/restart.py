"""RESTART: the client re-executes itself once this job's success is acknowledged.

Works with or without systemd: the process image is replaced in place (same
PID), so a supervisor sees no exit. Jobs queued behind it stay in the journal
and run after the restart, with whatever new configuration or keys the
restarted client now reads (this is how curve keys are rotated).
"""

from __future__ import annotations

from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError


class Restart(Component):
    """``RESTART``."""

    verb: ClassVar[str] = "RESTART"
    summary: ClassVar[str] = "Restart the directord client after reporting success."
    needs_lock: ClassVar[bool] = True

    def validate(self, options: dict[str, Any]) -> None:
        if options["argv"]:
            raise ComponentArgsError("RESTART takes no arguments")

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        ctx.request_restart()
        return Outcome.ok("client restarting")
