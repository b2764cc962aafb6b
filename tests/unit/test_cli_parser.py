"""The CLI's parser fills only the command being run, and parses exactly as the full one.

``main`` builds the subcommands' arguments lazily (each module command imports
its module for them); these tests hold it to the parser with every command
filled: same namespaces, same errors, same ``COMMAND --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from collections.abc import Iterator

import pytest

from directord import __version__, config
from directord.cli.main import _Commands, _commands, build_parser, main

COMMANDS = [name for name, _, _ in _commands()]


@pytest.fixture(autouse=True)
def installed_drivers_only() -> Iterator[None]:
    config.drivers.cache_clear()
    yield
    config.drivers.cache_clear()


def _commands_action(parser: argparse.ArgumentParser) -> _Commands:
    [action] = [a for a in parser._actions if isinstance(a, _Commands)]
    return action


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[object, str, str]:
    """(namespace and extras, or the exit code; stdout; stderr) of parsing ``argv``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            ns, extra = parser.parse_known_args(argv)
            result: object = (vars(ns), extra)
        except SystemExit as exc:
            result = ("exit", exc.code)
    return result, out.getvalue(), err.getvalue()


def test_the_help_lists_every_command_without_filling_any() -> None:
    parser = build_parser(lazy=True)
    text = parser.format_help()
    assert all(name in text for name in COMMANDS)
    assert text == build_parser().format_help()
    assert sorted(_commands_action(parser).fills) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_is_the_full_one(command: str) -> None:
    full = _parse(build_parser(), [command, "--help"])
    lazy = _parse(build_parser(lazy=True), [command, "--help"])
    assert lazy == full
    assert full[0] == ("exit", 0)
    options = {
        s
        for action in _commands_action(build_parser()).choices[command]._actions
        for s in action.option_strings
    }
    assert all(option in lazy[1] for option in options), options


@pytest.mark.parametrize(
    "argv",
    [
        ["exec", "--verb", "RUN", "true", "--wait"],
        # A global option's value that is a command's name is the value, not the command.
        ["--identity", "exec", "exec", "--verb", "RUN", "true"],
        ["--identity=exec", "exec", "--verb", "RUN", "true"],
        ["--socket-path", "orchestrate", "exec", "--verb", "RUN", "--target", "a", "echo hi"],
        ["--config-file", "server", "client", "--identity", "node1"],
        ["--datastore", "pki", "server", "--grpc-port", "0"],
        # Abbreviated global options take their value the same way.
        ["--sock", "demo", "--ident", "units", "orchestrate", "site.yaml", "--wait"],
        ["--debug", "pki", "--help"],
        ["--driver", "zmq", "server", "--zmq-generate-keys", "--client", "n1"],
        ["unit-file", "server"],
        ["exec", "--verb", "RUN", "--skip-cache", "echo", "hi"],
        # Errors: the same message and exit status.
        ["exec", "true"],
        ["--identity"],
        ["nosuchcommand"],
        [],
        ["--heartbeat-interval", "x", "exec", "--verb", "RUN"],
        ["orchestrate", "--wait", "--poll", "a.yaml"],
    ],
)
def test_lazy_parse_is_the_full_parse(argv: list[str]) -> None:
    assert _parse(build_parser(lazy=True), argv) == _parse(build_parser(), argv)


def test_only_the_command_parsed_is_filled() -> None:
    parser = build_parser(lazy=True)
    ns, _ = parser.parse_known_args(["--identity", "pki", "exec", "--verb", "RUN", "true"])
    assert ns.command == "exec" and ns.identity == "pki"
    assert sorted(_commands_action(parser).fills) == sorted(set(COMMANDS) - {"exec"})


def test_version_alone_and_with_options(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--version"], ["--debug", "--version"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 0
        assert capsys.readouterr().out == f"directord {__version__}\n"
    # An option missing its value is still an error, --version or not.
    with pytest.raises(SystemExit) as info:
        main(["--identity", "--version"])
    assert info.value.code == 2
