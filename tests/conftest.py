"""Shared fixtures: real local clusters (server + clients as processes on loopback)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from directord.localcluster import BROKERS, LocalCluster
from tests.brokers import NatsServer, RabbitNode, TestPKI
from tests.redis_server import RedisServer

# Hypothesis profiles: `bounded` runs inside `make test`; `make fuzz` passes
# --hypothesis-profile fuzz for a long run (the plugin loads it after this default).
for _name, _examples in (("bounded", 100), ("fuzz", 5000)):
    settings.register_profile(
        _name,
        max_examples=_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
settings.load_profile("bounded")

# Every driver the shared `cluster` fixture runs the behaviour suite on (issue 4: one
# parametrized suite). The broker drivers use the private brokers below.
DRIVERS = ("grpc", "zmq", "messaging", "nats")


class Cluster(LocalCluster):
    """LocalCluster with test conveniences."""

    def run(self, *args: str, rc: int | None = 0, timeout: float = 120.0) -> Any:
        """Run the CLI; assert its exit code (unless rc is None); return the process."""
        proc = self.cli(*args, timeout=timeout)
        if rc is not None:
            assert proc.returncode == rc, (
                f"directord {' '.join(args)} exited {proc.returncode}, expected {rc}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def json(self, *args: str, rc: int | None = 0, timeout: float = 120.0) -> Any:
        """Run the CLI with --format json and decode its stdout."""
        proc = self.run(*args, "--format", "json", rc=rc, timeout=timeout)
        return json.loads(proc.stdout)

    def orchestrate(
        self,
        text: str,
        *args: str,
        rc: int | None = 0,
        name: str = "orch.yaml",
    ) -> Any:
        """Write an orchestration file and run it with --wait --format json."""
        path = self.root / name
        path.write_text(text)
        return self.json("orchestrate", str(path), "--wait", *args, rc=rc)


def results_by_node(reply: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Group a ``--wait --format json`` reply's results by node, in arrival order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in reply["results"]:
        out.setdefault(r["node"], []).append(r)
    return out


def broker_options(request: pytest.FixtureRequest, driver: str) -> list[str]:
    """Options pointing a broker driver at this run's private broker (none for the others)."""
    if driver == "messaging":
        rabbit: RabbitNode = request.getfixturevalue("rabbitmq_broker")
        return ["--messaging-url", rabbit.url()]
    if driver == "nats":
        nats: NatsServer = request.getfixturevalue("nats_broker")
        return ["--nats-url", nats.url]
    return []


@pytest.fixture(scope="module", params=DRIVERS)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A server and three clients shared by a test module (use --skip-cache or unique jobs).

    Parametrized over every driver: each test using it runs once per driver, its id
    naming the driver (``test_x[nats]``). A test that needs one driver only (a raw gRPC
    peer, say) uses ``make_cluster`` instead.
    """
    driver: str = request.param
    options = broker_options(request, driver)
    c = Cluster(
        tmp_path_factory.mktemp(f"cluster-{driver}"),
        nodes=3,
        heartbeat=1.0,
        driver=driver,
        server_args=options,
        client_args=options,
    )
    c.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def make_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """Factory for a private cluster a test may break (kill, restart).

    With ``driver="messaging"`` or ``"nats"`` and no ``--messaging-url`` / ``--nats-url``
    in ``server_args``, server and clients use this run's private broker.
    """
    made: list[Cluster] = []

    def factory(nodes: int = 2, start: bool = True, **kwargs: Any) -> Cluster:
        driver = kwargs.get("driver", "grpc")
        if driver in BROKERS and not any(
            a in ("--messaging-url", "--nats-url") for a in kwargs.get("server_args", ())
        ):
            options = broker_options(request, driver)
            kwargs["server_args"] = [*options, *kwargs.get("server_args", ())]
            kwargs["client_args"] = [*options, *kwargs.get("client_args", ())]
        c = Cluster(tmp_path / f"cluster{len(made)}", nodes=nodes, **kwargs)
        made.append(c)
        if start:
            c.start()
        return c

    try:
        yield factory
    finally:
        for c in made:
            c.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server for the whole run (never the machine's own); fails if absent."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()


# ---- brokers (issue 5): our own processes on free ports, never the machine's ---------------


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """A throwaway CA (directord's PKI) with a server certificate for 127.0.0.1."""
    return TestPKI(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def nats_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """A plain nats-server (JetStream on, no auth) for the whole run; fails if absent."""
    server = NatsServer(tmp_path_factory.mktemp("nats"), jetstream=True).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def rabbitmq_broker(
    tmp_path_factory: pytest.TempPathFactory, test_pki: TestPKI
) -> Iterator[RabbitNode]:
    """A private RabbitMQ node: AMQP, and AMQPS with the test CA; fails if absent.

    Users: guest/guest, directord/directord-secret, and NODE/NODE-secret for node0..node2
    (per-node logins, for ``--messaging-bind-identity``): node0 and node1 may use only
    their own queue (the permissions README gives), node2 anything.
    """
    users = {"directord": "directord-secret", **{f"node{i}": f"node{i}-secret" for i in range(3)}}
    own_queue = {
        f"node{i}": (
            rf"^[^.]+\.(node|parked)\.node{i}$",
            r"^amq\.default$",
            rf"^[^.]+\.(node|parked)\.node{i}$",
        )
        for i in range(2)
    }
    node = RabbitNode(
        tmp_path_factory.mktemp("rabbitmq"),
        users=users,
        tls=test_pki.server,
        ca=test_pki.ca,
        permissions=own_queue,
    ).start()
    try:
        yield node
    finally:
        node.close()
