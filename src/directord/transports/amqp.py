"""AMQP 0-9-1 driver for RabbitMQ (``--driver messaging``), built on aio-pika.

Spec sheet
----------
* URL: ``--messaging-url amqp://USER:PASSWORD@HOST:5672/VHOST`` (default
  ``amqp://guest:guest@127.0.0.1:5672/``); the password is masked in logs.
* Queues (durable, on the default exchange): ``<ns>.server`` read by the
  server, ``<ns>.node.<identity>`` read by each node (``<ns>``:
  ``--broker-namespace``, default ``directord``). Session messages are
  transient (a broker restart ends sessions; both ends re-send what is
  unacknowledged), parked jobs persistent; a node queue keeps messages for ``--messaging-queue-ttl``
  seconds (3600) while its node is away. A job for a node without a session
  waits in the durable queue ``<ns>.parked.<identity>`` (same TTL) and runs
  when the node returns; the server's datastore remains the record of what
  is owed (server/parking.py).
* SSL: ``--messaging-ssl`` with ``--messaging-ssl-ca`` (verifies the broker),
  and ``--messaging-ssl-cert`` / ``--messaging-ssl-key`` for a client
  certificate (RabbitMQ ``verify_peer``). Certificates from ``directord pki``.
* Identity: with ``--messaging-bind-identity`` on the server, each node must
  log in to RabbitMQ as a user named after its identity; RabbitMQ checks the
  ``user_id`` of every message against the login, so one node cannot speak
  for another. The server drops a message whose ``user_id`` is missing or is
  not the node it names, and a message for a session of another node (see
  broker.py). Without it (shared broker login) identities are not proven.
  A user with RabbitMQ's ``impersonator`` tag may set any ``user_id``: never
  give it to a node.
* Memory: each consumer has at most ``PREFETCH`` (512) unacknowledged messages,
  each at most RabbitMQ's ``max_message_size`` (set it to 16 MiB, the
  protocol's ``MAX_FRAME``: RabbitMQ 3.x allows 128 MiB); a message is
  acknowledged once it is in its session's queue, which holds at most
  ``SESSION_QUEUE_BYTES`` (broker.py) before the session is dropped.
* Reconnects: aio-pika's robust connection restores channels, queues and
  consumers after a broker restart; sessions then start over (see broker.py).
* Options: :class:`AmqpOptions` (with ``--broker-namespace`` and
  ``--messaging-queue-ttl`` from :class:`BrokerOptions`); each is a flag, a
  config key and a ``DIRECTORD_*`` variable. aio-pika is imported when the
  driver is built.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

from directord.config import (
    Settings,
    TransportOptions,
    option,
    read_secret_file,
    url_with_password,
)
from directord.errors import ConnectError, ConnectionLost, MissingDependencyError
from directord.security.tls import read_pem
from directord.transports.base import ParkedHandler, is_loopback
from directord.transports.broker import BrokerOptions, BrokerTransport, Headers

if TYPE_CHECKING:
    import aio_pika
    import aio_pika.abc

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 10.0
# Unacknowledged deliveries per consumer: bounds what the broker pushes ahead of us.
PREFETCH = 512


@dataclass(frozen=True, slots=True)
class AmqpOptions(BrokerOptions):
    """The RabbitMQ driver's options (and the broker drivers' shared ones)."""

    messaging_url: str = option(
        "amqp://guest:guest@127.0.0.1:5672/",
        "RabbitMQ URL for --driver messaging",
        "server",
        "client",
    )
    messaging_address: str = option(
        "",
        "host of the RabbitMQ server (Directord's flag): replaces the host of --messaging-url",
        "server",
        "client",
    )
    messaging_password_file: str = option(
        "",
        "file holding the RabbitMQ password, private to its owner; replaces the URL's",
        "server",
        "client",
    )
    messaging_ssl: bool = option(False, "TLS to RabbitMQ", "server", "client")
    messaging_ssl_ca: str = option("", "CA that signed RabbitMQ's certificate", "server", "client")
    messaging_ssl_cert: str = option("", "client certificate for RabbitMQ", "server", "client")
    messaging_ssl_key: str = option("", "key of --messaging-ssl-cert", "server", "client")
    messaging_bind_identity: bool = option(
        False, "each node logs in to RabbitMQ as its identity; trust nothing else", "server"
    )

    def with_secrets(self) -> AmqpOptions:
        path = self.messaging_password_file
        if not path:
            return self
        password = quote(read_secret_file("messaging_password_file", path), safe="")
        url = url_with_password(
            self.messaging_url, password, "messaging_url", "messaging_password_file", path
        )
        return replace(self, messaging_url=url)


def _with_host(url: str, host: str) -> str:
    """``url`` with its host replaced (its login and port kept)."""
    parts = urlsplit(url)
    login = parts.netloc.rpartition("@")[0]
    netloc = (login + "@" if login else "") + (f"[{host}]" if ":" in host else host)
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def _import_aio_pika() -> None:
    """Import aio-pika into this module: only the selected driver's library is imported."""
    global aio_pika
    try:
        import aio_pika
        import aio_pika.abc
    except ImportError as exc:
        raise MissingDependencyError("pip install directord[amqp]") from exc


def _masked(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url


class AmqpTransport(BrokerTransport):
    """RabbitMQ through aio-pika."""

    name: ClassVar[str] = "messaging"
    options: ClassVar[type[TransportOptions]] = AmqpOptions

    def __init__(self, settings: Settings, options: AmqpOptions | None = None) -> None:
        _import_aio_pika()
        opts = options if options is not None else settings.options(AmqpOptions)
        if opts.messaging_address:
            opts = replace(
                opts, messaging_url=_with_host(opts.messaging_url, opts.messaging_address)
            )
        self.opts = opts
        super().__init__(settings, self.opts)
        self._conn: Any = None
        self._channel: Any = None
        self._park_channel: Any = None  # with publisher confirms: parked means stored
        self._user = urlsplit(self.opts.messaging_url).username or "guest"
        self._declared: set[str] = set()
        self._closing = False

    def describe(self) -> str:
        return f"{_masked(self.opts.messaging_url)} ({self.server_inbox})"

    def exposure(self) -> str | None:
        s = self.opts
        parts = urlsplit(s.messaging_url)
        if is_loopback(parts.hostname or "") or s.messaging_ssl or parts.scheme == "amqps":
            return None
        return (
            f"RabbitMQ at {parts.hostname} without TLS (--messaging-ssl): the broker login "
            "and every job and result cross the network in clear; anyone who reads them can "
            "log in as this cluster and act as its nodes"
        )

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.opts
        if not s.messaging_ssl:
            return None
        context = ssl.create_default_context(cafile=s.messaging_ssl_ca or None)
        if s.messaging_ssl_ca:
            read_pem(s.messaging_ssl_ca, "messaging CA certificate")
        if s.messaging_ssl_cert:
            read_pem(s.messaging_ssl_cert, "messaging certificate")
            read_pem(s.messaging_ssl_key, "messaging key")
            context.load_cert_chain(s.messaging_ssl_cert, s.messaging_ssl_key)
        return context

    async def open_broker(self) -> None:
        if self._conn is not None:
            return
        url = self.opts.messaging_url
        try:
            self._conn = await aio_pika.connect_robust(
                url,
                ssl=self.opts.messaging_ssl,
                ssl_context=self._ssl_context(),
                timeout=CONNECT_TIMEOUT,
                client_properties={
                    "connection_name": f"directord {self.settings.resolved_identity()}"
                },
            )
        except Exception as exc:
            raise ConnectError(f"cannot reach RabbitMQ at {_masked(url)}: {exc}") from None
        self._conn.close_callbacks.add(self._on_close)
        # No publisher confirms on the session channel: delivery is acknowledged end
        # to end (acks, result acks), and a confirm per batch halves throughput.
        self._channel = await self._conn.channel(publisher_confirms=False)
        await self._channel.set_qos(prefetch_count=PREFETCH)
        log.info("messaging: connected to %s", _masked(url))

    @property
    def binds_identity(self) -> bool:
        return self.opts.messaging_bind_identity

    def _on_close(self, *args: Any) -> None:
        if self._closing:
            return
        log.warning("messaging: connection to the broker lost; reconnecting")
        self.broker_lost()

    def _queue_arguments(self) -> dict[str, Any]:
        return {"x-message-ttl": int(self.opts.messaging_queue_ttl * 1000)}

    async def _queue(self, name: str) -> Any:
        try:
            queue = await self._channel.declare_queue(
                name, durable=True, arguments=self._queue_arguments()
            )
        except Exception as exc:
            raise ConnectionLost(f"messaging: cannot declare queue {name}: {exc}") from None
        self._declared.add(name)
        return queue

    async def listen_server(self) -> None:
        queue = await self._queue(self.server_inbox)
        bind = self.opts.messaging_bind_identity

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                # RabbitMQ refuses a user_id that is not the publisher's login; without
                # binding, the shared login proves nothing about the node.
                user = message.user_id if bind else None
                proven = user if isinstance(user, str) else None
                await self.on_server_message(dict(message.headers or {}), message.body, proven)

        await queue.consume(on_message)

    async def listen_node(self, identity: str) -> None:
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                self.on_node_message(dict(message.headers or {}), message.body)

        name = self.node_inbox(identity)
        try:
            queue = await self._queue(name)
            try:
                await queue.consume(on_message)
            except Exception as exc:
                raise ConnectionLost(f"messaging: cannot consume queue {name}: {exc}") from None
        except ConnectionLost as exc:
            # A refusal (ACCESS_REFUSED: this login may not use the queue) closes the
            # channel: drop the connection so that the next attempt starts afresh.
            await self.close_broker()
            self._closing = False
            self._declared.clear()
            raise ConnectError(str(exc)) from None

    async def _publish(
        self,
        routing_key: str,
        headers: dict[str, Any],
        body: bytes,
        user_id: str | None = None,
        persistent: bool = False,
    ) -> None:
        # Session traffic is transient: a broker restart ends every session anyway,
        # and what was in flight is re-sent from the server's datastore and the
        # node's journal. Parked jobs must outlive a broker restart: persistent.
        mode = (
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        )
        message = aio_pika.Message(body, headers=headers, user_id=user_id, delivery_mode=mode)
        channel = self._channel
        try:
            if persistent:
                if self._park_channel is None:
                    self._park_channel = await self._conn.channel(publisher_confirms=True)
                channel = self._park_channel
            await channel.default_exchange.publish(message, routing_key=routing_key)
        except Exception as exc:
            raise ConnectionLost(f"messaging: publish to {routing_key} failed: {exc}") from None

    async def publish_server(self, headers: Headers, body: bytes) -> None:
        # RabbitMQ rejects a user_id that is not the login: the server may trust it.
        await self._publish(
            self.server_inbox,
            {**headers, "n": self.settings.resolved_identity()},
            body,
            user_id=self._user,
        )

    async def publish_node(self, identity: str, headers: Headers, body: bytes) -> None:
        name = self.node_inbox(identity)
        if name not in self._declared:
            await self._queue(name)  # so jobs wait for a node that never connected yet
        await self._publish(name, dict(headers), body)

    @property
    def parks(self) -> bool:
        return True

    async def park(self, identity: str, job_id: str, message: bytes) -> None:
        name = self.parked_inbox(identity)
        if name not in self._declared:
            await self._queue(name)
        await self._publish(name, {"j": job_id}, message, persistent=True)

    async def take_parked(self, handler: ParkedHandler) -> None:
        # A channel of its own: a refusal (ACCESS_REFUSED) closes only this one.
        name = self.parked_inbox(self.settings.resolved_identity())
        try:
            channel = await self._conn.channel()
        except Exception as exc:
            raise ConnectionLost(f"messaging: cannot open a channel: {exc}") from None
        try:
            try:
                queue = await channel.declare_queue(
                    name, durable=True, arguments=self._queue_arguments()
                )
            except Exception as exc:
                raise ConnectionLost(f"messaging: cannot declare queue {name}: {exc}") from None
            while True:
                try:
                    message = await queue.get(no_ack=False, fail=False, timeout=CONNECT_TIMEOUT)
                except Exception as exc:
                    raise ConnectionLost(f"messaging: cannot read queue {name}: {exc}") from None
                if message is None:
                    return
                await handler(str((message.headers or {}).get("j", "")), message.body)
                await message.ack()
        finally:
            with contextlib.suppress(Exception):
                await channel.close()

    async def close_broker(self) -> None:
        conn, self._conn = self._conn, None
        self._park_channel = None
        self._closing = True
        if conn is not None:
            try:
                await conn.close()
            except Exception as exc:
                log.debug("messaging: close: %s", exc)
