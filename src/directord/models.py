"""Value and wire types shared by server, agent and user side."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, TypedDict


class State(enum.StrEnum):
    """Where one job stands on one node. The last seven are final."""

    QUEUED = "queued"  # accepted by the server, not yet acknowledged by the node
    DELIVERED = "delivered"  # the node acknowledged it has the job
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"  # ran past --timeout; its process group was killed
    SKIPPED_CACHE = "skipped-cache"  # already succeeded on this node (cache hit)
    SKIPPED_PARENT = "skipped-parent"  # an earlier job of the same orchestration failed here
    UNDELIVERED = "undelivered"  # the node stayed offline until the job's deadline
    LOST = "lost"  # the node vanished while the job was delivered/running

    @property
    def final(self) -> bool:
        """True once no further change can happen."""
        return self not in (State.QUEUED, State.DELIVERED)

    @property
    def ok(self) -> bool:
        """True for outcomes that count as success for ``--wait``."""
        return self in (State.SUCCESS, State.SKIPPED_CACHE)


# Option keys that change how a job is run this time, not what it is: they do
# not enter the job's fingerprint, so `--skip-cache` re-runs update the same
# cache entry.
TRANSIENT_OPTIONS = frozenset({"skip_cache", "ignore_cache", "force_lock", "exec_help"})


def job_sha(verb: str, options: dict[str, Any], timeout: float, run_once: bool) -> str:
    """SHA3-224 over a job's definition, before targets and ids are added."""
    body = {k: v for k, v in options.items() if k not in TRANSIENT_OPTIONS}
    blob = json.dumps(
        {"verb": verb, "options": body, "timeout": timeout, "run_once": run_once},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha3_224(blob.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A validated job, ready to be submitted; built by ``components.build_job``."""

    verb: str
    options: dict[str, Any]
    sha: str
    timeout: float
    run_once: bool
    skip_cache: bool
    name: str = ""
    assign: tuple[str, ...] = ()
    vars: dict[str, Any] = field(default_factory=dict)


class JobWire(TypedDict, total=False):
    """A job as sent to a node in a ``job`` envelope."""

    t: str
    id: str
    parent: str
    lane: str  # "" = the node's serial lane; otherwise the async parent's own lane
    verb: str
    sha: str
    options: dict[str, Any]
    vars: dict[str, Any]
    timeout: float
    skip_cache: bool
    stream: bool
    files: list[dict[str, Any]]


class ResultWire(TypedDict, total=False):
    """A node's report of one job, in a ``result`` envelope."""

    t: str
    id: str
    state: str
    rc: int | None
    stdout: str
    stderr: str
    started: float
    finished: float
    exec_time: float
