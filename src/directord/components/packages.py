"""PKG and DNF: install, upgrade or remove packages with the node's package manager.

``DNF: [--clear-metadata] [--exclude PKG] [--latest | --absent] [--retry N] PACKAGE...``
takes Directord 0.12's arguments and runs ``dnf``. ``PKG`` takes the same
arguments and runs whichever package manager the node has: ``apt-get`` where
it exists, else ``dnf``, so one orchestration serves Debian-family and
RPM-family nodes.

What runs, for packages P and excluded packages X (apt-get with
``DEBIAN_FRONTEND=noninteractive``):

* no state option: ``dnf -q -y install -- P``; ``apt-get install -y -q
  --no-install-recommends --no-upgrade -- P`` (installed ones stay as they are).
* ``--latest``: ``dnf -q -y --best install -- P``; ``apt-get install -y -q
  --no-install-recommends -- P``. Both install the missing ones and upgrade
  the installed ones to the newest version.
* ``--absent``: ``dnf -q -y remove -- P``; ``apt-get remove -y -q -- P``.
* ``--clear-metadata``: first ``dnf -q clean all`` and ``dnf -q makecache``;
  first ``apt-get update -q``.
* ``--exclude X``: ``--exclude=X,...`` on the dnf command. With apt, X is
  held back: ``apt-mark hold`` before the commands and ``apt-mark unhold``
  after them (a package already held stays held), so a change to X, asked
  for or needed by a dependency, fails the job. A job killed at its timeout
  while apt runs may leave the hold in place (``apt-mark showhold``).

The commands run as one shell line, like a RUN command (in the node's cached
ENV values, surviving a client restart), and ``--retry N`` runs that line
again up to N more times while it fails (default 2: three attempts in all,
as Directord's DNF). Only names of packages are taken (letters, digits and
``_ . + -``, never starting with ``-``): no versions, architectures, globs
or options, so no word can reach the package manager as an option. A name
may be a template; it is checked again once rendered on the node. Every
word is quoted with :func:`shlex.quote`.

Output: the package manager's stdout, then one line per package whose
installed version changed (``installed NAME VERSION``, ``changed NAME OLD ->
NEW``, ``removed NAME VERSION``...), read with ``dpkg-query`` or ``rpm``
before and after.
"""

from __future__ import annotations

import argparse
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError

#: A Debian or RPM package name: Debian's are lowercase, RPM's may use capitals and '_'.
PACKAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
#: Package managers PKG looks for on the node, in order.
MANAGERS = ("apt-get", "dnf")
DEFAULT_RETRY = 2


class PackageState(Enum):
    """What the job makes of its packages."""

    PRESENT = "present"
    LATEST = "latest"
    ABSENT = "absent"


@dataclass(frozen=True, slots=True)
class Plan:
    """The commands of one package job, as argument lists.

    ``steps`` run in order while each succeeds; ``cleanup`` runs after them
    whatever they returned, and the job's exit status is that of the steps.
    """

    steps: tuple[tuple[str, ...], ...]
    cleanup: tuple[tuple[str, ...], ...] = ()
    env: Mapping[str, str] | None = None

    def shell(self) -> str:
        """The plan as one ``/bin/sh`` line, every word quoted."""
        line = " && ".join(shlex.join(step) for step in self.steps)
        if self.cleanup:
            undo = "; ".join(shlex.join(step) + " >/dev/null" for step in self.cleanup)
            line = f"{{ {line}; }}; rc=$?; {undo}; exit $rc"
        if self.env:
            exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
            line = f"export {exports}; {line}"
        return line


def is_package_name(word: str) -> bool:
    """True when ``word`` is a package name PKG and DNF accept."""
    return PACKAGE_NAME.fullmatch(word) is not None


def dnf_plan(
    packages: Sequence[str],
    state: PackageState,
    *,
    exclude: Sequence[str] = (),
    clear_metadata: bool = False,
) -> Plan:
    """The dnf commands for a job (pure: nothing runs).

    Args:
        packages: validated package names.
        state: present, latest or absent.
        exclude: package names dnf leaves out of the transaction.
        clear_metadata: clean dnf's metadata and rebuild its cache first.

    Returns:
        The plan; its steps are the exact argument lists.
    """
    steps: list[tuple[str, ...]] = []
    if clear_metadata:
        steps += [("dnf", "-q", "clean", "all"), ("dnf", "-q", "makecache")]
    base = ["dnf", "-q", "-y"]
    if exclude:
        base.append("--exclude=" + ",".join(exclude))
    if state is PackageState.ABSENT:
        action = ["remove"]
    elif state is PackageState.LATEST:
        action = ["--best", "install"]
    else:
        action = ["install"]
    steps.append((*base, *action, "--", *packages))
    return Plan(tuple(steps))


def apt_plan(
    packages: Sequence[str],
    state: PackageState,
    *,
    exclude: Sequence[str] = (),
    clear_metadata: bool = False,
    already_held: Sequence[str] = (),
) -> Plan:
    """The apt-get commands for a job (pure: nothing runs).

    Args:
        packages: validated package names.
        state: present, latest or absent.
        exclude: package names held back for the duration of the command.
        clear_metadata: run ``apt-get update`` first.
        already_held: packages held before the job; they stay held afterwards.

    Returns:
        The plan; its steps are the exact argument lists.
    """
    steps: list[tuple[str, ...]] = []
    to_hold = [name for name in dict.fromkeys(exclude) if name not in already_held]
    if to_hold:
        steps.append(("apt-mark", "hold", "--", *to_hold))
    if clear_metadata:
        steps.append(("apt-get", "update", "-q"))
    if state is PackageState.ABSENT:
        steps.append(("apt-get", "remove", "-y", "-q", "--", *packages))
    else:
        command = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
        if state is PackageState.PRESENT:
            command.append("--no-upgrade")
        steps.append((*command, "--", *packages))
    cleanup = (("apt-mark", "unhold", "--", *to_hold),) if to_hold else ()
    return Plan(tuple(steps), cleanup, APT_ENV)


def installed_query(manager: str, packages: Sequence[str]) -> str:
    """A shell command printing ``NAME<TAB>STATUS<TAB>VERSION`` for each known package."""
    if manager == "apt-get":
        fmt = "${Package}\\t${db:Status-Abbrev}\\t${Version}\\n"
        return shlex.join(["dpkg-query", "-W", "-f", fmt, "--", *packages]) + " 2>/dev/null"
    fmt = "%{NAME}\\tii\\t%{VERSION}-%{RELEASE}\\n"
    return shlex.join(["rpm", "-q", "--qf", fmt, "--", *packages]) + " 2>/dev/null"


def parse_installed(text: str) -> dict[str, str]:
    """Installed versions by name from :func:`installed_query`'s output."""
    versions: dict[str, str] = {}
    for line in text.splitlines():
        fields = line.split("\t")
        # dpkg's second status letter is 'i' for installed; rpm prints nothing tabbed
        # for a package that is not installed.
        if len(fields) == 3 and len(fields[1]) >= 2 and fields[1][1] == "i":
            versions[fields[0]] = fields[2]
    return versions


def describe_changes(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """One line per package whose installed version changed."""
    lines = []
    for name in sorted(before.keys() | after.keys()):
        old, new = before.get(name), after.get(name)
        if old == new:
            continue
        if old is None:
            lines.append(f"installed {name} {new}")
        elif new is None:
            lines.append(f"removed {name} {old}")
        else:
            lines.append(f"changed {name} {old} -> {new}")
    return lines


async def find_manager(ctx: ExecContext, names: Sequence[str]) -> str | None:
    """The first of ``names`` found on the node's PATH (in the job's environment)."""
    probe = "; ".join(
        f"command -v {shlex.quote(name)} >/dev/null 2>&1 && {{ echo {shlex.quote(name)}; exit 0; }}"
        for name in names
    )
    result = await ctx.run_shell(probe + "; exit 1", timeout=min(ctx.timeout, 30.0))
    found = result.stdout.strip()
    return found if result.rc == 0 and found in names else None


class _PackageComponent(Component):
    """What PKG and DNF share: options, validation and running a plan."""

    needs_lock: ClassVar[bool] = True

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--clear-metadata",
            action="store_true",
            help="refresh the package metadata first",
        )
        parser.add_argument(
            "--exclude",
            action="append",
            default=[],
            metavar="PKG",
            help="leave PKG out (repeatable, or comma separated)",
        )
        state = parser.add_mutually_exclusive_group()
        state.add_argument(
            "--latest", action="store_true", help="install, or upgrade to the newest version"
        )
        state.add_argument("--absent", action="store_true", help="remove the packages")
        parser.add_argument(
            "--retry",
            type=int,
            default=DEFAULT_RETRY,
            metavar="N",
            help=f"run again up to N times while it fails ({DEFAULT_RETRY})",
        )

    def validate(self, options: dict[str, Any]) -> None:
        if not options["argv"]:
            raise ComponentArgsError(f"{self.verb}: at least one PACKAGE is required")
        if options["retry"] < 0:
            raise ComponentArgsError(f"{self.verb}: --retry must be >= 0")
        if options.get("latest") and options.get("absent"):
            # vars may set both, past argparse's mutually exclusive group.
            raise ComponentArgsError(f"{self.verb}: --latest and --absent exclude each other")
        options["exclude"] = split_exclude(self.verb, options.get("exclude") or [])
        for word in [*options["argv"], *options["exclude"]]:
            if not _is_template(word):
                check_name(self.verb, word)

    def _names(self, options: dict[str, Any], ctx: ExecContext) -> tuple[list[str], list[str]]:
        """Packages and exclusions rendered and checked again (a value may come from a template)."""
        packages = [check_name(self.verb, ctx.render(w)) for w in options["argv"]]
        exclude = [check_name(self.verb, ctx.render(w)) for w in options.get("exclude") or []]
        return list(dict.fromkeys(packages)), list(dict.fromkeys(exclude))

    async def _run(self, manager: str, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        # A name that renders to something else than a package name raises
        # ComponentArgsError, which the agent reports as the job's failure.
        packages, exclude = self._names(options, ctx)
        state = package_state(options)
        clear = bool(options.get("clear_metadata"))
        if manager == "apt-get":
            held: list[str] = []
            if exclude:
                shown = await ctx.run_shell("apt-mark showhold", timeout=ctx.timeout)
                if shown.rc != 0:
                    # Without the holds already there, the job would release one it did not set.
                    return Outcome.from_process(shown)
                held = shown.stdout.split()
            plan = apt_plan(
                packages, state, exclude=exclude, clear_metadata=clear, already_held=held
            )
        else:
            plan = dnf_plan(packages, state, exclude=exclude, clear_metadata=clear)
        query = installed_query(manager, packages)
        before = parse_installed((await ctx.run_shell(query, timeout=ctx.timeout)).stdout)
        command = plan.shell()
        outcome = Outcome.fail("not run")
        for _ in range(int(options.get("retry") or 0) + 1):
            # Durable like RUN: the package manager outlives a client restart, which then
            # reports the attempt it re-attached to.
            outcome = Outcome.from_process(
                await ctx.run_shell(command, timeout=ctx.timeout, durable=True)
            )
            if outcome.state.ok:
                break
        after = parse_installed((await ctx.run_shell(query, timeout=ctx.timeout)).stdout)
        changes = describe_changes(before, after)
        if changes:
            sep = "\n" if outcome.stdout and not outcome.stdout.endswith("\n") else ""
            outcome.stdout += sep + "\n".join(changes) + "\n"
        return outcome


class Dnf(_PackageComponent):
    """``DNF: [--clear-metadata] [--exclude PKG] [--latest | --absent] [--retry N] PACKAGE...``."""

    verb: ClassVar[str] = "DNF"
    summary: ClassVar[str] = "Install, upgrade or remove packages with dnf."

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        if await find_manager(ctx, ("dnf",)) is None:
            return Outcome.fail(f"DNF: dnf not found on {ctx.identity}", rc=127)
        return await self._run("dnf", options, ctx)


class Pkg(_PackageComponent):
    """``PKG: [--latest | --absent] [--clear-metadata] [--exclude PKG] [--retry N] PACKAGE...``."""

    verb: ClassVar[str] = "PKG"
    summary: ClassVar[str] = (
        "Install, upgrade or remove packages with the node's package manager (apt-get or dnf)."
    )

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        manager = await find_manager(ctx, MANAGERS)
        if manager is None:
            return Outcome.fail(
                f"PKG: no package manager found on {ctx.identity} (looked for "
                + " and ".join(MANAGERS)
                + ")",
                rc=127,
            )
        return await self._run(manager, options, ctx)


def package_state(options: Mapping[str, Any]) -> PackageState:
    """The state a parsed job asks for."""
    if options.get("absent"):
        return PackageState.ABSENT
    if options.get("latest"):
        return PackageState.LATEST
    return PackageState.PRESENT


def split_exclude(verb: str, values: Sequence[str]) -> list[str]:
    """``--exclude`` values, each possibly comma separated (as Directord's), as one list."""
    names: list[str] = []
    # vars may give one string instead of the list argparse builds.
    for value in [values] if isinstance(values, str) else values:
        if not isinstance(value, str):
            raise ComponentArgsError(f"{verb}: --exclude takes package names")
        names += [part.strip() for part in value.split(",") if part.strip()]
    return names


def check_name(verb: str, word: str) -> str:
    """Return ``word`` if it is a package name.

    Raises:
        ComponentArgsError: it is not (an option, a version, shell characters ...).
    """
    if not is_package_name(word):
        raise ComponentArgsError(
            f"{verb}: {word!r} is not a package name "
            "(letters, digits and _ . + -, starting with a letter, digit or _)"
        )
    return word


def _is_template(word: str) -> bool:
    return "{{" in word or "{%" in word
