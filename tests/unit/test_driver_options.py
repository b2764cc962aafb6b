"""Each driver declares its options; config.py resolves them with the common ones.

Built-in drivers and a third-party one (a tiny driver defined here, registered
through a fake ``directord.transports`` entry point) alike: config keys,
``DIRECTORD_*`` env vars and flags, their precedence, their errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

from directord import config
from directord.cli.main import build_parser, settings_from
from directord.config import (
    Settings,
    TransportOptions,
    load_settings,
    option,
    option_fields,
    read_secret_file,
)
from directord.errors import ConfigError
from directord.transports import Connection, Transport, load_transport
from directord.transports.amqp import AmqpOptions, AmqpTransport
from directord.transports.base import ConnectionHandler
from directord.transports.broker import BrokerOptions
from directord.transports.grpc import GrpcOptions, GrpcTransport
from directord.transports.memory import MemoryTransport
from directord.transports.nats import NatsOptions, NatsTransport
from directord.transports.zmq import ZmqOptions, ZmqTransport

# ---- a third-party driver -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeOptions(TransportOptions):
    """A third-party driver's options."""

    fake_port: int = option(7000, "port of the fake driver", "server", "client")
    fake_secure: bool = option(False, "TLS for the fake driver", "server", "client")
    fake_ratio: float = option(0.5, "a ratio of the fake driver", "server")
    fake_token: str = option("", "the fake driver's token", "server", "client")
    fake_token_file: str = option("", "file holding --fake-token", "server", "client")
    # Declared by the broker drivers too, with the same type: one option.
    broker_namespace: str = option("fake-ns", "namespace of the fake driver", "server", "client")

    def check(self) -> None:
        if self.fake_token and self.fake_token_file:
            raise ConfigError("fake_token and fake_token_file are both set", key="fake_token")

    def with_secrets(self) -> FakeOptions:
        if not self.fake_token_file:
            return self
        token = read_secret_file("fake_token_file", self.fake_token_file)
        return dataclasses.replace(self, fake_token=token)


class FakeTransport(Transport):
    """A driver that does nothing; only its options matter here."""

    name: ClassVar[str] = "fake"
    options: ClassVar[type[TransportOptions]] = FakeOptions

    def __init__(self, settings: Settings, options: FakeOptions | None = None) -> None:
        super().__init__(settings, options)
        self.opts = options if options is not None else settings.options(FakeOptions)

    async def serve(self, handler: ConnectionHandler) -> str:
        raise NotImplementedError

    async def connect(self) -> Connection:
        raise NotImplementedError

    async def close(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class ClashingOptions(TransportOptions):
    grpc_port: str = option("x", "the gRPC driver's option, with another type")


class ClashingTransport(FakeTransport):
    options: ClassVar[type[TransportOptions]] = ClashingOptions


@dataclass(frozen=True, slots=True)
class CommonOptions(TransportOptions):
    identity: str = option("", "a common option, declared again")


class CommonTransport(FakeTransport):
    options: ClassVar[type[TransportOptions]] = CommonOptions


@dataclass(frozen=True, slots=True)
class ListOptions(TransportOptions):
    list_hosts: tuple[str, ...] = option(("a",), "no flag, env var or YAML scalar holds these")


class ListTransport(FakeTransport):
    options: ClassVar[type[TransportOptions]] = ListOptions


def _entry_point(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=config.TRANSPORT_GROUP)


@pytest.fixture(autouse=True)
def no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.yaml"))
    config.drivers.cache_clear()
    yield
    config.drivers.cache_clear()


def install(monkeypatch: pytest.MonkeyPatch, **extra: str) -> None:
    """Register drivers (name=module:attr) beside the installed ones."""
    real = config.entry_points

    def entry_points(*, group: str) -> list[EntryPoint]:
        found = list(real(group=group))
        if group == config.TRANSPORT_GROUP:
            found += [_entry_point(name, value) for name, value in extra.items()]
        return found

    monkeypatch.setattr(config, "entry_points", entry_points)
    config.drivers.cache_clear()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, fake=f"{__name__}:FakeTransport")


def write(tmp_path: Path, values: dict[str, Any]) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)


def env_text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def resolve(where: str, tmp_path: Path, values: dict[str, Any]) -> Settings:
    """Settings with ``values`` given in a config file, as env vars or as flags."""
    if where == "file":
        return load_settings({"config_file": write(tmp_path, values)}, {})
    if where == "env":
        env = {f"DIRECTORD_{k.upper()}": env_text(v) for k, v in values.items()}
        return load_settings({}, env)
    return load_settings(values, {})


# ---- built-in drivers -----------------------------------------------------------------------

BUILTIN_VALUES = [
    (GrpcOptions, "grpc_port", 6000),
    (GrpcOptions, "grpc_ssl_client_auth", True),
    (GrpcOptions, "grpc_bind_address", "unix:/run/d.sock"),
    (ZmqOptions, "job_port", 6001),
    (ZmqOptions, "zmq_rotation_grace", 1.5),
    (ZmqOptions, "zmq_curve_encryption", True),
    (AmqpOptions, "messaging_url", "amqp://u:p@mq.example.net:5672/"),
    (AmqpOptions, "messaging_bind_identity", True),
    (AmqpOptions, "broker_namespace", "cluster1"),
    (AmqpOptions, "messaging_queue_ttl", 60.0),
    (NatsOptions, "nats_url", "tls://nats.example.net:4222"),
    (NatsOptions, "broker_namespace", "cluster1"),
    (NatsOptions, "messaging_queue_ttl", 60.0),
]


@pytest.mark.parametrize("where", ["file", "env", "flag"])
@pytest.mark.parametrize(("kind", "name", "value"), BUILTIN_VALUES)
def test_builtin_driver_option_from_file_env_and_flag(
    tmp_path: Path, where: str, kind: type[TransportOptions], name: str, value: object
) -> None:
    settings = resolve(where, tmp_path, {name: value})
    options = settings.options(kind)
    assert getattr(options, name) == value
    assert type(getattr(options, name)) is type(value)
    assert dataclasses.replace(options, **{name: getattr(kind(), name)}) == kind()


def test_driver_option_precedence_flag_env_file_default(tmp_path: Path) -> None:
    path = write(tmp_path, {"job_port": 1, "zmq_key_dir": "/file", "zmq_bind_address": "::1"})
    env = {
        "DIRECTORD_CONFIG_FILE": path,
        "DIRECTORD_JOB_PORT": "2",
        "DIRECTORD_ZMQ_KEY_DIR": "/env",
    }
    options = load_settings({"job_port": 3}, env).options(ZmqOptions)
    assert options.job_port == 3  # flag beats env and file
    assert options.zmq_key_dir == "/env"  # env beats file
    assert options.zmq_bind_address == "::1"  # file beats default
    assert options.zmq_server_address == ZmqOptions().zmq_server_address  # default


def test_broker_drivers_share_their_common_options(tmp_path: Path) -> None:
    settings = resolve("file", tmp_path, {"broker_namespace": "c1", "messaging_queue_ttl": 9})
    for kind in (AmqpOptions, NatsOptions):
        options = settings.options(kind)
        assert isinstance(options, BrokerOptions)
        assert (options.broker_namespace, options.messaging_queue_ttl) == ("c1", 9.0)


def test_one_file_holds_several_drivers_keys_and_the_driver_gets_its_own(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {
            "driver": "memory",
            "grpc_port": 6000,
            "job_port": 6001,
            "messaging_url": "amqp://mq/",
            "nats_url": "nats://n:4222",
        },
    )
    settings = load_settings({"config_file": path}, {})
    assert settings.options(GrpcOptions).grpc_port == 6000
    transport = load_transport(settings)
    assert isinstance(transport, MemoryTransport)


def test_each_builtin_transport_gets_its_options(tmp_path: Path) -> None:
    settings = load_settings(
        {"grpc_port": 6000, "messaging_url": "amqp://u@mq/", "nats_url": "nats://n:1"}, {}
    )
    assert GrpcTransport.options is GrpcOptions and ZmqTransport.options is ZmqOptions
    assert AmqpTransport.options is AmqpOptions and NatsTransport.options is NatsOptions
    grpc = load_transport(settings)
    assert isinstance(grpc, GrpcTransport) and grpc.opts == GrpcOptions(grpc_port=6000)
    amqp = AmqpTransport(settings, settings.options(AmqpOptions))
    assert amqp.opts.messaging_url == "amqp://u@mq/" and amqp.namespace == "directord"
    nats = NatsTransport(dataclasses.replace(settings, identity="n1"))
    assert nats.opts.nats_url == "nats://n:1" and nats.server_inbox == "directord.server"


@pytest.mark.parametrize(
    ("values", "key", "expected"),
    [
        ({"job_port": "x"}, "job_port", "int"),
        ({"job_port": True}, "job_port", "int"),
        ({"nats_tls": 3}, "nats_tls", "bool"),
        ({"messaging_queue_ttl": [1]}, "messaging_queue_ttl", "float"),
        ({"messaging_url": {"a": 1}}, "messaging_url", "str"),
    ],
)
def test_driver_option_of_the_wrong_type_names_key_file_and_type(
    tmp_path: Path, values: dict[str, Any], key: str, expected: str
) -> None:
    path = write(tmp_path, values)
    with pytest.raises(ConfigError) as info:
        load_settings({"config_file": path}, {})
    assert (info.value.key, info.value.source) == (key, path)
    assert f"expected {expected}" in str(info.value) and path in str(info.value)


def test_driver_option_of_the_wrong_type_in_env_and_flag() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, {"DIRECTORD_ZMQ_ROTATION_GRACE": "soon"})
    assert (info.value.key, info.value.source) == (
        "zmq_rotation_grace",
        "DIRECTORD_ZMQ_ROTATION_GRACE",
    )
    with pytest.raises(ConfigError) as info:
        load_settings({"nats_tls": "maybe"}, {})
    assert (info.value.key, info.value.source) == ("nats_tls", "--nats-tls")


def test_unknown_key_is_refused_naming_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, {"grpc_port": 1, "grpc_prot": 2})
    with pytest.raises(ConfigError) as info:
        load_settings({"config_file": path}, {})
    assert (info.value.key, info.value.source) == ("grpc_prot", path)
    assert str(info.value) == f"{path}: unknown key 'grpc_prot'"


def test_settings_options_defaults_for_a_class_not_resolved() -> None:
    assert Settings().options(GrpcOptions) == GrpcOptions()
    assert Settings(transport_options=(GrpcOptions(grpc_port=1),)).options(ZmqOptions) == (
        ZmqOptions()
    )


def test_every_builtin_option_is_listed_once() -> None:
    names = [f.name for f in option_fields()]
    assert len(names) == len(set(names))
    declared = {"identity", "heartbeat_interval", "broker_namespace", "messaging_queue_ttl"}
    for kind in (GrpcOptions, ZmqOptions, AmqpOptions, NatsOptions):
        declared |= {f.name for f in dataclasses.fields(kind)}
    assert declared <= set(names)
    # Settings keeps only what is common.
    common = {f.name for f in dataclasses.fields(Settings)}
    assert not common & {f.name for f in dataclasses.fields(GrpcOptions)}
    assert not common & {f.name for f in dataclasses.fields(NatsOptions)}


# ---- a third-party driver -------------------------------------------------------------------


@pytest.mark.usefixtures("fake")
@pytest.mark.parametrize("where", ["file", "env", "flag"])
@pytest.mark.parametrize(
    ("name", "value"),
    [("fake_port", 7100), ("fake_secure", True), ("fake_ratio", 2.0), ("fake_token", "t")],
)
def test_third_party_option_from_file_env_and_flag(
    tmp_path: Path, where: str, name: str, value: object
) -> None:
    options = resolve(where, tmp_path, {name: value}).options(FakeOptions)
    assert getattr(options, name) == value
    assert type(getattr(options, name)) is type(value)


@pytest.mark.usefixtures("fake")
def test_third_party_driver_gets_its_options_and_not_the_others(tmp_path: Path) -> None:
    path = write(tmp_path, {"driver": "fake", "fake_port": 7100, "grpc_port": 6000})
    env = {"DIRECTORD_CONFIG_FILE": path, "DIRECTORD_FAKE_SECURE": "yes"}
    settings = load_settings({"fake_ratio": "0.25"}, env)
    transport = load_transport(settings)
    assert isinstance(transport, FakeTransport)
    assert transport.opts == FakeOptions(fake_port=7100, fake_secure=True, fake_ratio=0.25)


@pytest.mark.usefixtures("fake")
@pytest.mark.parametrize(
    ("values", "key", "expected"),
    [({"fake_port": "abc"}, "fake_port", "int"), ({"fake_secure": 2}, "fake_secure", "bool")],
)
def test_third_party_option_of_the_wrong_type(
    tmp_path: Path, values: dict[str, Any], key: str, expected: str
) -> None:
    path = write(tmp_path, values)
    with pytest.raises(ConfigError) as info:
        load_settings({"config_file": path}, {})
    assert (info.value.key, info.value.source) == (key, path)
    assert f"expected {expected}" in str(info.value)


def test_third_party_key_is_unknown_without_its_driver(tmp_path: Path) -> None:
    path = write(tmp_path, {"fake_port": 1})
    with pytest.raises(ConfigError) as info:
        load_settings({"config_file": path}, {})
    assert (info.value.key, info.value.source) == ("fake_port", path)
    assert load_settings({}, {"DIRECTORD_FAKE_PORT": "1"}) == load_settings({}, {})


@pytest.mark.usefixtures("fake")
def test_third_party_secrets_are_read_for_the_selected_driver_only(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)
    flags = {"fake_token_file": str(token)}
    assert load_settings(flags, {}).options(FakeOptions).fake_token == ""
    settings = load_settings({**flags, "driver": "fake"}, {})
    assert settings.options(FakeOptions).fake_token == "s3cret"
    assert load_settings({**flags, "driver": "fake"}, {}, secrets=False).options(
        FakeOptions
    ) == FakeOptions(fake_token_file=str(token))
    with pytest.raises(ConfigError, match="both set") as info:
        load_settings({**flags, "fake_token": "x"}, {}, secrets=False)
    assert info.value.key == "fake_token"


@pytest.mark.usefixtures("fake")
def test_third_party_flags_are_on_the_command_line() -> None:
    parser = build_parser()
    ns = parser.parse_args(["client", "--fake-port", "7200", "--fake-secure", "--driver", "fake"])
    settings = settings_from(ns)
    assert settings.options(FakeOptions) == FakeOptions(fake_port=7200, fake_secure=True)
    ns = parser.parse_args(["--fake-ratio", "3", "server"])
    assert settings_from(ns).options(FakeOptions).fake_ratio == 3.0
    with pytest.raises(SystemExit):
        parser.parse_args(["client", "--fake-ratio", "3"])  # a server-only option
    text = " ".join(parser.format_help().split())
    assert "--fake-port FAKE_PORT port of the fake driver (default: 7000)" in text


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (f"{__name__}:ClashingTransport", "'grpc_port' has type str here, int in driver 'grpc'"),
        (f"{__name__}:CommonTransport", "'identity' is a common option"),
        (f"{__name__}:ListTransport", "'list_hosts' has type tuple[str, ...]"),
        (f"{__name__}:FakeOptions", "names no TransportOptions class"),
    ],
)
def test_a_driver_that_cannot_declare_its_options_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    install(monkeypatch, odd=value, fake=f"{__name__}:FakeTransport")
    assert problem in config.drivers().problems["odd"]
    assert "odd" not in config.drivers().options
    # The other drivers keep their options, their types untouched.
    assert (
        load_settings({"fake_port": "1", "grpc_port": "2"}, {}).options(FakeOptions).fake_port == 1
    )
    assert config.option_type("grpc_port") is int
    with pytest.raises(ConfigError) as info:
        load_transport(load_settings({"driver": "odd"}, {}))
    assert info.value.key == "driver"
    assert problem in str(info.value)


def test_a_driver_that_cannot_be_imported_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    install(monkeypatch, odd="tests.unit.no_such_module:Transport")
    assert (
        config.drivers()
        .problems["odd"]
        .startswith("cannot load tests.unit.no_such_module:Transport: ModuleNotFoundError")
    )
    assert load_settings({"grpc_port": "2"}, {}).options(GrpcOptions).grpc_port == 2
    # Selected, it fails as it always did: with the import's own error.
    with pytest.raises(ImportError):
        load_transport(load_settings({"driver": "odd"}, {}))


def test_unknown_key_says_which_drivers_are_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(monkeypatch, odd="tests.unit.no_such_module:Transport")
    path = write(tmp_path, {"odd_port": 1})
    with pytest.raises(ConfigError) as info:
        load_settings({"config_file": path}, {})
    assert (info.value.key, info.value.source) == ("odd_port", path)
    assert "unknown key 'odd_port'; driver 'odd' is left out (cannot load" in str(info.value)
