"""Value and wire types shared by server, agent and user side."""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import dataclass, field
from typing import Annotated, Any, TypedDict

import msgspec


class State(enum.StrEnum):
    """Where one job stands on one node. The last eight are final."""

    QUEUED = "queued"  # accepted by the server, not yet acknowledged by the node
    DELIVERED = "delivered"  # the node acknowledged it has the job
    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"  # ran past --timeout; its process group was killed
    SKIPPED_CACHE = "skipped-cache"  # already succeeded on this node (cache hit)
    SKIPPED_PARENT = "skipped-parent"  # an earlier job of the same orchestration failed here
    UNDELIVERED = "undelivered"  # the node stayed offline until the job's deadline
    LOST = "lost"  # the outcome cannot be known: no process and no exit status left
    CANCELLED = "cancelled"  # stopped on purpose before or while it ran

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


# A file name, never a path: no "/", no NUL, not "." or "..".
FILE_NAME = r"^(?!\.\.?$)[^/\x00]+$"


class FileRef(msgspec.Struct, frozen=True):
    """A file a job carries (COPY/ADD): what the node fetches, checks and names.

    The server knows a file only by these three; its content is uploaded by the
    user who submits the job and kept by SHA-256 (server/filestore.py). The
    bounds hold wherever one is decoded (``msgspec.convert``), so a name from a
    request can never be a path.
    """

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=FILE_NAME)]
    size: Annotated[int, msgspec.Meta(ge=0)]
    sha256: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]

    def to_dict(self) -> dict[str, Any]:
        """Wire and API form."""
        return {"name": self.name, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A job's file on the submitting machine, read there with the submitter's rights."""

    path: str
    ref: FileRef


def job_sha(
    verb: str,
    options: dict[str, Any],
    timeout: float,
    run_once: bool,
    files: tuple[FileRef, ...] = (),
) -> str:
    """SHA3-224 over a job's definition (its files by content), before targets and ids."""
    body = {k: v for k, v in options.items() if k not in TRANSIENT_OPTIONS}
    definition: dict[str, Any] = {
        "verb": verb,
        "options": body,
        "timeout": timeout,
        "run_once": run_once,
    }
    if files:
        definition["files"] = [f.to_dict() for f in files]
    blob = json.dumps(definition, sort_keys=True, separators=(",", ":"), default=str)
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
    #: the job's files; ``sources`` says where they are on the submitting machine
    files: tuple[FileRef, ...] = ()
    sources: tuple[SourceFile, ...] = ()
    #: a user's component: the file the server ships to the nodes
    component: FileRef | None = None


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
