"""What the user API answers: one handler per method, in a table.

Every handler takes the call's parameters and the calling connection (its
uploads) and returns plain data; a ``DirectordError`` it raises goes back to
the caller typed. ``watch`` streams events instead of one reply.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from directord import __version__
from directord.errors import ConfigError, ProtocolError
from directord.protocol import ApiEvent, Message
from directord.server import analysis
from directord.server.filestore import FileStore, UploadSession
from directord.server.jobs import JobBook
from directord.server.nodes import NodeRegistry
from directord.server.paging import in_pages, start_of, take_page
from directord.server.persist import Persister
from directord.server.records import JobRecord
from directord.server.submit import Submissions

Handler = Callable[[dict[str, Any], UploadSession], Awaitable[Any]]
#: Writes a batch of messages to the caller and waits until it is sent.
Send = Callable[[list[Message]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ApiParts:
    """The parts of the server the API reads and drives."""

    nodes: NodeRegistry
    jobs: JobBook
    persister: Persister
    files: FileStore
    submissions: Submissions
    #: where the server listens for nodes (for ``ping``)
    address: Callable[[], str]
    #: cancels jobs (Dispatcher.cancel)
    cancel: Callable[..., dict[str, dict[str, str]]]


class ApiMethods:
    """The API's methods."""

    def __init__(self, parts: ApiParts) -> None:
        self.parts = parts
        self.table: dict[str, Handler] = {
            "ping": self.ping,
            "submit": self.submit,
            "file_put": self.file_put,
            "nodes": self.nodes,
            "jobs": self.jobs,
            "job_info": self.job_info,
            "parent_info": self.parent_info,
            "purge_jobs": self.purge_jobs,
            "purge_nodes": self.purge_nodes,
            "analyze": self.analyze,
            "cancel": self.cancel,
        }

    async def call(self, method: str, params: dict[str, Any], uploads: UploadSession) -> Any:
        """Run one method.

        Raises:
            ProtocolError: no such method.
            DirectordError: the method refused (bad parameters, unknown job ...).
        """
        handler = self.table.get(method)
        if handler is None:
            raise ProtocolError(f"unknown API method {method[:80]!r}")
        return await handler(params, uploads)

    async def ping(self, params: dict[str, Any], uploads: UploadSession) -> dict[str, Any]:
        return {"version": __version__, "address": self.parts.address()}

    async def submit(self, params: dict[str, Any], uploads: UploadSession) -> dict[str, Any]:
        return await self.parts.submissions.submit(params, frozenset(uploads.proven))

    async def file_put(self, params: dict[str, Any], uploads: UploadSession) -> dict[str, Any]:
        """One piece of a file for a COPY/ADD job, uploaded by the submitting user."""
        return uploads.put(
            params.get("sha256"), params.get("size"), params.get("offset"), params.get("data")
        )

    async def nodes(self, params: dict[str, Any], uploads: UploadSession) -> list[dict[str, Any]]:
        return self.parts.nodes.listing()

    async def jobs(self, params: dict[str, Any], uploads: UploadSession) -> Any:
        book = self.parts.jobs
        keep = _job_filter(params.get("filter"))
        row = JobRecord.info if params.get("full") else JobRecord.summary
        if "from" not in params:  # a client from before pages: everything, if it fits a frame
            return [row(j) for j in book.jobs.values() if keep(j)]
        rows, next_page = take_page(
            (job.order, row(job)) for job in book.jobs_from(start_of(params)) if keep(job)
        )
        return {"jobs": rows, "next": next_page}

    async def job_info(self, params: dict[str, Any], uploads: UploadSession) -> Any:
        job = self.parts.jobs.resolve(str(params.get("id", "")))
        if job is None:
            raise ConfigError(f"no job {params.get('id')!r}", key="job-info")
        if "from" not in params:  # a client from before pages
            return job.info()
        first = start_of(params)
        targets = list(job.results.values())
        shown, next_page = take_page(
            (index, targets[index].to_dict()) for index in range(first, len(targets))
        )
        info = job.info(results=())
        info["results"] = {r["identity"]: r for r in shown}
        return {"job": info, "next": next_page}

    async def parent_info(self, params: dict[str, Any], uploads: UploadSession) -> dict[str, Any]:
        book = self.parts.jobs
        parent = book.parents.get(str(params.get("id", "")))
        if parent is None:
            raise ConfigError(f"no orchestration {params.get('id')!r}", key="parent")
        return {
            **parent.to_dict(),
            "job_info": [book.jobs[j].info() for j in parent.jobs if j in book.jobs],
        }

    async def purge_jobs(self, params: dict[str, Any], uploads: UploadSession) -> dict[str, Any]:
        count = self.parts.jobs.purge()
        await self.parts.persister.drain()
        # Uploaded files that no remaining job carries go too.
        self.parts.files.keep_only(
            f.sha256 for job in self.parts.jobs.jobs.values() for f in job.files
        )
        return {"purged": count}

    async def purge_nodes(self, params: dict[str, Any], uploads: UploadSession) -> dict[str, Any]:
        count = self.parts.nodes.purge_offline()
        await self.parts.persister.drain()
        return {"purged": count}

    async def analyze(self, params: dict[str, Any], uploads: UploadSession) -> dict[str, Any]:
        book = self.parts.jobs
        if params.get("job"):
            job = book.resolve(str(params["job"]))
            if job is None:
                raise ConfigError(f"no job {params['job']!r}", key="analyze-job")
            return analysis.analyze([job])
        if params.get("parent"):
            wanted = str(params["parent"])
            parent = book.parents.get(wanted)
            if parent is None:
                matches = [p for k, p in book.parents.items() if k.startswith(wanted)]
                parent = matches[0] if len(matches) == 1 else None
            if parent is None:
                raise ConfigError(f"no orchestration {wanted!r}", key="analyze-parent")
            return analysis.analyze([book.jobs[j] for j in parent.jobs if j in book.jobs])
        return analysis.analyze(list(book.jobs.values()))

    async def cancel(self, params: dict[str, Any], uploads: UploadSession) -> dict[str, Any]:
        """Cancel jobs (``jobs``: ids or prefixes) or whole orchestration runs (``parents``)."""
        book = self.parts.jobs
        job_ids: list[str] = []
        for wanted in _listed(params.get("jobs")):
            job = book.resolve(str(wanted))
            if job is None:
                raise ConfigError(f"no job {wanted!r}", key="cancel-job")
            job_ids.append(job.id)
        for wanted in _listed(params.get("parents")):
            parent = book.parents.get(str(wanted))
            if parent is None:
                matches = [p for k, p in book.parents.items() if k.startswith(str(wanted))]
                parent = matches[0] if len(matches) == 1 else None
            if parent is None:
                raise ConfigError(f"no orchestration {wanted!r}", key="cancel-parent")
            job_ids.extend(j for j in parent.jobs if j in book.jobs)
        kill = params.get("kill", True) is not False
        reason = "cancelled by an operator" + ("" if kill else " (running jobs left to finish)")
        return {"cancelled": self.parts.cancel(job_ids, kill=kill, reason=reason)}

    async def watch(self, rid: int | None, params: dict[str, Any], send: Send) -> None:
        """Stream the results (and output) of jobs until every one has ended."""
        book = self.parts.jobs
        job_ids = [str(j) for j in _listed(params.get("jobs"))]
        for parent_id in _listed(params.get("parents")):
            parent = book.parents.get(str(parent_id))
            if parent is not None:
                job_ids.extend(parent.jobs)
        watcher = book.watch(job_ids, bool(params.get("output")), bool(params.get("summary")))
        try:
            while True:
                events = watcher.take()
                for page in in_pages(events):  # a replay of many results outgrows a frame
                    await send([ApiEvent(rid=rid, **event) for event in page])
                if not watcher.pending and not watcher.events:
                    break
                await watcher.wake.wait()
            await send([ApiEvent(rid=rid, ev="done")])
        finally:
            book.unwatch(watcher)


def _job_filter(wanted: object) -> Callable[[JobRecord], bool]:
    """Which jobs a ``jobs`` call with ``filter`` lists.

    Raises:
        ConfigError: an unknown filter.
    """
    if not wanted:
        return lambda job: True
    if wanted == "success":
        return lambda job: bool(job.results) and all(t.state.ok for t in job.results.values())
    if wanted == "failed":
        return lambda job: any(t.state.final and not t.state.ok for t in job.results.values())
    if wanted == "processing":
        return lambda job: any(not t.state.final for t in job.results.values())
    raise ConfigError(f"unknown filter {wanted!r} (success, failed, processing)", key="filter")


def _listed(value: object) -> Iterable[object]:
    return value if isinstance(value, list) else ()
