"""UNIT and SERVICE: what they accept, refused before anything reaches a node."""

from __future__ import annotations

import pytest

from directord.components.service import Service
from directord.components.unit import Unit, signal_number, unit_name
from directord.errors import ComponentArgsError
from directord.units import unit_args


@pytest.mark.parametrize(
    ("word", "name"),
    [
        ("web", "web.service"),
        ("web.service", "web.service"),
        ("dbus.socket", "dbus.socket"),
        ("getty@tty1.service", "getty@tty1.service"),
        ("multi-user.target", "multi-user.target"),
        ("my.app", "my.app.service"),
    ],
)
def test_unit_names_get_their_type_as_systemctl_gives_them(word: str, name: str) -> None:
    assert unit_name(word) == name


@pytest.mark.parametrize("word", ["--now", "-x", "a b", "a;b", "$(reboot)", "../x", "web*", ""])
def test_what_is_no_unit_name_is_refused(word: str) -> None:
    with pytest.raises(ComponentArgsError, match="is not a unit name"):
        unit_name(word)


def test_globs_only_where_globs_are_taken() -> None:
    assert unit_name("web*", glob=True) == "web*"
    with pytest.raises(ComponentArgsError, match="unit name or glob"):
        unit_name("a;b", glob=True)


@pytest.mark.parametrize(("text", "number"), [("9", 9), ("KILL", 9), ("sigterm", 15), ("HUP", 1)])
def test_signals_by_number_or_name(text: str, number: int) -> None:
    assert signal_number(text) == number


@pytest.mark.parametrize("text", ["0", "999", "NOPE", "-9"])
def test_bad_signals_are_refused(text: str) -> None:
    with pytest.raises(ComponentArgsError, match="is not a signal"):
        signal_number(text)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("", "the first word is the action"),
        ("launch web", "the first word is the action"),
        ("status", "takes at least 1 unit name"),
        ("kill a b", "takes 1 unit name"),
        ("list web", "takes 0 unit name"),
        ("freeze", "takes 1 unit name"),
        ("--signal NOPE kill web", "is not a signal"),
        ("--filter 'a;b' list", "is not a unit name or glob"),
    ],
)
def test_unit_jobs_are_checked_when_built(args: str, message: str) -> None:
    with pytest.raises(ComponentArgsError, match=message):
        Unit().parse(args)


def test_a_unit_job_is_never_a_cache_hit_and_names_its_units() -> None:
    options = Unit().parse("--now enable web dbus.socket")
    assert options["action"] == "enable" and options["units"] == ["web.service", "dbus.socket"]
    assert options["skip_cache"] is True
    assert (
        Unit().parse(unit_args("kill", ["web"], signal="KILL", whom="main"))["signal_number"] == 9
    )


def test_service_takes_directords_options_in_its_groups() -> None:
    options = Service().parse("--restarted --enable --daemon-reload web")
    assert (options["running"], options["enable"], options["daemon_reload"]) == (
        "restart",
        True,
        True,
    )
    assert Service().parse("--mask telnet.socket")["running"] is None  # a masked unit never starts
    assert Service().parse("web")["running"] == "start"
    with pytest.raises(ComponentArgsError, match="not allowed with argument"):
        Service().parse("--stopped --restarted web")
    with pytest.raises(ComponentArgsError, match="SERVICE: 'a;b' is not a unit name"):
        Service().parse("'a;b'")
    with pytest.raises(ComponentArgsError, match="at least one UNIT"):
        Service().parse("--enable")
