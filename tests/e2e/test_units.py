"""``directord units`` against real systemd: two container nodes and one plain node.

Two systemd-nspawn containers boot Debian with systemd as PID 1; each runs a
directord client as a unit of its own systemd, joined to a server on this
machine. A third client runs here, where PID 1 is not systemd. Every command
is checked by reading the effect back with ``systemctl`` inside the container.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from directord.localcluster import LocalCluster
from tests import nspawn
from tests.e2e.helpers import LiveCLI, wait_for

pytestmark = pytest.mark.timeout(300)

WEB = """[Unit]
Description=directord test web
[Service]
ExecStart=/bin/sleep infinity
ExecReload=/bin/true
[Install]
WantedBy=multi-user.target
"""
BAD = """[Unit]
Description=directord test bad
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo bad-unit-says-no >&2; exit 3'
"""


class Fleet:
    """The cluster (with the plain node ``node0``) and the two container nodes by identity."""

    def __init__(self, cluster: LocalCluster, containers: dict[str, nspawn.Container]) -> None:
        self.cluster = cluster
        self.containers = containers
        self.plain = cluster.identities[0]

    def units(self, *args: str, timeout: float = 120.0) -> Any:
        return self.cluster.cli("units", *args, timeout=timeout)

    def json(self, *args: str) -> Any:
        proc = self.units(*args, "--format", "json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads(proc.stdout)

    def start_client(self, identity: str) -> None:
        node = self.containers[identity]
        ready = f"/run/directord-client-{identity}.ready"
        node.run("rm", "-f", ready)
        node.start_unit(
            f"directord-client-{identity}",
            [
                sys.executable, "-m", "directord", "--config-file", "/etc/directord/config.yaml",
                "--heartbeat-interval", "1", "--identity", identity,
                "--cache-path", "/var/cache/directord", "--run-path", "/run/directord",
                "--grpc-server-address", "127.0.0.1", "--grpc-port", str(self.cluster.port),
                "--ready-file", ready, "client",
            ],
        )  # fmt: skip
        wait_for(lambda: node.path(ready).exists(), f"{identity}'s client", timeout=60)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("units")
    cluster = LocalCluster(
        root / "cluster",
        nodes=1,
        heartbeat=1.0,
        # ct0's proxy units may start units on ct1; nothing else is allowed.
        server_args=["--unit-proxy-allow", "ct0>ct1"],
    )
    cluster.start()
    try:
        with nspawn.boot(2, root / "containers") as booted:
            fleet = Fleet(cluster, {f"ct{i}": c for i, c in enumerate(booted)})
            for identity, node in fleet.containers.items():
                node.write_file("/etc/directord/config.yaml", "run_path: /run/directord\n")
                node.write_file("/etc/systemd/system/dd-web.service", WEB)
                node.write_file("/etc/systemd/system/dd-bad.service", BAD)
                # Vendor units (not in /etc) can be masked: systemd links /etc's name to /dev/null.
                node.write_file("/usr/lib/systemd/system/dd-vendor.service", WEB)
                fleet.start_client(identity)
            yield fleet
    finally:
        cluster.stop()


def test_list_across_nodes_has_a_node_column_and_matches_systemctl(fleet: Fleet) -> None:
    started = time.monotonic()
    rows = fleet.json("list", "ct0", "ct1")
    elapsed = time.monotonic() - started
    print(f"units list across 2 nodes: {elapsed:.2f} s")  # recorded in the note
    assert {r["node"] for r in rows} == {"ct0", "ct1"}
    assert set(rows[0]) == {"node", "unit", "load", "active", "sub", "description"}
    dbus = [r for r in rows if r["unit"] == "dbus.service"]
    assert len(dbus) == 2 and {(r["active"], r["sub"]) for r in dbus} == {("active", "running")}
    # What systemctl lists inside ct0 is what came back for ct0.
    listed = fleet.containers["ct0"].systemctl("list-units", "--all", "--plain", "--no-legend")
    loaded = {line.split()[0] for line in listed.splitlines() if line.strip()}
    ours = {r["unit"] for r in rows if r["node"] == "ct0"}
    assert loaded <= ours
    table = fleet.units("list", "ct0", "ct1", "--filter", "dbus.service")
    assert table.returncode == 0
    header, *lines = table.stdout.splitlines()
    assert header.split()[:5] == ["NODE", "UNIT", "LOAD", "ACTIVE", "SUB"]
    assert sorted(line.split()[0] for line in lines) == ["ct0", "ct1"]


def test_list_on_every_node_names_the_one_without_systemd(fleet: Fleet) -> None:
    proc = fleet.units("list", "--filter", "dbus.service", "--format", "json")
    assert proc.returncode == 1
    assert {r["node"] for r in json.loads(proc.stdout)} == {"ct0", "ct1"}
    assert f"directord: {fleet.plain}: no systemd on {fleet.plain}" in proc.stderr


def test_start_status_restart_stop_read_back_with_systemctl(fleet: Fleet) -> None:
    node = fleet.containers["ct0"]
    assert fleet.units("daemon-reload", "ct0").returncode == 0
    started = time.monotonic()
    proc = fleet.units("start", "ct0", "dd-web")
    print(f"units start: {time.monotonic() - started:.2f} s")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["NODE", "UNIT", "RESULT", "ct0", "dd-web.service", "done"]
    assert node.systemctl("is-active", "dd-web").strip() == "active"
    [status] = fleet.json("status", "ct0", "dd-web")
    pid = int(node.systemctl("show", "-p", "MainPID", "--value", "dd-web").strip())
    assert (status["active"], status["sub"], status["main_pid"]) == ("active", "running", pid)
    assert status["unit_file_state"] == "disabled" and status["result"] == "success"
    assert status["since"]

    started = time.monotonic()
    assert fleet.units("restart", "ct0", "dd-web").returncode == 0
    print(f"units restart: {time.monotonic() - started:.2f} s")
    new_pid = int(node.systemctl("show", "-p", "MainPID", "--value", "dd-web").strip())
    assert new_pid not in (0, pid)
    assert fleet.units("reload", "ct0", "dd-web").returncode == 0
    assert fleet.units("stop", "ct0", "dd-web").returncode == 0
    assert node.systemctl("is-active", "dd-web", check=False).strip() == "inactive"


def test_a_failing_start_exits_1_with_the_result_and_the_units_log(fleet: Fleet) -> None:
    node = fleet.containers["ct1"]
    proc = fleet.units("start", "ct1", "dd-bad")
    assert proc.returncode == 1
    assert "directord: ct1: start dd-bad.service: failed" in proc.stderr
    assert "last log lines of dd-bad.service:" in proc.stderr
    assert "bad-unit-says-no" in proc.stderr
    assert node.systemctl("is-failed", "dd-bad", check=False).strip() == "failed"
    assert fleet.units("reset-failed", "ct1", "dd-bad").returncode == 0
    assert node.systemctl("is-failed", "dd-bad", check=False).strip() == "inactive"


def test_enable_now_and_disable_now(fleet: Fleet) -> None:
    node = fleet.containers["ct1"]
    assert fleet.units("enable", "ct1", "dd-web", "--now").returncode == 0
    assert node.systemctl("is-enabled", "dd-web").strip() == "enabled"
    assert node.systemctl("is-active", "dd-web").strip() == "active"
    files = {r["unit"]: r["state"] for r in fleet.json("list-unit-files", "ct1")}
    assert files["dd-web.service"] == "enabled"
    assert fleet.units("disable", "ct1", "dd-web", "--now").returncode == 0
    assert node.systemctl("is-enabled", "dd-web", check=False).strip() == "disabled"
    assert node.systemctl("is-active", "dd-web", check=False).strip() == "inactive"


def test_kill_signals_the_main_process(fleet: Fleet) -> None:
    node = fleet.containers["ct0"]
    assert fleet.units("start", "ct0", "dd-web").returncode == 0
    proc = fleet.units("kill", "ct0", "dd-web", "--signal", "KILL", "--whom", "main")
    assert proc.returncode == 0, proc.stderr
    wait_for(
        lambda: node.systemctl("is-failed", "dd-web", check=False).strip() == "failed",
        "dd-web to fail from SIGKILL",
    )
    result = node.systemctl("show", "-p", "Result", "--value", "dd-web").strip()
    assert result == "signal"
    assert fleet.units("reset-failed", "ct0").returncode == 0


def test_freeze_and_thaw_or_a_clear_refusal(fleet: Fleet) -> None:
    node = fleet.containers["ct0"]
    assert fleet.units("start", "ct0", "dd-web").returncode == 0
    proc = fleet.units("freeze", "ct0", "dd-web")
    state = node.systemctl("show", "-p", "FreezerState", "--value", "dd-web").strip()
    if proc.returncode == 0:  # a cgroup v2 host
        assert state == "frozen"
        assert fleet.units("thaw", "ct0", "dd-web").returncode == 0
    else:  # this machine's cgroup v1 hybrid: systemd refuses, and we say so
        assert "does not support freezing" in proc.stderr and "dd-web.service" in proc.stderr
    assert node.systemctl("show", "-p", "FreezerState", "--value", "dd-web").strip() == "running"
    assert fleet.units("stop", "ct0", "dd-web").returncode == 0


def test_a_missing_unit_and_a_node_without_systemd_exit_1_naming_them(fleet: Fleet) -> None:
    proc = fleet.units("start", "ct0", "no-such-thing")
    assert proc.returncode == 1
    assert "directord: ct0: no unit no-such-thing.service on ct0" in proc.stderr
    proc = fleet.units("status", "ct1", "nope.service")
    assert proc.returncode == 1 and "no unit nope.service on ct1" in proc.stderr
    proc = fleet.units("status", fleet.plain, "dbus")
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"directord: {fleet.plain}: no systemd on {fleet.plain}"
    proc = fleet.units("start", "ghost", "dd-web")
    assert proc.returncode == 1 and "unknown node ghost" in proc.stderr
    proc = fleet.units("start", "ct0", "--evil")
    assert proc.returncode == 2


def test_service_verb_in_an_orchestration(fleet: Fleet, tmp_path: Path) -> None:
    node = fleet.containers["ct1"]
    path = tmp_path / "service.yaml"
    path.write_text(
        "- targets: [ct1]\n  jobs:\n"
        "    - SERVICE: --enable --restarted dd-web\n"
        "    - SERVICE: --mask dd-vendor\n"
    )
    proc = fleet.cluster.cli("orchestrate", str(path), "--wait", "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert node.systemctl("is-enabled", "dd-web").strip() == "enabled"
    assert node.systemctl("is-active", "dd-web").strip() == "active"
    assert node.systemctl("is-enabled", "dd-vendor", check=False).strip() == "masked"
    path.write_text(
        "- targets: [ct1]\n  jobs:\n"
        "    - SERVICE: --unmask dd-vendor\n"
        "    - SERVICE: --disable --stopped dd-web\n"
    )
    proc = fleet.cluster.cli("orchestrate", str(path), "--wait", "--format", "json")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert node.systemctl("is-enabled", "dd-vendor", check=False).strip() == "disabled"
    assert node.systemctl("is-active", "dd-web", check=False).strip() == "inactive"
    # A failing unit fails the job, after its retries.
    path.write_text("- targets: [ct1]\n  jobs:\n    - SERVICE: --retry 0 dd-bad\n")
    proc = fleet.cluster.cli("orchestrate", str(path), "--wait", "--format", "json")
    assert proc.returncode == 1
    [result] = json.loads(proc.stdout)["results"]
    assert result["state"] == "failed" and "start dd-bad.service: failed" in result["stderr"]
    node.systemctl("reset-failed", "dd-bad")


def test_monitor_replays_then_streams_and_replays_again_after_a_node_restart(
    fleet: Fleet,
) -> None:
    node = fleet.containers["ct0"]
    watch = LiveCLI(fleet.cluster, "units", "monitor", "ct0", "dd-web*")  # type: ignore[arg-type]
    try:
        watch.until(lambda ls: any("ct0  dd-web.service  inactive/dead" in x for x in ls),
                    "the current state first")  # fmt: skip
        node.systemctl("start", "dd-web")
        watch.until(
            lambda ls: any("ct0  dd-web.service  active/running (was inactive)" in x for x in ls),
            "the start",
        )
        # The node's client restarts: the watcher is told, and gets the state again.
        mark = len(watch.lines)
        node.systemctl("restart", "directord-client-ct0")
        watch.until(lambda ls: any("-- monitor ended" in x for x in ls[mark:]), "the note")
        watch.until(
            lambda ls: any("ct0  dd-web.service  active/running" in x for x in ls[mark:]),
            "the state replayed after the reconnect",
            timeout=60,
        )
        node.systemctl("stop", "dd-web")
        watch.until(
            lambda ls: any("dd-web.service  inactive/dead (was " in x for x in ls[mark:]),
            "the stop, after the reconnect",
        )
    finally:
        watch.proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            watch.proc.wait(30)
        except subprocess.TimeoutExpired:
            watch.proc.kill()
        rc, err = watch.finish(30)
    assert rc == 130, err
    # Ctrl-C cancelled the node's monitor job: nothing of it is left running there.
    jobs = json.loads(fleet.cluster.cli("manage", "--list-jobs", "--format", "json").stdout)
    monitors = [
        json.loads(fleet.cluster.cli("manage", "--job-info", j["id"], "--format", "json").stdout)
        for j in jobs
        if j.get("verb") == "UNIT"
    ]
    states = [
        r["state"]
        for info in monitors
        if info["options"].get("action") == "monitor"
        for r in info["results"].values()
    ]
    assert states and "cancelled" in states, monitors[-1]


def test_is_online_and_unit_jobs_in_the_history(fleet: Fleet) -> None:
    assert fleet.cluster.cli("manage", "--is-online", "ct1").returncode == 0
    proc = fleet.cluster.cli(
        "manage", "--is-online", f"ghost-{uuid.uuid4().hex[:4]}", "--wait", "1"
    )
    assert proc.returncode == 1 and "is unknown" in proc.stdout
    jobs = json.loads(fleet.cluster.cli("manage", "--list-jobs", "--format", "json").stdout)
    unit_jobs = [j for j in jobs if j.get("verb") == "UNIT"]
    assert unit_jobs, jobs[:3]
    info = json.loads(
        fleet.cluster.cli("manage", "--job-info", unit_jobs[0]["id"], "--format", "json").stdout
    )
    result = next(iter(info["results"].values()))
    assert result.get("exec_time") is not None


APP = """[Unit]
Description=directord test app on ct0, needing dd-web on ct1
Wants=directord-proxy@ct1_dd-web.service.service
After=directord-proxy@ct1_dd-web.service.service
[Service]
ExecStart=/bin/sleep infinity
"""


def test_a_proxy_unit_starts_a_unit_on_another_node_where_allowed(fleet: Fleet) -> None:
    ct0, ct1 = fleet.containers["ct0"], fleet.containers["ct1"]
    for node in (ct0, ct1):
        template = node.run(sys.executable, "-m", "directord", "unit-file", "proxy").stdout
        node.write_file("/etc/systemd/system/directord-proxy@.service", template)
        node.write_file("/etc/systemd/system/dd-app.service", APP)
        node.systemctl("daemon-reload")
    ct1.systemctl("stop", "dd-web")
    proxy = "directord-proxy@ct1_dd-web.service.service"
    # Starting the app on ct0 starts dd-web on ct1 first, through the server.
    ct0.systemctl("start", "dd-app")
    assert ct0.systemctl("is-active", proxy).strip() == "active"
    assert ct1.systemctl("is-active", "dd-web").strip() == "active"
    assert "start dd-web.service on ct1: done" in ct0.journal(proxy)
    # The proxy stopped: no one wants the remote unit any more, so it stops.
    ct0.systemctl("stop", "dd-app", proxy)
    assert ct1.systemctl("is-active", "dd-web", check=False).strip() == "inactive"
    # ct1 -> ct0 is not in the server's unit_proxy_allow: refused, nothing runs on ct0.
    ct0.systemctl("stop", "dd-web", check=False)
    back = "directord-proxy@ct0_dd-web.service.service"
    assert ct1.run("systemctl", "start", back, check=False).returncode != 0
    assert ct1.systemctl("is-failed", back, check=False).strip() == "failed"
    assert "refused: ct1 may not start units on ct0" in ct1.journal(back)
    assert ct0.systemctl("is-active", "dd-web", check=False).strip() == "inactive"
    assert "node ct1 asked to start dd-web.service on ct0: not allowed" in (
        fleet.cluster.log("server").read_text()
    )
    ct1.systemctl("reset-failed", back)


def test_the_library_does_what_the_cli_does(fleet: Fleet) -> None:
    from directord import DirectordConnect
    from directord.units import UnitsError

    node = fleet.containers["ct1"]
    with DirectordConnect(socket_path=fleet.cluster.socket_path) as d:
        replies = d.units("list", ["ct0", "ct1"], filter="dbus.service")
        assert [(r.node, r.ok) for r in replies] == [("ct0", True), ("ct1", True)]
        assert replies[0].document["units"][0]["sub"] == "running"
        [reply] = d.units("restart", ["ct1"], ["dd-web"])
        assert reply.ok and reply.document["jobs"] == {"dd-web.service": "done"}
        assert node.systemctl("is-active", "dd-web").strip() == "active"
        [reply] = d.units("status", [fleet.plain], ["dbus"])
        assert not reply.ok and reply.error == f"no systemd on {fleet.plain}"
        with pytest.raises(UnitsError, match="unknown node ghost"):
            d.units("status", ["ghost"], ["dbus"])
        assert d.is_online("ct1") and not d.is_online("ghost", wait=0.5)
        events = d.monitor_units(["ct1"], ["dd-web*"])
        first = next(events)
        assert (first.node, first.unit, first.active) == ("ct1", "dd-web.service", "active")
        events.close()  # stops the node's monitor job
        node.systemctl("stop", "dd-web")
