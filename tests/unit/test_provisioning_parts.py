"""Provisioning's pure parts: the helper contract, renewal timing, addresses, allow-lists."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from directord.config import load_settings
from directord.errors import ConfigError, OrchestrationError
from directord.provisioning.helpers import HelperError, decision_from
from directord.provisioning.node import ProvisioningNode, split_address
from directord.provisioning.renewal import MIN_INTERVAL, START_SPREAD, delay_until_renewal
from directord.security.pki import PKI
from directord.server.proxies import UnitProxies, parse_allow

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


# ---- hostile inputs: what a provisioner sends a node, what a node asks its server ----------
ROOT = Path(__file__).resolve().parents[2]


def _node(tmp_path: Path) -> ProvisioningNode:
    ca = PKI(str(tmp_path / "ca"))
    ca.init()
    settings = load_settings(
        {
            "provision": True,
            "config_file": str(tmp_path / "config.yaml"),
            "provisioning_address": "127.0.0.1:1",
            "provisioning_token": "t",
            "provisioning_ca": str(ca.ca_cert_path),
            "pki_dir": str(tmp_path / "node-pki"),
            "identity": "n1",
        },
        environ={},
    )
    return ProvisioningNode(settings)


def test_a_configuration_the_client_would_refuse_is_refused_before_anything_is_written(
    tmp_path: Path,
) -> None:
    node = _node(tmp_path)
    cert = PKI(str(tmp_path / "ca")).ca_cert_path.read_text()
    for configuration, why in (
        ({"grpc_port": 1, "datacenter": "x"}, "configuration has unknown keys: datacenter"),
        ({"config_file": "/etc/passwd"}, "configuration has unknown keys: config_file"),
        ([1], "configuration (a mapping)"),
    ):
        with pytest.raises(ValueError, match=re.escape(why)):
            node._handle(
                "configure", {"certificate": cert, "ca": cert, "configuration": configuration}
            )
    with pytest.raises(ValueError, match="must be PEM certificates"):
        node._handle("configure", {"certificate": "x", "ca": "y", "configuration": {}})
    assert not (tmp_path / "config.yaml").exists()
    assert not (tmp_path / "node-pki" / "certs").exists()
    with pytest.raises(ValueError, match="unknown request 'shell'"):
        node._handle("shell", {"cmd": "id"})


@pytest.mark.parametrize(
    ("params", "why"),
    [
        ({"op": "exec", "node": "b", "unit": "web"}, "expected op start|stop"),
        ({"op": "start", "node": ["b"], "unit": "web"}, "expected op start|stop"),
        ({"op": "start", "node": "b", "unit": "web;reboot"}, "is not a unit name"),
        ({"op": "start", "node": "b", "unit": "--now"}, "is not a unit name"),
        ({"op": "start", "node": "b/../c", "unit": "web"}, "unit_proxy: node"),
        ({"op": "start", "node": "c", "unit": "web"}, "refused: a may not start units on c"),
        ({"op": "stop", "node": "a", "unit": "web"}, "refused: a may not stop units on a"),
    ],
)
def test_a_node_asks_only_what_the_allow_list_permits(params: dict[str, object], why: str) -> None:
    # Refused before any job is built: nothing is submitted (no submissions object at all).
    proxies = UnitProxies(None, None, "a>b")  # type: ignore[arg-type]
    with pytest.raises(OrchestrationError, match=re.escape(why)):
        asyncio.run(proxies.request("a", params))


def test_the_example_country_helper_signs_defers_and_rejects(tmp_path: Path) -> None:
    ca = PKI(str(tmp_path / "ca"))
    ca.init()
    csr = PKI(str(tmp_path / "node")).csr("web7").read_text()
    helper = ROOT / "examples" / "provisioning-helper-by-country.py"

    def run(identity: str, country: str) -> dict[str, object]:
        inventory = {"pki_dir": "/etc/directord/pki", "facts": {"country": country}}
        request = {"identity": identity, "csr": csr, "inventory": inventory}
        proc = subprocess.run(
            [sys.executable, str(helper)], input=json.dumps(request), capture_output=True,
            text=True, env={"DIRECTORD_PKI_DIR": str(tmp_path / "ca")}, check=True,
        )  # fmt: skip
        answer: dict[str, object] = json.loads(proc.stdout)
        return answer

    signed = run("web7", "NL")
    config = signed["configuration"]
    assert isinstance(config, dict) and config["grpc_server_address"] == "directord.nl.example.net"
    assert "BEGIN CERTIFICATE" in str(signed["certificate"])
    assert run("web7", "xx")["defer"] is True
    assert run("test-1", "nl")["reject"] is True


@pytest.mark.parametrize(
    ("script", "why"),
    [
        ("head -c 3000000 /dev/zero", "printed over 1048576 bytes; killed"),
        ("echo broke >&2; exit 4", "exited 4: broke"),
        ("sleep 30", "did not answer within 1s; killed"),
        ("echo not json", "did not print JSON"),
        ("echo '[1, 2]'", "is not a JSON object"),
    ],
)
def test_a_helper_program_that_misbehaves_is_an_error_with_bounded_cost(
    tmp_path: Path, script: str, why: str
) -> None:
    from directord.provisioning.helpers import run_program

    helper = tmp_path / "helper"
    helper.write_text(f"#!/bin/sh\ncat >/dev/null\n{script}\n")
    helper.chmod(0o755)
    with pytest.raises(HelperError, match=re.escape(why)):
        asyncio.run(run_program(str(helper), {"identity": "n1"}, 1.0))


def test_a_helper_program_reads_the_request_and_answers(tmp_path: Path) -> None:
    from directord.provisioning.helpers import run_program

    helper = tmp_path / "helper"
    helper.write_text(
        f"#!{sys.executable}\nimport json, sys\nreq = json.load(sys.stdin)\n"
        "print(json.dumps({'defer': True, 'msg': 'later, ' + req['identity']}))\n"
    )
    helper.chmod(0o755)
    decision = asyncio.run(run_program(str(helper), {"identity": "n1"}, 10.0))
    assert decision.defer and decision.msg == "later, n1"
