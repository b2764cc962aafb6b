"""JOB_WAIT: wait until a job (by fingerprint) has ended on the named nodes."""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome, ServerHook, ServerJob
from directord.errors import ComponentArgsError, OrchestrationError
from directord.models import State

log = logging.getLogger(__name__)
POLL = 0.25


class JobWaitServer(ServerHook):
    """Tells a JOB_WAIT's node the states of the job it waits for, and nothing else.

    A node learns only what an operator let it wait for: the asking JOB_WAIT must
    name that fingerprint and those nodes.
    """

    requests: ClassVar[frozenset[str]] = frozenset({"job_status"})

    async def request(
        self, node: str, job: ServerJob, method: str, params: dict[str, Any]
    ) -> dict[str, str | None]:
        sha = params.get("sha")
        identities = params.get("identities")
        named = list(job.options.get("identity") or []) or [node]
        if (
            not isinstance(sha, str)
            or list(job.options.get("argv") or [])[:1] != [sha]
            or not isinstance(identities, list)
            or not set(map(str, identities)) <= set(named)
        ):
            log.warning(
                "node %s asked for the status of job %s on nodes its JOB_WAIT does not name; "
                "refused",
                node,
                str(sha)[:12],
            )
            raise OrchestrationError("this JOB_WAIT does not name that job or node", path="<node>")
        status: dict[str, str | None] = {str(i): None for i in identities}
        for other in self.ctx.jobs_with_sha(sha):
            for identity in status:
                target = other.results.get(identity)
                if status[identity] is None and target is not None and target.state.final:
                    status[identity] = str(target.state)
        return status


class JobWait(Component):
    """``JOB_WAIT: [--job-timeout N] [--identity NODE ...] SHA``."""

    verb: ClassVar[str] = "JOB_WAIT"
    server_hook: ClassVar[type[ServerHook] | None] = JobWaitServer
    summary: ClassVar[str] = "Wait until the job with this SHA ended on the named nodes."

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--job-timeout", type=float, default=600.0, help="seconds to wait (600)"
        )
        parser.add_argument(
            "--identity",
            action="append",
            default=[],
            help="node to wait for (repeatable; default: this node)",
        )

    def validate(self, options: dict[str, Any]) -> None:
        if len(options["argv"]) != 1:
            raise ComponentArgsError("JOB_WAIT: expected exactly one job SHA")

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        sha = options["argv"][0]
        nodes = list(options.get("identity") or []) or [ctx.identity]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(options["job_timeout"])
        while True:
            # The server answers only what this very job (sent to this node) names.
            status = await ctx.request(
                "job_status", {"job": ctx.job_id, "sha": sha, "identities": nodes}
            )
            if all(status.get(n) for n in nodes):
                bad = {n: s for n, s in status.items() if not State(s).ok}
                if bad:
                    return Outcome.fail(
                        "job ended unsuccessfully on: "
                        + ", ".join(f"{n} ({s})" for n, s in sorted(bad.items()))
                    )
                return Outcome.ok(f"job {sha[:12]} ended on {', '.join(nodes)}")
            if loop.time() > deadline:
                waiting = [n for n in nodes if not status.get(n)]
                return Outcome.fail(
                    f"JOB_WAIT: still waiting for {', '.join(waiting)} after "
                    f"{options['job_timeout']:g}s"
                )
            await asyncio.sleep(POLL)
