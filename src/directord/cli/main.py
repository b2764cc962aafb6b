"""``directord`` entry point: global options, subcommands, error-to-exit-code mapping."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from directord import __version__
from directord.errors import (
    ConfigError,
    DirectordError,
    ExecHelp,
    OrchestrationError,
    ServerUnavailable,
)

if TYPE_CHECKING:
    from directord.config import Settings

# The rest of directord is imported where it is used: `directord --version` needs
# none of it, and each command only its own part.

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3
SCOPES = {
    "server": {"server"},
    "client": {"client"},
    "exec": {"user"},
    "orchestrate": {"user"},
    "manage": {"user"},
    "demo": set(),
    "pki": {"pki"},
    "provisioner": {"provisioner"},
    "bootstrap": set(),
    "units": {"user"},
    "proxy": set(),
}

# Commands whose code lives in a module of its own, imported only when used:
# name -> (module, its run function, help). Each module has add_arguments(parser),
# and the run function takes (namespace, settings) and returns the exit status.
MODULE_COMMANDS: dict[str, tuple[str, str, str]] = {
    "manage": ("directord.cli.manage", "run_manage", "inspect and manage the cluster"),
    "pki": ("directord.cli.pki", "run_pki", "the built-in certificate authority"),
    "bootstrap": (
        "directord.cli.bootstrap",
        "run_bootstrap",
        "set up servers and clients over SSH from catalogs",
    ),
    "provisioner": (
        "directord.cli.provisioner",
        "run_provisioner_command",
        "enrol new nodes: run the provisioner, or control it",
    ),
    "units": (
        "directord.cli.units",
        "run_units",
        "systemd units on the nodes (list, start, monitor ...)",
    ),
    "proxy": (
        "directord.cli.proxy",
        "run_proxy",
        "what a directord-proxy@ unit runs (a unit on another node)",
    ),
    # No options: it prints a file.
    "unit-file": (
        "directord.cli.unitfile",
        "run_unit_file",
        "print a systemd unit that runs this installation",
    ),
}


def _add_options(parser: argparse.ArgumentParser, scopes: set[str]) -> None:
    """Add the options visible for a command; unset flags are left out.

    The options are the common ones (:class:`Settings`) and every known
    driver's, whichever driver is selected: a script passing another driver's
    flags keeps working.
    """
    from directord.config import option_fields, option_type

    for f in option_fields():
        wanted = f.metadata["scopes"]
        if "all" not in wanted and not (wanted & scopes):
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = option_type(f.name)
        if kind is bool:
            parser.add_argument(
                flag, action="store_true", default=argparse.SUPPRESS, help=f.metadata["help"]
            )
        else:
            parser.add_argument(
                flag,
                type=kind,
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=f"{f.metadata['help']} (default: {f.default!r})",
            )


if TYPE_CHECKING:
    _SubParsersAction = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsersAction = argparse._SubParsersAction


class _Commands(_SubParsersAction):
    """The subcommands; a command's parser can get its arguments only once chosen.

    Adding every command's arguments costs more than the rest of a short
    command (each module command imports its module, with what it imports in
    turn). A command in :attr:`fills` gets its arguments when argparse hands
    the command's words to its parser, before they are parsed: the parse, its
    errors and ``directord COMMAND --help`` are the same as with every command
    filled, and ``directord --help`` lists every command with its help.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: command -> the function adding its arguments, for the commands not filled yet
        self.fills: dict[str, Callable[[argparse.ArgumentParser], None]] = {}

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        if values:
            name = values[0]
            fill = self.fills.pop(name, None)
            if fill is not None:
                fill(self.choices[name])
        super().__call__(parser, namespace, values, option_string)


def _version_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="directord")
    parser.add_argument("--version", action="version", version=f"directord {__version__}")
    return parser


def build_parser(*, lazy: bool = False) -> argparse.ArgumentParser:
    """The whole command line.

    Args:
        lazy: give a command its arguments only when it is the one parsed (what
            :func:`main` uses); otherwise every command has them now.
    """
    parser = _version_parser()
    parser.description = "Asynchronous deployment and operations platform."
    _add_options(parser, {"server", "client", "user", "pki", "provisioner"})
    sub = cast(
        _Commands, parser.add_subparsers(dest="command", metavar="COMMAND", action=_Commands)
    )
    sub.required = True
    for name, text, fill in _commands():
        p = sub.add_parser(name, help=text)
        if lazy:
            sub.fills[name] = fill
        else:
            fill(p)
    return parser


def _commands() -> list[tuple[str, str, Callable[[argparse.ArgumentParser], None]]]:
    """Every command, in the order of the help: (name, help, the function adding its arguments)."""
    return [
        ("server", "run the server", _server_arguments),
        ("client", "run the node agent", _client_arguments),
        ("exec", "run one job on the nodes", _exec_arguments),
        ("orchestrate", "run orchestration files", _orchestrate_arguments),
        *[(name, text, _module_arguments(name)) for name, (_, _, text) in MODULE_COMMANDS.items()],
        ("demo", "start a throwaway local cluster and run a sample", _demo_arguments),
    ]


def _server_arguments(p: argparse.ArgumentParser) -> None:
    _add_options(p, SCOPES["server"])
    p.add_argument(
        "--zmq-generate-keys",
        action="store_true",
        help="write ZeroMQ curve keys under --zmq-key-dir (backing up old ones) and exit",
    )
    p.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="with --zmq-generate-keys: a keypair bound to this node (repeatable)",
    )


def _client_arguments(p: argparse.ArgumentParser) -> None:
    _add_options(p, SCOPES["client"])


def _exec_arguments(p: argparse.ArgumentParser) -> None:
    _add_options(p, SCOPES["exec"])
    p.add_argument("--verb", required=True, help="component verb, e.g. RUN")
    p.add_argument("args", nargs="*", help="the verb's arguments, e.g. 'echo hello'")
    _add_run_options(p)


def _orchestrate_arguments(p: argparse.ArgumentParser) -> None:
    _add_options(p, SCOPES["orchestrate"])
    p.add_argument("files", nargs="+", help="orchestration YAML files")
    p.add_argument(
        "--restrict",
        nargs="+",
        default=[],
        metavar="SHA",
        help="run only the jobs with these fingerprints (prefixes)",
    )
    p.add_argument("--ignore-cache", action="store_true", help="run even cached jobs")
    p.add_argument(
        "--finger-print",
        action="store_true",
        help="print every job's fingerprint and exit without running",
    )
    _add_run_options(p)


def _module_arguments(name: str) -> Callable[[argparse.ArgumentParser], None]:
    """What adds the arguments of a module command: it imports the module."""

    def fill(p: argparse.ArgumentParser) -> None:
        if name in SCOPES:
            _add_options(p, SCOPES[name])
        importlib.import_module(MODULE_COMMANDS[name][0]).add_arguments(p)

    return fill


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    _add_options(p, SCOPES["demo"])
    p.add_argument("--nodes", type=int, default=3, help="number of local clients (3)")
    p.add_argument("--keep", action="store_true", help="leave the cluster running until Ctrl-C")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        action="extend",
        nargs="+",
        default=[],
        metavar="ID",
        help="run on these nodes (--target a b, or repeated); default every online node",
    )
    p.add_argument("--force-async", action="store_true", help="run beside other orchestrations")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--wait",
        action="store_true",
        help="wait for the end; exit 0 only if every job succeeded everywhere",
    )
    mode.add_argument("--poll", action="store_true", help="print each result as it arrives")
    mode.add_argument("--stream", action="store_true", help="print output lines live")
    p.add_argument(
        "--check",
        action="store_true",
        help="accepted for Directord's scripts: with --wait, --poll or --stream the "
        "exit status is always non-zero when a job failed",
    )
    p.add_argument(
        "--format", choices=("table", "json"), default="table", help="output format (table)"
    )


def settings_from(ns: argparse.Namespace) -> Settings:
    """Resolve Settings from the flags given (only explicitly given ones override)."""
    from directord.config import load_settings, option_fields

    names = {f.name for f in option_fields()}
    flags: dict[str, Any] = {k: v for k, v in vars(ns).items() if k in names}
    # Only the daemons use the secret files; operators need not be able to read them.
    return load_settings(flags, secrets=ns.command in ("server", "client", "provisioner"))


def _command_after_target(ns: argparse.Namespace) -> None:
    """``exec --target node2 'echo hi'``: the command is not a node.

    ``--target`` takes several IDs, as Directord's does, so the words after it
    are IDs until an option. The first one that cannot be a node's identity
    (a command with a space, say) starts the command again: it and what
    follows go back in front of the verb's arguments. A one-word command right
    after ``--target`` stays an ID, and an unknown node is refused, never run.
    """
    from directord.security.identities import identity_problem

    targets: list[str] = ns.target
    for i, value in enumerate(targets):
        if identity_problem(value) is not None:
            ns.args = targets[i:] + ns.args
            ns.target = targets[:i]
            return


def _choose_components(command: str, settings: Settings) -> None:
    """Where users' component files come from: a client runs only what its server ships."""
    if command not in ("server", "client", "exec", "orchestrate", "demo"):
        return  # no job is built or run here
    from directord.components import use_components_from

    if command == "client":
        use_components_from(settings.components_path if settings.local_components else None)
    else:
        use_components_from(settings.components_path)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
        # The same version action, without the options: the whole parser loads every
        # driver for them, which is most of the time `directord --version` takes.
        _version_parser().parse_args(["--version"])
    parser = build_parser(lazy=True)
    ns, extra = parser.parse_known_args(argv)
    if ns.command == "exec":
        _command_after_target(ns)
    if extra:
        if ns.command != "exec":
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        # `exec --verb RUN --skip-cache 'cmd'`: options of the component, kept in order.
        ns.args = extra + ns.args
    try:
        settings = settings_from(ns)
        command = ns.command
        _choose_components(command, settings)
        if settings.debug and command not in ("server", "client"):
            # The daemons set up their own logging; a user command logs its API calls.
            from directord.log import configure_logging

            configure_logging(True, "directord")
        if command == "server" and ns.zmq_generate_keys:
            from directord.cli.keys import generate_keys
            from directord.transports.zmq import ZmqOptions

            return generate_keys(settings.options(ZmqOptions), ns.client)
        if command == "server":
            from directord.cli.daemons import run_server

            return run_server(settings)
        if command == "client":
            from directord.cli.daemons import run_client

            return run_client(settings)
        if command in ("exec", "orchestrate"):
            from directord.cli.jobs import run_jobs

            return run_jobs(command, ns, settings)
        if command in MODULE_COMMANDS:
            module, function, _ = MODULE_COMMANDS[command]
            run: Callable[[argparse.Namespace, Settings], int]
            run = getattr(importlib.import_module(module), function)
            return run(ns, settings)
        if command == "demo":
            from directord.cli.demo import run_demo

            return run_demo(ns, settings)
    except ServerUnavailable as exc:
        print(f"directord: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except ExecHelp as exc:  # not a failure: the help a job asked for
        print(exc.text)
        return EXIT_OK
    except (ConfigError, OrchestrationError) as exc:
        # The server's refusals arrive typed (errors.remote_error): its ConfigError or
        # OrchestrationError is a usage error here too.
        print(f"directord: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DirectordError as exc:
        print(f"directord: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`directord manage --list-jobs | head`): stop quietly,
        # and keep the interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception:
        import tempfile
        import traceback

        with tempfile.NamedTemporaryFile(
            "w", prefix="directord-crash-", suffix=".txt", delete=False
        ) as fh:
            traceback.print_exc(file=fh)
        print(f"directord: internal error; traceback written to {fh.name}", file=sys.stderr)
        return EXIT_FAILED
    parser.error(f"unknown command {ns.command}")


if __name__ == "__main__":
    sys.exit(main())
