"""QUEUESENTINEL: cancel every job still waiting on the node, at once.

It runs as soon as the node receives it, past the lanes (a node busy with a
long queue still obeys it at once). Every job waiting in a lane there ends
``cancelled``, naming this job as the reason; jobs already running are left
alone (``manage --cancel-job`` kills those).
"""

from __future__ import annotations

from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError


class QueueSentinel(Component):
    """``QUEUESENTINEL``."""

    verb: ClassVar[str] = "QUEUESENTINEL"
    summary: ClassVar[str] = "Cancel every job still waiting on the node, at once."

    def validate(self, options: dict[str, Any]) -> None:
        # Directord's takes one word ("activate the queue sentinel"): accepted, unused.
        if len(options["argv"]) > 1:
            raise ComponentArgsError("QUEUESENTINEL takes at most one (unused) argument")

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        cancelled = ctx.cancel_waiting()
        return Outcome.ok(f"cancelled {cancelled} waiting jobs")
