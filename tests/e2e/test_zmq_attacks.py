"""ZeroMQ identity attacks: claims of reserved names, of online nodes, of other nodes' names.

The attacker is a raw pyzmq DEALER in the test process, holding whatever credential
the scenario gives it (the shared token, no credential, the shared curve key or another
node's own key) and a routing id of its choice; it sends what a client sends (an empty
frame, then a hello) and records everything the server sends back.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from directord import __version__
from directord.protocol import PROTOCOL_VERSION, Envelope, decode_batch, join_packed, pack
from directord.security import curve
from tests.conftest import Cluster
from tests.e2e.helpers import nodes, uid, wait_for

TOKEN = "tok3n-attacks"
# The server logs a connection held unused after QUIET_AFTER (5s); leave it time.
LOG_WAIT = 20.0


class Impostor:
    """A raw DEALER claiming ``routing_id`` on the cluster's ZeroMQ port."""

    def __init__(
        self,
        port: int,
        routing_id: str,
        *,
        token: str | None = None,
        keys: tuple[Path, str] | None = None,
    ) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.routing_id = routing_id.encode()
        if token is not None:
            self.sock.plain_username = b"directord"
            self.sock.plain_password = token.encode()
        if keys is not None:
            key_dir, name = keys
            public, secret = curve.load_keypair(str(key_dir), name)
            self.sock.curve_publickey, self.sock.curve_secretkey = public, secret
            self.sock.curve_serverkey = curve.load_public(str(key_dir), curve.SERVER)
        self.sock.connect(f"tcp://127.0.0.1:{port}")
        self.got: list[Envelope] = []

    def hello(self, identity: str) -> None:
        """Open as a client does: the new-connection frame, then a hello."""
        self.sock.send(b"")
        hello = {
            "t": "hello",
            "proto": PROTOCOL_VERSION,
            "identity": identity,
            "machine_id": "machine-impostor",
            "version": __version__,
            "driver": "zmq",
            "heartbeat_interval": 1.0,
            "host_boot": 0.0,
            "agent_start": time.time(),
            "known": [],
        }
        self.sock.send(join_packed([pack(hello)]))

    def listen(self, seconds: float) -> list[Envelope]:
        """Everything received so far and within ``seconds`` more."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.sock.poll(int(left * 1000) + 1):
                self.got += decode_batch(self.sock.recv())
        return self.got

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def impostors() -> Iterator[list[Impostor]]:
    """Impostors a test opens (append them); all closed at the end."""
    made: list[Impostor] = []
    try:
        yield made
    finally:
        for impostor in made:
            impostor.close()


def _server_log(cluster: Cluster) -> str:
    return cluster.log("server").read_text(errors="replace")


def _registrations(cluster: Cluster, identity: str) -> int:
    ready = json.loads((cluster.root / f"{identity}.ready").read_text())
    return int(ready["registered"])


def _generate(key_dir: Path, *clients: str) -> None:
    curve.generate(str(key_dir), [curve.SERVER, curve.SHARED_CLIENT, *clients])


def _node_keys(server_dir: Path, node_dir: Path, identity: str) -> None:
    """A node's key dir: the public keys, the shared secret and its own secret if it has one."""
    shutil.copytree(server_dir / "public_keys", node_dir / "public_keys")
    (node_dir / "private_keys").mkdir(parents=True)
    for name in (curve.SHARED_CLIENT, identity):
        secret = server_dir / "private_keys" / f"{name}.key_secret"
        if secret.exists():
            shutil.copy(secret, node_dir / "private_keys")


def _assert_node_undisturbed(cluster: Cluster, identity: str) -> None:
    """The node never lost its connection, is listed as itself, and still runs jobs."""
    word = uid()
    reply = cluster.json(
        "exec", "--verb", "RUN", f"--skip-cache echo {word}", "--target", identity, "--wait"
    )
    assert [(r["node"], r["state"], r["stdout"].strip()) for r in reply["results"]] == [
        (identity, "success", word)
    ]
    row = nodes(cluster)[identity]
    assert (row["status"], row["machine_id"]) == ("online", f"machine-{identity}")
    assert _registrations(cluster, identity) == 1


def test_reserved_routing_ids_are_refused_at_the_transport(
    make_cluster: Any, impostors: list[Impostor]
) -> None:
    """A shared-key holder claiming ``server`` or ``client`` gets no session at all."""
    cluster = make_cluster(
        nodes=1,
        driver="zmq",
        server_args=["--zmq-shared-key", TOKEN],
        client_args=["--zmq-shared-key", TOKEN],
    )
    for name in ("server", "client"):
        impostor = Impostor(cluster.port, name, token=TOKEN)
        impostors.append(impostor)
        impostor.hello(name)
    # Refused before any session: not even a refusal message comes back.
    assert [impostor.listen(1.5) for impostor in impostors] == [[], []]
    for name in ("server", "client"):
        wait_for(
            lambda name=name: (
                "zmq: refused a connection from 127.0.0.1:" in _server_log(cluster)
                and f"routing id: identity {name!r} is reserved" in _server_log(cluster)
            ),
            f"the server to log the refusal of {name!r}",
        )
    assert "refused node from zmq:server" not in _server_log(cluster)
    assert set(nodes(cluster)) == {"node0"}


@pytest.mark.parametrize("auth", ["shared-key", "none"])
def test_claim_of_an_online_node_gets_nothing_and_disturbs_nothing(
    make_cluster: Any, impostors: list[Impostor], auth: str
) -> None:
    options = ["--zmq-shared-key", TOKEN] if auth == "shared-key" else []
    cluster = make_cluster(nodes=2, driver="zmq", server_args=options, client_args=options)
    impostor = Impostor(cluster.port, "node1", token=TOKEN if auth == "shared-key" else None)
    impostors.append(impostor)
    impostor.hello("node1")
    assert impostor.listen(1.5) == []  # no welcome, no refusal
    _assert_node_undisturbed(cluster, "node1")
    _assert_node_undisturbed(cluster, "node0")
    assert impostor.listen(0.5) == []  # nor node1's job
    wait_for(
        lambda: "has sent nothing in 5s" in _server_log(cluster),
        "the server to log the connection it holds unused",
        LOG_WAIT,
    )


def test_curve_claims_of_other_nodes_names_are_refused(
    make_cluster: Any, impostors: list[Impostor], tmp_path: Path
) -> None:
    """Under Curve the key's name is the identity: no other key may take it, online or not."""
    server_keys = tmp_path / "server-keys"
    _generate(server_keys, "node1", "node2", "node3")  # node0 uses the shared key
    for identity in ("node0", "node1", "node2"):
        _node_keys(server_keys, tmp_path / "nk" / identity, identity)
    cluster = make_cluster(
        nodes=3,
        driver="zmq",
        server_args=["--zmq-key-dir", str(server_keys)],
        client_args=["--zmq-key-dir", str(tmp_path / "nk" / "{identity}")],
    )
    shared = (server_keys, curve.SHARED_CLIENT)
    node2 = (server_keys, "node2")
    # node1 is online: a claim of its routing id is held unused, whatever the key.
    online = [Impostor(cluster.port, "node1", keys=keys) for keys in (shared, node2)]
    # node3 has its own key and is offline: the shared key may not take its name,
    # neither as routing id nor, under another routing id, in the hello.
    offline = [
        (Impostor(cluster.port, "node3", keys=shared), "node3"),
        (Impostor(cluster.port, "decoy", keys=shared), "node3"),
        # node2's key proves node2, not node9 (a name with no key of its own)
        (Impostor(cluster.port, "node9", keys=node2), "node9"),
    ]
    impostors.extend(online + [i for i, _ in offline])
    for impostor in online:
        impostor.hello("node1")
    for impostor, claimed in offline:
        impostor.hello(claimed)
    decoy = offline[1][0]
    # Only the decoy reaches a session, which refuses it; the others get nothing at all.
    assert [e.get("t") for e in decoy.listen(1.5)] == ["refuse"]
    assert [impostor.listen(0.1) for impostor in impostors if impostor is not decoy] == [[]] * 4
    for identity in ("node0", "node1", "node2"):
        _assert_node_undisturbed(cluster, identity)
    listed = nodes(cluster)
    assert "node3" not in listed and "node9" not in listed and "decoy" not in listed
    # nor any of node1's jobs
    assert [impostor.listen(0.1) for impostor in impostors if impostor is not decoy] == [[]] * 4

    def logged() -> bool:
        text = _server_log(cluster)
        return (
            text.count("has sent nothing in 5s") >= 2
            and "'node3' has its own curve key; the shared key may not claim it" in text
            and "claims 'node9' with the curve key of 'node2'" in text
            and "identity 'node3' does not match the credential's 'decoy'" in text
        )

    wait_for(logged, "the server to log every refused claim", LOG_WAIT)


def test_killed_client_gets_back_in_past_a_held_claim(
    make_cluster: Any, impostors: list[Impostor]
) -> None:
    """A restarted node is not held up by its old connection, nor by an impostor's claim."""
    options = ["--zmq-shared-key", TOKEN]
    cluster = make_cluster(nodes=1, driver="zmq", server_args=options, client_args=options)
    impostor = Impostor(cluster.port, "node0", token=TOKEN)
    impostors.append(impostor)
    impostor.hello("node0")
    assert impostor.listen(1.5) == []
    cluster.stop_process("node0", signal.SIGKILL)
    started = time.monotonic()
    cluster.start_client("node0")  # returns once registered
    elapsed = time.monotonic() - started
    # Parked, it would have waited 10s for a welcome and said so before dialling again.
    assert "no answer to hello" not in cluster.log("node0").read_text(errors="replace")
    assert elapsed < 9.0, f"restarted client took {elapsed:.1f}s to register"
    _assert_node_undisturbed(cluster, "node0")
    assert impostor.listen(0.5) == []
