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
     |    +-- JobTimeout             a job ran past its timeout
     +-- SecurityError
     |    +-- CertificateError       unreadable, invalid, expired or revoked certificate/key
     |    +-- UntrustedValueError    another node's value would render unsafe into a job
     |                               (also a ComponentError: the job fails)
     +-- MissingDependencyError      an optional driver library is not installed

Errors worth retrying also subclass :class:`RetryableError`; the reconnect
loops check ``isinstance(exc, RetryableError)``.
"""

from __future__ import annotations


class DirectordError(Exception):
    """Root of every error directord raises on purpose."""


class RetryableError(DirectordError):
    """Mixin marker: the operation may succeed if tried again later."""


class ConfigError(DirectordError, ValueError):
    """An option has a bad value, or a config file is malformed.

    Attributes:
        key: the option or key at fault, if known.
        source: the file or env var it came from, if known.
    """

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

    def __init__(self, message: str, *, path: str = "<input>", line: int | None = None):
        self.path = path
        self.line = line
        self.detail = message
        loc = f"{path}:{line}" if line is not None else path
        super().__init__(f"{loc}: {message}")


class ComponentError(DirectordError):
    """A component failed in a way that is not a job failure."""


class ComponentArgsError(ComponentError, ValueError):
    """A component's arguments could not be parsed."""


class TransportError(DirectordError):
    """Base for driver-level failures; no library exception leaves a driver."""


class ConnectError(TransportError, RetryableError, ConnectionError):
    """The peer could not be reached."""


class ConnectionLost(TransportError, RetryableError, ConnectionError):
    """An established connection broke."""


class ProtocolError(TransportError):
    """A peer sent something that is not a valid directord message."""


class Refused(TransportError, RetryableError):
    """The server refused this client (identity in use, not allowed, ...)."""


class DatastoreError(DirectordError):
    """The datastore failed or holds data this version cannot read."""


class APIError(DirectordError):
    """The server answered a user-API request with an error.

    Attributes:
        kind: the server-side error class name (e.g. ``OrchestrationError``).
    """

    def __init__(self, message: str, *, kind: str = "APIError"):
        self.kind = kind
        super().__init__(message)


class ServerUnavailable(APIError, ConnectionError):
    """The server's API socket could not be reached."""


class JobError(DirectordError):
    """A job could not be run."""


class JobTimeout(JobError, TimeoutError):
    """A job ran past its timeout and its process group was killed."""


class SecurityError(DirectordError):
    """A credential or a peer failed a security check."""


class CertificateError(SecurityError, ValueError):
    """A certificate, key, CSR or CRL is unreadable, invalid, expired or revoked."""


class MissingDependencyError(DirectordError, ImportError):
    """An optional library for the selected driver is not installed."""


class UntrustedValueError(SecurityError, ComponentError):
    """A value another node reported would render as unsafe text into a job.

    Attributes:
        node: the node the value came from.
        key: the QUERY key it was reported under.
        reason: what makes it unsafe (the first unsafe character, or a leading ``-``).
    """

    def __init__(self, node: str, key: str, reason: str) -> None:
        self.node = node
        self.key = key
        self.reason = reason
        # ascii() keeps the message on one line whatever the names hold.
        super().__init__(
            f"untrusted value from node {node!a}, query key {key!a}, {reason}: "
            f"render it with '| quote', or with '| trust' if you are sure it is safe"
        )
