"""Every message directord sends, defined once: msgspec Structs in tagged unions.

A message is a msgpack map whose ``t`` key names its kind; messages travel in
batches (a msgpack array). Each side decodes a batch straight into the typed
messages it may receive, so a malformed one fails at decode with the path of
the bad field, and no code outside this package builds or reads a raw map.
Field names on the wire are short where they always were (``m``, ``p``,
``r``, ``s``, ``d``); in code every field has its full name.

Node and server (one session per node)::

    node -> server   Hello, Heartbeat, Ack, Result, Output, Request, ParkedTaken, QueryReport
    server -> node   Welcome, Refuse, Job, ResultAck, Reply, QueryData, Cancel

User and server (the API socket)::

    user -> server   ApiRequest
    server -> user   ApiReply, ApiEvent, Bye

Versioning: ``Hello.proto`` and ``Welcome.proto`` carry the protocol's major
version (PROTOCOL_VERSION); a peer of another major version is refused with a
message saying both. Fields added within a major version have defaults, and
unknown fields are ignored, so a newer minor peer still talks to an older one.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec

from directord.errors import ProtocolError
from directord.models import FileRef, State

PROTOCOL_VERSION = 1
MAX_FRAME = 16 * 1024 * 1024

# Bounds checked at decode: what a peer may claim before anything else looks at it.
Id = Annotated[str, msgspec.Meta(max_length=256)]
Name = Annotated[str, msgspec.Meta(max_length=1024)]
Seconds = Annotated[float, msgspec.Meta(ge=0)]


class Message(msgspec.Struct, tag_field="t", omit_defaults=True, kw_only=True):
    """Base of every message; ``t`` is the kind (the class's tag)."""


# ---- node -> server -------------------------------------------------------------------------
class Hello(Message, tag="hello"):
    """A node's first message: who it is, and which jobs its journal still holds."""

    proto: int
    identity: Name
    machine_id: Name = ""
    version: Name = ""
    driver: Name = ""
    heartbeat_interval: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 60.0
    host_boot: float = 0.0
    agent_start: float = 0.0
    known: list[Id] = []


class Heartbeat(Message, tag="hb"):
    """A sign of life between messages."""


class Ack(Message, tag="ack"):
    """The node holds these jobs (in its journal): the server stops owing them."""

    ids: list[Id]


class Result(Message, tag="result"):
    """How a job ended on the node that sends it."""

    id: Id
    state: State
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""
    started: float | None = None
    exec_time: float | None = None


class Output(Message, tag="out"):
    """One live line of a job's output (``--stream``)."""

    id: Id
    stream: str = msgspec.field(name="s")
    data: str = msgspec.field(name="d")


class Request(Message, tag="req"):
    """A node asks the server something on its own behalf (a file chunk, a job's state)."""

    rid: int
    method: Name = msgspec.field(name="m")
    params: dict[str, Any] = msgspec.field(default_factory=dict, name="p")


class ParkedTaken(Message, tag="parked"):
    """The node took its parked jobs from the broker; these it did not find there."""

    missing: list[Id]


class QueryReport(Message, tag="qrep"):
    """A node's value for a QUERY job."""

    id: Id
    value: Any = None


# ---- server -> node -------------------------------------------------------------------------
class Welcome(Message, tag="welcome"):
    """Registration accepted; ``parked`` lists (job id, message SHA-256) owed in the broker."""

    version: str
    proto: int
    parked: list[tuple[Id, Id]] = []


class Refuse(Message, tag="refuse"):
    """Registration refused, and why; the server then closes."""

    reason: str


class Job(Message, tag="job"):
    """One job for the node that receives it."""

    id: Id
    parent: Id
    lane: Id
    verb: Name
    sha: Id
    options: dict[str, Any]
    timeout: Seconds
    skip_cache: bool = False
    stream: bool = False
    vars: dict[str, Any] = {}
    files: list[FileRef] = []
    #: a user's component: its file, which the node asks the server for (``component``)
    component: FileRef | None = None


class ResultAck(Message, tag="rack"):
    """The server stored these results: the node may forget them."""

    ids: list[Id]


class Reply(Message, tag="rep"):
    """The answer to a node's Request: ``result`` when ``ok``, else ``error``."""

    rid: int
    ok: bool
    result: Any = msgspec.field(default=None, name="r")
    error: str = msgspec.field(default="", name="err")


class QueryData(Message, tag="qdata"):
    """Every target's value of a QUERY job: ``{node: {key: value}}``."""

    id: Id
    data: dict[str, dict[str, Any]]


class Cancel(Message, tag="cancel"):
    """An operator cancelled these jobs: drop them if they wait, kill them if they run.

    With ``kill`` false a running job is left to finish. ``reason`` goes into
    the ``cancelled`` result.
    """

    ids: list[Id]
    kill: bool = True
    reason: Name = ""


# ---- user <-> server (the API) --------------------------------------------------------------
class ApiRequest(Message, tag="req"):
    """A user's call of an API method."""

    rid: int
    method: Name = msgspec.field(name="m")
    params: dict[str, Any] = msgspec.field(default_factory=dict, name="p")


class JobRequest(msgspec.Struct, omit_defaults=True):
    """One job of a submitted orchestration, in the orchestration file's terms."""

    verb: Name
    args: str = ""
    vars: dict[str, Any] | None = None
    name: str = ""
    assign: list[Name] = []
    line: int | None = None
    files: list[FileRef] = []  # found and uploaded by the submitter (COPY/ADD)


class OrchestrationRequest(msgspec.Struct, omit_defaults=True):
    """One orchestration of a submission (``orchestration.load_files`` makes these)."""

    jobs: list[JobRequest]
    name: str = ""
    targets: list[Name] = []
    is_async: bool = msgspec.field(default=False, name="async")
    source: str = ""
    line: int | None = None


class SubmitParams(msgspec.Struct, omit_defaults=True):
    """The parameters of the API's ``submit``."""

    orchestrations: list[OrchestrationRequest]
    targets: list[Name] = []
    restrict: list[str] = []
    ignore_cache: bool = False
    force_async: bool = False
    stream: bool = False


class ErrorInfo(msgspec.Struct, omit_defaults=True):
    """A refused API call: its error's ``code`` and class name (directord.errors), and text."""

    type: str
    msg: str
    code: str = "api"


class ApiReply(Message, tag="rep"):
    """The answer to an ApiRequest: ``result`` when ``ok``, else ``error``."""

    rid: int | None
    ok: bool
    result: Any = msgspec.field(default=None, name="r")
    error: ErrorInfo | None = msgspec.field(default=None, name="err")


class ApiEvent(Message, tag="ev"):
    """One event of a ``watch``: a result, an output line, or ``done``."""

    rid: int | None
    ev: str
    job: str = ""
    node: str = ""
    verb: str = ""
    name: str = ""
    parent: str = ""
    result: dict[str, Any] | None = None
    stream: str = ""
    data: str = ""


class Bye(Message, tag="bye"):
    """The server closes this API connection unread (idle); a request crossing it may go again."""

    reason: str


NodeMessage = Hello | Heartbeat | Ack | Result | Output | Request | ParkedTaken | QueryReport
ServerMessage = Welcome | Refuse | Job | ResultAck | Reply | QueryData | Cancel
ApiServerMessage = ApiReply | ApiEvent | Bye

_ENCODER = msgspec.msgpack.Encoder()
M = TypeVar("M")


class BatchDecoder:
    """Decodes one transport message (a batch) into the messages of one union."""

    def __init__(self, kind: Any, what: str) -> None:
        self._decoder: msgspec.msgpack.Decoder[list[Any]] = msgspec.msgpack.Decoder(list[kind])
        self._single: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(kind)
        self.what = what

    def decode(self, data: bytes) -> list[Any]:
        """The messages of a batch.

        Raises:
            ProtocolError: oversized, not msgpack, not a list, an unknown kind, or a
                field of the wrong type or size (the error names the field's path).
        """
        if len(data) > MAX_FRAME:
            raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_FRAME} byte limit")
        try:
            return self._decoder.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ProtocolError(f"bad {self.what} message: {exc}") from None

    def decode_one(self, data: bytes) -> Any:
        """One message that is not in a batch (a journal entry)."""
        try:
            return self._single.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise ProtocolError(f"bad {self.what} message: {exc}") from None


#: What the server reads from nodes, nodes from the server, users from the server, and back.
FROM_NODE = BatchDecoder(NodeMessage, "node")
FROM_SERVER = BatchDecoder(ServerMessage, "server")
FROM_USER = BatchDecoder(ApiRequest, "API")
FROM_API = BatchDecoder(ApiServerMessage, "API")


def encode(message: msgspec.Struct) -> bytes:
    """One message, to be joined into a batch by ``envelope.join_packed``."""
    return _ENCODER.encode(message)


def encoded_size(value: Any) -> int:
    """Bytes ``value`` takes on the wire (how a QUERY value is measured)."""
    return len(_ENCODER.encode(value))


def to_builtins(message: msgspec.Struct) -> dict[str, Any]:
    """A message as plain data with its wire names (for the datastore and the CLI's JSON)."""
    data: dict[str, Any] = msgspec.to_builtins(message)
    return data
