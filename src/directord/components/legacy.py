"""Components written for Directord, run unchanged on our interface.

A Directord component is a file whose class ``Component`` derives from
``directord.components.ComponentBase``; its verb is the file's name. It
declares its arguments in ``args()``, turns a job's arguments into the job's
data in ``server(exec_array, data, arg_vars)`` where the job is submitted,
and does the work in ``client(cache, job)`` on the node, returning
``(stdout, stderr, outcome, info)``.

:func:`adapt` wraps such a class in one of ours. Its limits, which
docs/components.md repeats:

* ``client()`` is synchronous: it runs in a worker thread. At the job's
  timeout the job ends ``timeout``, but the thread cannot be stopped; what it
  started keeps running until it returns.
* ``cache`` holds the node's ``args``, ``envs`` and ``query``: read as they
  were when the job started; what the component writes there is stored once
  ``client()`` returns. Other keys live for that one call.
* The job's data is what ``server()`` returns; it must be plain data (text,
  numbers, booleans, lists and mappings), as it travels to the node.
* ``--stdout-arg`` and ``--stderr-arg`` are stored by the node itself, so the
  ``cacheargs`` decorator only passes through; ``timeout`` too (the node
  enforces the job's timeout); ``retry`` retries as Directord's does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import subprocess
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, ClassVar, NoReturn

import jinja2
import jinja2.sandbox
import msgspec

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError, ExecHelp
from directord.models import State

_CACHED = ("args", "envs", "query")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise ComponentArgsError(f"{self.prog}: {message}")

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise ComponentArgsError(message or f"{self.prog}: invalid arguments")


class ComponentBase:
    """The base of Directord components (``from directord import components``)."""

    command: Any = None
    info: Any = None
    driver: Any = None
    verb: Any = None
    block_on_tasks: Any = None
    queue_sentinel = False

    def __init__(self, desc: str | None = None) -> None:
        self.desc = desc
        self.log = logging.getLogger("directord.components.legacy")
        self.blueprint = jinja2.sandbox.ImmutableSandboxedEnvironment(
            keep_trailing_newline=True, undefined=jinja2.StrictUndefined
        )
        self.known_args: Any = None
        self.unknown_args: list[str] = []
        self.cacheable = True
        self.requires_lock = False
        self.parser: argparse.ArgumentParser = _Parser(add_help=False)

    @staticmethod
    def run_command(
        command: Any,
        shell: bool = True,
        env: Mapping[str, str] | None = None,
        execute: str = "/bin/sh",
        return_codes: int | list[int] | None = None,
        no_block: bool = False,
    ) -> tuple[bytes | None, bytes | None, bool]:
        """Run a command: ``(stdout, stderr, ok)``, ok when its status is in ``return_codes``."""
        environment = {**os.environ, **env} if env else dict(os.environ)
        codes = [0] if return_codes is None else return_codes
        codes = [codes] if isinstance(codes, int) else codes
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            executable=execute if shell else None,
            env=environment,
            shell=shell,
            start_new_session=True,
        )
        if no_block:
            return None, None, True
        output, error = process.communicate()
        return output, error, process.returncode in codes

    @staticmethod
    def sanitized_args(execute: list[str] | None) -> list[str]:
        """The words of ``execute``, flattened (split at whitespace, as Directord does)."""
        return [word for item in execute or () if item for word in item.split()]

    def exec_parser(
        self, parser: argparse.ArgumentParser, exec_array: list[str], arg_vars: Any = None
    ) -> tuple[Any, list[str]]:
        """Parse a job's arguments with the component's parser."""
        words = self.sanitized_args(exec_array)
        if "--exec-help" in words:  # before the required arguments are missed
            raise ExecHelp(parser.format_help())
        self.known_args, self.unknown_args = parser.parse_known_args(words)
        for key, value in (arg_vars or {}).items():
            setattr(self.known_args, key, value)
        return self.known_args, self.unknown_args

    def args(self) -> None:
        """Declare the arguments every component takes (extend it, calling super)."""
        self.parser = _Parser(prog=self.verb or "component", description=self.desc, add_help=False)
        self.parser.add_argument("--exec-help", action="store_true", help="show this help")
        self.parser.add_argument("--skip-cache", action="store_true", help="skip the node cache")
        self.parser.add_argument("--run-once", action="store_true", help="run on one target")
        self.parser.add_argument("--timeout", default=600, type=int, help="seconds (600)")
        self.parser.add_argument("--force-lock", action="store_true", help="run with the lock")
        self.parser.add_argument("--stdout-arg", help="store stdout as this cached arg")
        self.parser.add_argument("--stderr-arg", help="store stderr as this cached arg")

    @staticmethod
    def set_cache(
        cache: Any, key: str, value: Any, value_update: bool = False, extend: bool = False
    ) -> Any:
        """Set a cached item (with ``value_update``, merged into the mapping there)."""
        if value_update:
            value = {**(cache.get(key, default={}) or {}), **value}
        cache.set(key, value)
        return value

    def blueprinter(
        self, content: str, values: Mapping[str, Any] | None, allow_empty_values: bool = False
    ) -> tuple[bool, str]:
        """Render ``content`` with ``values``: ``(True, text)`` or ``(False, error)``."""
        if not values and not allow_empty_values:
            return False, "No arguments were defined for blueprinting"
        try:
            return True, self.blueprint.from_string(content).render(**(values or {}))
        except jinja2.TemplateError as exc:
            return False, str(exc)

    def file_blueprinter(self, cache: Any, file_to: str) -> tuple[bool, str | None]:
        """Render a file on the node in place with the cached args."""
        try:
            with open(file_to) as fh:
                ok, contents = self.blueprinter(fh.read(), cache.get("args"))
            if not ok:
                return False, contents
            with open(file_to, "w") as fh:
                fh.write(contents)
        except OSError as exc:
            return False, str(exc)
        return True, None

    def parser_error(self) -> str:
        """The component's argument help."""
        return self.parser.format_help()

    def server(self, exec_array: list[str], data: dict[str, Any], arg_vars: Any) -> Any:
        """Parse the job's arguments (extend it: call super, then fill ``data``)."""
        self.args()
        self.exec_parser(self.parser, exec_array, arg_vars)
        if self.known_args.stdout_arg:
            data["stdout_arg"] = self.known_args.stdout_arg
        if self.known_args.stderr_arg:
            data["stderr_arg"] = self.known_args.stderr_arg
        return data

    def client(self, cache: Any, job: dict[str, Any]) -> Any:
        """Do the job on the node (override)."""
        return None, None, True, None

    def close(self) -> None:
        """Release what the component holds."""

    def __enter__(self) -> ComponentBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Cache:
    """What a Directord component sees as its node cache (see the module's limits)."""

    def __init__(self, ctx: ExecContext) -> None:
        self.values: dict[str, Any] = {
            "args": dict(ctx.args),
            "envs": dict(ctx.envs),
            "query": dict(ctx.query),
        }
        self.written: set[str] = set()

    def get(self, key: str, default: Any = None, **_: Any) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any, **_: Any) -> bool:
        self.values[key] = value
        self.written.add(key)
        return True

    def setdefault(self, key: str, value: Any, **_: Any) -> Any:
        if key not in self.values:
            self.set(key, value)
        return self.values[key]

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.values


class LegacyComponent(Component):
    """Our side of a Directord component: parse with its ``server()``, run its ``client()``."""

    positional: ClassVar[str] = "raw"
    legacy: ClassVar[type[ComponentBase]]

    def help_text(self) -> str:
        component = self.legacy()
        component.verb = self.verb
        component.args()
        return component.parser.format_help()

    def parse(self, argstring: str, job_vars: Mapping[str, Any] | None = None) -> dict[str, Any]:
        component = self.legacy()
        component.verb = self.verb
        try:
            data = component.server(exec_array=[argstring], data={}, arg_vars=None)
        except (ComponentArgsError, ExecHelp):
            raise
        except Exception as exc:
            raise ComponentArgsError(f"{self.verb}: {type(exc).__name__}: {exc}") from None
        if data is None:
            data = {}
        try:
            data = msgspec.to_builtins(data)
        except (TypeError, msgspec.EncodeError) as exc:
            raise ComponentArgsError(
                f"{self.verb}: its job data is not plain data: {exc}"
            ) from None
        known = component.known_args
        timeout = float(getattr(known, "timeout", 600))
        if timeout <= 0:
            raise ComponentArgsError(f"{self.verb}: --timeout must be > 0")
        return {
            "argv": argstring,
            "job": data,
            "timeout": timeout,
            "skip_cache": bool(getattr(known, "skip_cache", False)),
            "run_once": bool(getattr(known, "run_once", False)),
            "force_lock": bool(getattr(known, "force_lock", False)),
            "stdout_arg": getattr(known, "stdout_arg", None),
            "stderr_arg": getattr(known, "stderr_arg", None),
        }

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        job = {
            **options["job"],
            "job_id": ctx.job_id,
            "timeout": ctx.timeout,
            "verb": self.verb,
        }
        cache = _Cache(ctx)
        component = self.legacy()
        component.verb = self.verb
        component.driver = SimpleNamespace(identity=ctx.identity)
        try:
            returned = await asyncio.to_thread(component.client, cache=cache, job=job)
        finally:
            for key in cache.written & set(_CACHED):
                if isinstance(cache.values[key], Mapping):
                    ctx.update_cache(key, cache.values[key])
        stdout, stderr, outcome, _info = returned
        return Outcome(
            State.SUCCESS if outcome else State.FAILED,
            0 if outcome else 1,
            _text(stdout),
            _text(stderr),
        )


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def adapt(verb: str, legacy: type[ComponentBase]) -> type[Component]:
    """Our component class for the Directord component ``legacy`` (verb: its file's name)."""
    summary = (legacy.__doc__ or "").strip().splitlines()[0] if legacy.__doc__ else ""
    return type(
        f"Legacy{verb.title()}",
        (LegacyComponent,),
        {"verb": verb, "summary": summary or f"Directord component {verb}", "legacy": legacy},
    )
