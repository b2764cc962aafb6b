"""PKG and DNF: parsing, the exact commands they build, and execute() against a fake node.

The commands are built by pure functions (``dnf_plan``, ``apt_plan``), so every
combination of options is checked here word for word; the e2e suite runs PKG
with real apt against a local repository, and DNF where dnf is absent.
"""

from __future__ import annotations

import asyncio
import shlex
from typing import Any

import pytest

from directord.components import get_component
from directord.components.base import ProcessResult
from directord.components.packages import (
    PackageState,
    Plan,
    apt_plan,
    describe_changes,
    dnf_plan,
    installed_query,
    is_package_name,
    parse_installed,
)
from directord.errors import ComponentArgsError
from directord.models import State
from tests.unit.test_component_execute import FakeContext

P, L, A = PackageState.PRESENT, PackageState.LATEST, PackageState.ABSENT
INSTALL = ("apt-get", "install", "-y", "-q", "--no-install-recommends")

# ---- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize("verb", ["PKG", "DNF"])
def test_parse_defaults(verb: str) -> None:
    options = get_component(verb).parse("vim git")
    assert options["argv"] == ["vim", "git"]
    assert (options["latest"], options["absent"], options["clear_metadata"]) == (
        False,
        False,
        False,
    )
    assert (options["exclude"], options["retry"]) == ([], 2)


@pytest.mark.parametrize("verb", ["PKG", "DNF"])
def test_parse_every_option(verb: str) -> None:
    options = get_component(verb).parse(
        "--clear-metadata --exclude kernel,kernel-core --exclude=glibc --latest --retry 0 "
        "NetworkManager python3-foo_bar libstdc++6 g++-12 perl-IO-Socket-SSL"
    )
    assert options["clear_metadata"] and options["latest"] and not options["absent"]
    assert options["exclude"] == ["kernel", "kernel-core", "glibc"]
    assert options["retry"] == 0
    assert options["argv"] == [
        "NetworkManager",
        "python3-foo_bar",
        "libstdc++6",
        "g++-12",
        "perl-IO-Socket-SSL",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("", "at least one PACKAGE is required"),
        ("--latest", "at least one PACKAGE is required"),
        ("--latest --absent vim", "not allowed with argument"),
        ("--retry -1 vim", "--retry must be >= 0"),
        ("--retry x vim", "invalid int value"),
        ("--foo vim", "unrecognized option --foo"),
        ("vim --foo", "'--foo' is not a package name"),
        ("vim -y", "'-y' is not a package name"),
        ("'a;b'", "'a;b' is not a package name"),
        ("'a b'", "'a b' is not a package name"),
        ("'$(reboot)'", "is not a package name"),
        ("vim=1.0", "'vim=1.0' is not a package name"),
        ("'vim*'", "'vim*' is not a package name"),
        (".hidden", "'.hidden' is not a package name"),
        ("--exclude=--all vim", "'--all' is not a package name"),
        ("--exclude 'a;b' vim", "'a;b' is not a package name"),
        ("'vim", "No closing quotation"),
    ],
)
@pytest.mark.parametrize("verb", ["PKG", "DNF"])
def test_parse_refuses(verb: str, args: str, message: str) -> None:
    with pytest.raises(ComponentArgsError) as info:
        get_component(verb).parse(args)
    text = str(info.value)
    assert text.startswith(f"{verb}: ") and message in text, text
    assert "\n" not in text


def test_parse_vars_may_not_set_both_states() -> None:
    with pytest.raises(ComponentArgsError, match="--latest and --absent exclude each other"):
        get_component("PKG").parse("--latest vim", {"absent": True})


def test_parse_vars_exclude_as_a_string_is_split() -> None:
    options = get_component("DNF").parse("vim", {"exclude": "a,b"})
    assert options["exclude"] == ["a", "b"]


def test_templates_pass_parse_and_are_checked_when_rendered() -> None:
    options = get_component("PKG").parse("{{ pkg }}")
    assert options["argv"] == ["{{ pkg }}"]


@pytest.mark.parametrize(
    ("word", "ok"),
    [
        ("a", True),
        ("0ad", True),
        ("_x", True),
        ("x" * 200, True),
        ("x" * 201, False),
        ("-a", False),
        ("+a", False),
        ("a/b", False),
        ("a:amd64", False),
        ("", False),
        ("a\n", False),
        ("ü", False),
    ],
)
def test_is_package_name(word: str, ok: bool) -> None:
    assert is_package_name(word) is ok


# ---- the commands, word for word --------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "exclude", "clear", "steps"),
    [
        (P, (), False, [("dnf", "-q", "-y", "install", "--", "a", "b")]),
        (L, (), False, [("dnf", "-q", "-y", "--best", "install", "--", "a", "b")]),
        (A, (), False, [("dnf", "-q", "-y", "remove", "--", "a", "b")]),
        (
            P,
            (),
            True,
            [
                ("dnf", "-q", "clean", "all"),
                ("dnf", "-q", "makecache"),
                ("dnf", "-q", "-y", "install", "--", "a", "b"),
            ],
        ),
        (P, ("x",), False, [("dnf", "-q", "-y", "--exclude=x", "install", "--", "a", "b")]),
        (
            L,
            ("x", "y"),
            True,
            [
                ("dnf", "-q", "clean", "all"),
                ("dnf", "-q", "makecache"),
                ("dnf", "-q", "-y", "--exclude=x,y", "--best", "install", "--", "a", "b"),
            ],
        ),
        (
            A,
            ("x",),
            True,
            [
                ("dnf", "-q", "clean", "all"),
                ("dnf", "-q", "makecache"),
                ("dnf", "-q", "-y", "--exclude=x", "remove", "--", "a", "b"),
            ],
        ),
    ],
)
def test_dnf_plan(
    state: PackageState, exclude: tuple[str, ...], clear: bool, steps: list[tuple[str, ...]]
) -> None:
    plan = dnf_plan(["a", "b"], state, exclude=exclude, clear_metadata=clear)
    assert list(plan.steps) == steps
    assert plan.cleanup == () and plan.env is None
    assert plan.shell() == " && ".join(shlex.join(s) for s in steps)


@pytest.mark.parametrize(
    ("state", "exclude", "clear", "held", "steps", "cleanup"),
    [
        (P, (), False, (), [(*INSTALL, "--no-upgrade", "--", "a", "b")], []),
        (L, (), False, (), [(*INSTALL, "--", "a", "b")], []),
        (A, (), False, (), [("apt-get", "remove", "-y", "-q", "--", "a", "b")], []),
        (
            L,
            (),
            True,
            (),
            [("apt-get", "update", "-q"), (*INSTALL, "--", "a", "b")],
            [],
        ),
        (
            P,
            ("x", "y"),
            False,
            (),
            [("apt-mark", "hold", "--", "x", "y"), (*INSTALL, "--no-upgrade", "--", "a", "b")],
            [("apt-mark", "unhold", "--", "x", "y")],
        ),
        (
            # y was held before the job: it is not held again, and stays held afterwards.
            A,
            ("x", "y", "x"),
            True,
            ("y", "z"),
            [
                ("apt-mark", "hold", "--", "x"),
                ("apt-get", "update", "-q"),
                ("apt-get", "remove", "-y", "-q", "--", "a", "b"),
            ],
            [("apt-mark", "unhold", "--", "x")],
        ),
        (
            L,
            ("y",),
            False,
            ("y",),
            [(*INSTALL, "--", "a", "b")],
            [],
        ),
    ],
)
def test_apt_plan(
    state: PackageState,
    exclude: tuple[str, ...],
    clear: bool,
    held: tuple[str, ...],
    steps: list[tuple[str, ...]],
    cleanup: list[tuple[str, ...]],
) -> None:
    plan = apt_plan(["a", "b"], state, exclude=exclude, clear_metadata=clear, already_held=held)
    assert list(plan.steps) == steps
    assert list(plan.cleanup) == cleanup
    assert plan.env == {"DEBIAN_FRONTEND": "noninteractive"}


def test_plan_shell_quotes_and_always_cleans_up() -> None:
    plan = Plan(
        (("apt-mark", "hold", "--", "x"), ("echo", "a b", "$(no)")),
        (("apt-mark", "unhold", "--", "x"),),
        {"K": "v w"},
    )
    assert plan.shell() == (
        "export K='v w'; { apt-mark hold -- x && echo 'a b' '$(no)'; }; rc=$?; "
        "apt-mark unhold -- x >/dev/null; exit $rc"
    )


def test_installed_query_and_parse() -> None:
    assert installed_query("apt-get", ["a"]) == (
        "dpkg-query -W -f '${Package}\\t${db:Status-Abbrev}\\t${Version}\\n' -- a 2>/dev/null"
    )
    assert installed_query("dnf", ["a", "b"]) == (
        "rpm -q --qf '%{NAME}\\tii\\t%{VERSION}-%{RELEASE}\\n' -- a b 2>/dev/null"
    )
    dpkg = "a\tii \t1.0\nb\trc \t2.0\nc\tun \t\nd\thi \t3:1.2-1\n"
    assert parse_installed(dpkg) == {"a": "1.0", "d": "3:1.2-1"}
    rpm = "vim\tii\t9.0-1.fc40\npackage git is not installed\n"
    assert parse_installed(rpm) == {"vim": "9.0-1.fc40"}


def test_describe_changes() -> None:
    before = {"a": "1.0", "b": "2.0", "c": "3.0"}
    after = {"a": "1.1", "c": "3.0", "d": "4.0"}
    assert describe_changes(before, after) == [
        "changed a 1.0 -> 1.1",
        "removed b 2.0",
        "installed d 4.0",
    ]


# ---- execute() on a fake node -----------------------------------------------------------

PROBE_APT = (
    "command -v apt-get >/dev/null 2>&1 && { echo apt-get; exit 0; }; "
    "command -v dnf >/dev/null 2>&1 && { echo dnf; exit 0; }; exit 1"
)
PROBE_DNF = "command -v dnf >/dev/null 2>&1 && { echo dnf; exit 0; }; exit 1"


def run(verb: str, args: str, ctx: FakeContext) -> Any:
    component = get_component(verb)
    return asyncio.run(component.execute(component.parse(args), ctx))  # type: ignore[arg-type]


def test_dnf_absent_from_node_fails_clearly() -> None:
    ctx = FakeContext(identity="web1")
    outcome = run("DNF", "vim", ctx)
    assert (outcome.state, outcome.rc) == (State.FAILED, 127)
    assert outcome.stderr == "DNF: dnf not found on web1"
    assert ctx.ran == [PROBE_DNF]


def test_pkg_without_a_package_manager_names_what_it_looked_for() -> None:
    ctx = FakeContext(identity="web1")
    outcome = run("PKG", "vim", ctx)
    assert outcome.state is State.FAILED
    assert outcome.stderr == "PKG: no package manager found on web1 (looked for apt-get and dnf)"


def test_pkg_on_apt_installs_reports_change_and_retries() -> None:
    query = installed_query("apt-get", ["vim"])
    main = apt_plan(["vim"], P).shell()
    ctx = FakeContext(
        shell={
            PROBE_APT: ProcessResult(0, "apt-get\n", ""),
            query: ProcessResult(1, "", ""),
            main: ProcessResult(100, "", "E: temporary failure\n"),
        }
    )
    outcome = run("PKG", "--retry 1 vim", ctx)
    assert outcome.state is State.FAILED and "temporary failure" in outcome.stderr
    assert ctx.ran == [PROBE_APT, query, main, main, query]

    ctx.shell[main] = ProcessResult(0, "Setting up vim\n", "")
    ctx.shell[query] = ProcessResult(0, "vim\tii \t9.0\n", "")
    ctx.ran.clear()
    # The second run finds vim installed before and after: no change line.
    outcome = run("PKG", "vim", ctx)
    assert (outcome.state, outcome.stdout) == (State.SUCCESS, "Setting up vim\n")


def test_pkg_on_dnf_uses_dnf_and_renders_names() -> None:
    query = installed_query("dnf", ["vim"])
    main = dnf_plan(["vim"], L, exclude=["kernel"]).shell()
    ctx = FakeContext(
        args={"editor": "vim"},
        shell={
            PROBE_APT: ProcessResult(0, "dnf\n", ""),
            main: ProcessResult(0, "done", ""),
        },
    )
    ctx.shell[query] = ProcessResult(1, "package vim is not installed\n", "")
    component = get_component("PKG")
    options = component.parse("--latest --exclude kernel {{ editor }}")

    async def go() -> Any:
        # The query answers "not installed" before the install and "9.0-1" after it.
        real = ctx.run_shell

        async def shell(command: str, **kwargs: Any) -> ProcessResult:
            result = await real(command, **kwargs)
            if command == main:
                ctx.shell[query] = ProcessResult(0, "vim\tii\t9.0-1\n", "")
            return result

        ctx.run_shell = shell  # type: ignore[method-assign]
        return await component.execute(options, ctx)  # type: ignore[arg-type]

    outcome = asyncio.run(go())
    assert outcome.state is State.SUCCESS
    assert outcome.stdout == "done\ninstalled vim 9.0-1\n"
    assert ctx.ran == [PROBE_APT, query, main, query]


def test_rendered_name_is_checked_on_the_node() -> None:
    ctx = FakeContext(
        args={"pkg": "vim; reboot"}, shell={PROBE_APT: ProcessResult(0, "apt-get\n", "")}
    )
    with pytest.raises(ComponentArgsError, match="'vim; reboot' is not a package name"):
        run("PKG", "{{ pkg }}", ctx)
    assert ctx.ran == [PROBE_APT]


def test_apt_exclude_asks_which_holds_exist() -> None:
    query = installed_query("apt-get", ["vim"])
    main = apt_plan(["vim"], P, exclude=["x", "y"], already_held=["y"]).shell()
    ctx = FakeContext(
        shell={
            PROBE_APT: ProcessResult(0, "apt-get\n", ""),
            "apt-mark showhold": ProcessResult(0, "y\n", ""),
            query: ProcessResult(0, "", ""),
            main: ProcessResult(0, "", ""),
        }
    )
    outcome = run("PKG", "--exclude x,y vim", ctx)
    assert outcome.state is State.SUCCESS
    assert ctx.ran == [PROBE_APT, "apt-mark showhold", query, main, query]
    assert "apt-mark unhold -- x >/dev/null" in main and "hold -- x &&" in main


def test_apt_exclude_fails_when_the_holds_cannot_be_read() -> None:
    ctx = FakeContext(
        shell={
            PROBE_APT: ProcessResult(0, "apt-get\n", ""),
            "apt-mark showhold": ProcessResult(100, "", "E: cannot read dpkg status\n"),
        }
    )
    outcome = run("PKG", "--exclude x vim", ctx)
    assert (outcome.state, outcome.rc) == (State.FAILED, 100)
    assert "cannot read dpkg status" in outcome.stderr
    assert ctx.ran == [PROBE_APT, "apt-mark showhold"]
