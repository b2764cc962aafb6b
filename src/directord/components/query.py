"""QUERY and QUERY_WAIT: share a cached arg of every node with the targets.

QUERY KEY: each target reports its cached arg KEY; once every target has
reported (or ended), each target receives every value and stores it as
``query[NODE][KEY]``, so templates read ``{{ query['node0']['KEY'] }}``. By
default the job waits for that exchange; ``--no-wait`` reports and moves on,
the values landing in the cache when they arrive.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError


class Query(Component):
    """``QUERY: [--no-wait] KEY``."""

    verb: ClassVar[str] = "QUERY"
    summary: ClassVar[str] = "Gather cached arg KEY from every target into each one's query cache."

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--no-wait", action="store_true", help="do not wait for the other nodes' values"
        )

    def validate(self, options: dict[str, Any]) -> None:
        if len(options["argv"]) != 1:
            raise ComponentArgsError("QUERY: expected exactly one KEY")

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        key = options["argv"][0]
        value = ctx.args.get(key)
        data = await ctx.query_exchange(value, wait=not options.get("no_wait"))
        if data is None:
            return Outcome.ok(f"reported {key}")
        return Outcome.ok(f"{key} from {len(data)} nodes")


class QueryWait(Component):
    """``QUERY_WAIT: [--query-timeout N] [--identity NODE ...] KEY``."""

    verb: ClassVar[str] = "QUERY_WAIT"
    summary: ClassVar[str] = "Wait until the query cache holds KEY (for the named nodes)."

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--query-timeout", type=float, default=600.0, help="seconds to wait (600)"
        )
        parser.add_argument(
            "--identity",
            action="append",
            default=[],
            help="node whose value must be present (repeatable)",
        )

    def validate(self, options: dict[str, Any]) -> None:
        if len(options["argv"]) != 1:
            raise ComponentArgsError("QUERY_WAIT: expected exactly one KEY")

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        key = options["argv"][0]
        wanted = list(options.get("identity") or [])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(options["query_timeout"])

        def present() -> bool:
            holders = [n for n, v in ctx.query.items() if isinstance(v, dict) and key in v]
            return all(n in holders for n in wanted) if wanted else bool(holders)

        while not present():
            if loop.time() > deadline:
                return Outcome.fail(
                    f"QUERY_WAIT: {key} not in the query cache after {options['query_timeout']:g}s"
                )
            await asyncio.sleep(0.1)
        return Outcome.ok(f"{key} present")
