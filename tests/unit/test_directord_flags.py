"""Every flag of Directord 0.12's command line is accepted here (issue 10).

DIRECTORD_0_12 lists, per place, the option strings of ``directord --help``
and of each subcommand's help in Directord 0.12.0 (its main.py and its
drivers' parse_args), as facts to check against.
"""

from __future__ import annotations

import argparse

import pytest

from directord.cli.main import build_parser
from directord.transports.amqp import _with_host

DIRECTORD_0_12: dict[str, list[str]] = {
    "directord": [
        "--version",
        "--config-file",
        "--driver",
        "--identity",
        "--debug",
        "--job-port",
        "--backend-port",
        "--datastore",
        "--heartbeat-interval",
        "--socket-path",
        "--socket-group",
        "--cache-path",
        "--zmq-highwater-mark",
        "--zmq-shared-key",
        "--zmq-curve-encryption",
        "--grpc-port",
        "--grpc-server-address",
        "--grpc-disable-compression",
        "--grpc-ssl",
        "--grpc-ssl-ca",
        "--grpc-ssl-cert",
        "--grpc-ssl-key",
        "--grpc-ssl-client-auth",
        "--messaging-ssl",
        "--messaging-ssl-ca",
        "--messaging-ssl-cert",
        "--messaging-ssl-key",
        "--messaging-address",
    ],
    "server": [
        "--zmq-generate-keys",
        "--zmq-bind-address",
        "--grpc-bind-address",
        "--grpc-server-workers",
    ],
    "client": ["--machine-id", "--zmq-server-address"],
    "orchestrate": [
        "--restrict",
        "--target",
        "--ignore-cache",
        "--force-async",
        "--poll",
        "--wait",
        "--finger-print",
        "--stream",
        "--check",
    ],
    "bootstrap": ["--catalog", "--key-file", "--threads"],
    "exec": ["--verb", "--target", "--poll", "--wait", "--stream", "--check", "--force-async"],
    "manage": [
        "--filter",
        "--list-jobs",
        "--list-nodes",
        "--purge-jobs",
        "--purge-nodes",
        "--job-info",
        "--export-jobs",
        "--export-nodes",
        "--dump-cache",
        "--analyze-parent",
        "--analyze-job",
        "--analyze-all",
    ],
}


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    commands = {"directord": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
    return commands


@pytest.mark.parametrize("place", sorted(DIRECTORD_0_12))
def test_every_directord_flag_is_accepted(place: str) -> None:
    commands = _commands()
    known = _options(commands[place]) | _options(commands["directord"])
    assert [flag for flag in DIRECTORD_0_12[place] if flag not in known] == []


def test_a_directord_command_line_parses() -> None:
    parser = build_parser()
    ns = parser.parse_args(
        [
            "--driver",
            "zmq",
            "--zmq-highwater-mark",
            "2048",
            "--debug",
            "orchestrate",
            "site.yaml",
            "--poll",
            "--check",
            "--target",
            "web1",
            "web2",
            "--ignore-cache",
        ]
    )
    assert (ns.driver, ns.zmq_highwater_mark, ns.debug) == ("zmq", 2048, True)
    assert (ns.files, ns.target, ns.poll, ns.check) == (["site.yaml"], ["web1", "web2"], True, True)


@pytest.mark.parametrize(
    ("url", "host", "expected"),
    [
        ("amqp://u:p@example.invalid:5673/v", "127.0.0.9", "amqp://u:p@127.0.0.9:5673/v"),
        ("amqp://127.0.0.1/", "rabbit.example", "amqp://rabbit.example/"),
        ("amqps://u@h:5671", "::1", "amqps://u@[::1]:5671"),
    ],
)
def test_messaging_address_replaces_only_the_host_of_the_url(
    url: str, host: str, expected: str
) -> None:
    assert _with_host(url, host) == expected
