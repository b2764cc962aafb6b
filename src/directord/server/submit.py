"""Submissions from the user API: check, plan, record, then dispatch.

A submission is decoded into ``SubmitParams`` (a malformed one is refused
naming the field), each job is built once into its JobSpec (never reading a
user's path: a job's files must have been uploaded on the same connection),
targets are resolved (``--target`` > ``assign`` > the orchestration's
``targets`` > every online or rebooting node), and everything is stored before the reply:
a crash right after it loses nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec

from directord.components import build_job
from directord.components.copy import per_node_name
from directord.errors import OrchestrationError
from directord.models import JobSpec
from directord.protocol import JobRequest, OrchestrationRequest, SubmitParams
from directord.server.dispatch import Dispatcher
from directord.server.jobs import JobBook, PlannedJob
from directord.server.nodes import NodeRegistry
from directord.server.persist import Persister

Plan = tuple[str, bool, list[PlannedJob]]


class Submissions:
    """Turns ``submit`` requests into stored, dispatched jobs."""

    def __init__(
        self, nodes: NodeRegistry, jobs: JobBook, persister: Persister, dispatcher: Dispatcher
    ) -> None:
        self._nodes = nodes
        self._jobs = jobs
        self._persister = persister
        self._dispatcher = dispatcher

    async def submit(
        self, params: dict[str, Any], uploaded: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """Validate, record and dispatch orchestrations.

        Args:
            params: the ``submit`` parameters.
            uploaded: SHA-256 of the files the submitting connection uploaded; a job
                may carry only those.

        Raises:
            OrchestrationError: a malformed request, a bad job, an unknown target, no
                node, a file that was not uploaded; nothing is stored then.
        """
        try:
            request = msgspec.convert(params, SubmitParams)
        except msgspec.ValidationError as exc:
            raise OrchestrationError(f"malformed submit request: {exc}", path="<api>") from None
        plans = self._plan(request, uploaded)
        recorded = [
            self._jobs.record(name, is_async, planned, request.stream)
            for name, is_async, planned in plans
        ]
        await self._persister.stored()
        out = []
        for parent, records in recorded:
            self._dispatcher.deliver(records)
            out.append(
                {
                    "id": parent.id,
                    "name": parent.name,
                    "jobs": [j.id for j in records],
                    "targets": sorted({t for j in records for t in j.targets}),
                    "shas": [j.sha for j in records],
                }
            )
        return {"parents": out}

    def _plan(self, request: SubmitParams, uploaded: frozenset[str]) -> list[Plan]:
        known = set(self._nodes.records)
        if not request.orchestrations:
            raise OrchestrationError("no orchestrations given", path="<api>")
        unknown = [t for t in request.targets if t not in known]
        if unknown:
            raise OrchestrationError(
                f"unknown target node(s): {', '.join(unknown)}", path="--target"
            )
        plans = []
        for index, orch in enumerate(request.orchestrations):
            planned = [
                plan
                for j_index, job in enumerate(orch.jobs)
                if (plan := self._plan_job(request, orch, index, j_index, job, uploaded))
            ]
            if planned:
                plans.append((orch.name, orch.is_async or request.force_async, planned))
        if not plans:
            raise OrchestrationError("nothing to run (every job was filtered out)", path="<api>")
        return plans

    def _plan_job(
        self,
        request: SubmitParams,
        orch: OrchestrationRequest,
        o_index: int,
        j_index: int,
        job: JobRequest,
        uploaded: frozenset[str],
    ) -> PlannedJob | None:
        where = orch.source or f"<api>[{o_index}]"
        line = job.line if job.line is not None else j_index + 1
        for ref in job.files:
            if ref.sha256 not in uploaded:
                raise OrchestrationError(
                    f"{ref.name}: its content was not uploaded on this connection",
                    path=where,
                    line=line,
                )
        spec = build_job(
            job.verb,
            job.args,
            job_vars=job.vars,
            name=job.name,
            assign=tuple(job.assign),
            skip_cache=request.ignore_cache,
            prepare=False,
            files=job.files,
            where=where,
            line=line,
        )
        if request.restrict and not any(spec.sha.startswith(r) for r in request.restrict):
            return None
        targets = request.targets or list(spec.assign) or orch.targets or self._nodes.reachable()
        known = self._nodes.records
        missing = [t for t in targets if t not in known]
        if missing:
            raise OrchestrationError(
                f"unknown target node(s): {', '.join(missing)}", path=where, line=job.line
            )
        if not targets:
            raise OrchestrationError("no target nodes: none is online", path=where)
        if spec.run_once:
            targets = targets[:1]
        targets = list(dict.fromkeys(targets))
        return PlannedJob(spec=_own_files_only(spec, targets), targets=targets)


def _own_files_only(spec: JobSpec, targets: list[str]) -> JobSpec:
    """A per-node COPY keeps only its targets' own files: no other node's can be had."""
    if not spec.options.get("per_node"):
        return spec
    src = str(spec.options.get("src", ""))
    names = {per_node_name(src, t) for t in targets}
    return dataclasses.replace(spec, files=tuple(f for f in spec.files if f.name in names))
