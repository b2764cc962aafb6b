"""RUN: run a shell command with ``/bin/sh -c`` (templated, with cached ENV values)."""

from __future__ import annotations

import argparse
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError


class Run(Component):
    """``RUN: [--no-block] [--retry N] COMMAND``."""

    verb: ClassVar[str] = "RUN"
    summary: ClassVar[str] = "Run a shell command; success is exit status 0."
    positional: ClassVar[str] = "raw"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--no-block", action="store_true", help="start the command detached and succeed at once"
        )
        parser.add_argument(
            "--retry",
            type=int,
            default=0,
            metavar="N",
            help="run again up to N times while it fails",
        )

    def validate(self, options: dict[str, Any]) -> None:
        if not options["argv"]:
            raise ComponentArgsError("RUN: a command is required")
        if options["retry"] < 0:
            raise ComponentArgsError("RUN: --retry must be >= 0")

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        command = ctx.render(options["argv"])
        if options.get("no_block"):
            await ctx.run_shell(command, block=False)
            return Outcome.ok()
        attempts = int(options.get("retry") or 0) + 1
        outcome = Outcome.fail("not run")
        for _ in range(attempts):
            # Durable: the shell outlives an agent restart, which then reports the
            # result of the attempt it re-attached to (no further retries).
            outcome = Outcome.from_process(
                await ctx.run_shell(command, timeout=ctx.timeout, durable=True)
            )
            if outcome.state.ok:
                break
        return outcome
