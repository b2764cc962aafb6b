"""Settings: the one place that reads config files, ``DIRECTORD_*`` env vars and defaults.

Precedence, highest first: command-line flags, environment variables
(``DIRECTORD_<NAME>``), the YAML config file (``/etc/directord/config.yaml``,
or ``--config-file``), then the defaults the options declare. Keys of the
config file are the option names in snake_case; an unknown key or a value of
the wrong type is a :class:`ConfigError` naming the key and the file. After
:func:`load_settings` returns, nothing else reads the environment.

Options come in two kinds, resolved together:

* :class:`Settings` declares the options common to every driver (identity,
  heartbeat, datastore, the user API ...).
* Each messaging driver declares its own in a :class:`TransportOptions`
  subclass (``GrpcOptions``, ``ZmqOptions`` ...) that its Transport names in
  ``options``. Drivers register in the ``directord.transports`` entry-point
  group, so a third-party driver's options become config keys, env vars and
  flags exactly like the built-ins'. Option names form one namespace: a config
  file may hold keys of several drivers (operators share one file), every
  known driver's keys are checked, and only the selected driver's options
  object goes to the driver.

Secrets need never be on a command line (which every local user can read in
``/proc``): each comes from the environment or from a file (``*_file``
options) that only its owner may read, resolved here into the option the
driver uses (:meth:`TransportOptions.with_secrets`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar, get_type_hints
from urllib.parse import urlsplit, urlunsplit

from directord.errors import ConfigError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

DEFAULT_CONFIG_FILE = "/etc/directord/config.yaml"
ENV_PREFIX = "DIRECTORD_"
DRIVER_ALIASES = {"grpcd": "grpc", "zeromq": "zmq"}
#: The entry-point group drivers register in (name: what ``--driver`` selects).
TRANSPORT_GROUP = "directord.transports"
#: The types an option may have: what a flag, an env var and a YAML scalar can all carry.
OPTION_TYPES: tuple[type, ...] = (str, int, float, bool)

T = TypeVar("T")


def option(default: T, help: str, *scopes: str, choices: tuple[str, ...] = ()) -> T:
    """Declare an option: a dataclass field carrying its default, help text and scopes.

    Used by :class:`Settings` and by every driver's :class:`TransportOptions`.

    Args:
        default: the value when no flag, env var or config key gives one.
        help: the flag's help text.
        scopes: the commands whose flags show it: ``server``, ``client``, ``user``
            (exec, orchestrate, manage), ``pki``; none means every command.
        choices: the accepted values, when they form a closed set.
    """
    return field(
        default=default,
        metadata={"help": help, "scopes": frozenset(scopes or ("all",)), "choices": choices},
    )


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """A driver's options; the base class has none (the memory driver's).

    A driver subclasses it as a frozen, slotted dataclass whose fields are
    :func:`option` s of type str, int, float or bool, and names the class in
    its Transport's ``options``. Each field is a config key, a
    ``DIRECTORD_<NAME>`` env var and a ``--flag``. Names are shared by every
    driver: prefix them with the driver's name. A field of the same name and
    type in two drivers is one option (the broker drivers share
    ``broker_namespace`` so); one that clashes with a common option or with
    another driver's of another type leaves its driver out.
    """

    def check(self) -> None:
        """Refuse values that contradict each other; run for every driver, every command.

        Raises:
            ConfigError: naming the key at fault.
        """

    def with_secrets(self) -> Self:
        """These options with their ``*_file`` secrets read in.

        Only the daemons call it, and only for the selected driver: an operator
        sharing their config file need not be able to read their secrets.

        Raises:
            ConfigError: a secret file is unreadable, open to others or malformed.
        """
        return self


OptionsT = TypeVar("OptionsT", bound=TransportOptions)


@dataclass(frozen=True, slots=True)
class Settings:
    """The options common to every driver, and the drivers' resolved options.

    Scopes say which commands show the flag: ``all``, ``server``, ``client``,
    ``user`` (exec, orchestrate, manage). Each driver's own options are in
    :attr:`transport_options`, one object per known driver; :meth:`options`
    finds one.
    """

    config_file: str = option(DEFAULT_CONFIG_FILE, "YAML config file; keys are option names")
    driver: str = option("grpc", "messaging driver (grpc, alias grpcd)", "server", "client")
    identity: str = option("", "node identity (default: the hostname)", "client")
    debug: bool = option(False, "log at DEBUG level")
    heartbeat_interval: float = option(
        60.0,
        "seconds between heartbeats; a node silent for 3 intervals is offline",
        "server",
        "client",
    )
    socket_path: str = option("/var/run/directord.sock", "the server's user API socket")
    socket_group: str = option("", "group owning the API socket (mode 0660)", "server")
    cache_path: str = option(
        "/var/cache/directord", "the client's persistent cache directory", "client", "user"
    )
    datastore: str = option(
        "sqlite:///var/lib/directord/directord.db",
        "server datastore URL: memory, file:///DIR, sqlite:///FILE, redis[s]://HOST:PORT/DB",
        "server",
    )
    file_store: str = option(
        "",
        "directory of the files uploaded for COPY/ADD jobs (default: files/ beside an "
        "sqlite or file datastore, else /var/lib/directord/files)",
        "server",
    )
    components_path: str = option(
        "/etc/directord/components",
        "directory of your own component files: the server and the CLI read them, and the "
        "server ships each to the nodes that run it",
        "server",
        "client",
        "user",
    )
    local_components: bool = option(
        False,
        "the client also runs component files from its own --components-path (by default "
        "only those its server ships)",
        "client",
    )
    run_path: str = option(
        "",
        "directory where running jobs write their output and exit status, which outlive "
        "the client there; on tmpfs it costs no disk write per job (default: systemd's "
        "$RUNTIME_DIRECTORY, else run/ in --cache-path)",
        "client",
    )
    on_stop: str = option(
        "leave",
        "what a stopping client does with the job processes still running: leave them "
        "to the next client, which reports their results, or kill them (cancelled)",
        "client",
        choices=("leave", "kill"),
    )
    reboot_command: str = option(
        "shutdown -r now",
        "the shell command a REBOOT job runs on the node, after its SECONDS",
        "client",
    )
    machine_id: str = option(
        "", "machine id reported by the client (default /etc/machine-id)", "client"
    )
    ready_file: str = option(
        "", "write a JSON line here once listening/registered", "server", "client", "provisioner"
    )
    pki_dir: str = option(
        "/etc/directord/pki",
        "directory of the built-in PKI (directord pki; a provisioning node's own key and "
        "certificate; the builtin provisioning helper's CA)",
        "pki",
        "client",
        "provisioner",
    )
    allowed_node_names: str = option(
        "", "comma-separated identities allowed to register (empty: any)", "server"
    )
    unit_proxy_allow: str = option(
        "",
        "comma-separated SOURCE>DESTINATION node pairs (globs) whose directord-proxy@ "
        "units may start units on the destination (empty: none)",
        "server",
    )
    api_bind: str = option(
        "",
        "also serve the user API on this TCP address, with TLS and required client certificates",
        "server",
    )
    api_port: int = option(5560, "TCP port of the user API (with --api-bind)", "server")
    api_url: str = option("", "reach the API at tls://HOST:PORT instead of --socket-path", "user")
    ca: str = option("", "CA certificate for the API over TCP", "server", "user")
    cert: str = option(
        "", "certificate for the API over TCP (server's, or the user's)", "server", "user"
    )
    key: str = option("", "private key for the API over TCP", "server", "user")
    api_idle_timeout: float = option(
        300.0,
        "seconds an API connection may send nothing before the server closes it "
        "(0: never); a watch in progress is not idle",
        "server",
    )
    api_max_connections: int = option(
        100,
        "API connections open at once, Unix socket and TCP together; more are refused",
        "server",
    )
    query_max_bytes: int = option(
        1024 * 1024,
        "largest value a node may report for a QUERY (msgpack bytes); a larger one fails it",
        "server",
    )
    insecure: bool = option(
        False,
        "let the server listen without TLS or authentication on a non-loopback address",
        "server",
    )
    job_timeout_grace: float = option(
        5.0,
        "seconds beyond a job's timeout before the server calls it lost/undelivered",
        "server",
    )
    job_retention: float = option(
        7 * 86400.0,
        "seconds the server keeps a job (and its results) after it ended everywhere, in "
        "memory and the datastore; then it forgets it. 0 keeps every job until "
        "`manage --purge-jobs`",
        "server",
    )
    reboot_grace: float = option(
        600.0,
        "seconds past a REBOOT's own that the server waits for the node to come back; its "
        "jobs wait as long, then end undelivered/lost",
        "server",
    )
    # ---- zero-touch enrolment (docs/provisioning.md) --------------------------------
    provision: bool = option(
        False,
        "start in provisioning mode: get a certificate and configuration from the "
        "provisioner, then restart into the cluster",
        "client",
    )
    provisioning_address: str = option(
        "", "the provisioner, HOST:PORT (provisioning mode)", "client"
    )
    provisioning_token: str = option(
        "",
        "the shared token that admits nodes to provisioning (prefer the env var or the "
        "config file: a command line is visible to every local user)",
        "client",
        "provisioner",
    )
    provisioning_ca: str = option(
        "", "CA certificate the provisioner's TLS certificate must chain to", "client"
    )
    provisioning_facts: str = option(
        "", "a JSON or YAML file of facts sent with the announcement", "client"
    )
    reprovision_before: float = option(
        7 * 86400.0,
        "seconds before its certificate expires when a node re-enters provisioning "
        "(each node picks its moment at random in the last half of that window; 0: never)",
        "client",
    )
    helper: str = option(
        "builtin",
        "the provisioning helper: a program, or builtin (signs with --pki-dir)",
        "provisioner",
    )
    provisioning_bind: str = option("0.0.0.0", "address the provisioner listens on", "provisioner")
    provisioning_port: int = option(5570, "port the provisioner listens on", "provisioner")
    provisioning_ssl_cert: str = option(
        "", "the provisioner's TLS certificate (its nodes check it)", "provisioner"
    )
    provisioning_ssl_key: str = option("", "the provisioner's TLS private key", "provisioner")
    provisioner_workers: int = option(8, "nodes provisioned at once", "provisioner")
    helper_timeout: float = option(
        10.0, "seconds a helper may run before the node is deferred", "provisioner"
    )
    metrics_port: int = option(
        0, "serve Prometheus metrics on this port at /metrics (0: off)", "provisioner"
    )
    metrics_bind: str = option("127.0.0.1", "address of the metrics endpoint", "provisioner")
    node_config: str = option(
        "",
        "builtin helper: client config YAML template (Jinja2 over identity and facts)",
        "provisioner",
    )
    provisioning_cert_days: int = option(
        365, "builtin helper: validity of the node certificates it signs", "provisioner"
    )
    provisioner_socket: str = option(
        "/run/directord-provisioner.sock",
        "the running provisioner's control socket (pause, resume, status, clear)",
        "provisioner",
    )
    provisioner_state: str = option(
        "/var/lib/directord/provisioner",
        "where the provisioner keeps enrolled and rejected nodes",
        "provisioner",
    )

    #: every known driver's options, resolved (not an option itself)
    transport_options: tuple[TransportOptions, ...] = ()

    def resolved_identity(self) -> str:
        """The node identity: ``--identity`` or the hostname."""
        return self.identity or socket.gethostname()

    def resolved_run_path(self) -> str:
        """Where running jobs keep their files: ``--run-path``, systemd's, or the cache's."""
        return (
            self.run_path
            or os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
            or str(Path(self.cache_path) / "run")
        )

    def options(self, kind: type[OptionsT]) -> OptionsT:
        """The resolved options of class ``kind``, or its defaults if none were resolved."""
        for opts in self.transport_options:
            if isinstance(opts, kind) and type(opts) is kind:
                return opts
        return kind()


def _is_option(f: dataclasses.Field[Any]) -> bool:
    return "help" in f.metadata


@dataclass(frozen=True, slots=True)
class Drivers:
    """The registered drivers and every option they and :class:`Settings` declare.

    Attributes:
        options: driver name -> its options class, for each driver that loaded.
        problems: driver name -> why it is left out (it failed to import, or its
            options are malformed or clash with others').
        fields: option name -> its declaration: the common options first, then
            the drivers' (built-in drivers first, each group by name).
        types: option name -> its type (one of :data:`OPTION_TYPES`).
    """

    options: Mapping[str, type[TransportOptions]]
    problems: Mapping[str, str]
    fields: Mapping[str, dataclasses.Field[Any]]
    types: Mapping[str, type]


def entry_points(*, group: str) -> list[EntryPoint]:
    """The entry points registered in ``group`` by the installed distributions.

    Tests replace it to register drivers of their own.
    """
    from importlib.metadata import entry_points as installed

    return list(installed(group=group))


def driver_entry_points() -> dict[str, EntryPoint]:
    """The entry points of the ``directord.transports`` group, by driver name."""
    return {ep.name: ep for ep in entry_points(group=TRANSPORT_GROUP)}


def _declaration_problem(
    kind: type[TransportOptions],
    hints: Mapping[str, Any],
    types: Mapping[str, type],
    owners: Mapping[str, str],
) -> str:
    """Why ``kind`` cannot be a driver's options class, or ''."""
    if "__dataclass_fields__" not in vars(kind):
        return f"{kind.__qualname__} is not a dataclass of its own"
    for f in dataclasses.fields(kind):
        kind_of = hints.get(f.name)
        if not _is_option(f):
            return f"option {f.name!r} is not declared with directord.config.option()"
        if kind_of not in OPTION_TYPES:
            return f"option {f.name!r} has type {kind_of!r}; an option is a str, int, float or bool"
        owner = owners.get(f.name)
        if owner == "":
            return f"option {f.name!r} is a common option: a driver may not declare it"
        if owner is not None and types[f.name] is not kind_of:
            return (
                f"option {f.name!r} has type {kind_of.__name__} here, "
                f"{types[f.name].__name__} in driver {owner!r}"
            )
    return ""


@functools.cache
def drivers() -> Drivers:
    """Load every registered driver once; its options class tells its options.

    A driver module must import without its library (pyzmq, aio-pika ...): the
    library is imported when the driver is built, so only the selected driver's
    is. A driver that fails to load is left out and its options are unknown;
    selecting it reports why.
    """
    common = {f.name: f for f in dataclasses.fields(Settings) if _is_option(f)}
    settings_hints = get_type_hints(Settings)
    fields: dict[str, dataclasses.Field[Any]] = dict(common)
    types: dict[str, type] = {name: settings_hints[name] for name in common}
    owners: dict[str, str] = dict.fromkeys(common, "")
    options: dict[str, type[TransportOptions]] = {}
    problems: dict[str, str] = {}
    found = driver_entry_points().values()
    for ep in sorted(found, key=lambda ep: (not ep.value.startswith("directord."), ep.name)):
        try:
            cls = ep.load()
            kind = getattr(cls, "options", None)
            if not (isinstance(kind, type) and issubclass(kind, TransportOptions)):
                problems[ep.name] = f"{ep.value} names no TransportOptions class in 'options'"
                continue
            hints = get_type_hints(kind)
        except Exception as exc:  # a broken plugin must not stop the other drivers
            problems[ep.name] = f"cannot load {ep.value}: {type(exc).__name__}: {exc}"
            continue
        problem = _declaration_problem(kind, hints, types, owners)
        if problem:
            problems[ep.name] = f"{ep.value}: {problem}"
            continue
        for f in dataclasses.fields(kind):
            if f.name not in fields:
                fields[f.name] = f
                types[f.name] = hints[f.name]
                owners[f.name] = ep.name
        options[ep.name] = kind
    return Drivers(options, problems, fields, types)


def option_fields() -> tuple[dataclasses.Field[Any], ...]:
    """Every declared option: the common ones, then every known driver's."""
    return tuple(drivers().fields.values())


def option_type(name: str) -> type:
    """The type of option ``name`` (str, int, float or bool)."""
    return drivers().types[name]


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check (file) or convert (env, flag strings) a value to the option's type."""
    kind = option_type(name)
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


def _unknown_key(key: str, path: str) -> ConfigError:
    problems = drivers().problems
    # A key of a driver that did not load is unknown too: say which drivers those are.
    hint = "".join(f"; driver {name!r} is left out ({why})" for name, why in problems.items())
    return ConfigError(f"unknown key {key!r}{hint}", key=key, source=path)


def read_config_file(path: str, *, required: bool) -> dict[str, Any]:
    """Read and validate a YAML config file.

    Keys of every known driver are accepted, whichever driver is selected.

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
    # Imported here, once a file is there to parse: most commands on most machines
    # have none, and the CLI's start-up would pay for the import (about 10 ms).
    import yaml

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
    known = drivers().types
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known or name == "config_file":
            raise _unknown_key(str(key), path)
        out[name] = _coerce(name, value, path)
    return out


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """Options set as ``DIRECTORD_<NAME>`` environment variables (every known driver's too)."""
    out: dict[str, Any] = {}
    for name in drivers().types:
        var = ENV_PREFIX + name.upper()
        if var in environ:
            out[name] = _coerce(name, environ[var], var)
    return out


SECRET_FILE_LIMIT = 64 * 1024


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


def url_with_password(url: str, password: str, key: str, file_key: str, path: str) -> str:
    """``url`` with ``password`` (already escaped as the URL needs) for the user it names.

    Args:
        url: the URL of option ``key``.
        password: the secret read from ``path``, the file option ``file_key`` names.
        key: the URL's option, for the error.
        file_key: the password file's option, for the error.
        path: the password file, for the error.

    Raises:
        ConfigError: the URL names no user.
    """
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


def load_settings(
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    secrets: bool = True,
) -> Settings:
    """Resolve settings: flags > env > file > defaults.

    Every known driver's options are resolved from the same values (and
    checked); only the selected driver's secret files are read.

    Args:
        flags: options given explicitly on the command line (snake_case names).
        environ: the environment to read; defaults to ``os.environ``.
        secrets: read the selected driver's secret files (``zmq_shared_key_file``,
            ...) into the options they stand for. Commands that do not connect
            a driver (``exec``, ``manage`` ...) skip them: an operator sharing
            the daemons' config file need not be able to read their secrets.

    Raises:
        ConfigError: a bad value anywhere, naming its source; a secret file
            that is unreadable or open to others.
    """
    flags = dict(flags or {})
    env = read_env(os.environ if environ is None else environ)
    config_file = flags.get("config_file") or env.get("config_file")
    # A node in provisioning mode is given the path its configuration will be written to.
    required = config_file is not None and not flags.get("provision")
    values = read_config_file(config_file or DEFAULT_CONFIG_FILE, required=required)
    values.update(env)
    for name, value in flags.items():
        values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    if "driver" in values:
        values["driver"] = DRIVER_ALIASES.get(values["driver"], values["driver"])
    if config_file:
        values["config_file"] = config_file
    registry = drivers()
    resolved: list[TransportOptions] = []
    for kind in dict.fromkeys(registry.options.values()):
        names = {f.name for f in dataclasses.fields(kind)}
        opts = kind(**{name: value for name, value in values.items() if name in names})
        opts.check()
        resolved.append(opts)
    common = {f.name for f in dataclasses.fields(Settings) if _is_option(f)}
    settings = Settings(**{name: value for name, value in values.items() if name in common})
    selected = registry.options.get(settings.driver)
    if secrets and selected is not None:
        resolved = [o.with_secrets() if type(o) is selected else o for o in resolved]
    settings = dataclasses.replace(settings, transport_options=tuple(resolved))
    # `not x > 0` also refuses NaN, which would compare false everywhere downstream.
    if not 0 < settings.heartbeat_interval < math.inf:
        raise ConfigError(
            "heartbeat_interval must be a finite number > 0", key="heartbeat_interval"
        )
    if not 0 <= settings.job_retention < math.inf:
        raise ConfigError("job_retention must be a finite number >= 0", key="job_retention")
    if not 0 <= settings.reboot_grace < math.inf:
        raise ConfigError("reboot_grace must be a finite number >= 0", key="reboot_grace")
    if not 0 <= settings.reprovision_before < math.inf:
        raise ConfigError(
            "reprovision_before must be a finite number >= 0", key="reprovision_before"
        )
    if not 0 < settings.helper_timeout < math.inf:
        raise ConfigError("helper_timeout must be a finite number > 0", key="helper_timeout")
    if settings.provisioner_workers < 1:
        raise ConfigError("provisioner_workers must be at least 1", key="provisioner_workers")
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
