"""The Component interface and the argument parsing every component shares.

A component has two halves:

* ``parse`` runs where a job is built (CLI, library, server). It is pure: it
  turns the argument string of ``VERB: "args"`` into an options dict or raises
  :class:`ComponentArgsError`. ``prepare`` may then touch the submitting
  machine (COPY expands globs and hashes files there).
* ``execute`` runs on the node, doing all its I/O through the
  :class:`ExecContext` it is given, and returns an :class:`Outcome`.

Options every component takes: ``--exec-help``, ``--skip-cache``,
``--run-once``, ``--timeout N`` (600), ``--force-lock``, ``--stdout-arg KEY``,
``--stderr-arg KEY``.
"""

from __future__ import annotations

import argparse
import io
import re
import shlex
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NoReturn, Protocol

from directord.errors import ComponentArgsError, ExecHelp, OrchestrationError
from directord.models import FileRef, SourceFile, State
from directord.protocol import Message

DEFAULT_TIMEOUT = 600.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ComponentArgsError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise ComponentArgsError(message or f"{self.prog}: invalid arguments")


@dataclass(slots=True)
class ProcessResult:
    """What a finished child process produced."""

    rc: int | None
    stdout: str
    stderr: str
    timed_out: bool = False


@dataclass(slots=True)
class Outcome:
    """A component's verdict on one job."""

    state: State
    rc: int | None = None
    stdout: str = ""
    stderr: str = ""

    @classmethod
    def from_process(cls, proc: ProcessResult) -> Outcome:
        """Map a process result to success / failed / timeout."""
        stderr = proc.stderr
        if proc.timed_out:
            state = State.TIMEOUT
            # Say why on stderr too: it is what `--wait` prints for a failed node.
            stderr += ("\n" if stderr and not stderr.endswith("\n") else "") + (
                "timed out; its process group was killed"
            )
        elif proc.rc == 0:
            state = State.SUCCESS
        else:
            state = State.FAILED
        return cls(state, proc.rc, proc.stdout, stderr)

    @classmethod
    def ok(cls, stdout: str = "") -> Outcome:
        """A success without a process."""
        return cls(State.SUCCESS, 0, stdout, "")

    @classmethod
    def fail(cls, stderr: str, rc: int = 1) -> Outcome:
        """A failure without a process, with its reason on stderr."""
        return cls(State.FAILED, rc, "", stderr)


class ExecContext(Protocol):
    """What a component may do on the node. Implemented by the agent."""

    identity: str
    args: dict[str, Any]
    envs: dict[str, str]
    query: dict[str, Any]
    job_id: str
    timeout: float
    vars: dict[str, Any]
    files: list[FileRef]

    def render(self, text: str) -> str:
        """Render Jinja2 with cached args (plus job vars); undefined names raise."""
        ...

    def update_cache(self, section: str, values: Mapping[str, Any]) -> None:
        """Merge values into the persistent ``args`` / ``envs`` / ``query`` cache."""
        ...

    def evict_cache(self, section: str) -> None:
        """Clear one part of the node cache (args, envs, query, jobs, parents, all)."""
        ...

    async def run_shell(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        block: bool = True,
        durable: bool = False,
    ) -> ProcessResult:
        """Run ``/bin/sh -c command`` in its own process group, honouring the timeout.

        ``durable``: the process outlives the agent. Its output and exit status
        go to the node's journal directory, and an agent restarted while it runs
        re-attaches and reports its result as this job's (so only the job's one
        main process should be durable).
        """
        ...

    def output_line(self, stream: str, line: str) -> None:
        """Send one line of output live to ``--stream`` watchers (dropped without them)."""
        ...

    def cancel_waiting(self) -> int:
        """Cancel every job waiting on this node (QUEUESENTINEL); returns how many."""
        ...

    async def fetch_file(
        self,
        index: int,
        dest: str,
        expected_sha256: str,
        size: int,
        *,
        uid: int = -1,
        gid: int = -1,
        mode: int | None = None,
    ) -> None:
        """Stream file ``index`` of this job from the server into ``dest``, checking its hash.

        The content goes to a new temporary file (``O_EXCL``) beside ``dest``,
        which gets its owner and mode through its descriptor and is then
        renamed over ``dest``: a symlink at ``dest`` is replaced, never written
        through, and the file never appears with other rights than these.

        Args:
            index: the file's position in the job's files.
            dest: the final path.
            expected_sha256: hex SHA-256 the content must have.
            size: its size in bytes.
            uid: owner to give the file; -1 keeps the agent's.
            gid: group to give the file; -1 keeps the agent's.
            mode: permission bits; None keeps the temporary file's 0600.

        Raises:
            ComponentError: the content does not match ``expected_sha256``.
            OSError: the file cannot be written, chowned or renamed.
        """
        ...

    async def fetch_bytes(self, index: int, limit: int) -> bytes:
        """Fetch a small file of this job whole (used for blueprints)."""
        ...

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        """Ask the server something on this node's behalf."""
        ...

    async def query_exchange(self, value: Any, wait: bool) -> dict[str, Any] | None:
        """Report this node's QUERY value; optionally wait for everyone's values."""
        ...

    def request_restart(self) -> None:
        """Re-execute the client once this job's result is acknowledged."""
        ...

    def request_reboot(self, delay: float) -> None:
        """Reboot the node ``delay`` seconds after this job's result is acknowledged.

        Nothing new starts on the node from now on; the jobs it holds run once it is back.
        """
        ...


class ServerTarget(Protocol):
    """One node's slot in a job, as a server hook sees it."""

    @property
    def state(self) -> State:
        """Where the job stands on that node."""
        ...


class ServerJob(Protocol):
    """A job as a component's server hook sees it (the server's job record)."""

    @property
    def id(self) -> str:
        """The job id."""
        ...

    @property
    def options(self) -> dict[str, Any]:
        """The component's parsed options."""
        ...

    @property
    def files(self) -> tuple[FileRef, ...]:
        """The files the job carries."""
        ...

    @property
    def results(self) -> Mapping[str, ServerTarget]:
        """Its targets by identity."""
        ...

    query: dict[str, Any]
    query_done: bool


class ServerContext(Protocol):
    """What a component's server hook may do on the server."""

    def job(self, job_id: str) -> ServerJob | None:
        """A job by id."""
        ...

    def jobs_with_sha(self, sha: str) -> list[ServerJob]:
        """Jobs with this fingerprint, newest first."""
        ...

    async def read_file(self, sha256: str, offset: int, size: int) -> bytes:
        """Bytes of a file in the server's file store."""
        ...

    def send(self, identity: str, message: Message) -> None:
        """Send a message to a node if it is online now (else nothing)."""
        ...

    def fail(self, identity: str, job: ServerJob, reason: str) -> None:
        """End the node's target of the job as failed (once)."""
        ...

    def store(self, job: ServerJob) -> None:
        """Persist the job record (after changing ``query``)."""
        ...

    @property
    def query_max_bytes(self) -> int:
        """The largest QUERY value a node may report (``--query-max-bytes``)."""
        ...

    def mark_rebooting(self, identity: str, seconds: float, started: float | None) -> None:
        """The node goes down for a reboot in ``seconds``: keep its jobs until it is back.

        ``started`` is when (by the node's clock) the job that said so started: one
        that ran under an earlier client of the node is old news, and ignored.
        """
        ...


class ServerHook:
    """The server-side half of a component, for the few that need one.

    The server routes to it what nodes send about the component's jobs, after
    checking that the job targets the node: the requests named in
    ``requests`` (COPY's ``chunk``, JOB_WAIT's ``job_status``), reports
    (QUERY's values), the results nodes report (REBOOT's), and the end of
    each target.
    """

    #: node request methods this hook answers
    requests: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    async def request(self, node: str, job: ServerJob, method: str, params: dict[str, Any]) -> Any:
        """Answer a node's request about one of its jobs.

        Raises:
            OrchestrationError: the request is refused (its text goes back to the node).
        """
        raise OrchestrationError(f"no {method!r} requests for this job", path="<node>")

    def on_report(self, node: str, job: ServerJob, value: Any) -> None:
        """A node reported a value for the job (QUERY)."""
        raise OrchestrationError("this job takes no reports", path="<node>")

    def on_target_final(self, job: ServerJob) -> None:
        """A target of the job reached a final state."""

    def on_result(self, node: str, job: ServerJob, state: State, started: float | None) -> None:
        """The node reported how the job ended there (its target was not final before).

        ``started`` is when the job started, by the node's clock.
        """


class Component(ABC):
    """One verb. Subclasses declare their own options and the node-side action."""

    verb: ClassVar[str]
    summary: ClassVar[str]
    # "raw": the rest of the argument string is kept verbatim (a shell command).
    # "split": the rest is shlex-split into ``argv`` positional words.
    positional: ClassVar[str] = "split"
    # Components that mutate shared node state or depend on order (ARG, QUERY ...)
    # may ask for the node's exclusive lock; users can force it with --force-lock.
    needs_lock: ClassVar[bool] = False
    # The server-side half, for components whose jobs need the server while they run.
    server_hook: ClassVar[type[ServerHook] | None] = None
    # Components whose jobs carry files (COPY/ADD) read them where the job is
    # submitted, with the submitter's rights (source_files); the server never does.
    takes_files: ClassVar[bool] = False

    def __init__(self) -> None:
        self._parser = self._build_parser()

    def _build_parser(self) -> _Parser:
        # exit_on_error stays on: argparse then reports bad values through error(), which
        # raises ComponentArgsError; with it off, argparse.ArgumentError would escape.
        parser = _Parser(prog=self.verb, description=self.summary, add_help=False)
        parser.add_argument("--exec-help", action="store_true", help="show this help")
        parser.add_argument(
            "--skip-cache",
            action="store_true",
            help="run even if this job already succeeded on the node",
        )
        parser.add_argument("--run-once", action="store_true", help="run on the first target only")
        parser.add_argument(
            "--timeout",
            type=float,
            default=DEFAULT_TIMEOUT,
            help="seconds before the job's process group is killed (600)",
        )
        parser.add_argument(
            "--force-lock", action="store_true", help="run holding the node's exclusive lock"
        )
        parser.add_argument(
            "--stdout-arg", metavar="KEY", help="store the stripped stdout as cached arg KEY"
        )
        parser.add_argument(
            "--stderr-arg", metavar="KEY", help="store the stripped stderr as cached arg KEY"
        )
        self.add_arguments(parser)
        return parser

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Declare the component's own options (override)."""

    def help_text(self) -> str:
        """The ``--exec-help`` text."""
        return self._parser.format_help()

    def parse(self, argstring: str, job_vars: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Parse ``VERB: "argstring"`` into options; ``vars`` override same-named options.

        Raises:
            ComponentArgsError: unknown option, bad value, missing argument.
            ExecHelp: ``--exec-help`` was given.
        """
        flags, rest = split_leading_options(argstring, self._parser)
        ns = self._parser.parse_args(flags)
        options = {k: v for k, v in vars(ns).items()}
        if options.pop("exec_help"):
            raise ExecHelp(self.help_text())
        if self.positional == "raw":
            options["argv"] = rest
        else:
            options["argv"] = split_words(self.verb, rest)
        for key, value in (job_vars or {}).items():
            if key in options and key != "argv":
                options[key] = _vars_override(self.verb, key, options[key], value)
        if options["timeout"] <= 0:
            raise ComponentArgsError(f"{self.verb}: --timeout must be > 0")
        self.validate(options)
        return options

    def validate(self, options: dict[str, Any]) -> None:
        """Check the positional arguments (override); raise ComponentArgsError."""

    def prepare(self, options: dict[str, Any], cwd: str) -> dict[str, Any]:
        """Submit-side step with I/O on the submitting machine (override)."""
        return options

    def source_files(self, options: dict[str, Any], cwd: str) -> list[SourceFile]:
        """The files this job carries, found and hashed on the submitting machine.

        Runs in the CLI or library, as the user who submits; they upload the
        content. Only components with ``takes_files`` override it.

        Raises:
            ComponentArgsError: a source is missing or unreadable.
        """
        return []

    @abstractmethod
    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        """Do the job on the node."""


_TEMPLATE = re.compile(r"\{\{.*?\}\}|\{%.*?%\}")


def split_words(verb: str, text: str) -> list[str]:
    """Split like a shell, keeping each ``{{ ... }}`` / ``{% ... %}`` in one word."""
    spans: list[str] = []

    def hide(match: re.Match[str]) -> str:
        spans.append(match.group(0))
        return f"\x00{len(spans) - 1}\x00"

    try:
        words = shlex.split(_TEMPLATE.sub(hide, text))
    except ValueError as exc:
        raise ComponentArgsError(f"{verb}: {exc}") from None
    return [re.sub(r"\x00(\d+)\x00", lambda m: spans[int(m.group(1))], w) for w in words]


def _vars_override(verb: str, key: str, current: Any, value: Any) -> Any:
    if isinstance(current, bool) or current is None:
        if current is not None and not isinstance(value, bool):
            raise ComponentArgsError(f"{verb}: vars.{key} must be true or false")
        return value
    if isinstance(current, int | float):
        # bool is an int to Python, but `timeout: true` is a mistake, not one second.
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ComponentArgsError(f"{verb}: vars.{key} must be a number")
        if isinstance(current, int) and not isinstance(value, int):
            raise ComponentArgsError(f"{verb}: vars.{key} must be a whole number")
    return value


def split_leading_options(argstring: str, parser: argparse.ArgumentParser) -> tuple[list[str], str]:
    """Split leading ``--options`` from the rest, keeping the rest verbatim.

    Shell commands must reach ``/bin/sh`` exactly as written (pipes, quotes),
    so only the leading tokens that are this parser's options are tokenised.
    """
    takes_value: dict[str, bool] = {}
    for action in parser._actions:
        for opt in action.option_strings:
            takes_value[opt] = action.nargs != 0
    stream = io.StringIO(argstring)
    lexer = shlex.shlex(stream, posix=True, punctuation_chars=False)
    lexer.whitespace_split = True
    lexer.commenters = ""
    flags: list[str] = []
    while True:
        start = stream.tell()
        try:
            token = lexer.get_token()
        except ValueError as exc:
            raise ComponentArgsError(f"{parser.prog}: {exc}") from None
        if token is None or token == lexer.eof:
            return flags, ""
        name = token.split("=", 1)[0]
        if not token.startswith("--") or name not in takes_value:
            if token.startswith("--") and name.replace("-", "").isalpha():
                # An unknown leading option is a typo, not the start of a command.
                parser.error(f"unrecognized option {name}")
            return flags, argstring[start:].strip()
        flags.append(token)
        if takes_value[name] and "=" not in token:
            try:
                value = lexer.get_token()
            except ValueError as exc:  # an unterminated quote in the option's value
                raise ComponentArgsError(f"{parser.prog}: {exc}") from None
            if value is None or value == lexer.eof:
                parser.error(f"option {name} expects a value")
            flags.append(value)
