"""Routes what nodes send about their jobs to the server-side half of each job's component.

A node's request (a file chunk, a job's state) and report (a QUERY value)
each name the job they are for. The router checks that the job targets the
node, then hands the rest to the job's component (``Component.server_hook``):
COPY serves its files, JOB_WAIT the states it waits for, QUERY gathers and
shares values. It also tells the hooks the results nodes report (REBOOT
marks its node rebooting) and when a target ends. It is the hooks'
``ServerContext``: what they may do on the server, and nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from directord.components import get_component, source_content
from directord.components.base import ServerHook, ServerJob
from directord.errors import ComponentArgsError, OrchestrationError
from directord.models import State
from directord.protocol import Message
from directord.server.filestore import FileStore
from directord.server.jobs import JOBS, JobBook
from directord.server.persist import Persister
from directord.server.records import JobRecord

log = logging.getLogger(__name__)
#: Sends a message to a node if it is online now; False when it is not.
Send = Callable[[str, Message], bool]
#: Marks a node rebooting: (identity, seconds until it goes down, when its job started).
MarkRebooting = Callable[[str, float, float | None], None]


class ComponentHooks:
    """The server-side hooks of every component, and the context they act in."""

    def __init__(
        self,
        jobs: JobBook,
        files: FileStore,
        persister: Persister,
        send: Send,
        query_max_bytes: int,
        mark_rebooting: MarkRebooting = lambda *_: None,
    ) -> None:
        self._jobs = jobs
        self._files = files
        self._persister = persister
        self._send = send
        self._query_max_bytes = query_max_bytes
        self._mark_rebooting = mark_rebooting
        self._hooks: dict[str, ServerHook | None] = {}

    # ---- what nodes send ---------------------------------------------------------------------
    async def request(self, node: str, method: str, params: dict[str, Any]) -> Any:
        """Answer a node's request about one of its jobs (``params["job"]``).

        Raises:
            OrchestrationError: no such job for this node, or a request its component
                does not answer; the text goes back to the node.
        """
        job = self._own_job(node, params.get("job"), f"asked {method[:40]!r} about")
        if method == "component":
            return self._component(job)
        hook = self._hook(job.verb)
        if hook is None or method not in hook.requests:
            raise OrchestrationError(f"{job.verb} jobs answer no {method!r} request", path="<node>")
        return await hook.request(node, job, method, params)

    def report(self, node: str, job_id: str, value: Any) -> None:
        """A node's report (a QUERY value) for one of its jobs; refused ones are logged."""
        try:
            job = self._own_job(node, job_id, "reported a value for")
            hook = self._hook(job.verb)
            if hook is None:
                raise OrchestrationError(f"{job.verb} jobs take no reports", path="<node>")
            hook.on_report(node, job, value)
        except OrchestrationError as exc:
            log.warning("node %s: report for job %s refused: %s", node, str(job_id)[:40], exc)

    def on_result(self, node: str, job_id: str, state: State, started: float | None) -> None:
        """A node reported how one of its jobs ended (its target was not final before)."""
        job = self._jobs.jobs.get(job_id)
        hook = self._hook(job.verb) if job is not None else None
        if job is not None and hook is not None:
            hook.on_result(node, job, state, started)

    def on_target_final(self, job_id: str) -> None:
        """A target of the job reached a final state."""
        job = self._jobs.jobs.get(job_id)
        hook = self._hook(job.verb) if job is not None else None
        if job is not None and hook is not None:
            hook.on_target_final(job)

    def _component(self, job: JobRecord) -> dict[str, bytes]:
        """The file of a job's user component, for a node that does not have it yet."""
        ref = job.spec.component
        if ref is None:
            raise OrchestrationError(
                f"{job.verb} is not a component the server ships", path="<node>"
            )
        content = source_content(job.verb, ref.sha256)
        if content is None:
            raise OrchestrationError(
                f"the server no longer has component file {ref.name} as it was for this job"
                " (changed or removed since)",
                path="<node>",
            )
        return {"data": content}

    def _own_job(self, node: str, job_id: object, doing: str) -> JobRecord:
        job = self._jobs.jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None or node not in job.results:
            log.warning("node %s %s job %s, which does not target it; refused", node, doing, job_id)
            raise OrchestrationError("no such job for this node", path="<node>")
        return job

    def _hook(self, verb: str) -> ServerHook | None:
        if verb not in self._hooks:
            try:
                kind = get_component(verb).server_hook
            except ComponentArgsError:  # a verb whose component is gone since
                kind = None
            self._hooks[verb] = kind(self) if kind is not None else None
        return self._hooks[verb]

    # ---- ServerContext: what hooks may do ---------------------------------------------------
    def job(self, job_id: str) -> ServerJob | None:
        return self._jobs.jobs.get(job_id)

    def jobs_with_sha(self, sha: str) -> list[ServerJob]:
        return list(self._jobs.by_sha(sha))

    async def read_file(self, sha256: str, offset: int, size: int) -> bytes:
        return await self._files.read(sha256, offset, size)

    def send(self, identity: str, message: Message) -> None:
        self._send(identity, message)

    def fail(self, identity: str, job: ServerJob, reason: str) -> None:
        target = self._jobs.target_of(job.id, identity)
        if target is not None:
            self._jobs.finish(identity, target, State.FAILED, stderr=reason)
            self.on_target_final(job.id)

    def store(self, job: ServerJob) -> None:
        record = self._jobs.jobs.get(job.id)
        if record is not None:
            self._persister.put(JOBS, record.id, record)

    @property
    def query_max_bytes(self) -> int:
        return self._query_max_bytes

    def mark_rebooting(self, identity: str, seconds: float, started: float | None) -> None:
        self._mark_rebooting(identity, seconds, started)
