"""ECHO: print the (templated) text; the smallest example of a component."""

from __future__ import annotations

from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome


class Echo(Component):
    """``ECHO: TEXT``."""

    verb: ClassVar[str] = "ECHO"
    summary: ClassVar[str] = "Print text on the node (templated)."
    positional: ClassVar[str] = "raw"

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        return Outcome.ok(ctx.render(options["argv"]))
