"""Settings: the one place that reads config files, ``DIRECTORD_*`` env vars and defaults.

Precedence, highest first: command-line flags, environment variables
(``DIRECTORD_<NAME>``), the YAML config file (``/etc/directord/config.yaml``,
or ``--config-file``), then the defaults declared on :class:`Settings`.
Keys of the config file are the option names in snake_case; an unknown key
or a value of the wrong type is a :class:`ConfigError` naming the key and the
file. After :func:`load_settings` returns, nothing else reads the environment.

Secrets need never be on a command line (which every local user can read in
``/proc``): each comes from the environment or from a file (``*_file``
options) that only its owner may read, resolved here into the option the
driver uses.
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints
from urllib.parse import quote, urlsplit, urlunsplit

import yaml

from directord.errors import ConfigError

DEFAULT_CONFIG_FILE = "/etc/directord/config.yaml"
ENV_PREFIX = "DIRECTORD_"
DRIVER_ALIASES = {"grpcd": "grpc", "zeromq": "zmq"}


def _opt(default: Any, help: str, *scopes: str, choices: tuple[str, ...] = ()) -> Any:
    return field(
        default=default,
        metadata={"help": help, "scopes": frozenset(scopes or ("all",)), "choices": choices},
    )


@dataclass(frozen=True, slots=True)
class Settings:
    """Every option directord knows, with its default and help text.

    Scopes say which commands show the flag: ``all``, ``server``, ``client``,
    ``user`` (exec, orchestrate, manage).
    """

    config_file: str = _opt(DEFAULT_CONFIG_FILE, "YAML config file; keys are option names")
    driver: str = _opt("grpc", "messaging driver (grpc, alias grpcd)", "server", "client")
    identity: str = _opt("", "node identity (default: the hostname)", "client")
    debug: bool = _opt(False, "log at DEBUG level")
    heartbeat_interval: float = _opt(
        60.0,
        "seconds between heartbeats; a node silent for 3 intervals is offline",
        "server",
        "client",
    )
    socket_path: str = _opt("/var/run/directord.sock", "the server's user API socket")
    socket_group: str = _opt("", "group owning the API socket (mode 0660)", "server")
    cache_path: str = _opt(
        "/var/cache/directord", "the client's persistent cache directory", "client", "user"
    )
    datastore: str = _opt(
        "sqlite:///var/lib/directord/directord.db",
        "server datastore URL: memory, file:///DIR, sqlite:///FILE, redis[s]://HOST:PORT/DB",
        "server",
    )
    file_store: str = _opt(
        "",
        "directory of the files uploaded for COPY/ADD jobs (default: files/ beside an "
        "sqlite or file datastore, else /var/lib/directord/files)",
        "server",
    )
    machine_id: str = _opt(
        "", "machine id reported by the client (default /etc/machine-id)", "client"
    )
    ready_file: str = _opt(
        "", "write a JSON line here once listening/registered", "server", "client"
    )
    grpc_port: int = _opt(5558, "gRPC server port (0 picks a free port)", "server", "client")
    grpc_bind_address: str = _opt(
        "0.0.0.0", "address the gRPC server binds, or unix:/PATH", "server"
    )
    grpc_server_address: str = _opt(
        "127.0.0.1", "server address clients dial, or unix:/PATH", "client"
    )
    grpc_server_workers: int = _opt(4, "gRPC server worker threads", "server")
    grpc_compression: bool = _opt(
        False,
        "gzip gRPC messages (helps slow links; costs CPU and slows file transfer)",
        "server",
        "client",
    )
    grpc_disable_compression: bool = _opt(
        False,
        "accepted for compatibility: compression is off unless --grpc-compression",
        "server",
        "client",
    )
    grpc_ssl: bool = _opt(False, "enable TLS on the gRPC driver", "server", "client")
    grpc_ssl_ca: str = _opt(
        "/etc/pki/ca-trust/source/anchors/cm-local-ca.pem",
        "CA certificate that signs server and client certificates",
        "server",
        "client",
    )
    grpc_ssl_cert: str = _opt(
        "/etc/directord/grpc/ssl/directord.crt",
        "this side's certificate (server; client with client auth)",
        "server",
        "client",
    )
    grpc_ssl_key: str = _opt(
        "/etc/directord/grpc/ssl/directord.key", "this side's private key", "server", "client"
    )
    grpc_ssl_client_auth: bool = _opt(
        False,
        "require client certificates (mTLS); a client's identity is its certificate's name",
        "server",
        "client",
    )
    grpc_ssl_crl: str = _opt(
        "", "CRL checked at every connection (default: crl.pem beside the CA, if present)", "server"
    )
    zmq_server_address: str = _opt("127.0.0.1", "server address ZeroMQ clients dial", "client")
    zmq_bind_address: str = _opt("0.0.0.0", "address the ZeroMQ server binds", "server")
    job_port: int = _opt(5555, "ZeroMQ port (0 picks a free port)", "server", "client")
    backend_port: int = _opt(
        5556, "accepted for compatibility; the ZeroMQ driver uses one channel", "server", "client"
    )
    zmq_shared_key: str = _opt(
        "", "ZeroMQ shared key: authenticates, does NOT encrypt", "server", "client"
    )
    zmq_shared_key_file: str = _opt(
        "",
        "file holding the ZeroMQ shared key, private to its owner (instead of --zmq-shared-key)",
        "server",
        "client",
    )
    zmq_curve_encryption: bool = _opt(
        False, "ZeroMQ Curve25519 encryption (on by itself when keys exist)", "server", "client"
    )
    zmq_key_dir: str = _opt(
        "/etc/directord", "holds public_keys/ and private_keys/", "server", "client"
    )
    zmq_rotation_grace: float = _opt(
        600.0,
        "seconds a rotated server key waits for clients still on the old key to leave",
        "server",
    )
    broker_namespace: str = _opt(
        "directord",
        "prefix of queue/subject names on a broker (one per cluster)",
        "server",
        "client",
    )
    messaging_url: str = _opt(
        "amqp://guest:guest@127.0.0.1:5672/",
        "RabbitMQ URL for --driver messaging",
        "server",
        "client",
    )
    messaging_password_file: str = _opt(
        "",
        "file holding the RabbitMQ password, private to its owner; replaces the URL's",
        "server",
        "client",
    )
    messaging_ssl: bool = _opt(False, "TLS to RabbitMQ", "server", "client")
    messaging_ssl_ca: str = _opt("", "CA that signed RabbitMQ's certificate", "server", "client")
    messaging_ssl_cert: str = _opt("", "client certificate for RabbitMQ", "server", "client")
    messaging_ssl_key: str = _opt("", "key of --messaging-ssl-cert", "server", "client")
    messaging_queue_ttl: float = _opt(
        3600.0,
        "seconds a node's queue (RabbitMQ) or parked jobs (NATS JetStream) wait for it",
        "server",
        "client",
    )
    messaging_bind_identity: bool = _opt(
        False, "each node logs in to RabbitMQ as its identity; trust nothing else", "server"
    )
    nats_url: str = _opt(
        "nats://127.0.0.1:4222", "NATS server URL(s), comma separated", "server", "client"
    )
    nats_password_file: str = _opt(
        "",
        "file holding the NATS password, private to its owner; replaces each URL's",
        "server",
        "client",
    )
    nats_nkey_seed: str = _opt("", "NKEY seed file for NATS", "server", "client")
    nats_creds: str = _opt("", "NATS .creds file", "server", "client")
    nats_tls: bool = _opt(False, "TLS to NATS", "server", "client")
    nats_tls_ca: str = _opt("", "CA that signed the NATS server's certificate", "server", "client")
    nats_tls_cert: str = _opt("", "client certificate for NATS (mTLS)", "server", "client")
    nats_tls_key: str = _opt("", "key of --nats-tls-cert", "server", "client")
    pki_dir: str = _opt(
        "/etc/directord/pki", "directory of the built-in PKI (directord pki)", "pki"
    )
    allowed_node_names: str = _opt(
        "", "comma-separated identities allowed to register (empty: any)", "server"
    )
    api_bind: str = _opt(
        "",
        "also serve the user API on this TCP address, with TLS and required client certificates",
        "server",
    )
    api_port: int = _opt(5560, "TCP port of the user API (with --api-bind)", "server")
    api_url: str = _opt("", "reach the API at tls://HOST:PORT instead of --socket-path", "user")
    ca: str = _opt("", "CA certificate for the API over TCP", "server", "user")
    cert: str = _opt(
        "", "certificate for the API over TCP (server's, or the user's)", "server", "user"
    )
    key: str = _opt("", "private key for the API over TCP", "server", "user")
    api_idle_timeout: float = _opt(
        300.0,
        "seconds an API connection may send nothing before the server closes it "
        "(0: never); a watch in progress is not idle",
        "server",
    )
    api_max_connections: int = _opt(
        100,
        "API connections open at once, Unix socket and TCP together; more are refused",
        "server",
    )
    query_max_bytes: int = _opt(
        1024 * 1024,
        "largest value a node may report for a QUERY (msgpack bytes); a larger one fails it",
        "server",
    )
    insecure: bool = _opt(
        False,
        "let the server listen without TLS or authentication on a non-loopback address",
        "server",
    )
    job_timeout_grace: float = _opt(
        5.0,
        "seconds beyond a job's timeout before the server calls it lost/undelivered",
        "server",
    )

    def resolved_identity(self) -> str:
        """The node identity: ``--identity`` or the hostname."""
        return self.identity or socket.gethostname()


_HINTS: dict[str, Any] = {}


def _field_types() -> dict[str, type]:
    if not _HINTS:
        _HINTS.update(get_type_hints(Settings))
    return _HINTS


def option_fields() -> tuple[dataclasses.Field[Any], ...]:
    """The declared options, in declaration order."""
    return dataclasses.fields(Settings)


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check (file) or convert (env, flag strings) a value to the option's type."""
    kind = _field_types()[name]
    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        try:
            if kind is bool:
                if text in ("1", "true", "yes", "on"):
                    return True
                if text in ("0", "false", "no", "off", ""):
                    return False
                raise ValueError(value)
            return kind(text)
        except ValueError:
            raise ConfigError(
                f"{name}: expected {kind.__name__}, got {value!r}", key=name, source=source
            ) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(
            f"{name}: expected {kind.__name__}, got {type(value).__name__} {value!r}",
            key=name,
            source=source,
        )
    return value


def read_config_file(path: str, *, required: bool) -> dict[str, Any]:
    """Read and validate a YAML config file.

    Raises:
        ConfigError: the file is unreadable, not a mapping, has an unknown key or a bad type.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        if required:
            raise ConfigError("config file does not exist", source=path) from None
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", source=path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        raise ConfigError(f"invalid YAML: {getattr(exc, 'problem', exc)}", source=where) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("expected a mapping of option names to values", source=path)
    known = _field_types()
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known or name == "config_file":
            raise ConfigError(f"unknown key {key!r}", key=str(key), source=path)
        out[name] = _coerce(name, value, path)
    return out


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Options set as ``DIRECTORD_<NAME>`` environment variables."""
    out: dict[str, Any] = {}
    for name in _field_types():
        var = ENV_PREFIX + name.upper()
        if var in environ:
            out[name] = _coerce(name, environ[var], var)
    return out


SECRET_FILE_LIMIT = 64 * 1024
# A NATS URL carries its password as written (nats-py does not percent-decode it),
# so these would end or split the URL.
_NATS_UNSAFE = frozenset("/?#,[]")


def read_secret_file(key: str, path: str) -> str:
    """The one-line secret in ``path``, named by option ``key``, without its line ending.

    The file must be a regular file of at most 64 KiB, owned by this user or
    root, and private to its owner: group and others have no rights on it.

    Raises:
        ConfigError: any of that is not so, naming the key and the file.
    """
    try:
        # O_NONBLOCK: a FIFO at the path must not hang the start.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read: {exc.strerror}", key=key, source=path) from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        mode = stat.S_IMODE(st.st_mode)
        if not stat.S_ISREG(st.st_mode):
            problem = "not a regular file"
        elif mode & 0o077:
            problem = f"group or others have rights on it (mode {mode:04o}); chmod 600 it"
        elif st.st_uid not in (0, os.getuid()):
            problem = f"owned by uid {st.st_uid}, neither this user nor root"
        else:
            problem = ""
            data = fh.read(SECRET_FILE_LIMIT + 1)
    if problem:
        raise ConfigError(f"{key}: {problem}", key=key, source=path)
    if len(data) > SECRET_FILE_LIMIT:
        raise ConfigError(f"{key}: larger than {SECRET_FILE_LIMIT} bytes", key=key, source=path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: not UTF-8 text", key=key, source=path) from None
    secret = text.removesuffix("\n").removesuffix("\r")
    if not secret or "\n" in secret or "\r" in secret:
        raise ConfigError(f"{key}: expected one line holding the secret", key=key, source=path)
    return secret


def _with_password(url: str, password: str, key: str, file_key: str, path: str) -> str:
    """``url`` with ``password`` for the user it names."""
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    if not at or not user.partition(":")[0]:
        raise ConfigError(
            f"{file_key}: {key} {url.split('@')[-1]!r} names no user for the password",
            key=file_key,
            source=path,
        )
    netloc = f"{user.partition(':')[0]}:{password}@{host}"
    return urlunsplit(parts._replace(netloc=netloc))


def _resolve_secret_files(values: dict[str, Any], *, read: bool) -> None:
    """Read the ``*_file`` secrets into the options the drivers use (only check, unless read)."""
    path = values.get("zmq_shared_key_file")
    if path and values.get("zmq_shared_key"):
        raise ConfigError(
            "zmq_shared_key and zmq_shared_key_file are both set; give one",
            key="zmq_shared_key_file",
        )
    if not read:
        return
    if path:
        values["zmq_shared_key"] = read_secret_file("zmq_shared_key_file", path)
    path = values.get("messaging_password_file")
    if path:
        password = quote(read_secret_file("messaging_password_file", path), safe="")
        url = values.get("messaging_url", Settings().messaging_url)
        values["messaging_url"] = _with_password(
            url, password, "messaging_url", "messaging_password_file", path
        )
    path = values.get("nats_password_file")
    if path:
        password = read_secret_file("nats_password_file", path)
        if _NATS_UNSAFE & set(password) or not password.isprintable():
            raise ConfigError(
                "nats_password_file: a NATS URL cannot carry this password (it holds one of "
                "/ ? # , [ ] or a control character); choose another or use nats_creds",
                key="nats_password_file",
                source=path,
            )
        urls = [u.strip() for u in values.get("nats_url", Settings().nats_url).split(",")]
        values["nats_url"] = ",".join(
            _with_password(u, password, "nats_url", "nats_password_file", path) for u in urls if u
        )


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    secrets: bool = True,
) -> Settings:
    """Resolve settings: flags > env > file > defaults.

    Args:
        flags: options given explicitly on the command line (snake_case names).
        environ: the environment to read; defaults to ``os.environ``.
        secrets: read the secret files (``zmq_shared_key_file``, ...) into the
            options they stand for. Commands that do not connect a driver
            (``exec``, ``manage`` ...) skip them: an operator sharing the
            daemons' config file need not be able to read their secrets.

    Raises:
        ConfigError: a bad value anywhere, naming its source; a secret file
            that is unreadable or open to others.
    """
    flags = dict(flags or {})
    env = read_env(os.environ if environ is None else environ)
    config_file = flags.get("config_file") or env.get("config_file")
    required = config_file is not None
    values = read_config_file(config_file or DEFAULT_CONFIG_FILE, required=required)
    values.update(env)
    for name, value in flags.items():
        values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    if "driver" in values:
        values["driver"] = DRIVER_ALIASES.get(values["driver"], values["driver"])
    if config_file:
        values["config_file"] = config_file
    _resolve_secret_files(values, read=secrets)
    settings = Settings(**values)
    # `not x > 0` also refuses NaN, which would compare false everywhere downstream.
    if not 0 < settings.heartbeat_interval < math.inf:
        raise ConfigError(
            "heartbeat_interval must be a finite number > 0", key="heartbeat_interval"
        )
    return settings


def activation_sockets(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Sockets handed over by systemd socket activation (``LISTEN_FDS``).

    Name them with ``FileDescriptorName=nodes`` and ``FileDescriptorName=api``
    in the .socket units; unnamed, the first is the node listener and the
    second the API socket. Returns ``{"nodes": socket, "api": socket}`` (either
    may be absent). Sockets meant for another process (LISTEN_PID) are ignored.
    """
    import socket as _socket

    env = os.environ if environ is None else environ
    try:
        count = int(env.get("LISTEN_FDS", "0"))
        pid = int(env.get("LISTEN_PID", "0"))
    except ValueError:
        raise ConfigError("LISTEN_FDS/LISTEN_PID are not numbers", source="environment") from None
    if count <= 0 or pid != os.getpid():
        return {}
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    out: dict[str, Any] = {}
    for index in range(count):
        fd = 3 + index
        name = names[index] if index < len(names) else ("nodes", "api")[min(index, 1)]
        if name in ("nodes", "api") and name not in out:
            out[name] = _socket.socket(fileno=fd)
    return out
