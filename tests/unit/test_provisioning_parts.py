"""Provisioning's pure parts: the helper contract, renewal timing, addresses, allow-lists."""

from __future__ import annotations

import random

import pytest

from directord.errors import ConfigError
from directord.provisioning.helpers import HelperError, decision_from
from directord.provisioning.node import split_address
from directord.provisioning.renewal import MIN_INTERVAL, START_SPREAD, delay_until_renewal
from directord.server.proxies import parse_allow

PEM = "-----BEGIN CERTIFICATE-----\nMII...\n-----END CERTIFICATE-----\n"


def test_a_helper_may_defer_or_reject_without_a_certificate() -> None:
    assert decision_from({"defer": True, "msg": "later"}).defer
    decision = decision_from({"reject": True, "msg": "no"})
    assert decision.reject and decision.msg == "no"


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        ([], "not a JSON object"),
        ({}, "no PEM certificate"),
        ({"certificate": PEM}, "no PEM ca"),
        ({"certificate": PEM, "ca": PEM, "configuration": [1]}, "not a mapping"),
        ({"certificate": 7, "ca": PEM}, "no PEM certificate"),
        ({"defer": "yes"}, "no PEM certificate"),  # only JSON true defers
    ],
)
def test_a_bad_helper_answer_is_a_helper_error(answer: object, why: str) -> None:
    with pytest.raises(HelperError, match=why):
        decision_from(answer)


def test_renewal_falls_in_the_last_half_of_the_window() -> None:
    rng = random.Random(7)
    now, day = 1_000_000.0, 86400.0
    not_after = now + 30 * day
    for _ in range(200):
        delay = delay_until_renewal(not_after, 7 * day, now, 0.0, rng)
        moment = now + delay
        assert not_after - 7 * day <= moment <= not_after - 3.5 * day


def test_renewal_inside_the_window_goes_soon_but_at_most_once_an_hour() -> None:
    rng = random.Random(1)
    now = 1_000_000.0
    assert 0 <= delay_until_renewal(now + 86400, 2 * 86400, now, 0.0, rng) <= START_SPREAD
    # It re-entered provisioning ten minutes ago: not again before the hour is out.
    delay = delay_until_renewal(now + 86400, 2 * 86400, now, now - 600, rng)
    assert delay == pytest.approx(MIN_INTERVAL - 600)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.1:5570", "10.0.0.1", 5570),
        ("[::1]:80", "::1", 80),
        ("prov.example:1", "prov.example", 1),
    ],
)
def test_provisioning_addresses(text: str, host: str, port: int) -> None:
    assert split_address(text) == (host, port)


@pytest.mark.parametrize("text", ["10.0.0.1", ":5570", "h:0", "h:99999", "h:x"])
def test_bad_provisioning_addresses(text: str) -> None:
    with pytest.raises(ConfigError, match="is not HOST:PORT"):
        split_address(text)


def test_unit_proxy_allow_pairs() -> None:
    assert parse_allow("web*>db1, a>b,,") == [("web*", "db1"), ("a", "b")]
    with pytest.raises(ConfigError, match="'web1' is not SOURCE>DESTINATION"):
        parse_allow("web1")
