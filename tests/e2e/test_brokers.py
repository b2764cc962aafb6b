"""End-to-end on real brokers (issue 5): TLS and credentials, offline nodes, broker restarts.

Every broker here is a private process of this run (tests/brokers.py): the session's
RabbitMQ node (AMQP and AMQPS with the test CA) and plain NATS, NATS servers with TLS,
users and NKEYs (module fixtures), and a broker of its own for each restart test.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aio_pika.exceptions
import nats
import nats.js.errors
import pytest

from directord import DirectordConnect
from directord.components import build_job
from directord.protocol import encode_batch
from directord.transports.nats import consumer_name
from tests.brokers import NatsServer, RabbitNode, TestPKI, nkey_user
from tests.conftest import Cluster
from tests.e2e.helpers import nodes, read_lines, uid, wait_for, wait_status

BROKER_DRIVERS = ("messaging", "nats")
NATS_USER, NATS_PASSWORD = "directord", "nats-secret-pw"
DEADLINE = 60.0


# ---- fixtures ------------------------------------------------------------------------------


@dataclass
class NatsAuth:
    """A TLS nats-server with a password user and an NKEY user."""

    server: NatsServer
    seed: Path  # NKEY seed of a user the server knows
    stranger_seed: Path  # a valid NKEY the server does not know


@pytest.fixture(scope="module")
def nats_auth(tmp_path_factory: pytest.TempPathFactory, test_pki: TestPKI) -> Iterator[NatsAuth]:
    directory = tmp_path_factory.mktemp("nats-auth")
    public, seed = nkey_user(directory, "nodes")
    _, stranger = nkey_user(directory, "stranger")
    users = [{"user": NATS_USER, "password": NATS_PASSWORD}, {"nkey": public}]
    server = NatsServer(directory, tls=test_pki.server, users=users).start()
    try:
        yield NatsAuth(server, seed, stranger)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def nats_mtls(tmp_path_factory: pytest.TempPathFactory, test_pki: TestPKI) -> Iterator[NatsServer]:
    """A nats-server that requires a client certificate from the test CA."""
    server = NatsServer(
        tmp_path_factory.mktemp("nats-mtls"), tls=test_pki.server, ca=test_pki.ca, verify=True
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def foreign_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """Another CA: the brokers do not trust it, and it did not sign their certificates."""
    return TestPKI(tmp_path_factory.mktemp("foreign-pki"))


# ---- helpers -------------------------------------------------------------------------------


def all_logs(c: Cluster) -> str:
    return "".join(p.read_text(errors="replace") for p in sorted((c.root / "logs").iterdir()))


def assert_jobs_run(c: Cluster) -> None:
    """A job reaches every node and its output comes back."""
    tok = uid()
    reply = c.json("exec", "--verb", "RUN", f"echo hello-{tok}-$(hostname)", "--wait")
    results = {r["node"]: r for r in reply["results"]}
    assert sorted(results) == c.identities
    for r in results.values():
        assert r["state"] == "success", r
        assert r["stdout"].startswith(f"hello-{tok}-")


def assert_refused(c: Cluster, identity: str, needle: str) -> str:
    """A client that cannot get through the broker says why in its log and never registers."""
    c.start_client(identity, wait=False)
    line = wait_for(
        lambda: next((ln for ln in read_lines(c.log(identity)) if needle in ln), None),
        f"{identity} to log {needle!r}",
        DEADLINE,
    )
    assert not (c.root / f"{identity}.ready").exists()
    assert not any("registered with" in ln for ln in read_lines(c.log(identity)))
    assert identity not in nodes(c)
    return line


def tls_cluster(
    make_cluster: Any,
    driver: str,
    options: list[str],
    nodes: int = 2,
    start: bool = True,
    client_options: list[str] | None = None,
) -> Cluster:
    client = options if client_options is None else client_options
    cluster: Cluster = make_cluster(
        nodes=nodes,
        start=start,
        driver=driver,
        heartbeat=1.0,
        server_args=options,
        client_args=client,
    )
    return cluster


# ---- RabbitMQ: TLS and credentials ----------------------------------------------------------


def test_messaging_over_tls_with_the_ca(
    make_cluster: Any, rabbitmq_broker: RabbitNode, test_pki: TestPKI
) -> None:
    url = rabbitmq_broker.url("directord", tls=True)  # the AMQPS port speaks only TLS
    options = ["--messaging-url", url, "--messaging-ssl", "--messaging-ssl-ca", str(test_pki.ca)]
    c = tls_cluster(make_cluster, "messaging", options)
    assert_jobs_run(c)
    logs = all_logs(c)
    assert f"connected to amqps://directord:***@127.0.0.1:{rabbitmq_broker.ssl_port}/" in logs
    assert "directord-secret" not in logs  # the password never reaches a log


def test_messaging_tls_with_client_certificates(
    make_cluster: Any, rabbitmq_broker: RabbitNode, test_pki: TestPKI
) -> None:
    for identity in ("server", "node0", "node1"):
        test_pki.client(f"amqp-{identity}")
    ssl = [
        "--messaging-url",
        rabbitmq_broker.url(tls=True),
        "--messaging-ssl",
        "--messaging-ssl-ca",
        str(test_pki.ca),
    ]
    server = [
        *ssl,
        "--messaging-ssl-cert",
        str(test_pki.pki.cert_path("amqp-server")),
        "--messaging-ssl-key",
        str(test_pki.pki.key_path("amqp-server")),
    ]
    clients = [
        *ssl,
        "--messaging-ssl-cert",
        str(test_pki.pki.cert_path("amqp-{identity}")),
        "--messaging-ssl-key",
        str(test_pki.pki.key_path("amqp-{identity}")),
    ]
    c = tls_cluster(make_cluster, "messaging", server, client_options=clients)
    assert_jobs_run(c)


def test_messaging_refuses_a_broker_it_does_not_trust(
    make_cluster: Any, rabbitmq_broker: RabbitNode, test_pki: TestPKI, foreign_pki: TestPKI
) -> None:
    good = [
        "--messaging-url",
        rabbitmq_broker.url(tls=True),
        "--messaging-ssl",
        "--messaging-ssl-ca",
        str(test_pki.ca),
    ]
    bad = [*good[:-1], str(foreign_pki.ca)]
    c = tls_cluster(make_cluster, "messaging", good, nodes=1, start=False, client_options=bad)
    c.start_server()
    line = assert_refused(c, "node0", "cannot reach RabbitMQ")
    assert "CERTIFICATE_VERIFY_FAILED" in line or "certificate verify failed" in line, line


def test_messaging_wrong_password_is_refused(
    make_cluster: Any, rabbitmq_broker: RabbitNode
) -> None:
    good = ["--messaging-url", rabbitmq_broker.url("directord")]
    bad = ["--messaging-url", rabbitmq_broker.url("directord", password="not-the-password")]
    c = tls_cluster(make_cluster, "messaging", good, nodes=1, start=False, client_options=bad)
    c.start_server()
    line = assert_refused(c, "node0", "cannot reach RabbitMQ")
    assert "ACCESS_REFUSED" in line or "authentication" in line.lower(), line
    assert "directord:***@" in line and "not-the-password" not in all_logs(c)


def test_messaging_bind_identity_proves_each_node(
    make_cluster: Any, rabbitmq_broker: RabbitNode
) -> None:
    # node0 and node1 log in as themselves, with rights on their own queue only.
    server = ["--messaging-url", rabbitmq_broker.url("directord"), "--messaging-bind-identity"]
    own_login = [
        "--messaging-url",
        f"amqp://{{identity}}:{{identity}}-secret@127.0.0.1:{rabbitmq_broker.port}/",
    ]
    c = tls_cluster(make_cluster, "messaging", server, client_options=own_login)
    assert_jobs_run(c)
    assert_parked_job_runs(c, "node1")  # the documented rights cover parked jobs too
    # node2 with node1's login: RabbitMQ refuses it node2's queue, the client says so.
    c.client_args = ["--messaging-url", rabbitmq_broker.url("node1")]
    line = assert_refused(c, "node2", "ACCESS_REFUSED")
    assert "cannot declare queue" in line and "refused for user 'node1'" in line, line
    # node3 with a login of broad rights (node2's): RabbitMQ vouches that its messages
    # come from user node2, so the server drops them; node3 never registers.
    c.client_args = ["--messaging-url", rabbitmq_broker.url("node2")]
    c.start_client("node3", wait=False)
    wait_for(
        lambda: any(
            "claiming node 'node3' from broker user 'node2'" in ln
            for ln in read_lines(c.log("server"))
        ),
        "the server to drop node3's messages",
        DEADLINE,
    )
    assert "node3" not in nodes(c)
    assert not (c.root / "node3.ready").exists()
    assert_jobs_run_on(c, ["node0", "node1"])


# ---- NATS: TLS, mTLS, user/password and NKEY --------------------------------------------------


def nats_tls(ca: Path) -> list[str]:
    return ["--nats-tls", "--nats-tls-ca", str(ca)]


@pytest.mark.parametrize("credential", ["password", "nkey"])
def test_nats_over_tls_with_credentials(
    make_cluster: Any, nats_auth: NatsAuth, test_pki: TestPKI, credential: str
) -> None:
    if credential == "password":
        options = ["--nats-url", nats_auth.server.url_with(NATS_USER, NATS_PASSWORD)]
    else:
        options = ["--nats-url", nats_auth.server.url, "--nats-nkey-seed", str(nats_auth.seed)]
    c = tls_cluster(make_cluster, "nats", [*options, *nats_tls(test_pki.ca)])
    assert_jobs_run(c)
    logs = all_logs(c)
    assert "connected to tls://" in logs
    assert NATS_PASSWORD not in logs
    assert nats_auth.seed.read_text().strip() not in logs


@pytest.mark.parametrize("credential", ["wrong-password", "unknown-nkey", "none"])
def test_nats_wrong_credentials_are_refused(
    make_cluster: Any, nats_auth: NatsAuth, test_pki: TestPKI, credential: str
) -> None:
    good = [
        "--nats-url",
        nats_auth.server.url_with(NATS_USER, NATS_PASSWORD),
        *nats_tls(test_pki.ca),
    ]
    bad = {
        "wrong-password": ["--nats-url", nats_auth.server.url_with(NATS_USER, "wrong-pw")],
        "unknown-nkey": [
            "--nats-url",
            nats_auth.server.url,
            "--nats-nkey-seed",
            str(nats_auth.stranger_seed),
        ],
        "none": ["--nats-url", nats_auth.server.url],
    }[credential]
    c = tls_cluster(
        make_cluster,
        "nats",
        good,
        nodes=1,
        start=False,
        client_options=[*bad, *nats_tls(test_pki.ca)],
    )
    c.start_server()
    line = assert_refused(c, "node0", "Authorization Violation")
    assert "cannot reach NATS at tls://" in line, line
    assert "wrong-pw" not in all_logs(c)


def test_nats_mtls_needs_a_client_certificate(
    make_cluster: Any, nats_mtls: NatsServer, test_pki: TestPKI
) -> None:
    for identity in ("server", "node0", "node1", "node2"):
        test_pki.client(f"nats-{identity}")
    base = ["--nats-url", nats_mtls.url, *nats_tls(test_pki.ca)]

    def cert(name: str) -> list[str]:
        return [
            "--nats-tls-cert",
            str(test_pki.pki.cert_path(f"nats-{name}")),
            "--nats-tls-key",
            str(test_pki.pki.key_path(f"nats-{name}")),
        ]

    c = tls_cluster(
        make_cluster, "nats", [*base, *cert("server")], client_options=[*base, *cert("{identity}")]
    )
    assert_jobs_run(c)
    # Same broker, no client certificate: the TLS handshake fails, the client says so.
    c.client_args = base
    assert_refused(c, "node2", "cannot reach NATS")
    assert_jobs_run_on(c, ["node0", "node1"])


def test_nats_refuses_a_server_it_does_not_trust(
    make_cluster: Any, nats_auth: NatsAuth, test_pki: TestPKI, foreign_pki: TestPKI
) -> None:
    url = ["--nats-url", nats_auth.server.url_with(NATS_USER, NATS_PASSWORD)]
    c = tls_cluster(
        make_cluster,
        "nats",
        [*url, *nats_tls(test_pki.ca)],
        nodes=1,
        start=False,
        client_options=[*url, *nats_tls(foreign_pki.ca)],
    )
    c.start_server()
    line = assert_refused(c, "node0", "cannot reach NATS")
    assert "CERTIFICATE_VERIFY_FAILED" in line or "certificate verify failed" in line, line


def test_nats_subject_permissions_keep_each_node_to_its_own_subject(
    make_cluster: Any, tmp_path: Path
) -> None:
    c: Cluster = make_cluster(
        nodes=2, driver="nats", start=False, heartbeat=1.0, server_args=["--nats-url", "set below"]
    )
    ns = c.namespace
    stream = f"{ns}_parked"  # the namespace has no characters a stream name forbids
    # The permissions README gives, for the server and for each node.
    users: list[dict[str, Any]] = [
        {
            "user": "directord",
            "password": "server-pw",
            "permissions": {
                "publish": [
                    f"{ns}.node.>",
                    f"{ns}.parked.>",
                    f"$JS.API.STREAM.CREATE.{stream}",
                    f"$JS.API.STREAM.UPDATE.{stream}",
                ],
                "subscribe": [f"{ns}.server", f"_INBOX.{ns}.server.>"],
            },
        }
    ]
    for n in c.identities:
        consumer = consumer_name(n)
        users.append(
            {
                "user": n,
                "password": f"{n}-pw",
                "permissions": {
                    "publish": [
                        f"{ns}.server",
                        f"$JS.API.CONSUMER.INFO.{stream}.{consumer}",
                        f"$JS.API.CONSUMER.CREATE.{stream}.{consumer}.>",
                        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}",
                        f"$JS.ACK.{stream}.{consumer}.>",
                    ],
                    "subscribe": [f"{ns}.node.{n}", f"_INBOX.{ns}.{consumer}.>"],
                },
            }
        )
    broker = NatsServer(tmp_path / "nats-perms", users=users, jetstream=True).start()
    try:
        c.server_args = ["--nats-url", broker.url_with("directord", "server-pw")]
        c.client_args = ["--nats-url", broker.url.replace("://", "://{identity}:{identity}-pw@")]
        c.start()
        assert_jobs_run(c)  # the documented permissions are all a node and the server need
        assert "jobs for offline nodes wait in JetStream" in c.log("server").read_text()
        assert_parked_job_runs(c, "node1")  # parking included
        # node2 logs in as node1: NATS refuses it node2's subject, so nothing sent to
        # node2 reaches it, not even the server's welcome.
        c.client_args = ["--nats-url", broker.url_with("node1", "node1-pw")]
        c.start_client("node2", wait=False)
        line = wait_for(
            lambda: next(
                (ln for ln in read_lines(c.log("node2")) if "no answer to hello" in ln), None
            ),
            "node2 to give up waiting for the welcome",
            DEADLINE,
        )
        assert not (c.root / "node2.ready").exists(), line
        assert f'permissions violation for subscription to "{ns}.node.node2"' in (
            c.log("node2").read_text()
        )
        assert_jobs_run_on(c, ["node0", "node1"])
    finally:
        c.stop()
        broker.stop()


def assert_parked_job_runs(c: Cluster, identity: str) -> None:
    """A job submitted while ``identity`` is away waits in the broker and runs on return."""
    c.stop_process(identity)
    wait_status(c, identity, "offline")
    tok = uid()
    [parent] = c.json("exec", "--verb", "RUN", f"echo parked-{tok}", "--target", identity)
    c.start_client(identity)
    with DirectordConnect(c.socket_path) as conn:
        ok, info = conn.wait(parent["jobs"][0], timeout=DEADLINE)
    result = info["results"][identity]
    assert ok and result["stdout"].strip() == f"parked-{tok}", result
    assert_came_from_the_broker(c, identity, 1)


def assert_came_from_the_broker(
    c: Cluster, identity: str, count: int, driver: str | None = None
) -> None:
    """The node took ``count`` parked jobs, none had to be re-sent, and (given the
    driver, whose broker the test may then query) the broker forgot them."""
    wait_for(
        lambda: (
            f"took {count} of {count} parked jobs from the broker" in c.log(identity).read_text()
        ),
        "the node to take its parked jobs",
        DEADLINE,
    )
    assert "missing from the broker" not in c.log("server").read_text()
    if driver is not None:
        parked = f"{c.namespace}.parked.{identity}"
        wait_for(lambda: parked_count(c, driver, parked) == 0, "the broker to forget", DEADLINE)


def assert_jobs_run_on(c: Cluster, targets: list[str]) -> None:
    tok = uid()
    args = [a for t in targets for a in ("--target", t)]
    reply = c.json("exec", "--verb", "RUN", f"echo again-{tok}", *args, "--wait")
    assert {r["node"]: (r["state"], r["stdout"].strip()) for r in reply["results"]} == {
        t: ("success", f"again-{tok}") for t in targets
    }


# ---- offline nodes ---------------------------------------------------------------------------


@pytest.mark.parametrize("driver", BROKER_DRIVERS)
def test_job_for_an_offline_node_runs_when_it_returns(make_cluster: Any, driver: str) -> None:
    c: Cluster = make_cluster(nodes=2, driver=driver, heartbeat=1.0)
    tok = uid()
    ran = c.root / f"ran-{tok}"
    c.stop_process("node1")
    wait_status(c, "node1", "offline")
    [parent] = c.json(
        "exec", "--verb", "RUN", f"echo {tok} >> {ran}; echo done-{tok}", "--target", "node1"
    )
    [job_id] = parent["jobs"]
    parked = f"{c.namespace}.parked.node1"
    # The job waits in the broker (JetStream stream / durable queue), not only on the server.
    wait_for(lambda: parked_count(c, driver, parked) == 1, "the job to be parked", DEADLINE)
    with DirectordConnect(c.socket_path) as conn:
        assert conn.job_info(job_id)["results"]["node1"]["state"] == "queued"
        assert not ran.exists()
        c.start_client("node1")
        ok, info = conn.wait(job_id, timeout=DEADLINE)
    r = info["results"]["node1"]
    assert ok and r["state"] == "success", r
    assert r["stdout"].strip() == f"done-{tok}"
    assert ran.read_text() == f"{tok}\n"  # ran exactly once
    assert_came_from_the_broker(c, "node1", 1, driver)


@pytest.mark.parametrize("driver", BROKER_DRIVERS)
def test_parked_jobs_still_come_from_the_broker_after_a_server_restart(
    make_cluster: Any, driver: str
) -> None:
    c: Cluster = make_cluster(nodes=2, driver=driver, heartbeat=1.0)
    tok = uid()
    ran = c.root / f"ran-{tok}"
    c.stop_process("node1")
    wait_status(c, "node1", "offline")
    path = c.root / f"two-{tok}.yaml"
    path.write_text(f"- jobs:\n  - RUN: echo first >> {ran}\n  - RUN: echo second >> {ran}\n")
    [parent] = c.json("orchestrate", str(path), "--target", "node1")
    parked = f"{c.namespace}.parked.node1"
    wait_for(lambda: parked_count(c, driver, parked) == 2, "the jobs to be parked", DEADLINE)
    c.stop_process("server")
    c.start_server()  # the record of what is parked comes back from the datastore
    c.start_client("node1")
    with DirectordConnect(c.socket_path) as conn:
        for job_id in parent["jobs"]:
            ok, info = conn.wait(job_id, timeout=DEADLINE)
            assert ok and info["results"]["node1"]["state"] == "success", info
    assert ran.read_text() == "first\nsecond\n"  # once each, in order
    assert_came_from_the_broker(c, "node1", 2, driver)


@pytest.mark.parametrize("driver", BROKER_DRIVERS)
def test_a_parked_job_past_its_deadline_never_runs(make_cluster: Any, driver: str) -> None:
    c: Cluster = make_cluster(
        nodes=2, driver=driver, heartbeat=1.0, server_args=["--job-timeout-grace", "0.2"]
    )
    tok = uid()
    late = c.root / f"late-{tok}"
    c.stop_process("node1")
    wait_status(c, "node1", "offline")
    [parent] = c.json("exec", "--verb", "RUN", f"--timeout 1 touch {late}", "--target", "node1")
    parked = f"{c.namespace}.parked.node1"
    wait_for(lambda: parked_count(c, driver, parked) == 1, "the job to be parked", DEADLINE)
    with DirectordConnect(c.socket_path) as conn:
        ok, info = conn.wait(parent["jobs"][0], timeout=DEADLINE)
    assert not ok and info["results"]["node1"]["state"] == "undelivered", info
    # Back after the deadline: the server no longer owes the job, so it never runs,
    # although its message is still in the broker.
    c.start_client("node1")
    assert_jobs_run_on(c, ["node1"])
    assert parked_count(c, driver, parked) == 1
    assert not late.exists()


def test_a_forged_parked_job_never_runs(make_cluster: Any) -> None:
    """Whoever can publish to a node's parked subject still cannot make it run a job."""
    c: Cluster = make_cluster(nodes=2, driver="nats", heartbeat=1.0)
    tok = uid()
    ran, forged = c.root / f"ran-{tok}", c.root / f"forged-{tok}"
    c.stop_process("node1")
    wait_status(c, "node1", "offline")
    [parent] = c.json("exec", "--verb", "RUN", f"echo {tok} >> {ran}", "--target", "node1")
    [job_id] = parent["jobs"]
    subject = f"{c.namespace}.parked.node1"
    wait_for(lambda: parked_count(c, "nats", subject) == 1, "the job to be parked", DEADLINE)
    # A message for the same job id, with other work in it, queued after the real one,
    # and then the real one taken away: only the forgery is left in the broker.
    spec = build_job("RUN", f"touch {forged}", where="forgery", line=1)
    job = {
        "t": "job",
        "id": job_id,
        "parent": parent["id"],
        "lane": "",
        "verb": spec.verb,
        "sha": spec.sha,
        "options": spec.options,
        "timeout": spec.timeout,
        "skip_cache": True,
        "stream": False,
    }
    asyncio.run(_nats_replace_parked(c, subject, job_id, encode_batch([job])))
    c.start_client("node1")
    with DirectordConnect(c.socket_path) as conn:
        ok, info = conn.wait(job_id, timeout=DEADLINE)
    assert ok and info["results"]["node1"]["state"] == "success", info
    assert ran.read_text() == f"{tok}\n" and not forged.exists()
    assert "digest mismatch" in c.log("node1").read_text()
    wait_for(
        lambda: "1 parked jobs were missing from the broker" in c.log("server").read_text(),
        "the server to send the job itself",
        DEADLINE,
    )


async def _nats_replace_parked(c: Cluster, subject: str, job_id: str, body: bytes) -> None:
    nc = await nats.connect(_broker_url(c, "nats"))
    try:
        js = nc.jetstream()
        stream = await js.find_stream_name_by_subject(subject)
        first = (await js.stream_info(stream)).state.first_seq
        await js.publish(subject, body, headers={"j": job_id})
        await js.delete_msg(stream, first)
    finally:
        await nc.close()


def _broker_url(c: Cluster, driver: str) -> str:
    flag = "--nats-url" if driver == "nats" else "--messaging-url"
    return c.server_args[c.server_args.index(flag) + 1]


def parked_count(c: Cluster, driver: str, name: str) -> int:
    """Messages waiting in the broker for one node, asked of the broker itself."""
    return asyncio.run(_parked_count(_broker_url(c, driver), driver, name))


async def _parked_count(url: str, driver: str, name: str) -> int:
    if driver == "nats":
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            try:
                stream = await js.find_stream_name_by_subject(name)
            except nats.js.errors.NotFoundError:
                return 0
            info = await js.stream_info(stream, subjects_filter=name)
            return int(info.state.messages)
        finally:
            await nc.close()
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelClosed:
            return 0
        return int(queue.declaration_result.message_count or 0)
    finally:
        await connection.close()


# ---- faults: the broker restarts in the middle of an orchestration ---------------------------


@pytest.fixture
def private_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """A broker of the test's own (it gets restarted): a nats-server or a RabbitMQ node."""
    driver: str = request.param
    broker: Any
    if driver == "nats":
        broker = NatsServer(tmp_path / "nats", jetstream=True).start()
    else:
        broker = RabbitNode(tmp_path / "rabbitmq").start()
    try:
        yield broker
    finally:
        if isinstance(broker, RabbitNode):
            broker.close()
        else:
            broker.stop()


BEFORE, DURING = 40, 20  # jobs submitted before the broker dies, and while it is down


def append_jobs(c: Cluster, out: Path, numbers: range, tok: str) -> list[str]:
    """Submit one orchestration whose jobs append their number to their node's file."""
    jobs = "".join(
        f"  - RUN: echo {i} >> {out}/{{{{ identity }}}}; sleep 0.1 # {tok}\n" for i in numbers
    )
    path = c.root / f"orch-{tok}-{numbers.start}.yaml"
    path.write_text(f"- jobs:\n{jobs}")
    targets = [a for n in c.identities for a in ("--target", n)]
    [parent] = c.json("orchestrate", str(path), *targets)
    assert len(parent["jobs"]) == len(numbers)
    return list(parent["jobs"])


@pytest.mark.parametrize(
    ("private_broker", "driver"),
    [(d, d) for d in BROKER_DRIVERS],
    indirect=["private_broker"],
    ids=BROKER_DRIVERS,
)
def test_broker_restart_mid_orchestration_loses_and_repeats_nothing(
    private_broker: Any, make_cluster: Any, driver: str
) -> None:
    url = private_broker.url if driver == "nats" else private_broker.url()
    options = ["--nats-url" if driver == "nats" else "--messaging-url", url]
    c: Cluster = make_cluster(
        nodes=2, driver=driver, heartbeat=1.0, server_args=options, client_args=options
    )
    tok = uid()
    out = c.root / f"lines-{tok}"
    out.mkdir()

    def lines() -> dict[str, list[str]]:
        return {n: read_lines(out / n) for n in c.identities}

    # Each job appends its number to its node's file: a lost job leaves a number out,
    # a job run twice writes it twice.
    job_ids = append_jobs(c, out, range(BEFORE), tok)
    wait_for(
        lambda: min(map(len, lines().values())) >= 5, "the orchestration to be under way", DEADLINE
    )
    # A hard crash (SIGKILL): whatever the broker held in memory is gone.
    private_broker.stop(signal.SIGKILL)
    assert max(map(len, lines().values())) < BEFORE, "the orchestration ended too early"
    # The server accepts work while the broker is away; it reaches the nodes later.
    job_ids += append_jobs(c, out, range(BEFORE, BEFORE + DURING), tok)
    private_broker.start()
    # Nodes and server find the broker again by themselves and carry on.
    for identity in c.identities:
        c.wait_registered(identity, 2)
    with DirectordConnect(c.socket_path) as conn:
        infos = [conn.wait(job_id, timeout=180.0)[1] for job_id in job_ids]
    bad = [
        (i["id"], n, r["state"], r["stderr"])
        for i in infos
        for n, r in i["results"].items()
        if r["state"] != "success"
    ]
    assert not bad, bad
    expected = [str(i) for i in range(BEFORE + DURING)]
    for identity, got in lines().items():
        assert sorted(got, key=int) == expected, (identity, got)
        assert got[:BEFORE] == expected[:BEFORE], (identity, got)  # in order, too
