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
import logging
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome, ServerHook, ServerJob
from directord.errors import ComponentArgsError
from directord.protocol import QueryData, encoded_size

log = logging.getLogger(__name__)


class QueryServer(ServerHook):
    """Gathers each target's QUERY value, then sends all of them to every target.

    "All" means once every target has reported, or has ended without reporting.
    """

    def on_report(self, node: str, job: ServerJob, value: Any) -> None:
        size = encoded_size(value)
        limit = self.ctx.query_max_bytes
        if size > limit:
            log.error(
                "node %s reported a QUERY value of %d bytes for job %s, over the %d byte limit "
                "(--query-max-bytes); its target fails",
                node,
                size,
                job.id,
                limit,
            )
            self.ctx.fail(
                node,
                job,
                f"QUERY value of {size} bytes is over the limit of {limit} (--query-max-bytes)",
            )
            return
        job.query[node] = value
        self.ctx.store(job)
        if job.query_done:
            self.ctx.send(node, self._data(job))  # a late report gets everyone's values
        else:
            self.on_target_final(job)

    def on_target_final(self, job: ServerJob) -> None:
        if job.query_done:
            return
        if all(node in job.query or target.state.final for node, target in job.results.items()):
            job.query_done = True
            self.ctx.store(job)
            data = self._data(job)
            for node in job.results:
                self.ctx.send(node, data)

    @staticmethod
    def _data(job: ServerJob) -> QueryData:
        key = job.options["argv"][0]
        return QueryData(id=job.id, data={node: {key: value} for node, value in job.query.items()})


class Query(Component):
    """``QUERY: [--no-wait] KEY``."""

    verb: ClassVar[str] = "QUERY"
    server_hook: ClassVar[type[ServerHook] | None] = QueryServer
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
