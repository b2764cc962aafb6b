"""FACTS' parsers and bounds, REBOOT's arguments, and the server's bookkeeping of a reboot.

No network, no subprocess: the parsers read given text; the node registry and
the job book run over a memory datastore.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import pytest

from directord.components import build_job, get_component
from directord.components.facts import (
    MAX_ADDRESSES,
    VALUE_LIMIT,
    addresses_from_ip,
    addresses_from_kernel,
    mem_total,
    os_release,
    read_bounded,
)
from directord.datastores.memory import MemoryDatastore
from directord.errors import ComponentArgsError
from directord.models import State
from directord.protocol import Hello
from directord.server.jobs import JobBook, PlannedJob
from directord.server.nodes import NodeRegistry
from directord.server.persist import Persister

# ---- FACTS ----------------------------------------------------------------------------------


def test_os_release_reads_the_shell_quoted_keys() -> None:
    text = (
        'PRETTY_NAME="Rocky Linux 9.3 (Blue Onyx)"\n'
        "NAME='Rocky Linux'\n"
        "ID=rocky\n"
        'ID_LIKE="rhel centos fedora"\n'
        'VERSION_ID="9.3"\n'
        "# a comment\n"
        "garbage line\n"
        'HOME_URL="https://rockylinux.org/"\n'
    )
    assert os_release(text) == {
        "id": "rocky",
        "version_id": "9.3",
        "pretty_name": "Rocky Linux 9.3 (Blue Onyx)",
        "name": "Rocky Linux",
        "id_like": ["rhel", "centos", "fedora"],
    }


def test_os_release_missing_or_hostile() -> None:
    assert os_release(None) == {
        "id": None,
        "version_id": None,
        "pretty_name": None,
        "name": None,
        "id_like": [],
    }
    facts = os_release('ID="unterminated\nPRETTY_NAME=' + "x" * 100_000 + "\n")
    assert facts["id"] == '"unterminated'
    assert len(facts["pretty_name"]) == VALUE_LIMIT
    assert len(os_release("ID_LIKE=" + " a" * 10_000)["id_like"]) == MAX_ADDRESSES


def test_mem_total_in_bytes() -> None:
    assert mem_total("MemFree: 1 kB\nMemTotal:       2048 kB\n") == 2048 * 1024
    assert mem_total("MemTotal: lots kB\n") is None
    assert mem_total(None) is None


def test_read_bounded_reads_at_most_the_limit(tmp_path: Any) -> None:
    path = tmp_path / "big"
    path.write_text("a" * 1000)
    assert read_bounded(str(path), 10) == "a" * 10
    assert read_bounded(str(tmp_path / "missing")) is None


def test_addresses_from_ip_json() -> None:
    output = json.dumps(
        [
            {
                "ifname": "lo",
                "addr_info": [
                    {"family": "inet", "local": "127.0.0.1"},
                    {"family": "inet6", "local": "::1"},
                ],
            },
            {"ifname": "eth0", "addr_info": [{"family": "inet", "local": "10.0.0.2"}]},
            {"ifname": "down0"},
            {"no": "name"},
            "junk",
        ]
    )
    assert addresses_from_ip(output) == {
        "lo": {"ipv4": ["127.0.0.1"], "ipv6": ["::1"]},
        "eth0": {"ipv4": ["10.0.0.2"], "ipv6": []},
        "down0": {"ipv4": [], "ipv6": []},
    }
    assert addresses_from_ip("not json") is None
    assert addresses_from_ip('{"a": 1}') is None
    many = [{"family": "inet", "local": f"10.0.{i // 256}.{i % 256}"} for i in range(1000)]
    found = addresses_from_ip(json.dumps([{"ifname": "eth0", "addr_info": many}]))
    assert found is not None and len(found["eth0"]["ipv4"]) == MAX_ADDRESSES


def test_addresses_from_the_kernel_without_ip() -> None:
    found = addresses_from_kernel()
    assert "127.0.0.1" in found["lo"]["ipv4"]


def test_facts_take_options_only_and_never_hit_the_cache() -> None:
    spec = build_job("FACTS", "--custom-dir /srv/facts")
    assert spec.options["custom_dir"] == "/srv/facts"
    assert spec.skip_cache
    assert build_job("FACTER", "").skip_cache
    with pytest.raises(ComponentArgsError, match="takes no arguments"):
        get_component("FACTS").parse("os")


# ---- REBOOT ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "seconds"), [("", 10.0), ("0", 0.0), ("2.5", 2.5)])
def test_reboot_seconds(args: str, seconds: float) -> None:
    spec = build_job("REBOOT", args)
    assert spec.options["seconds"] == seconds
    assert spec.skip_cache  # every REBOOT reboots


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("soon", "must be a number"),
        ("1 2", "at most one argument"),
        ("-1", "between 0 and"),
        ("nan", "between 0 and"),
        ("inf", "between 0 and"),
        ("86401", "between 0 and"),
    ],
)
def test_reboot_refuses_bad_seconds(args: str, words: str) -> None:
    with pytest.raises(ComponentArgsError, match=words):
        get_component("REBOOT").parse(args)


# ---- the server's side of a reboot ----------------------------------------------------------


class Server:
    """A node registry and a job book over one memory datastore."""

    def __init__(self, grace: float = 100.0) -> None:
        persister = Persister(MemoryDatastore())
        self.nodes = NodeRegistry(persister, reboot_grace=grace)
        self.book = JobBook(persister, grace=5.0)

    def attach(self, identity: str, agent_start: float) -> Any:
        session = SimpleNamespace(
            identity=identity, link=SimpleNamespace(closed=False, conn=SimpleNamespace(peer="p"))
        )
        hello = Hello(proto=1, identity=identity, agent_start=agent_start)
        assert self.nodes.attach(session, hello) is not None  # type: ignore[arg-type]
        return session

    def status(self, identity: str) -> str:
        row = next(r for r in self.nodes.listing() if r["identity"] == identity)
        status: str = row["status"]
        return status


def test_a_node_is_rebooting_until_a_new_client_of_it_registers() -> None:
    s = Server(grace=100.0)
    session = s.attach("n0", agent_start=1000.0)
    before = time.time()
    s.nodes.mark_rebooting("n0", 10.0, started=1500.0)
    assert s.status("n0") == "rebooting"
    assert before + 110 <= s.nodes.rebooting()["n0"] <= time.time() + 110
    assert s.nodes.reachable() == ["n0"]
    s.nodes.detach(session, "gone")
    assert s.status("n0") == "rebooting" and s.nodes.reachable() == ["n0"]
    # The same client reconnecting has not rebooted yet.
    session = s.attach("n0", agent_start=1000.0)
    assert s.status("n0") == "rebooting"
    s.nodes.detach(session, "gone")
    s.attach("n0", agent_start=2000.0)
    assert s.status("n0") == "online" and s.nodes.rebooting() == {}


def test_a_reboot_result_older_than_the_client_is_ignored() -> None:
    s = Server()
    s.attach("n0", agent_start=2000.0)
    s.nodes.mark_rebooting("n0", 10.0, started=1500.0)  # re-sent after the reboot
    assert s.status("n0") == "online"


def test_a_rebooting_nodes_jobs_wait_past_their_deadline_then_end_with_the_reason() -> None:
    s = Server()
    planned = [
        PlannedJob(build_job("RUN", "--timeout 1 echo a"), ["n0"]),
        PlannedJob(build_job("RUN", "--timeout 1 echo b"), ["n0"]),
    ]
    _, (held, queued) = s.book.record("orch", False, planned, False)
    s.book.mark_delivered("n0", [held.id])
    later = time.time() + 1000
    assert s.book.sweep(later, {"n0": 0.0}, set(), frozenset({"n0"})) == set()
    assert held.results["n0"].state is State.DELIVERED
    assert queued.results["n0"].state is State.QUEUED
    assert s.book.give_up("n0", "node n0 did not come back") == {held.id, queued.id}
    assert held.results["n0"].state is State.LOST
    assert queued.results["n0"].state is State.UNDELIVERED
    assert held.results["n0"].stderr == "node n0 did not come back; it held the job"
    assert queued.results["n0"].stderr == "node n0 did not come back; it never took the job"
    assert "n0" not in s.book.pending


def test_a_job_sent_to_a_node_back_online_gets_its_whole_deadline() -> None:
    s = Server()
    _, (job,) = s.book.record(
        "orch", False, [PlannedJob(build_job("RUN", "--timeout 1 echo a"), ["n0"])], False
    )
    target = job.results["n0"]
    s.book.mark_sent(target)
    target.sent = job.submitted + 100  # sent when the node came back, long after
    assert s.book.sweep(job.submitted + 100 + 5, {}, {"n0"}) == set()
    assert target.state is State.QUEUED
    assert s.book.sweep(job.submitted + 100 + 7, {}, {"n0"}) == {job.id}
    assert target.state is State.UNDELIVERED
