"""The whole directord exception tree.

::

    DirectordError
     +-- ConfigError                 bad option, file, env var (names key, file, expected type)
     +-- OrchestrationError          bad orchestration file (names file, line, what is wrong)
     +-- ComponentError
     |    +-- ComponentArgsError     a component's arguments do not parse
     +-- TransportError
     |    +-- ConnectError           cannot reach the peer            (retryable)
     |    +-- ConnectionLost         an established link broke        (retryable)
     |    +-- ProtocolError          garbage, truncated or oversized message
     |    +-- Refused                the peer refused us (identity, version)
     +-- DatastoreError
     +-- APIError                    the server answered a user request with an error
     |    +-- ServerUnavailable      the API socket cannot be reached
     +-- JobError
     |    +-- JobTimeout             a job did not end in time (poll's timeout)
     +-- SecurityError
     |    +-- CertificateError       unreadable, invalid, expired or revoked certificate/key
     |    +-- UntrustedValueError    another node's value would render unsafe into a job
     |                               (also a ComponentError: the job fails)
     +-- ExecHelp                    not a failure: a job asked for --exec-help (carries the text)
     +-- ClusterError                a local cluster's process failed (demo, tests)
     +-- MissingDependencyError      an optional driver library is not installed

Errors worth retrying also subclass :class:`RetryableError`; the reconnect
loops check ``isinstance(exc, RetryableError)``.

Every class has a ``code``. An error the server raises while answering a user
crosses the API as its code and message, and the client raises it again as
that class (mixed with :class:`APIError`, so ``except APIError`` still sees
every refusal): exit codes follow from the type, on both sides of the socket.
"""

from __future__ import annotations

from typing import ClassVar

# Every error class by its code (filled as the classes below are defined).
_BY_CODE: dict[str, type[DirectordError]] = {}


class DirectordError(Exception):
    """Root of every error directord raises on purpose."""

    #: how this error is named on the wire (the API's error replies)
    code: ClassVar[str] = "error"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            _BY_CODE.setdefault(cls.code, cls)


class RetryableError(DirectordError):
    """Mixin marker: the operation may succeed if tried again later."""

    code: ClassVar[str] = "retryable"


class ConfigError(DirectordError, ValueError):
    """An option has a bad value, or a config file is malformed.

    Attributes:
        key: the option or key at fault, if known.
        source: the file or env var it came from, if known.
    """

    code: ClassVar[str] = "config"
    key: str | None = None
    source: str | None = None

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None):
        self.key = key
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{message}")


class OrchestrationError(DirectordError, ValueError):
    """An orchestration file or job definition is invalid.

    Attributes:
        path: file name (or ``<exec>`` / ``<api>``).
        line: 1-based line number, when known.
    """

    code: ClassVar[str] = "orchestration"
    path: str = "<input>"
    line: int | None = None
    detail: str = ""

    def __init__(self, message: str, *, path: str = "<input>", line: int | None = None):
        self.path = path
        self.line = line
        self.detail = message
        loc = f"{path}:{line}" if line is not None else path
        super().__init__(f"{loc}: {message}")


class ComponentError(DirectordError):
    """A component failed in a way that is not a job failure."""

    code: ClassVar[str] = "component"


class ComponentArgsError(ComponentError, ValueError):
    """A component's arguments could not be parsed."""

    code: ClassVar[str] = "component-args"


class TransportError(DirectordError):
    """Base for driver-level failures; no library exception leaves a driver."""

    code: ClassVar[str] = "transport"


class ConnectError(TransportError, RetryableError, ConnectionError):
    """The peer could not be reached."""

    code: ClassVar[str] = "connect"


class ConnectionLost(TransportError, RetryableError, ConnectionError):
    """An established connection broke."""

    code: ClassVar[str] = "connection-lost"


class ProtocolError(TransportError):
    """A peer sent something that is not a valid directord message."""

    code: ClassVar[str] = "protocol"


class Refused(TransportError, RetryableError):
    """The server refused this client (identity in use, not allowed, ...)."""

    code: ClassVar[str] = "refused"


class DatastoreError(DirectordError):
    """The datastore failed or holds data this version cannot read."""

    code: ClassVar[str] = "datastore"


class APIError(DirectordError):
    """The server answered a user-API request with an error.

    Attributes:
        kind: the server-side error class name (e.g. ``OrchestrationError``).
    """

    code: ClassVar[str] = "api"

    def __init__(self, message: str, *, kind: str = "APIError"):
        self.kind = kind
        super().__init__(message)


class ServerUnavailable(APIError, ConnectionError):
    """The server's API socket could not be reached."""

    code: ClassVar[str] = "server-unavailable"


class JobError(DirectordError):
    """A job could not be run."""

    code: ClassVar[str] = "job"


class JobTimeout(JobError, TimeoutError):
    """A job did not end in time: the library's ``poll(timeout=...)`` gave up on it.

    (On a node, a job past its own ``--timeout`` has its process group killed and
    ends in the state ``timeout``: a result, not an exception.)
    """

    code: ClassVar[str] = "job-timeout"


class SecurityError(DirectordError):
    """A credential or a peer failed a security check."""

    code: ClassVar[str] = "security"


class CertificateError(SecurityError, ValueError):
    """A certificate, key, CSR or CRL is unreadable, invalid, expired or revoked."""

    code: ClassVar[str] = "certificate"


class ExecHelp(DirectordError):
    """Not a failure: a job asked for its component's help (``--exec-help``); here it is.

    Attributes:
        text: the help text.
    """

    code: ClassVar[str] = "exec-help"

    def __init__(self, text: str):
        self.text = text
        super().__init__(text)


class ClusterError(DirectordError):
    """A local cluster's process (``directord demo``, the tests) failed to start or died."""

    code: ClassVar[str] = "cluster"


class MissingDependencyError(DirectordError, ImportError):
    """An optional library for the selected driver is not installed."""

    code: ClassVar[str] = "missing-dependency"


class UntrustedValueError(SecurityError, ComponentError):
    """A value another node reported would render as unsafe text into a job.

    Attributes:
        node: the node the value came from.
        key: the QUERY key it was reported under.
        reason: what makes it unsafe (the first unsafe character, or a leading ``-``).
    """

    code: ClassVar[str] = "untrusted-value"
    node: str = ""
    key: str = ""
    reason: str = ""

    def __init__(self, node: str, key: str, reason: str) -> None:
        self.node = node
        self.key = key
        self.reason = reason
        # ascii() keeps the message on one line whatever the names hold.
        super().__init__(
            f"untrusted value from node {node!a}, query key {key!a}, {reason}: "
            f"render it with '| quote', or with '| trust' if you are sure it is safe"
        )


_REMOTE: dict[str, type[APIError]] = {}


def remote_error(code: str, message: str) -> APIError:
    """The error a server's refusal raises on the client: its class by code, and APIError.

    An unknown code (a newer server) gives a plain APIError; ``kind`` is the
    class name either way.
    """
    base = _BY_CODE.get(code)
    if base is None or issubclass(base, APIError):
        return APIError(message, kind=base.__name__ if base is not None else code)
    remote = _REMOTE.get(code)
    if remote is None:
        remote = _REMOTE[code] = type(
            f"Remote{base.__name__}",
            (APIError, base),
            {"__doc__": f"A {base.__name__} the server raised answering this client."},
        )
    error = remote.__new__(remote)
    BaseException.__init__(error, message)  # the server's text as is, no re-formatting
    error.kind = base.__name__
    return error
