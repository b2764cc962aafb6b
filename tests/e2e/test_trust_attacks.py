"""Attacks on trust from a node, a local user and the network (issue 8), on real processes.

Each test is an attack that worked on 0c0e9ad: a socket-group member copying a
root-only file off the server, a per-node COPY handing out the server's own
key, a node registering under a reserved name, an open listener on every
address, and a node that reads other jobs' states, asks for unbounded chunks,
floods requests or reports a huge QUERY value.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.e2e.helpers import (
    job_count,
    job_info,
    nodes,
    raw_cli,
    read_lines,
    submit,
    uid,
    wait_for,
    wait_job,
)
from tests.fakenode import FakeNode, connect_grpc

NOBODY = 65534  # uid and gid of nobody / nogroup on Debian


@pytest.fixture
def open_root() -> Iterator[Path]:
    """A directory other users may traverse (pytest's own tmp is 0700 to root)."""
    root = Path(tempfile.mkdtemp(prefix="directord-trust-"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _interpreter_for_nobody() -> str:
    """A Python that nobody may run, for this venv's packages.

    The venv's own interpreter may live under /root (0700 here); Debian's python of
    the same version runs the same compiled packages.
    """
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}"):
        try:
            probe = subprocess.run(
                [candidate, "-c", "pass"],
                capture_output=True,
                timeout=30,
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
            )
        except OSError:
            continue
        if probe.returncode == 0:
            return candidate
    raise AssertionError(f"no {version} that user nobody may run: apt-get install {version}")


def as_nobody(cluster: Cluster, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The CLI run by an unprivileged member of the socket's group."""
    import directord

    paths = [
        str(Path(directord.__file__).parents[1]),
        *(p for p in sys.path if "site-packages" in p),
    ]
    return subprocess.run(
        [_interpreter_for_nobody(), "-m", "directord", "--socket-path", cluster.socket_path, *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
        env={
            **cluster.env,
            "PYTHONPATH": os.pathsep.join(paths),
            "COVERAGE_FILE": str(cwd / ".coverage"),
        },
        user=NOBODY,
        group=NOBODY,
        extra_groups=[],
    )


def test_copy_reads_source_files_with_the_submitters_rights(open_root: Path) -> None:
    cluster = Cluster(open_root / "c", nodes=1, server_args=["--socket-group", "nogroup"])
    cluster.root.chmod(0o711)
    with cluster:
        _copy_as_nobody(cluster, open_root)


def _copy_as_nobody(cluster: Cluster, open_root: Path) -> None:
    work = open_root / "work"
    work.mkdir(mode=0o777)
    work.chmod(0o777)
    secret = open_root / "root-only.key"
    secret.write_text("TOPSECRET")
    secret.chmod(0o600)  # root's, as the server's own keys are
    dest = open_root / "stolen"
    before = job_count(cluster)
    proc = as_nobody(cluster, "exec", "--verb", "COPY", str(secret), str(dest), "--wait", cwd=work)
    assert proc.returncode == 2, proc.stderr
    assert f"{secret}: Permission denied" in proc.stderr or "Permission denied" in proc.stderr
    assert not dest.exists()
    assert job_count(cluster) == before  # refused before anything was submitted
    # What nobody may read, nobody may copy, through the same upload.
    shared = open_root / "public.txt"
    shared.write_text("for everyone")
    shared.chmod(0o644)
    proc = as_nobody(cluster, "exec", "--verb", "COPY", str(shared), str(dest), "--wait", cwd=work)
    assert proc.returncode == 0, proc.stderr
    assert dest.read_text() == "for everyone"


def test_per_node_copy_never_carries_another_nodes_or_the_servers_key(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(nodes=2)
    keys = cluster.root / "private_keys"
    keys.mkdir()
    for name in ("node0", "node1", "server", "client", "ca"):
        (keys / f"{name}.key_secret").write_text(f"secret of {name}")
    dest = cluster.root / "dest-{{ identity }}"
    reply = cluster.json(
        "exec",
        "--verb",
        "COPY",
        "--per-node",
        f"{keys}/{{identity}}.key_secret",
        f"{dest}/",
        "--target",
        "node0",
        "--wait",
    )
    assert [r["state"] for r in reply["results"]] == ["success"]
    info = job_info(cluster, reply["parents"][0]["jobs"][0])
    assert [f["name"] for f in info["files"]] == ["node0.key_secret"]
    got = cluster.root / "dest-node0"
    assert sorted(p.name for p in got.iterdir()) == ["node0.key_secret"]
    # A reserved name's file is never even uploaded (node1's is: it may be a target).
    stored = {p.name for p in (cluster.root / "files").rglob("*") if p.is_file()}
    mine = {hashlib.sha256(f"secret of {n}".encode()).hexdigest() for n in ("node0", "node1")}
    assert stored == mine
    # With both nodes as targets each still gets its own file and nothing else.
    reply = cluster.json(
        "exec",
        "--verb",
        "COPY",
        "--per-node",
        f"{keys}/{{identity}}.key_secret",
        f"{dest}/",
        "--wait",
    )
    assert {r["node"]: r["state"] for r in reply["results"]} == {
        "node0": "skipped-cache",  # the same job as above: it already succeeded there
        "node1": "success",
    }
    for node in ("node0", "node1"):
        folder = cluster.root / f"dest-{node}"
        assert [p.name for p in folder.iterdir()] == [f"{node}.key_secret"]
        assert (folder / f"{node}.key_secret").read_text() == f"secret of {node}"


@pytest.mark.parametrize("name", ["server", "client", "ca", "Server"])
def test_a_node_cannot_register_under_a_reserved_name(
    make_cluster: Callable[..., Cluster], name: str
) -> None:
    cluster = make_cluster(nodes=0)
    cluster.identities.append(name)
    cluster.start_client(name, wait=False)
    wait_for(
        lambda: any(
            f"identity {name!r} is reserved" in line for line in read_lines(cluster.log("server"))
        ),
        f"the server to refuse {name}",
    )
    wait_for(
        lambda: any("server refused this client" in line for line in read_lines(cluster.log(name))),
        f"{name} to log the refusal",
    )
    assert name not in nodes(cluster)


def _server_argv(tmp: Path, *args: str) -> list[str]:
    return [
        "--socket-path",
        str(tmp / "api.sock"),
        "--datastore",
        "memory",
        "--ready-file",
        str(tmp / "ready"),
        *args,
        "server",
    ]


@pytest.mark.parametrize(
    "listener",
    [
        ["--grpc-bind-address", "0.0.0.0", "--grpc-port", "0"],
        ["--grpc-bind-address", "::", "--grpc-port", "0", "--grpc-ssl"],
        ["--driver", "zmq", "--zmq-bind-address", "0.0.0.0", "--job-port", "0"],
    ],
    ids=["grpc", "grpc-tls-without-client-auth", "zmq"],
)
def test_an_open_listener_beyond_loopback_needs_insecure(
    tmp_path: Path, listener: list[str]
) -> None:
    proc = raw_cli(*_server_argv(tmp_path, "--zmq-key-dir", str(tmp_path), *listener))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "refusing to start" in lines[0] and "can register as any node" in lines[0]
    assert "directord pki" in lines[0] and "--insecure" in lines[0]
    assert not (tmp_path / "ready").exists()


def test_insecure_starts_and_says_what_it_exposes(tmp_path: Path) -> None:
    argv = _server_argv(tmp_path, "--grpc-bind-address", "0.0.0.0", "--grpc-port", "0")
    argv.insert(-1, "--insecure")
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "directord", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if not k.startswith("DIRECTORD_")},
    )
    try:
        wait_for(lambda: (tmp_path / "ready").exists(), "the server to start")
        text = (tmp_path / "server.log").read_text()
        assert "--insecure: gRPC listener on 0.0.0.0:" in text
        assert "anyone who can reach it can register as any node" in text
    finally:
        server.terminate()
        server.wait(10)
        log.close()


def test_a_loopback_listener_needs_no_insecure(tmp_path: Path) -> None:
    # What the demo and every local cluster do: nothing to refuse, nothing to warn of.
    argv = _server_argv(tmp_path, "--grpc-bind-address", "127.0.0.1", "--grpc-port", "0")
    server = subprocess.Popen(
        [sys.executable, "-m", "directord", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("DIRECTORD_")},
    )
    try:
        wait_for(lambda: (tmp_path / "ready").exists(), "the server to start")
    finally:
        server.terminate()
        _, err = server.communicate(timeout=10)
    assert b"--insecure" not in err


# ---- a hostile node -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def fake_node(cluster: Cluster, identity: str) -> AsyncIterator[FakeNode]:
    """A registered node that sends what an agent never would."""
    node = FakeNode(await connect_grpc(cluster.port))
    try:
        assert (await node.hello(identity))["t"] == "welcome"
        yield node
    finally:
        await node.close()


def test_a_node_learns_job_states_only_through_its_own_job_wait(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(nodes=1)
    tok = uid()
    done = cluster.json("exec", "--verb", "RUN", f"echo {tok}", "--target", "node0", "--wait")
    sha = done["parents"][0]["shas"][0]
    job_id = done["parents"][0]["jobs"][0]

    async def spy() -> list[dict[str, Any]]:
        async with fake_node(cluster, "mole") as mole:
            # A JOB_WAIT of mole's own, waiting for another job on mole alone.
            other = uid()
            await asyncio.to_thread(
                submit,
                cluster,
                "exec",
                "--verb",
                "JOB_WAIT",
                "--job-timeout",
                "5",
                other,
                "--target",
                "mole",
            )
            wait = await mole.recv_until(lambda e: e["t"] == "job")
            return [
                # No job at all, then node0's own job as the "asker": neither targets mole.
                await mole.request("job_status", {"sha": sha, "identities": ["node0"]}),
                await mole.request(
                    "job_status", {"job": job_id, "sha": sha, "identities": ["node0"]}
                ),
                # Its own JOB_WAIT, for a job or a node that JOB_WAIT does not name.
                await mole.request(
                    "job_status", {"job": wait["id"], "sha": sha, "identities": ["mole"]}
                ),
                await mole.request(
                    "job_status", {"job": wait["id"], "sha": other, "identities": ["node0"]}
                ),
                # What it does name: answered (nothing ran, so no state yet).
                await mole.request(
                    "job_status", {"job": wait["id"], "sha": other, "identities": ["mole"]}
                ),
            ]

    replies = asyncio.run(spy())
    assert [r["ok"] for r in replies] == [False, False, False, False, True]
    assert all("no such job for this node" in r["err"] for r in replies[:2])
    assert all("this JOB_WAIT does not name that job or node" in r["err"] for r in replies[2:4])
    assert replies[4]["r"] == {"mole": None}
    logged = read_lines(cluster.log("server"))
    assert any("node mole asked 'job_status' about job None" in line for line in logged)
    assert any(f"about job {job_id}, which does not target it" in line for line in logged)
    assert "success" not in str(replies)


def test_a_node_gets_bounded_chunks_and_bounded_requests(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(nodes=0)
    big = cluster.root / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))

    async def attack() -> tuple[dict[str, Any], list[dict[str, Any]]]:
        async with fake_node(cluster, "mole") as mole:
            parents = await asyncio.to_thread(
                submit, cluster, "exec", "--verb", "COPY", str(big), "/nonexistent/x"
            )
            job = await mole.recv_until(lambda e: e["t"] == "job")
            assert job["id"] == parents[0]["jobs"][0]
            # A negative size once read the whole file into one reply.
            whole = await mole.chunk(job=job["id"], index=0, offset=0, size=-1)
            # A flood of requests it never waits for: the server answers at most so many.
            await mole.send(
                *(
                    {
                        "t": "req",
                        "rid": 1000 + i,
                        "m": "chunk",
                        "p": {"job": job["id"], "index": 0, "offset": 0},
                    }
                    for i in range(300)
                )
            )
            replies = [
                await mole.recv_until(lambda e, i=i: e["t"] == "rep" and e["rid"] == 1000 + i)
                for i in range(300)
            ]
            return whole, replies

    whole, replies = asyncio.run(attack())
    assert whole["ok"] and 0 < len(whole["r"]["data"]) <= 1024 * 1024
    refused = [r for r in replies if not r["ok"]]
    assert refused and all("too many requests in flight" in r["err"] for r in refused)
    assert any(r["ok"] for r in replies)
    assert any("requests in flight (limit" in line for line in read_lines(cluster.log("server")))


def test_an_oversized_query_value_fails_only_that_nodes_target(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(nodes=1, server_args=["--query-max-bytes", "4096"])
    key = uid()
    cluster.json("exec", "--verb", "ARG", f"{key} small", "--wait")

    async def report() -> str:
        async with fake_node(cluster, "mole") as mole:
            parents = await asyncio.to_thread(
                submit,
                cluster,
                "exec",
                "--verb",
                "QUERY",
                key,
                "--target",
                "node0",
                "--target",
                "mole",
            )
            job = await mole.recv_until(lambda e: e["t"] == "job")
            await mole.send({"t": "ack", "ids": [job["id"]]})
            await mole.send({"t": "qrep", "id": job["id"], "value": "x" * 10_000})
            return str(parents[0]["jobs"][0])

    job_id = asyncio.run(report())
    info = wait_job(cluster, job_id)
    mole = info["results"]["mole"]
    assert mole["state"] == "failed"
    assert "QUERY value of 10003 bytes is over the limit of 4096" in mole["stderr"]
    assert info["results"]["node0"]["state"] == "success"
