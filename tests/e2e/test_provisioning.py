"""Zero-touch enrolment with real processes: a provisioner, an mTLS server, nodes that join.

Nodes start with nothing but a token and the provisioner's CA certificate;
they announce themselves, are given a certificate and a configuration, and
restart into the cluster over mTLS, where a job runs on them.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from directord.localcluster import LocalCluster
from directord.security.pki import PKI
from tests.e2e.helpers import wait_for


def spawn(argv: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start a process writing to ``log`` (the child keeps its own copy of the file)."""
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


pytestmark = pytest.mark.timeout(600)
TOKEN = "t0ken-" + "x" * 20
HELPER = Path(__file__).with_name("provisioning_helper.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class World:
    """A CA, an mTLS server, a provisioner, and the nodes started against it."""

    def __init__(self, root: Path, helper: str, extra: list[str]) -> None:
        self.root = root
        self.ca = root / "ca"
        pki = PKI(str(self.ca))
        if not pki.ca_cert_path.exists():
            pki.init()
            pki.issue("server1", ["127.0.0.1"], "server")
            pki.issue("provisioner", ["127.0.0.1"], "server")
        self.cluster = LocalCluster(
            root / "cluster",
            nodes=0,
            heartbeat=1.0,
            server_args=[
                "--grpc-ssl", "--grpc-ssl-client-auth",
                "--grpc-ssl-ca", str(self.ca / "ca.crt"),
                "--grpc-ssl-cert", str(self.ca / "certs/server1.crt"),
                "--grpc-ssl-key", str(self.ca / "private/server1.key"),
            ],
        )  # fmt: skip
        self.cluster.start()
        self.nodes_dir = root / "nodes"
        template = root / "node-config.yaml"
        template.write_text(
            f"grpc_server_address: 127.0.0.1\ngrpc_port: {self.cluster.port}\n"
            "heartbeat_interval: 1\n"
            f"cache_path: {self.nodes_dir}/{{{{ identity }}}}/cache\n"
            f"run_path: {self.nodes_dir}/{{{{ identity }}}}/run\n"
            "# a fact rendered into the configuration\n"
            "components_path: /opt/{{ facts.datacenter | default('none') }}/components\n"
        )
        self.mode = root / "helper-mode"
        self.mode.write_text("accept\n")
        self.control = str(root / "provisioner.sock")
        self.metrics_port = free_port()
        ready = root / "provisioner.ready"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIRECTORD_")}
        env.update(
            HELPER_MODE=str(self.mode),
            HELPER_CA=str(self.ca),
            HELPER_CONFIG=json.dumps(
                {
                    "grpc_server_address": "127.0.0.1",
                    "grpc_port": self.cluster.port,
                    "heartbeat_interval": 1,
                    "cache_path": f"{self.nodes_dir}/IDENTITY/cache",
                    "run_path": f"{self.nodes_dir}/IDENTITY/run",
                }
            ),
        )
        self.env = env
        if helper != "builtin":
            wrapper = root / "helper.sh"
            wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HELPER} "$@"\n')
            wrapper.chmod(0o755)
            helper = str(wrapper)
        argv = [
            sys.executable, "-m", "directord", "--config-file", str(self.cluster.config),
            "--socket-path", self.cluster.socket_path, "provisioner",
            "--helper", helper, "--provisioning-token", TOKEN,
            "--provisioning-bind", "127.0.0.1", "--provisioning-port", "0",
            "--provisioning-ssl-cert", str(self.ca / "certs/provisioner.crt"),
            "--provisioning-ssl-key", str(self.ca / "private/provisioner.key"),
            "--pki-dir", str(self.ca), "--node-config", str(template),
            "--provisioner-socket", self.control, "--provisioner-state", str(root / "state"),
            "--metrics-port", str(self.metrics_port), "--ready-file", str(ready), *extra,
        ]  # fmt: skip
        self.log = root / "provisioner.log"
        self.proc = spawn(argv, self.log, env)
        data = wait_for(lambda: ready.exists() and ready.read_text(), "the provisioner", 30)
        self.port = json.loads(data)["port"]
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}

    def start_node(self, name: str, *, token: str = TOKEN, extra: tuple[str, ...] = ()) -> None:
        home = self.nodes_dir / name
        home.mkdir(parents=True, exist_ok=True)
        facts = home / "facts.json"
        facts.write_text(json.dumps({"datacenter": "dc-" + name}))
        argv = [
            sys.executable, "-m", "directord", "client", "--provision",
            "--provisioning-address", f"127.0.0.1:{self.port}",
            "--provisioning-token", token, "--provisioning-ca", str(self.ca / "ca.crt"),
            "--provisioning-facts", str(facts), "--config-file", str(home / "config.yaml"),
            "--pki-dir", str(home / "pki"), "--identity", name, "--machine-id", f"m-{name}",
            "--cache-path", str(home / "cache"), *extra,
        ]  # fmt: skip
        self.nodes[name] = spawn(argv, home / "log", self.env)

    def online(self) -> set[str]:
        proc = self.cluster.cli("manage", "--list-nodes", "--format", "json")
        if proc.returncode != 0:
            return set()
        return {n["identity"] for n in json.loads(proc.stdout) if n["status"] == "online"}

    def command(self, *args: str) -> Any:
        proc = subprocess.run(
            [sys.executable, "-m", "directord", "provisioner", *args,
             "--provisioner-socket", self.control, "--format", "json"],
            capture_output=True, text=True, env=self.env, timeout=30,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def metrics(self) -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics").read()
        out = {}
        for line in text.decode().splitlines():
            if line.startswith("directord_provisioner") and " " in line:
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def stop(self) -> None:
        for proc in [*self.nodes.values(), self.proc]:
            proc.terminate()
        for proc in [*self.nodes.values(), self.proc]:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.cluster.stop()


@pytest.fixture(scope="module")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = World(tmp_path_factory.mktemp("builtin"), "builtin", ["--provisioner-workers", "4"])
    try:
        yield world
    finally:
        world.stop()


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    world = World(tmp_path_factory.mktemp("program"), "program", ["--helper-timeout", "2"])
    try:
        yield world
    finally:
        world.stop()


def test_twenty_nodes_enrol_and_run_a_job_over_mtls(builtin: World) -> None:
    names = [f"n{i:02d}" for i in range(20)]
    started = time.monotonic()
    for name in names:
        builtin.start_node(name)
    wait_for(lambda: set(names) <= builtin.online(), "20 nodes to join", timeout=240)
    print(f"20 nodes joined in {time.monotonic() - started:.1f} s")
    proc = builtin.cluster.cli(
        "exec", "--verb", "RUN", "echo joined", "--target", *names, "--wait", "--format", "json",
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert sorted(r["node"] for r in results) == names
    assert {r["state"] for r in results} == {"success"}
    for name in names:
        home = builtin.nodes_dir / name
        key = home / "pki" / "private" / f"{name}.key"
        assert key.stat().st_mode & 0o777 == 0o600
        config = home / "config.yaml"
        assert config.stat().st_mode & 0o777 == 0o600
        text = config.read_text()
        assert "provision: false" in text
        assert f"components_path: /opt/dc-{name}/components" in text
        # No node key ever reached the provisioner's CA directory.
        assert not (builtin.ca / "private" / f"{name}.key").exists()
    metrics = builtin.metrics()
    assert metrics["directord_provisioner_provisioned_total"] == 20
    assert metrics["directord_provisioner_discovered_total"] == 20
    assert metrics["directord_provisioner_paused"] == 0
    assert "directord_provisioner_helper_seconds_count" in metrics


def test_a_wrong_token_never_joins(builtin: World) -> None:
    before = builtin.metrics()["directord_provisioner_refused_total"]
    builtin.start_node("intruder", token="guessed-token")
    wait_for(
        lambda: builtin.metrics()["directord_provisioner_refused_total"] > before,
        "the refusal to be counted",
    )
    time.sleep(2)
    assert "intruder" not in builtin.online()
    assert "wrong provisioning token" in (builtin.nodes_dir / "intruder" / "log").read_text()
    assert TOKEN not in builtin.log.read_text() and "guessed-token" not in builtin.log.read_text()
    assert not (builtin.nodes_dir / "intruder" / "pki" / "certs").exists()


def test_pause_keeps_nodes_waiting_and_resume_lets_them_join(builtin: World) -> None:
    assert builtin.command("pause")["paused"] is True
    assert builtin.metrics()["directord_provisioner_paused"] == 1
    builtin.start_node("paused1")
    wait_for(lambda: "paused1" in builtin.command("status")["waiting"], "paused1 to wait")
    time.sleep(3)
    assert "paused1" not in builtin.online()
    assert builtin.command("resume")["paused"] is False
    wait_for(lambda: "paused1" in builtin.online(), "paused1 to join after resume", timeout=90)


def test_garbage_floods_and_huge_frames_are_refused_and_the_provisioner_carries_on(
    builtin: World,
) -> None:
    before = builtin.metrics()["directord_provisioner_refused_total"]
    context = ssl.create_default_context(cafile=str(builtin.ca / "ca.crt"))

    def tls() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", builtin.port), timeout=10)
        return context.wrap_socket(raw, server_hostname="127.0.0.1")

    with tls() as s:  # not msgpack at all
        s.sendall(struct.pack(">I", 5) + b"\xc1\xc1\xc1\xc1\xc1")
        assert s.recv(100) == b""
    with tls() as s:  # a frame announcing 100 MB
        s.sendall(struct.pack(">I", 100 * 1024 * 1024))
        assert s.recv(100) == b""
    from directord.protocol import frame
    from directord.protocol.provisioning import Announce

    announce = frame([Announce(identity="flood", machine_id="m", token=TOKEN)])
    with tls() as s:
        s.sendall(announce * 200)
        data = b""
        with pytest.raises((ConnectionError, OSError)):
            while chunk := s.recv(65536):
                data += chunk
            raise ConnectionError("closed")
    wait_for(
        lambda: builtin.metrics()["directord_provisioner_refused_total"] >= before + 3,
        "three refusals",
    )
    assert builtin.proc.poll() is None
    assert builtin.command("status")["paused"] is False


def test_deferring_rejecting_crashing_and_hanging_helpers(program: World) -> None:
    program.mode.write_text("defer\n")
    program.start_node("d1")
    wait_for(lambda: program.metrics()["directord_provisioner_deferred_total"] >= 2,
             "d1 to be deferred twice (the sweep asks again)", timeout=60)  # fmt: skip
    assert "d1" in program.command("status")["waiting"] and "d1" not in program.online()

    program.mode.write_text("crash\n")
    wait_for(lambda: program.metrics()["directord_provisioner_helper_errors_total"] >= 1,
             "the crash to be counted", timeout=60)  # fmt: skip
    assert "helper failed for d1" in program.log.read_text()
    program.mode.write_text("hang\n")
    errors = program.metrics()["directord_provisioner_helper_errors_total"]
    wait_for(lambda: program.metrics()["directord_provisioner_helper_errors_total"] > errors,
             "the hang to be cut off", timeout=60)  # fmt: skip
    assert "did not answer within 2s" in program.log.read_text()
    program.mode.write_text("garbage\n")
    errors = program.metrics()["directord_provisioner_helper_errors_total"]
    wait_for(lambda: program.metrics()["directord_provisioner_helper_errors_total"] > errors,
             "bad JSON to be counted", timeout=60)  # fmt: skip
    assert "d1" in program.command("status")["waiting"]

    program.mode.write_text("reject\n")
    wait_for(lambda: "d1" in program.command("status")["rejected"], "d1 rejected", timeout=60)
    assert program.metrics()["directord_provisioner_rejected_total"] == 1
    program.mode.write_text("accept\n")
    time.sleep(6)  # a sweep later: still refused, it was rejected
    assert "d1" not in program.online()
    assert "rejected: not in the inventory system" in (program.nodes_dir / "d1" / "log").read_text()
    cleared = program.command("clear", "d1")
    assert "d1" not in cleared["rejected"]
    wait_for(lambda: "d1" in program.online(), "d1 to join once cleared", timeout=120)


def test_a_certificate_near_expiry_is_reprovisioned(program: World) -> None:
    from cryptography import x509

    # The helper signs for one day the first time, thirty days after.
    program.mode.write_text("renew\n")
    program.start_node("short", extra=("--reprovision-before", "172800"))
    cert = program.nodes_dir / "short" / "pki" / "certs" / "short.crt"

    def lifetime() -> float:
        try:
            renewed = x509.load_pem_x509_certificate(cert.read_bytes())
        except (OSError, ValueError):
            return 0.0
        return renewed.not_valid_after_utc.timestamp() - time.time()

    # Inside its window from the start (one day left, two asked), the client re-enters
    # provisioning within seconds of joining and comes back with a thirty-day certificate.
    wait_for(lambda: lifetime() > 20 * 86400, "a renewed certificate", timeout=120)
    wait_for(lambda: "short" in program.online(), "short to rejoin", timeout=90)
    log = (program.nodes_dir / "short" / "log").read_text()
    assert "certificate expires soon: re-entering provisioning" in log
    assert log.count("configured: ") == 2
    assert "short" in program.command("status")["waiting"] or "short" in program.online()


class RawNode:
    """A provisioning-mode node played by the test, to send what a real one never would."""

    def __init__(self, world: World, identity: str, machine_id: str) -> None:
        from directord.protocol import FrameDecoder
        from directord.protocol.provisioning import FROM_PROVISIONER

        context = ssl.create_default_context(cafile=str(world.ca / "ca.crt"))
        raw = socket.create_connection(("127.0.0.1", world.port), timeout=30)
        self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.decoder = FrameDecoder(FROM_PROVISIONER)
        self.send_announce(identity, machine_id)

    def send_announce(self, identity: str, machine_id: str) -> None:
        from directord.protocol import frame
        from directord.protocol.provisioning import Announce

        self.sock.sendall(frame([Announce(identity=identity, machine_id=machine_id, token=TOKEN)]))

    def next(self) -> Any:
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            for batch in self.decoder.feed(data):
                return batch[0]

    def answer(self, rid: int, result: Any) -> None:
        from directord.protocol import frame
        from directord.protocol.provisioning import Answer

        self.sock.sendall(frame([Answer(rid=rid, ok=True, result=result)]))


def test_a_bad_csr_or_one_for_another_name_is_refused(builtin: World) -> None:
    from directord.protocol.provisioning import Refused
    from directord.security.pki import PKI as NodePKI

    before = builtin.metrics()["directord_provisioner_refused_total"]
    other = NodePKI(str(builtin.root / "raw-pki"))
    other_csr = other.csr("someone-else").read_text()
    for name, csr, why in (
        ("raw1", "not a certificate request", "bad CSR"),
        ("raw2", other_csr, "the CSR is for 'someone-else', not 'raw2'"),
    ):
        node = RawNode(builtin, name, f"m-{name}")
        try:
            ask = node.next()
            assert ask.method == "inventory"
            node.answer(ask.rid, {"identity": name, "facts": {}, "pki_dir": "/x"})
            ask = node.next()
            assert ask.method == "gencsr"
            node.answer(ask.rid, {"csr": csr})
            refused = node.next()
            assert isinstance(refused, Refused) and why in refused.reason
        finally:
            node.sock.close()
    wait_for(
        lambda: builtin.metrics()["directord_provisioner_refused_total"] >= before + 2,
        "the two refusals to be counted",
    )
    assert not (builtin.ca / "certs" / "raw1.crt").exists()


def test_an_identity_enrolled_with_another_machine_is_refused(builtin: World) -> None:
    from directord.protocol.provisioning import Refused

    builtin.start_node("owned")
    wait_for(lambda: "owned" in builtin.online(), "owned to join", timeout=90)
    node = RawNode(builtin, "owned", "m-impostor")
    try:
        refused = node.next()
        assert isinstance(refused, Refused)
        assert refused.reason == "owned is enrolled already, with another machine id"
    finally:
        node.sock.close()
    assert "owned" in builtin.online()
