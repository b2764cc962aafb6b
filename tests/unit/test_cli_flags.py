"""The command line keeps every flag it had before drivers declared their own options.

EXPECTED is what ``main``'s parser offered (collected once from ``git show
main:src/directord/cli/main.py``, when every option was a field of Settings):
each command's option strings. Every driver's flags stay on every command that
had them, whatever the driver, so scripts passing them keep working.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from directord import config
from directord.cli.main import build_parser

EXPECTED: dict[str, set[str]] = {
    "directord": {
        "--allowed-node-names",
        "--api-bind",
        "--api-idle-timeout",
        "--api-max-connections",
        "--api-port",
        "--api-url",
        "--backend-port",
        "--broker-namespace",
        "--ca",
        "--cache-path",
        "--cert",
        "--config-file",
        "--datastore",
        "--debug",
        "--driver",
        "--file-store",
        "--grpc-bind-address",
        "--grpc-compression",
        "--grpc-disable-compression",
        "--grpc-port",
        "--grpc-server-address",
        "--grpc-server-workers",
        "--grpc-ssl",
        "--grpc-ssl-ca",
        "--grpc-ssl-cert",
        "--grpc-ssl-client-auth",
        "--grpc-ssl-crl",
        "--grpc-ssl-key",
        "--heartbeat-interval",
        "--help",
        "--identity",
        "--insecure",
        "--job-port",
        "--job-timeout-grace",
        "--key",
        "--machine-id",
        "--messaging-bind-identity",
        "--messaging-password-file",
        "--messaging-queue-ttl",
        "--messaging-ssl",
        "--messaging-ssl-ca",
        "--messaging-ssl-cert",
        "--messaging-ssl-key",
        "--messaging-url",
        "--nats-creds",
        "--nats-nkey-seed",
        "--nats-password-file",
        "--nats-tls",
        "--nats-tls-ca",
        "--nats-tls-cert",
        "--nats-tls-key",
        "--nats-url",
        "--pki-dir",
        "--query-max-bytes",
        "--ready-file",
        "--socket-group",
        "--socket-path",
        "--version",
        "--zmq-bind-address",
        "--zmq-curve-encryption",
        "--zmq-key-dir",
        "--zmq-rotation-grace",
        "--zmq-server-address",
        "--zmq-shared-key",
        "--zmq-shared-key-file",
        "-h",
    },
    "server": {
        "--allowed-node-names",
        "--api-bind",
        "--api-idle-timeout",
        "--api-max-connections",
        "--api-port",
        "--backend-port",
        "--broker-namespace",
        "--ca",
        "--cert",
        "--client",
        "--config-file",
        "--datastore",
        "--debug",
        "--driver",
        "--file-store",
        "--grpc-bind-address",
        "--grpc-compression",
        "--grpc-disable-compression",
        "--grpc-port",
        "--grpc-server-workers",
        "--grpc-ssl",
        "--grpc-ssl-ca",
        "--grpc-ssl-cert",
        "--grpc-ssl-client-auth",
        "--grpc-ssl-crl",
        "--grpc-ssl-key",
        "--heartbeat-interval",
        "--help",
        "--insecure",
        "--job-port",
        "--job-timeout-grace",
        "--key",
        "--messaging-bind-identity",
        "--messaging-password-file",
        "--messaging-queue-ttl",
        "--messaging-ssl",
        "--messaging-ssl-ca",
        "--messaging-ssl-cert",
        "--messaging-ssl-key",
        "--messaging-url",
        "--nats-creds",
        "--nats-nkey-seed",
        "--nats-password-file",
        "--nats-tls",
        "--nats-tls-ca",
        "--nats-tls-cert",
        "--nats-tls-key",
        "--nats-url",
        "--query-max-bytes",
        "--ready-file",
        "--socket-group",
        "--socket-path",
        "--zmq-bind-address",
        "--zmq-curve-encryption",
        "--zmq-generate-keys",
        "--zmq-key-dir",
        "--zmq-rotation-grace",
        "--zmq-shared-key",
        "--zmq-shared-key-file",
        "-h",
    },
    "client": {
        "--backend-port",
        "--broker-namespace",
        "--cache-path",
        "--config-file",
        "--debug",
        "--driver",
        "--grpc-compression",
        "--grpc-disable-compression",
        "--grpc-port",
        "--grpc-server-address",
        "--grpc-ssl",
        "--grpc-ssl-ca",
        "--grpc-ssl-cert",
        "--grpc-ssl-client-auth",
        "--grpc-ssl-key",
        "--heartbeat-interval",
        "--help",
        "--identity",
        "--job-port",
        "--machine-id",
        "--messaging-password-file",
        "--messaging-queue-ttl",
        "--messaging-ssl",
        "--messaging-ssl-ca",
        "--messaging-ssl-cert",
        "--messaging-ssl-key",
        "--messaging-url",
        "--nats-creds",
        "--nats-nkey-seed",
        "--nats-password-file",
        "--nats-tls",
        "--nats-tls-ca",
        "--nats-tls-cert",
        "--nats-tls-key",
        "--nats-url",
        "--ready-file",
        "--socket-path",
        "--zmq-curve-encryption",
        "--zmq-key-dir",
        "--zmq-server-address",
        "--zmq-shared-key",
        "--zmq-shared-key-file",
        "-h",
    },
    "exec": {
        "--api-url",
        "--ca",
        "--cache-path",
        "--cert",
        "--config-file",
        "--debug",
        "--force-async",
        "--format",
        "--help",
        "--key",
        "--poll",
        "--socket-path",
        "--stream",
        "--target",
        "--verb",
        "--wait",
        "-h",
    },
    "orchestrate": {
        "--api-url",
        "--ca",
        "--cache-path",
        "--cert",
        "--config-file",
        "--debug",
        "--finger-print",
        "--force-async",
        "--format",
        "--help",
        "--ignore-cache",
        "--key",
        "--poll",
        "--restrict",
        "--socket-path",
        "--stream",
        "--target",
        "--wait",
        "-h",
    },
    "manage": {
        "--analyze-all",
        "--analyze-job",
        "--analyze-parent",
        "--api-url",
        "--ca",
        "--cache-path",
        "--cert",
        "--config-file",
        "--debug",
        "--dump-cache",
        "--export-jobs",
        "--export-nodes",
        "--filter",
        "--format",
        "--help",
        "--job-info",
        "--key",
        "--list-jobs",
        "--list-nodes",
        "--purge-jobs",
        "--purge-nodes",
        "--socket-path",
        "-h",
    },
    "pki": {
        "--config-file",
        "--debug",
        "--help",
        "--pki-dir",
        "--socket-path",
        "-h",
    },
    "demo": {
        "--config-file",
        "--debug",
        "--help",
        "--keep",
        "--nodes",
        "--socket-path",
        "-h",
    },
}


@pytest.fixture(autouse=True)
def installed_drivers_only() -> Iterator[None]:
    config.drivers.cache_clear()
    yield
    config.drivers.cache_clear()


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    out = {"directord": parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.update(action.choices)
    return out


# Flags added since: jobs that outlive the client (issue 14), Directord's (issue 10),
# REBOOT's, units' (issue 11); and the commands added since: bootstrap and unit-file
# (issue 10), units (issue 11).
ADDED: dict[str, set[str]] = {
    "directord": {
        "--on-stop",
        "--run-path",
        "--zmq-highwater-mark",
        "--messaging-address",
        "--components-path",
        "--local-components",
        "--reboot-command",
        "--reboot-grace",
        "--job-retention",
        "--unit-proxy-allow",
        "--provision",
        "--provisioning-address",
        "--provisioning-token",
        "--provisioning-ca",
        "--provisioning-facts",
        "--reprovision-before",
        "--helper",
        "--provisioning-bind",
        "--provisioning-port",
        "--provisioning-ssl-cert",
        "--provisioning-ssl-key",
        "--provisioner-workers",
        "--helper-timeout",
        "--metrics-port",
        "--metrics-bind",
        "--node-config",
        "--provisioning-cert-days",
        "--provisioner-socket",
        "--provisioner-state",
    },
    "server": {
        "--zmq-highwater-mark",
        "--messaging-address",
        "--components-path",
        "--reboot-grace",
        "--job-retention",
        "--unit-proxy-allow",
    },
    "client": {
        "--on-stop",
        "--run-path",
        "--zmq-highwater-mark",
        "--messaging-address",
        "--components-path",
        "--local-components",
        "--reboot-command",
        "--pki-dir",
        "--provision",
        "--provisioning-address",
        "--provisioning-token",
        "--provisioning-ca",
        "--provisioning-facts",
        "--reprovision-before",
    },
    "exec": {"--check", "--components-path"},
    "orchestrate": {"--check", "--components-path"},
    "manage": {
        "--cancel-job",
        "--cancel-parent",
        "--no-kill",
        "--components-path",
        "--is-online",
        "--wait",
    },
    "units": {
        "--api-url",
        "--ca",
        "--cache-path",
        "--cert",
        "--components-path",
        "--config-file",
        "--debug",
        "--help",
        "--key",
        "--socket-path",
        "-h",
    },
    "bootstrap": {
        "--catalog",
        "--config-file",
        "--connect-timeout",
        "--debug",
        "--help",
        "--insecure-host-keys",
        "--key-file",
        "--known-hosts",
        "--socket-path",
        "--step-timeout",
        "--threads",
        "-h",
    },
    "unit-file": {"--help", "-h"},
    "provisioner": {
        "--config-file",
        "--debug",
        "--format",
        "--help",
        "--helper",
        "--helper-timeout",
        "--metrics-bind",
        "--metrics-port",
        "--node-config",
        "--pki-dir",
        "--provisioner-socket",
        "--provisioner-state",
        "--provisioner-workers",
        "--provisioning-bind",
        "--provisioning-cert-days",
        "--provisioning-port",
        "--provisioning-ssl-cert",
        "--provisioning-ssl-key",
        "--provisioning-token",
        "--ready-file",
        "--socket-path",
        "-h",
    },
    "proxy": {"--config-file", "--debug", "--help", "--run-path", "--socket-path", "-h"},
}


def test_every_command_has_the_flags_it_had() -> None:
    parsers = _parsers()
    assert set(parsers) == set(EXPECTED) | set(ADDED)
    for command, parser in parsers.items():
        wanted = EXPECTED.get(command, set()) | ADDED.get(command, set())
        assert _option_strings(parser) == wanted, command


@pytest.mark.parametrize("command", ["directord", "server", "client"])
def test_help_lists_every_flag(command: str) -> None:
    text = _parsers()[command].format_help()
    listed = {word.strip("[],") for word in text.split() if word.startswith(("--", "[--", "-h"))}
    assert EXPECTED[command] <= listed


def test_driver_flags_are_accepted_whatever_the_driver() -> None:
    parser = build_parser()
    argv = ["--nats-url", "nats://n:1", "client", "--driver", "zmq", "--grpc-port", "1"]
    argv += ["--messaging-ssl", "--job-port", "2", "--broker-namespace", "x"]
    ns = parser.parse_args(argv)
    assert (ns.nats_url, ns.grpc_port, ns.messaging_ssl, ns.job_port) == ("nats://n:1", 1, True, 2)


def test_target_takes_several_ids_after_one_flag_as_directord_does() -> None:
    parser = build_parser()
    ns, extra = parser.parse_known_args(
        ["exec", "--verb", "RUN", "true", "--target", "a", "b", "--target", "c", "--wait"]
    )
    assert (ns.target, ns.args, extra, ns.wait) == (["a", "b", "c"], ["true"], [], True)
    ns = parser.parse_args(["orchestrate", "f.yaml", "--target", "a", "b", "--poll", "--check"])
    assert (ns.target, ns.files, ns.poll, ns.check) == (["a", "b"], ["f.yaml"], True, True)


@pytest.mark.parametrize(
    ("argv", "targets", "args"),
    [
        (["--target", "node2", "echo hi"], ["node2"], ["echo hi"]),
        (["--target", "a", "b", "echo hi", "--wait"], ["a", "b"], ["echo hi"]),
        (["--target", "node2", "--timeout 60 sleep 1"], ["node2"], ["--timeout 60 sleep 1"]),
        (["echo hi", "--target", "a", "b"], ["a", "b"], ["echo hi"]),
        # A one-word command right after --target is an ID: the server refuses it.
        (["--target", "a", "uptime"], ["a", "uptime"], []),
    ],
)
def test_exec_finds_its_command_among_the_target_ids(
    argv: list[str], targets: list[str], args: list[str]
) -> None:
    from directord.cli.main import _command_after_target

    ns, extra = build_parser().parse_known_args(["exec", "--verb", "RUN", *argv])
    _command_after_target(ns)
    assert (ns.target, ns.args, extra) == (targets, args, [])
