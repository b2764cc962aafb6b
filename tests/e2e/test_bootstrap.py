"""``directord bootstrap`` against a real sshd on 127.0.0.2-7.

The shipped catalogs install directord on each host from a wheelhouse made
here (the hosts need no internet), configure it, and start it. The hosts
share this machine, so each gets its own ``root`` prefix and starts its
daemon in the background (``service: none``) instead of through systemd.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.helpers import raw_cli, wait_for
from tests.e2e.sshd import HOSTS, Sshd, running_sshd

REPO = Path(__file__).resolve().parents[2]
PYTHON = str(Path(sys.base_prefix) / "bin" / "python3")
pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheels of this checkout and its dependencies, as an operator makes them."""
    folder = tmp_path_factory.mktemp("wheelhouse")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "-w", str(folder), f"{REPO}[zmq]"],
        check=True,
        capture_output=True,
    )
    return folder


def free_port(host: str = "127.0.0.2") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def bootstrap(sshd: Sshd, *catalogs: Path | str, extra: tuple[str, ...] = ()) -> Any:
    args = ["bootstrap", "--key-file", str(sshd.key_file), "--known-hosts", str(sshd.known_hosts)]
    for catalog in catalogs:
        args += ["--catalog", str(catalog)]
    return raw_cli(*args, *extra, timeout=500)


def write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@contextlib.contextmanager
def daemons(roots: list[Path]) -> Iterator[None]:
    """Kill the daemons the catalogs started (their pid files) when the test ends."""
    try:
        yield
    finally:
        for root in roots:
            for pidfile in (root / "run").glob("directord-*.pid"):
                with contextlib.suppress(OSError, ValueError):
                    os.kill(int(pidfile.read_text().strip()), signal.SIGKILL)


def node_rows(socket_path: Path) -> dict[str, dict[str, Any]]:
    proc = raw_cli("--socket-path", str(socket_path), "manage", "--list-nodes", "--format", "json")
    if proc.returncode != 0:
        return {}
    return {row["identity"]: row for row in json.loads(proc.stdout)}


def hosts_catalog(sshd: Sshd, tmp: Path, names: list[str], **top: Any) -> dict[str, Any]:
    """Server on 127.0.0.2, one client per name on the next addresses, each under its own root."""
    return {
        **top,
        "service": "none",
        "python": PYTHON,
        "directord_server": {
            "targets": [
                {
                    "host": HOSTS[0],
                    "port": sshd.port,
                    "username": "root",
                    "name": "server1",
                    "vars": {"root": str(tmp / "server1")},
                }
            ]
        },
        "directord_clients": {
            "args": {"port": sshd.port, "username": "root"},
            "targets": [
                {"host": HOSTS[i + 1], "name": name, "vars": {"root": str(tmp / name)}}
                for i, name in enumerate(names)
            ],
        },
    }


def run_everywhere(socket_path: Path, names: list[str]) -> None:
    """The bootstrapped nodes join, and a job runs on each of them."""
    wait_for(
        lambda: all(node_rows(socket_path).get(n, {}).get("status") == "online" for n in names),
        f"{names} to join",
        timeout=60,
    )
    proc = raw_cli(
        "--socket-path", str(socket_path), "exec", "--verb", "RUN",
        "echo joined-$(hostname)", "--wait", "--format", "json", timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(proc.stdout)["results"]
    assert sorted(r["node"] for r in results) == sorted(names)
    assert {r["state"] for r in results} == {"success"}
    assert all("joined-" in r["stdout"] for r in results)


def test_grpc_mtls_catalog_bootstraps_a_server_and_three_clients_that_run_a_job(
    sshd: Sshd, wheelhouse: Path, tmp_path: Path
) -> None:
    names = ["node1", "node2", "node3"]
    pki = tmp_path / "operator-pki"
    hosts = write(
        tmp_path / "hosts.yaml",
        hosts_catalog(
            sshd, tmp_path, names,
            wheelhouse=str(wheelhouse), pki_dir=str(pki),
            bind_address=HOSTS[0], grpc_port=free_port(),
        ),
    )  # fmt: skip
    with daemons([tmp_path / n for n in ["server1", *names]]):
        proc = bootstrap(sshd, "grpc-mtls.yaml", hosts)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0] == "bootstrap: 4 hosts"
        for name in ["server1", *names]:
            assert any(line.startswith(f"ok      {name} (root@127.0.0.") for line in lines)
        assert lines[-1] == "bootstrap: all 4 hosts done"
        # No private key left its host: the operator's CA holds the CA key only.
        assert (pki / "ca.key").exists() and list(pki.glob("private/*")) == []
        for name in names:
            key = tmp_path / name / "etc/directord/pki/private" / f"{name}.key"
            assert key.stat().st_mode & 0o777 == 0o600
        run_everywhere(tmp_path / "server1/run/directord.sock", names)


def test_zmq_curve_catalog_gives_each_client_its_own_key_only(
    sshd: Sshd, wheelhouse: Path, tmp_path: Path
) -> None:
    names = ["zn1", "zn2", "zn3"]
    curve = tmp_path / "operator-curve"
    hosts = write(
        tmp_path / "hosts.yaml",
        hosts_catalog(
            sshd, tmp_path, names,
            wheelhouse=str(wheelhouse), curve_dir=str(curve), bind_address=HOSTS[0],
            job_port=free_port(), backend_port=free_port(),
        ),
    )  # fmt: skip
    with daemons([tmp_path / n for n in ["server1", *names]]):
        proc = bootstrap(sshd, "zmq-curve.yaml", hosts)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.splitlines()[-1] == "bootstrap: all 4 hosts done"
        server_secrets = tmp_path / "server1/etc/directord/keys/private_keys"
        assert sorted(p.name for p in server_secrets.iterdir()) == ["server.key_secret"]
        for name in names:
            secrets = tmp_path / name / "etc/directord/keys/private_keys"
            assert sorted(p.name for p in secrets.iterdir()) == [f"{name}.key_secret"]
            assert (secrets / f"{name}.key_secret").stat().st_mode & 0o777 == 0o600
        run_everywhere(tmp_path / "server1/run/directord.sock", names)


def test_an_unknown_host_key_is_refused_and_nothing_runs(sshd: Sshd, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    catalog = write(
        tmp_path / "c.yaml",
        {
            "directord_clients": {
                "args": {"port": sshd.port, "username": "root"},
                "targets": [{"host": HOSTS[1], "name": "n1"}],
                "jobs": [{"RUN": f"touch {marker}"}],
            }
        },
    )
    other = tmp_path / "known_hosts"
    other.write_text(
        f"[{HOSTS[1]}]:{sshd.port} ssh-ed25519 "
        "AAAAC3NzaC1lZDI1NTE5AAAAIB5qb8C2SLJaoJ8KvCLy1UN0iZBaf9ebqEygy5BfVOL9\n"
    )
    proc = raw_cli(
        "bootstrap", "--catalog", str(catalog), "--key-file", str(sshd.key_file),
        "--known-hosts", str(other),
    )  # fmt: skip
    assert proc.returncode == 1
    assert "FAILED  n1 (root@127.0.0.3" in proc.stdout
    assert "host key not trusted" in proc.stdout and "--insecure-host-keys" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "bootstrap: 1 of 1 hosts failed: n1"
    assert not marker.exists()
    # The operator's explicit choice is honoured.
    proc = raw_cli(
        "bootstrap", "--catalog", str(catalog), "--key-file", str(sshd.key_file),
        "--known-hosts", str(other), "--insecure-host-keys",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert marker.exists()


def test_a_failed_host_does_not_stop_the_others_and_is_listed(sshd: Sshd, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    local = tmp_path / "payload.txt"
    local.write_text("payload\n")
    catalog = write(
        tmp_path / "c.yaml",
        f"""
out: {out}
directord_clients:
  args: {{port: {sshd.port}, username: root}}
  targets:
  - {{host: {HOSTS[1]}, name: good1}}
  - {{host: {HOSTS[2]}, name: bad}}
  - {{host: {HOSTS[3]}, name: good2}}
  jobs:
  - ADD: '{local} {{{{ out }}}}/{{{{ directord_bootstrap.name }}}}.txt'
  - RUN: 'test {{{{ directord_bootstrap.name }}}} != bad || {{ echo broken on purpose >&2; exit 7; }}'
  - ['RUN': 'echo from-$(basename {{{{ out }}}})-{{{{ directord_bootstrap.name }}}} > {{{{ out }}}}/{{{{ directord_bootstrap.name }}}}.remote']
  - GET: "{{{{ out }}}}/{{{{ directord_bootstrap.name }}}}.remote {{{{ out }}}}/got/{{{{ directord_bootstrap.name }}}}"
  - LOCAL: 'test -s {{{{ out }}}}/got/{{{{ directord_bootstrap.name }}}}'
""",  # noqa: E501
    )
    proc = bootstrap(sshd, catalog, extra=("--threads", "2"))
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    bad = [line for line in lines if line.startswith("FAILED  bad ")]
    assert len(bad) == 1
    assert "exit 7: broken on purpose" in bad[0]
    assert f"at step 2 of 5 ({catalog}:" in bad[0] and "RUN)" in bad[0]
    assert sum(line.startswith("ok      good") for line in lines) == 2
    assert lines[-1] == "bootstrap: 1 of 3 hosts failed: bad"
    for name in ("good1", "good2"):
        assert (out / f"{name}.txt").read_text() == "payload\n"
        assert (out / "got" / name).read_text() == f"from-out-{name}\n"
    assert not (out / "got" / "bad").exists()


def test_a_misspelt_variable_fails_the_step_naming_file_and_line(
    sshd: Sshd, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    catalog = write(
        tmp_path / "c.yaml",
        f"directord_clients:\n  args: {{port: {sshd.port}, username: root}}\n"
        f"  targets: [{{host: {HOSTS[1]}, name: n1}}]\n  jobs:\n"
        f"  - RUN: touch {marker}\n  - RUN: rm -rf {{{{ tmp_dri }}}}/x\n",
    )
    proc = bootstrap(sshd, catalog)
    assert proc.returncode == 1
    assert "template error: 'tmp_dri' is undefined" in proc.stdout
    assert f"at step 2 of 2 ({catalog}:6 RUN)" in proc.stdout
    assert marker.exists()  # step 1 ran; step 2 never did


def test_a_broken_catalog_is_refused_before_any_connection(tmp_path: Path) -> None:
    catalog = write(
        tmp_path / "c.yaml",
        "directord_clients:\n  targets: [{host: 127.0.0.3}]\n  jobs:\n  - COPY: a b\n",
    )
    proc = raw_cli("bootstrap", "--catalog", str(catalog))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"directord: {catalog}:4: unknown job 'COPY' (expected one of RUN, ADD, GET, LOCAL)"
    )
