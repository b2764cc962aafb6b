"""Mutable server-side records of nodes, jobs, per-node results and parents.

Each record converts to and from the plain dict the datastore keeps. A stored
dict is checked field by field as it is read back (msgspec): the datastore is
a file or a service, and a record it returns may be damaged or edited.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec

from directord.models import FileRef, JobSpec, State
from directord.protocol import Job

log = logging.getLogger(__name__)
R = TypeVar("R")


def rebuild(kind: Callable[[dict[str, Any]], R], namespace: str, key: str, data: Any) -> R | None:
    """The record stored at ``namespace/key``, or None (logged) if it cannot be read.

    A record that cannot be read is left out and left in the store: the server
    starts without it rather than not at all, and nothing stored is lost.
    """
    try:
        return kind(data)
    except (ValueError, TypeError, KeyError) as exc:  # msgspec.ValidationError is a ValueError
        log.error(
            "datastore: %s/%s cannot be read (%s); left out, and left in the store",
            namespace,
            key,
            exc,
        )
        return None


def _asdict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


@dataclass(slots=True)
class NodeRecord:
    """A node the server knows, online or not."""

    identity: str
    machine_id: str = ""
    version: str = ""
    driver: str = ""
    heartbeat_interval: float = 60.0
    host_boot: float = 0.0
    agent_start: float = 0.0
    first_seen: float = 0.0
    last_seen: float = 0.0
    online: bool = False
    peer: str = ""
    #: when the server stops waiting for a node that went down to reboot (0: not rebooting)
    rebooting_until: float = 0.0
    #: ``agent_start`` of the client that ran the REBOOT: another one means it is back
    reboot_agent: float = 0.0

    @property
    def expiry(self) -> float:
        """When the node counts as offline without a further message."""
        return self.last_seen + 3 * self.heartbeat_interval

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the datastore and the API."""
        return _asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NodeRecord:
        """Rebuild from a stored dict, ignoring unknown keys.

        Raises:
            msgspec.ValidationError: a field missing or of the wrong type (named).
        """
        return msgspec.convert(data, cls)


@dataclass(slots=True)
class TargetRecord:
    """One job on one node."""

    job_id: str
    identity: str
    state: State = State.QUEUED
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    exec_time: float | None = None
    roundtrip: float | None = None
    sent: float | None = None
    delivered: float | None = None
    finished: float | None = None
    #: states this target left, oldest first: {state, at, stderr} (a ``lost``
    #: that the node's real result replaced when its agent came back); None while
    #: there is none, as for nearly every target (an empty list each was 15 % of one)
    history: list[dict[str, Any]] | None = None

    @property
    def key(self) -> str:
        """Datastore key."""
        return f"{self.job_id}/{self.identity}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the datastore and the API (explicit: this is the hot path)."""
        return {
            "job_id": self.job_id,
            "identity": self.identity,
            "state": self.state.value,
            "rc": self.rc,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "exec_time": self.exec_time,
            "roundtrip": self.roundtrip,
            "sent": self.sent,
            "delivered": self.delivered,
            "finished": self.finished,
            "history": self.history or [],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TargetRecord:
        """Rebuild from a stored dict, ignoring unknown keys.

        Raises:
            msgspec.ValidationError: a field missing or of the wrong type (named).
        """
        rec = msgspec.convert(data, cls)
        rec.history = rec.history or None
        return rec


class _StoredJob(msgspec.Struct):
    """A job as the datastore keeps it (``JobRecord.to_dict``): what reading one checks.

    Fields later releases added have defaults, and may be null in older stores.
    """

    id: str
    parent_id: str
    parent_name: str
    verb: str
    sha: str
    options: dict[str, Any]
    timeout: float
    run_once: bool
    skip_cache: bool
    lane: str
    stream: bool
    submitted: float
    order: int
    name: str = ""
    vars: dict[str, Any] | None = None
    targets: list[str] | None = None
    files: list[Any] | None = None
    component: Any = None
    query: dict[str, Any] | None = None
    query_done: bool = False
    cancels: dict[str, Any] | None = None


@dataclass(slots=True)
class JobRecord:
    """One job of one orchestration run (its parent), with its targets' results.

    ``spec`` is the job as built once from the submission (verb, options, files
    ...); the record adds where it goes and how it went.
    """

    id: str
    parent_id: str
    parent_name: str
    spec: JobSpec
    lane: str
    stream: bool
    submitted: float
    order: int
    targets: list[str] = field(default_factory=list)
    query: dict[str, Any] = field(default_factory=dict)
    query_done: bool = False
    #: cancels owed to nodes that were away: identity -> [kill, reason]
    cancels: dict[str, list[Any]] = field(default_factory=dict)
    results: dict[str, TargetRecord] = field(default_factory=dict)

    # The spec's fields, read often enough to be named here.
    @property
    def verb(self) -> str:
        """The component verb."""
        return self.spec.verb

    @property
    def sha(self) -> str:
        """The job's fingerprint."""
        return self.spec.sha

    @property
    def options(self) -> dict[str, Any]:
        """The component's parsed options."""
        return self.spec.options

    @property
    def name(self) -> str:
        """The job's name in its orchestration ('' if none)."""
        return self.spec.name

    @property
    def timeout(self) -> float:
        """Seconds the job may run."""
        return self.spec.timeout

    @property
    def files(self) -> tuple[FileRef, ...]:
        """The files the job carries (COPY/ADD), kept in the server's file store."""
        return self.spec.files

    @property
    def done(self) -> bool:
        """True when every target reached a final state."""
        return all(r.state.final for r in self.results.values())

    def message(self) -> Job:
        """The ``job`` message sent to each target (one encoding serves them all)."""
        spec = self.spec
        return Job(
            id=self.id,
            parent=self.parent_id,
            lane=self.lane,
            verb=spec.verb,
            sha=spec.sha,
            options=spec.options,
            timeout=spec.timeout,
            skip_cache=spec.skip_cache,
            stream=self.stream,
            vars=spec.vars,
            files=list(spec.files),
            component=spec.component,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for the datastore (results are stored apart); the spec flattened."""
        spec = self.spec
        return {
            "id": self.id,
            "parent_id": self.parent_id,
            "parent_name": self.parent_name,
            "verb": spec.verb,
            "sha": spec.sha,
            "options": spec.options,
            "vars": spec.vars,
            "timeout": spec.timeout,
            "run_once": spec.run_once,
            "skip_cache": spec.skip_cache,
            "name": spec.name,
            "lane": self.lane,
            "stream": self.stream,
            "submitted": self.submitted,
            "order": self.order,
            "targets": self.targets,
            "files": [f.to_dict() for f in spec.files],
            "component": spec.component.to_dict() if spec.component is not None else None,
            "query": self.query,
            "query_done": self.query_done,
            "cancels": self.cancels,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobRecord:
        """Rebuild from a stored dict (results attached by the caller).

        A file entry stored before files were kept by content (a path, no sha256)
        is dropped: its job can no longer be served, and says so when asked.

        Raises:
            msgspec.ValidationError: a field missing or of the wrong type (named).
            ValueError, TypeError: a file entry that is not one.
        """
        stored = msgspec.convert(data, _StoredJob)
        files = tuple(
            FileRef(str(f["name"]), int(f["size"]), str(f["sha256"]))
            for f in stored.files or ()
            if isinstance(f, dict) and "sha256" in f
        )
        spec = JobSpec(
            verb=stored.verb,
            options=stored.options,
            sha=stored.sha,
            timeout=stored.timeout,
            run_once=stored.run_once,
            skip_cache=stored.skip_cache,
            name=stored.name,
            vars=stored.vars or {},
            files=files,
            component=_component_ref(stored.component),
        )
        return cls(
            id=stored.id,
            parent_id=stored.parent_id,
            parent_name=stored.parent_name,
            spec=spec,
            lane=stored.lane,
            stream=stored.stream,
            submitted=stored.submitted,
            order=stored.order,
            targets=stored.targets or [],
            query=stored.query or {},
            query_done=stored.query_done,
            cancels={
                str(k): [bool(v[0]), str(v[1])]
                for k, v in (stored.cancels or {}).items()
                if isinstance(v, list) and len(v) == 2
            },
        )

    def summary(self) -> dict[str, Any]:
        """One row of ``manage --list-jobs``."""
        states = [r.state for r in self.results.values()]
        times = [r.exec_time for r in self.results.values() if r.exec_time is not None]
        return {
            "id": self.id,
            "parent_id": self.parent_id,
            "parent_name": self.parent_name,
            "name": self.name,
            "verb": self.verb,
            "sha": self.sha,
            "submitted": self.submitted,
            "execution_time": max(times) if times else None,
            "processing": sum(1 for s in states if not s.final),
            "success": sum(1 for s in states if s.ok),
            "failed": sum(1 for s in states if s.final and not s.ok),
            "targets": list(self.targets),
        }

    def info(self, results: Iterable[TargetRecord] | None = None) -> dict[str, Any]:
        """Everything about the job, for ``--job-info`` and watchers.

        ``results``: only these (a page of them); every result by default.
        """
        data = self.to_dict()
        data["files"] = [{"name": f.name, "size": f.size} for f in self.files]
        shown = self.results.values() if results is None else results
        data["results"] = {r.identity: r.to_dict() for r in shown}
        data.update({k: v for k, v in self.summary().items() if k not in data})
        return data


def _component_ref(data: object) -> FileRef | None:
    """The stored file of a job's user component, if it has one (and it is whole)."""
    if not isinstance(data, dict) or not {"name", "size", "sha256"} <= data.keys():
        return None
    return FileRef(str(data["name"]), int(data["size"]), str(data["sha256"]))
