"""Settings resolution: flags > env DIRECTORD_* > YAML file > defaults."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from directord import config
from directord.config import Settings, load_settings, read_config_file, read_env
from directord.errors import ConfigError
from directord.transports.amqp import AmqpOptions
from directord.transports.grpc import GrpcOptions
from directord.transports.nats import NatsOptions
from directord.transports.zmq import ZmqOptions


@pytest.fixture(autouse=True)
def no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests never depend on whether /etc/directord/config.yaml exists here.
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.yaml"))


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def grpc_port(settings: Settings) -> int:
    return settings.options(GrpcOptions).grpc_port


def test_defaults_without_file_env_or_flags() -> None:
    settings = load_settings({}, {})
    assert dataclasses.replace(settings, transport_options=()) == Settings()
    assert set(settings.transport_options) == {
        GrpcOptions(),
        ZmqOptions(),
        AmqpOptions(),
        NatsOptions(),
        config.TransportOptions(),
    }
    assert settings.driver == "grpc"
    assert settings.heartbeat_interval == 60.0
    assert grpc_port(settings) == 5558
    assert settings.debug is False
    assert settings.datastore.startswith("sqlite:///")


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings().debug = True  # type: ignore[misc]


def test_file_keys_are_read_and_typed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "debug: true\nheartbeat_interval: 5\ngrpc-port: 6000\nidentity: node7\ndatastore: memory\n",
    )
    settings = load_settings({"config_file": path}, {})
    assert settings.debug is True
    assert settings.heartbeat_interval == 5.0 and isinstance(settings.heartbeat_interval, float)
    assert grpc_port(settings) == 6000
    assert settings.identity == "node7"
    assert settings.datastore == "memory"
    assert settings.config_file == path
    assert settings.socket_path == Settings().socket_path  # untouched keys keep defaults


def test_config_file_named_by_env(tmp_path: Path) -> None:
    path = write(tmp_path, "identity: from-file\n")
    settings = load_settings({}, {"DIRECTORD_CONFIG_FILE": path})
    assert settings.identity == "from-file"
    assert settings.config_file == path


def test_default_config_file_is_read_when_present(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "identity: from-default-file\n", name="default.yaml")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", path)
    assert load_settings({}, {}).identity == "from-default-file"


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    assert load_settings({"config_file": path}, {}) == dataclasses.replace(
        load_settings({}, {}), config_file=path
    )


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_settings({"config_file": missing}, {})
    assert info.value.source == missing
    assert missing in str(info.value)


def test_env_values() -> None:
    env = {
        "DIRECTORD_IDENTITY": "envnode",
        "DIRECTORD_GRPC_PORT": "7000",
        "DIRECTORD_HEARTBEAT_INTERVAL": "2.5",
        "DIRECTORD_DEBUG": "yes",
        "DIRECTORD_NOT_AN_OPTION": "ignored",
        "OTHER": "x",
    }
    settings = load_settings({}, env)
    assert settings.identity == "envnode"
    assert grpc_port(settings) == 7000
    assert settings.heartbeat_interval == 2.5
    assert settings.debug is True


def test_flags() -> None:
    settings = load_settings({"identity": "flagnode", "grpc_port": 0, "debug": True}, {})
    assert settings.identity == "flagnode"
    assert grpc_port(settings) == 0
    assert settings.debug is True


def test_precedence_flags_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "heartbeat_interval: 10\nidentity: file\nsocket_path: /file.sock\n")
    env = {
        "DIRECTORD_CONFIG_FILE": path,
        "DIRECTORD_HEARTBEAT_INTERVAL": "20",
        "DIRECTORD_IDENTITY": "env",
    }
    flags = {"heartbeat_interval": 30.0}
    settings = load_settings(flags, env)
    assert settings.heartbeat_interval == 30.0  # flag beats env and file
    assert settings.identity == "env"  # env beats file
    assert settings.socket_path == "/file.sock"  # file beats default
    assert grpc_port(settings) == 5558  # default
    assert load_settings({}, env).heartbeat_interval == 20.0
    assert load_settings({"config_file": path}, {}).heartbeat_interval == 10.0


def test_flag_config_file_beats_env_config_file(tmp_path: Path) -> None:
    a = write(tmp_path, "identity: a\n", name="a.yaml")
    b = write(tmp_path, "identity: b\n", name="b.yaml")
    assert load_settings({"config_file": a}, {"DIRECTORD_CONFIG_FILE": b}).identity == "a"


def test_unknown_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, "debug: true\nheartbeat_intervall: 5\n")
    with pytest.raises(ConfigError) as info:
        load_settings({"config_file": path}, {})
    assert info.value.key == "heartbeat_intervall"
    assert info.value.source == path
    assert "heartbeat_intervall" in str(info.value) and path in str(info.value)


def test_config_file_key_inside_a_config_file_is_unknown(tmp_path: Path) -> None:
    path = write(tmp_path, "config_file: /elsewhere.yaml\n")
    with pytest.raises(ConfigError) as info:
        read_config_file(path, required=True)
    assert info.value.key == "config_file"


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("grpc_port: abc\n", "grpc_port", "int"),
        ("grpc_port: 1.5\n", "grpc_port", "int"),
        ("grpc_port: true\n", "grpc_port", "int"),
        ("debug: 3\n", "debug", "bool"),
        ("heartbeat_interval: [1]\n", "heartbeat_interval", "float"),
        ("heartbeat_interval: true\n", "heartbeat_interval", "float"),
        ("identity: {a: 1}\n", "identity", "str"),
    ],
)
def test_wrong_type_in_file(tmp_path: Path, text: str, key: str, expected: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings({"config_file": path}, {})
    assert info.value.key == key
    assert info.value.source == path
    assert f"expected {expected}" in str(info.value)


def test_numeric_strings_in_file_are_converted(tmp_path: Path) -> None:
    path = write(tmp_path, "grpc_port: '6001'\nheartbeat_interval: '1.5'\n")
    settings = load_settings({"config_file": path}, {})
    assert grpc_port(settings) == 6001 and settings.heartbeat_interval == 1.5


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1", True),
        ("true", True),
        ("TRUE", True),
        ("yes", True),
        ("on", True),
        (" On ", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
        ("", False),
    ],
)
def test_bool_from_env(text: str, value: bool) -> None:
    assert load_settings({}, {"DIRECTORD_DEBUG": text}).debug is value


@pytest.mark.parametrize(
    ("var", "text"),
    [
        ("DIRECTORD_DEBUG", "maybe"),
        ("DIRECTORD_GRPC_PORT", "5.5"),
        ("DIRECTORD_GRPC_PORT", "port"),
        ("DIRECTORD_HEARTBEAT_INTERVAL", "soon"),
    ],
)
def test_bad_env_value_names_the_variable(var: str, text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, {var: text})
    assert info.value.source == var
    assert info.value.key == var.removeprefix("DIRECTORD_").lower()
    assert var in str(info.value) and repr(text) in str(info.value)


def test_int_and_float_from_env() -> None:
    settings = load_settings(
        {}, {"DIRECTORD_GRPC_PORT": " 42 ", "DIRECTORD_JOB_TIMEOUT_GRACE": "3"}
    )
    assert grpc_port(settings) == 42 and isinstance(grpc_port(settings), int)
    assert settings.job_timeout_grace == 3.0 and isinstance(settings.job_timeout_grace, float)


def test_read_env_only_reads_known_options() -> None:
    assert read_env({"DIRECTORD_IDENTITY": "x", "DIRECTORD_BOGUS": "y"}) == {"identity": "x"}


def test_flag_strings_are_coerced_and_checked() -> None:
    assert grpc_port(load_settings({"grpc_port": "6002"}, {})) == 6002
    with pytest.raises(ConfigError) as info:
        load_settings({"grpc_port": "x"}, {})
    assert info.value.source == "--grpc-port"


@pytest.mark.parametrize(
    ("where", "alias", "name"),
    [
        ("flag", "grpcd", "grpc"),
        ("env", "grpcd", "grpc"),
        ("file", "grpcd", "grpc"),
        ("flag", "zeromq", "zmq"),
        ("flag", "grpc", "grpc"),
        ("flag", "memory", "memory"),
    ],
)
def test_driver_aliases(tmp_path: Path, where: str, alias: str, name: str) -> None:
    if where == "flag":
        settings = load_settings({"driver": alias}, {})
    elif where == "env":
        settings = load_settings({}, {"DIRECTORD_DRIVER": alias})
    else:
        settings = load_settings({"config_file": write(tmp_path, f"driver: {alias}\n")}, {})
    assert settings.driver == name


def test_yaml_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "debug: true\nidentity: node0\ngrpc_port: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML") as info:
        load_settings({"config_file": path}, {})
    assert info.value.source is not None
    file, line = info.value.source.rsplit(":", 1)
    assert file == path
    assert int(line) >= 3
    assert str(info.value).startswith(f"{path}:{line}: ")


def test_yaml_error_on_first_line(tmp_path: Path) -> None:
    path = write(tmp_path, "debug: : true\n")
    with pytest.raises(ConfigError) as info:
        load_settings({"config_file": path}, {})
    assert info.value.source == f"{path}:1"


def test_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- debug\n- identity\n")
    with pytest.raises(ConfigError, match="mapping") as info:
        load_settings({"config_file": path}, {})
    assert info.value.source == path


def test_unreadable_config_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_settings({"config_file": str(tmp_path)}, {})  # a directory
    assert info.value.source == str(tmp_path)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_heartbeat_interval_must_be_positive_and_finite(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, {"DIRECTORD_HEARTBEAT_INTERVAL": value})
    assert info.value.key == "heartbeat_interval"


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_job_retention_must_be_finite_and_not_negative(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, {"DIRECTORD_JOB_RETENTION": value})
    assert info.value.key == "job_retention"


def test_job_retention_is_a_week_unless_set_and_zero_keeps_every_job() -> None:
    assert load_settings({}, {}).job_retention == 7 * 86400
    assert load_settings({}, {"DIRECTORD_JOB_RETENTION": "0"}).job_retention == 0


def test_resolved_identity() -> None:
    assert Settings(identity="node9").resolved_identity() == "node9"
    assert Settings().resolved_identity() == socket.gethostname()


# ---- secrets from files (never on a command line) -------------------------------------------


def secret(tmp_path: Path, text: str, mode: int = 0o600, name: str = "secret") -> str:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


ZMQ = {"driver": "zmq"}
MESSAGING = {"driver": "messaging"}
NATS = {"driver": "nats"}


def test_zmq_shared_key_file_is_read_without_its_line_ending(tmp_path: Path) -> None:
    path = secret(tmp_path, "s3cret key\n")
    options = load_settings({**ZMQ, "zmq_shared_key_file": path}, {}).options(ZmqOptions)
    assert options.zmq_shared_key == "s3cret key"
    assert options.zmq_shared_key_file == path
    env = {"DIRECTORD_ZMQ_SHARED_KEY_FILE": path}
    assert load_settings(ZMQ, env).options(ZmqOptions).zmq_shared_key == "s3cret key"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o644])
def test_secret_file_open_to_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = secret(tmp_path, "s3cret\n", mode)
    with pytest.raises(ConfigError) as info:
        load_settings({**ZMQ, "zmq_shared_key_file": path}, {})
    assert info.value.key == "zmq_shared_key_file"
    assert info.value.source == path
    assert str(info.value) == (
        f"{path}: zmq_shared_key_file: group or others have rights on it "
        f"(mode {mode:04o}); chmod 600 it"
    )
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "problem"),
    [("", "one line"), ("\n", "one line"), ("a\nb\n", "one line"), ("x" * 70000, "larger")],
)
def test_secret_file_must_hold_one_line(tmp_path: Path, text: str, problem: str) -> None:
    path = secret(tmp_path, text)
    with pytest.raises(ConfigError, match=problem) as info:
        load_settings({**ZMQ, "zmq_shared_key_file": path}, {})
    assert info.value.source == path


def test_missing_secret_file_names_it(tmp_path: Path) -> None:
    path = str(tmp_path / "absent")
    with pytest.raises(ConfigError, match="cannot read") as info:
        load_settings(NATS, {"DIRECTORD_NATS_PASSWORD_FILE": path})
    assert info.value.source == path and info.value.key == "nats_password_file"


def test_only_the_selected_drivers_secret_files_are_read(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent")
    flags = {"zmq_shared_key_file": absent, "messaging_password_file": absent}
    settings = load_settings({**flags, "nats_password_file": absent}, {})  # grpc
    assert settings.options(ZmqOptions).zmq_shared_key_file == absent
    assert settings.options(ZmqOptions).zmq_shared_key == ""
    with pytest.raises(ConfigError) as info:
        load_settings({**flags, **NATS, "nats_password_file": absent}, {})
    assert info.value.key == "nats_password_file"


def test_shared_key_and_its_file_together_are_refused(tmp_path: Path) -> None:
    path = secret(tmp_path, "from-file\n")
    config_file = write(tmp_path, "zmq_shared_key: from-config\n")
    with pytest.raises(ConfigError, match="both set; give one") as info:
        load_settings({**ZMQ, "config_file": config_file, "zmq_shared_key_file": path}, {})
    assert info.value.key == "zmq_shared_key_file"
    # Refused even where the files are not read (a user command on the same config), and
    # whatever the driver, as every driver's keys are checked.
    with pytest.raises(ConfigError, match="both set"):
        load_settings({"zmq_shared_key": "x", "zmq_shared_key_file": path}, {}, secrets=False)


def test_user_commands_do_not_read_the_secret_files(tmp_path: Path) -> None:
    # An operator may share the daemons' config without being able to read their secrets.
    path = str(tmp_path / "root-only")
    settings = load_settings({**ZMQ, "zmq_shared_key_file": path}, {}, secrets=False)
    options = settings.options(ZmqOptions)
    assert options.zmq_shared_key == "" and options.zmq_shared_key_file == path


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "amqp://directord:old@mq.example.net:5672/",
            "amqp://directord:p%40ss%3Aw%2Fd@mq.example.net:5672/",
        ),
        (
            "amqps://directord@mq.example.net:5671/vhost",
            "amqps://directord:p%40ss%3Aw%2Fd@mq.example.net:5671/vhost",
        ),
    ],
)
def test_messaging_password_file_replaces_the_urls_password(
    tmp_path: Path, url: str, expected: str
) -> None:
    path = secret(tmp_path, "p@ss:w/d\n")
    flags = {**MESSAGING, "messaging_url": url, "messaging_password_file": path}
    assert load_settings(flags, {}).options(AmqpOptions).messaging_url == expected


def test_messaging_password_file_with_the_default_url(tmp_path: Path) -> None:
    path = secret(tmp_path, "not-guest\n")
    settings = load_settings({**MESSAGING, "messaging_password_file": path}, {})
    assert settings.options(AmqpOptions).messaging_url == "amqp://guest:not-guest@127.0.0.1:5672/"


def test_password_file_needs_a_user_in_the_url(tmp_path: Path) -> None:
    path = secret(tmp_path, "pw\n")
    flags = {**MESSAGING, "messaging_url": "amqp://mq:5672/", "messaging_password_file": path}
    with pytest.raises(ConfigError, match="names no user") as info:
        load_settings(flags, {})
    assert info.value.source == path


def test_nats_password_file_goes_into_every_url(tmp_path: Path) -> None:
    path = secret(tmp_path, "p@ss:w%rd\n")
    urls = "nats://directord@a.example.net:4222, tls://directord:old@b.example.net:4222"
    settings = load_settings({**NATS, "nats_url": urls, "nats_password_file": path}, {})
    # nats-py takes the password from the URL as written: it is not percent-encoded.
    assert settings.options(NatsOptions).nats_url == (
        "nats://directord:p@ss:w%rd@a.example.net:4222,tls://directord:p@ss:w%rd@b.example.net:4222"
    )


@pytest.mark.parametrize("password", ["a/b", "a,b", "a#b", "a?b", "a\tb"])
def test_nats_password_a_url_cannot_carry_is_refused(tmp_path: Path, password: str) -> None:
    path = secret(tmp_path, password + "\n")
    flags = {**NATS, "nats_url": "nats://u@h:4222", "nats_password_file": path}
    with pytest.raises(ConfigError, match="cannot carry") as info:
        load_settings(flags, {})
    assert info.value.source == path
    assert password not in str(info.value)
