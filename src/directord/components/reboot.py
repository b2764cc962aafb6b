"""REBOOT: reboot the node; the server keeps its work waiting until it is back.

On the node the job succeeds at once, and nothing further starts there: once
the server has acknowledged the result the client waits SECONDS (10), then
runs the reboot command (``--reboot-command``, ``shutdown -r now``). Jobs it
holds stay in its journal and run when it is back. A reboot command that
fails, or a machine still up ``--timeout`` seconds after it, makes the
client log an error and restart itself instead (as RESTART does), so its
jobs run rather than wait for a reboot that is not coming. A client stopped
during the wait does not reboot.

On the server (:class:`RebootHook`) the node's success marks it
``rebooting`` (``manage --list-nodes``) for SECONDS plus ``--reboot-grace``.
While it is, the node's jobs wait for it past their own deadlines (a job
submitted to every online node also goes to a rebooting one), and a client
of the node that registers anew (a new client process) ends the mark. A
node not back by then has its waiting jobs ended: ``undelivered`` (never
taken) or ``lost`` (held by the node), saying so.

Directord's REBOOT took the same one argument, the seconds to wait.
"""

from __future__ import annotations

from typing import Any, ClassVar

from directord.components.base import (
    Component,
    ExecContext,
    Outcome,
    ServerHook,
    ServerJob,
)
from directord.errors import ComponentArgsError
from directord.models import State

DEFAULT_SECONDS = 10.0
#: A delay over a day is a typo, not a plan.
MAX_SECONDS = 86400.0


class RebootHook(ServerHook):
    """Marks a node rebooting when it reports its REBOOT job's success."""

    def on_result(self, node: str, job: ServerJob, state: State, started: float | None) -> None:
        if state is State.SUCCESS:
            self.ctx.mark_rebooting(node, float(job.options["seconds"]), started)


class Reboot(Component):
    """``REBOOT: [SECONDS]``."""

    verb: ClassVar[str] = "REBOOT"
    summary: ClassVar[str] = (
        "Reboot the node after SECONDS (10); the server keeps its jobs until it is back."
    )
    needs_lock: ClassVar[bool] = True
    server_hook: ClassVar[type[ServerHook] | None] = RebootHook

    def validate(self, options: dict[str, Any]) -> None:
        argv = options["argv"]
        if len(argv) > 1:
            raise ComponentArgsError("REBOOT: expected at most one argument, SECONDS")
        try:
            seconds = float(argv[0]) if argv else DEFAULT_SECONDS
        except ValueError:
            raise ComponentArgsError(f"REBOOT: SECONDS must be a number, not {argv[0]!r}") from None
        # `not a <= x <= b` also refuses NaN, which compares false everywhere.
        if not 0 <= seconds <= MAX_SECONDS:
            raise ComponentArgsError(f"REBOOT: SECONDS must be between 0 and {MAX_SECONDS:g}")
        options["seconds"] = seconds
        # Every REBOOT reboots: an earlier one's success on the node is no cache hit.
        options["skip_cache"] = True

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        seconds = float(options["seconds"])
        ctx.request_reboot(seconds)
        return Outcome.ok(f"rebooting in {seconds:g}s")
