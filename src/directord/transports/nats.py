"""NATS driver (``--driver nats``), built on nats-py.

Spec sheet
----------
* URL: ``--nats-url nats://[USER:PASSWORD@]HOST:4222`` (several, comma
  separated, for a cluster); ``tls://`` to require TLS. Credentials: user and
  password in the URL, an NKEY seed file (``--nats-nkey-seed``) or a
  ``.creds`` file (``--nats-creds``). Passwords are masked in logs.
* Subjects: the server subscribes ``<ns>.server``; each node ``<ns>.node.<id>``
  (``<ns>``: ``--broker-namespace``, default ``directord``). Give each node's
  NATS user publish rights on ``<ns>.server`` and subscribe rights on its own
  subject only.
* TLS: ``--nats-tls`` with ``--nats-tls-ca`` (verifies the server) and
  ``--nats-tls-cert`` / ``--nats-tls-key`` for mTLS; certificates from
  ``directord pki``.
* Offline nodes: a job for a node without a session waits in JetStream, in the
  stream ``<ns>_parked`` (subjects ``<ns>.parked.>``, file storage, work-queue
  retention, messages kept ``--messaging-queue-ttl`` seconds); the node takes it with a durable
  pull consumer when it returns. The server's datastore remains the record of
  what is owed (server/parking.py): with JetStream off on the NATS server,
  jobs wait there only and are sent when the node's next session opens.
  Sessions themselves run on core NATS subjects.
* Identities are not proven by this driver: NATS does not tell a subscriber
  who published. Use subject permissions per node user to stop one node from
  reading another's jobs.
* Large messages: a message over the server's ``max_payload`` (1 MiB unless
  configured) goes in parts (header ``p: i/n``) and is joined on arrival, so
  COPY chunks and big results pass with the default server settings. Joining
  is bounded, since anyone who may publish to an inbox may send parts: one
  message is at most ``MAX_FRAME`` (16 MiB) in at most ``PART_COUNT`` parts
  (so ``max_payload`` must be at least 32 KiB), at most ``PARTS_MESSAGES``
  messages (``PARTS_BYTES`` in all) are incomplete at once, and one whose next
  part does not come within ``PART_IDLE_TIMEOUT`` seconds is dropped. A message
  dropped drops its session (logged); the peer reconnects and re-sends.
* Memory: nats-py holds at most ``PENDING_BYTES`` not yet read per subscription;
  beyond, it drops messages and every session of this process starts over
  (logged), as after a reconnect. Each session's queue is bounded in broker.py.
* Reconnects: nats-py reconnects by itself (forever); sessions then start over.
* Options: :class:`NatsOptions` (with ``--broker-namespace`` and
  ``--messaging-queue-ttl`` from :class:`BrokerOptions`); each is a flag, a
  config key and a ``DIRECTORD_*`` variable. nats-py is imported when the
  driver is built.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from directord.config import (
    Settings,
    TransportOptions,
    option,
    read_secret_file,
    url_with_password,
)
from directord.errors import ConfigError, ConnectError, ConnectionLost, MissingDependencyError
from directord.protocol import MAX_FRAME
from directord.security.tls import read_pem
from directord.transports.base import ConnectionHandler, ParkedHandler, is_loopback
from directord.transports.broker import BrokerOptions, BrokerTransport, Headers

if TYPE_CHECKING:
    import nats
    import nats.aio.client
    import nats.errors
    import nats.js.api
    import nats.js.errors

log = logging.getLogger(__name__)
CONNECT_TIMEOUT = 5.0
# Room left under max_payload for headers: NATS counts them in a message's size.
HEADER_ROOM = 4096
JS_TIMEOUT = 5.0
PARKED_BATCH = 64
#: Most parts one message may come in (a part carries max_payload - HEADER_ROOM bytes).
PART_COUNT = 1024
#: Most messages in parts kept incomplete at once, and the most bytes they may hold.
PARTS_MESSAGES = 64
PARTS_BYTES = 4 * MAX_FRAME
#: Seconds an incomplete message waits for its next part before it is dropped.
PART_IDLE_TIMEOUT = 10.0
#: Bytes nats-py may hold for one subscription before it drops messages (slow consumer).
PENDING_BYTES = 4 * MAX_FRAME
PART_HEADER = re.compile(r"([1-9][0-9]{0,8})/([1-9][0-9]{0,8})", re.ASCII)
PartsKey = tuple[str, str]  # (node header, session header) of a message in parts
# A NATS URL carries its password as written (nats-py does not percent-decode it),
# so these would end or split the URL.
_URL_UNSAFE = frozenset("/?#,[]")


@dataclass(frozen=True, slots=True)
class NatsOptions(BrokerOptions):
    """The NATS driver's options (and the broker drivers' shared ones)."""

    nats_url: str = option(
        "nats://127.0.0.1:4222", "NATS server URL(s), comma separated", "server", "client"
    )
    nats_password_file: str = option(
        "",
        "file holding the NATS password, private to its owner; replaces each URL's",
        "server",
        "client",
    )
    nats_nkey_seed: str = option("", "NKEY seed file for NATS", "server", "client")
    nats_creds: str = option("", "NATS .creds file", "server", "client")
    nats_tls: bool = option(False, "TLS to NATS", "server", "client")
    nats_tls_ca: str = option(
        "", "CA that signed the NATS server's certificate", "server", "client"
    )
    nats_tls_cert: str = option("", "client certificate for NATS (mTLS)", "server", "client")
    nats_tls_key: str = option("", "key of --nats-tls-cert", "server", "client")

    def with_secrets(self) -> NatsOptions:
        path = self.nats_password_file
        if not path:
            return self
        password = read_secret_file("nats_password_file", path)
        if _URL_UNSAFE & set(password) or not password.isprintable():
            raise ConfigError(
                "nats_password_file: a NATS URL cannot carry this password (it holds one of "
                "/ ? # , [ ] or a control character); choose another or use nats_creds",
                key="nats_password_file",
                source=path,
            )
        urls = [u.strip() for u in self.nats_url.split(",")]
        url = ",".join(
            url_with_password(u, password, "nats_url", "nats_password_file", path)
            for u in urls
            if u
        )
        return replace(self, nats_url=url)


def _import_nats() -> None:
    """Import nats-py into this module: only the selected driver's library is imported."""
    global nats
    try:
        import nats
        import nats.aio.client
        import nats.errors
        import nats.js.api
        import nats.js.errors
    except ImportError as exc:
        raise MissingDependencyError("pip install directord[nats]") from exc


def consumer_name(identity: str) -> str:
    """A node's JetStream consumer: its identity with ``_`` and ``.`` escaped (injective)."""
    return "node-" + identity.replace("_", "_5f").replace(".", "_2e")


@dataclass(slots=True)
class _Partial:
    """The parts of one message received so far."""

    count: int
    timer: asyncio.TimerHandle
    chunks: list[bytes]
    size: int = 0


def _masked(url: str) -> str:
    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        out.append(one.replace(f":{parts.password}@", ":***@", 1) if parts.password else one)
    return ",".join(out)


class NatsTransport(BrokerTransport):
    """NATS through nats-py."""

    name: ClassVar[str] = "nats"
    options: ClassVar[type[TransportOptions]] = NatsOptions

    def __init__(self, settings: Settings, options: NatsOptions | None = None) -> None:
        _import_nats()
        self.opts = options if options is not None else settings.options(NatsOptions)
        super().__init__(settings, self.opts)
        self._nc: Any = None
        self._closing = False
        self._last_error: Exception | None = None
        # Parts of a multi-part message, per sender and session, until its last one arrives.
        self._parts: dict[PartsKey, _Partial] = {}
        self._parts_bytes = 0
        # Keeps the parts of one message together (and in order) on the wire.
        self._publish_lock = asyncio.Lock()
        self._js: Any = None  # set on the server once the parked stream exists
        self.parked_stream = re.sub(r"[^A-Za-z0-9_-]", "_", self.namespace) + "_parked"
        self.consumer = consumer_name(settings.resolved_identity())
        self.inbox_prefix = f"_INBOX.{self.namespace}.{self.consumer}"

    def describe(self) -> str:
        return f"{_masked(self.opts.nats_url)} ({self.server_inbox})"

    def exposure(self) -> str | None:
        s = self.opts
        urls = [urlsplit(u.strip()) for u in s.nats_url.split(",") if u.strip()]
        remote = [u for u in urls if not is_loopback(u.hostname or "")]
        if not remote:
            return None
        tls = s.nats_tls or all(u.scheme == "tls" for u in urls)
        login = bool(s.nats_nkey_seed or s.nats_creds or all(u.username for u in urls))
        if tls and login:
            return None
        missing = " and ".join(
            what for what, ok in (("TLS (--nats-tls)", tls), ("a login", login)) if not ok
        )
        return (
            f"NATS at {remote[0].hostname} without {missing}: anyone who can reach the "
            "broker can publish as any node and read the jobs sent to it"
        )

    async def serve(self, handler: ConnectionHandler) -> str:
        self.inbox_prefix = f"_INBOX.{self.namespace}.server"
        return await super().serve(handler)

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.opts
        if not s.nats_tls and not s.nats_url.startswith("tls://"):
            return None
        if s.nats_tls_ca:
            read_pem(s.nats_tls_ca, "NATS CA certificate")
        context = ssl.create_default_context(cafile=s.nats_tls_ca or None)
        if s.nats_tls_cert:
            read_pem(s.nats_tls_cert, "NATS certificate")
            read_pem(s.nats_tls_key, "NATS key")
            context.load_cert_chain(s.nats_tls_cert, s.nats_tls_key)
        return context

    async def open_broker(self) -> None:
        if self._nc is not None:
            return
        s = self.opts
        options: dict[str, Any] = {
            "name": f"directord {self.settings.resolved_identity()}",
            # Replies (JetStream API, pulled messages) come to an inbox of this node's
            # own, so a node's NATS user can be kept out of every other inbox.
            "inbox_prefix": self.inbox_prefix,
            "connect_timeout": CONNECT_TIMEOUT,
            # The first connect tries each URL twice, then fails: wrong credentials or
            # an absent broker come back as ConnectError (the agent backs off and logs
            # why). Once connected, reconnects go on forever (set below).
            "max_reconnect_attempts": 1,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
            "disconnected_cb": self._disconnected,
            "reconnected_cb": self._reconnected,
            "error_cb": self._error,
        }
        context = self._ssl_context()
        if context is not None:
            options["tls"] = context
        if s.nats_nkey_seed:
            options["nkeys_seed"] = s.nats_nkey_seed
        if s.nats_creds:
            options["user_credentials"] = s.nats_creds
        servers = [u.strip() for u in s.nats_url.split(",") if u.strip()]
        nc = nats.aio.client.Client()
        self._last_error = None
        # Bounded too: after a failed TLS handshake nats-py can wait forever for the
        # dead socket to close (seen with a server certificate the CA does not sign).
        bound = len(servers) * 2 * (CONNECT_TIMEOUT + 1.0)
        try:
            await asyncio.wait_for(nc.connect(servers=servers, **options), bound)
        except Exception as exc:
            cause = self._last_error or exc
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 1.0)
            raise ConnectError(
                f"cannot reach NATS at {_masked(s.nats_url)}: {type(cause).__name__} {cause}"
            ) from None
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc
        log.info("nats: connected to %s", _masked(s.nats_url))

    async def _disconnected(self) -> None:
        if self._nc is not None and not self._closing:
            log.warning("nats: connection lost; reconnecting")
            self._forget_all_parts()
            self.broker_lost()

    async def _reconnected(self) -> None:
        log.info("nats: reconnected")

    async def _error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            self._overrun(exc)
            return
        if self._nc is None:
            # Reported once, by open_broker's ConnectError; the server's own refusal
            # (authorization) says more than the socket error that follows it.
            if self._last_error is None or isinstance(exc, nats.errors.Error):
                self._last_error = exc
            log.debug("nats: %s", exc)
        else:
            log.warning("nats: %s", exc)

    def _overrun(self, exc: nats.errors.SlowConsumerError) -> None:
        """nats-py dropped a message of an inbox: some session has a hole, so all start over."""
        inboxes = (self.server_inbox, self.node_inbox(self.settings.resolved_identity()))
        if exc.subject not in inboxes:
            log.warning("nats: %s", exc)
            return
        self.dropped(
            exc.subject,
            "messages on %s: more than %d bytes waited to be read; every session starts over",
            exc.subject,
            PENDING_BYTES,
        )
        self._forget_all_parts()
        self.broker_lost(f"messages on {exc.subject} were dropped (slow consumer)")

    def _joined(self, headers: dict[str, str], data: bytes) -> bytes | None:
        """The whole body once a message is complete (parts are joined), else None.

        Every bound (see the module docstring) drops the message and, through
        :meth:`BrokerTransport.lose_message`, the session it belongs to.
        """
        part = headers.pop("p", None)
        if part is None:
            return data
        key = (headers.get("n", ""), headers.get("s", ""))
        match = PART_HEADER.fullmatch(part)
        index, count = (int(match[1]), int(match[2])) if match else (0, 0)
        if not 1 <= index <= count or not 2 <= count <= PART_COUNT:
            self._drop_parts(key, headers, "a malformed part number")
            return None
        partial = self._parts.get(key)
        if index == 1:
            if partial is not None:
                self._drop_parts(key, headers, "a new message began before the last one ended")
            if len(self._parts) >= PARTS_MESSAGES:
                reason = f"{PARTS_MESSAGES} other messages in parts are incomplete"
                self._drop_parts(key, headers, reason)
                return None
            partial = _Partial(count, self._idle_timer(key, headers), [])
            self._parts[key] = partial
        elif partial is None:
            # Its first parts were dropped (a limit, a broker restart): so was its session.
            log.debug("nats: dropped part %s of a message for session %.80r", part, key[1])
            return None
        elif index != len(partial.chunks) + 1 or count != partial.count:
            self._drop_parts(key, headers, "a part out of order")
            return None
        if partial.size + len(data) > MAX_FRAME:
            self._drop_parts(key, headers, f"a message over the {MAX_FRAME} byte limit")
            return None
        if self._parts_bytes + len(data) > PARTS_BYTES:
            reason = f"incomplete messages would hold over {PARTS_BYTES} bytes"
            self._drop_parts(key, headers, reason)
            return None
        partial.chunks.append(data)
        partial.size += len(data)
        self._parts_bytes += len(data)
        partial.timer.cancel()
        if index < count:
            partial.timer = self._idle_timer(key, headers)
            return None
        self._forget_parts(key)
        return b"".join(partial.chunks)

    def _idle_timer(self, key: PartsKey, headers: dict[str, str]) -> asyncio.TimerHandle:
        loop = asyncio.get_running_loop()
        reason = f"no part for {PART_IDLE_TIMEOUT:.0f}s"
        return loop.call_later(PART_IDLE_TIMEOUT, self._drop_parts, key, dict(headers), reason)

    def _drop_parts(self, key: PartsKey, headers: dict[str, str], reason: str) -> None:
        """Drop an incomplete message (and so its session): ``reason`` (fixed text) says why."""
        self._forget_parts(key)
        self.dropped(
            (key[0], reason),
            "a message in parts from node %.80r, session %.80r: %s",
            key[0],
            key[1],
            reason,
        )
        self.lose_message(headers, f"a message in parts was dropped: {reason}")

    def _forget_parts(self, key: PartsKey) -> None:
        partial = self._parts.pop(key, None)
        if partial is not None:
            partial.timer.cancel()
            self._parts_bytes -= partial.size

    def _forget_all_parts(self) -> None:
        for key in list(self._parts):
            self._forget_parts(key)

    async def listen_server(self) -> None:
        async def on_message(msg: Any) -> None:
            headers = dict(msg.headers or {})
            body = self._joined(headers, msg.data)
            if body is not None:
                await self.on_server_message(headers, body, None)

        await self._nc.subscribe(
            self.server_inbox,
            cb=on_message,
            pending_msgs_limit=-1,
            pending_bytes_limit=PENDING_BYTES,
        )
        await self._open_parked_stream()

    async def _open_parked_stream(self) -> None:
        js = self._nc.jetstream(timeout=JS_TIMEOUT)
        config = nats.js.api.StreamConfig(
            name=self.parked_stream,
            subjects=[f"{self.namespace}.parked.>"],
            storage=nats.js.api.StorageType.FILE,
            # A message is gone once its node acknowledges it.
            retention=nats.js.api.RetentionPolicy.WORK_QUEUE,
            max_age=self.opts.messaging_queue_ttl,
        )
        try:
            try:
                await js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await js.update_stream(config)  # exists with other settings (TTL changed)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning(
                "nats: no JetStream stream for offline nodes (%s: %s); their jobs wait in "
                "the server's datastore only",
                type(exc).__name__,
                exc,
            )
            return
        self._js = js
        log.info("nats: jobs for offline nodes wait in JetStream stream %s", self.parked_stream)

    @property
    def parks(self) -> bool:
        return self._js is not None

    async def park(self, identity: str, job_id: str, message: bytes) -> None:
        subject = self.parked_inbox(identity)
        try:
            await self._js.publish(subject, message, headers={"j": job_id}, timeout=JS_TIMEOUT)
        except Exception as exc:
            raise ConnectionLost(f"nats: cannot park on {subject}: {exc}") from None

    async def take_parked(self, handler: ParkedHandler) -> None:
        subject = self.parked_inbox(self.settings.resolved_identity())
        js = self._nc.jetstream(timeout=JS_TIMEOUT)
        try:
            sub = await js.pull_subscribe(subject, durable=self.consumer, stream=self.parked_stream)
        except Exception as exc:
            raise ConnectionLost(f"nats: cannot read {subject}: {exc}") from None
        try:
            while True:
                try:
                    info = await sub.consumer_info()
                    if not info.num_pending:
                        return
                    messages = await sub.fetch(
                        batch=min(PARKED_BATCH, info.num_pending), timeout=JS_TIMEOUT
                    )
                except Exception as exc:
                    raise ConnectionLost(f"nats: cannot read {subject}: {exc}") from None
                for message in messages:
                    await handler(str((message.headers or {}).get("j", "")), message.data)
                    await message.ack()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def listen_node(self, identity: str) -> None:
        async def on_message(msg: Any) -> None:
            headers = dict(msg.headers or {})
            body = self._joined(headers, msg.data)
            if body is not None:
                self.on_node_message(headers, body)

        await self._nc.subscribe(
            self.node_inbox(identity),
            cb=on_message,
            pending_msgs_limit=-1,
            pending_bytes_limit=PENDING_BYTES,
        )

    async def _publish(self, subject: str, headers: dict[str, str], body: bytes) -> None:
        if self._nc is None or not self._nc.is_connected:
            raise ConnectionLost(f"nats: not connected (publishing to {subject})")
        size = max(1, self._nc.max_payload - HEADER_ROOM)
        count = -(-len(body) // size)
        if count > PART_COUNT:
            # The receiver would drop it: say why here instead.
            raise ConnectionLost(
                f"nats: a message of {len(body)} bytes needs {count} parts, over "
                f"{PART_COUNT}: raise the NATS server's max_payload"
            )
        try:
            async with self._publish_lock:
                if count <= 1:
                    await self._nc.publish(subject, body, headers=headers)
                    return
                for i in range(count):
                    await self._nc.publish(
                        subject,
                        body[i * size : (i + 1) * size],
                        headers={**headers, "p": f"{i + 1}/{count}"},
                    )
        except Exception as exc:
            raise ConnectionLost(f"nats: publish to {subject} failed: {exc}") from None

    async def publish_server(self, headers: Headers, body: bytes) -> None:
        await self._publish(
            self.server_inbox, {**headers, "n": self.settings.resolved_identity()}, body
        )

    async def publish_node(self, identity: str, headers: Headers, body: bytes) -> None:
        await self._publish(self.node_inbox(identity), dict(headers), body)

    async def close_broker(self) -> None:
        nc, self._nc = self._nc, None
        self._closing = True
        self._forget_all_parts()
        if nc is not None:
            try:
                await nc.drain()
            except Exception as exc:
                log.debug("nats: close: %s", exc)
