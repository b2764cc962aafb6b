"""Redis datastore (``--datastore redis://HOST:PORT/DB``; ``rediss://`` for TLS).

Spec sheet
----------
URL forms::

    redis://HOST[:PORT][/DB][?OPTIONS]               no authentication
    redis://:PASSWORD@HOST[:PORT][/DB][?OPTIONS]     ``requirepass``
    redis://USER:PASSWORD@HOST[:PORT][/DB][?OPTIONS] an ACL user
    rediss://...                                     the same over TLS

``PORT`` defaults to 6379 and ``DB`` to 0. User and password may be
percent-encoded (``%40`` for ``@``). An IPv6 host is written in brackets.
Every message this store writes shows the URL with the password replaced by
``***``.

Options (query string, ``?name=value&...``):

* ``prefix`` (``directord``): the start of every key, so that several
  directord servers can share one Redis database.
* ``timeout`` (``10``): seconds to wait for a connection or a reply.
* ``ssl_ca_certs``: CA bundle (PEM) that verifies the server's certificate
  (``rediss`` only; default: the system's trust store).
* ``ssl_certfile`` / ``ssl_keyfile``: client certificate and key (PEM), for
  servers that require client certificates (``tls-auth-clients yes``).
* ``ssl_cert_reqs`` (``required``): ``required``, ``optional`` or ``none``
  (``none`` skips verification; for tests only).

What is stored where
--------------------
Each namespace is one Redis hash, ``PREFIX:NAMESPACE`` (``directord:jobs``,
``directord:results``, ``directord:nodes``, ``directord:parents``). A field is
a record's key and its value is the record packed with msgpack; nothing is
pickled and no other keys are created. :meth:`RedisDatastore.clear` deletes
one hash.

Writes: one :meth:`~RedisDatastore.apply` is one ``MULTI``/``EXEC``
transaction of ``HSET``/``HDEL`` over all its namespaces, so other clients
see all of it or none of it, and a failure before ``EXEC`` (connection lost,
``maxmemory`` reached, a read-only replica) writes nothing. Every value is
packed before the transaction is sent: a value msgpack cannot pack fails the
whole batch. The one error Redis raises after ``EXEC`` has begun is
``WRONGTYPE``, when something other than directord put a non-hash at one of
these keys; that is reported as :class:`~directord.errors.DatastoreError`,
and Redis does not undo the other commands of that transaction.

Reads: ``HGET`` for one key; a namespace is read with one ``HGETALL`` up to
:attr:`RedisDatastore.scan_chunk` fields, or in ``HSCAN`` pages above that so
a large history does not block Redis for long.

Durability is what the Redis server is configured for: with
``appendonly yes`` and ``appendfsync everysec`` a crash of Redis loses at
most the last second of writes; with snapshots only (``save``), more. A
restart of the directord server loses nothing either way.

Errors: the ``redis`` library's exceptions never leave this module; they
become :class:`~directord.errors.DatastoreError` naming the masked URL. A
missing library raises ``MissingDependencyError("pip install directord[redis]")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

from directord.datastores.base import Datastore, Deletes, Puts, Value
from directord.datastores.packing import pack_value, unpack_value
from directord.errors import ConfigError, DatastoreError, MissingDependencyError

try:
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import ExponentialBackoff
    from redis.exceptions import RedisError
    from redis.typing import EncodableT, FieldT
except ImportError as exc:
    raise MissingDependencyError("pip install directord[redis]") from exc

DEFAULT_PORT = 6379
DEFAULT_PREFIX = "directord"
DEFAULT_TIMEOUT = 10.0
_CERT_REQS = ("required", "optional", "none")
_OPTIONS = ("prefix", "timeout", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")


@dataclass(frozen=True, slots=True)
class RedisURL:
    """A parsed ``redis://`` or ``rediss://`` URL.

    Attributes:
        tls: ``rediss://``.
        host / port / db: where the data lives.
        username / password: credentials, or None.
        prefix: the start of every key.
        timeout: seconds to wait for a connection or a reply.
        ssl_ca_certs / ssl_certfile / ssl_keyfile / ssl_cert_reqs: TLS settings.
        masked: the URL with the password replaced by ``***``, for messages.
    """

    tls: bool
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    prefix: str
    timeout: float
    ssl_ca_certs: str | None
    ssl_certfile: str | None
    ssl_keyfile: str | None
    ssl_cert_reqs: str
    masked: str


def mask_url(url: str) -> str:
    """``url`` with the password part of its user info replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" not in netloc:
        return url
    userinfo, _, hostport = netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return urlunsplit(parts._replace(netloc=f"{userinfo}@{hostport}"))


def parse_url(url: str) -> RedisURL:
    """Parse and check a Redis datastore URL.

    Raises:
        ConfigError: wrong scheme, missing host, bad port, DB or option (key ``datastore``;
            the message shows the URL with its password masked).
    """
    masked = mask_url(url)

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"{why} in {masked!r}; expected redis[s]://[[USER]:PASSWORD@]HOST[:PORT][/DB]",
            key="datastore",
        )

    try:
        parts = urlsplit(url)
        port = DEFAULT_PORT if parts.port is None else parts.port
    except ValueError as exc:
        raise bad(f"bad port or address ({exc})") from None
    if port == 0:
        raise bad("port 0")
    if parts.scheme not in ("redis", "rediss") or not url.startswith(f"{parts.scheme}://"):
        raise bad("not a redis:// or rediss:// URL")
    if not parts.hostname:
        raise bad("no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise bad(f"database {path!r} is not a number")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name not in _OPTIONS:
            raise bad(f"unknown option {name!r} (known: {', '.join(_OPTIONS)})")
        options[name] = value
    try:
        timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
    except ValueError:
        raise bad(f"timeout {options['timeout']!r} is not a number of seconds") from None
    if not timeout > 0:
        raise bad("timeout must be more than 0 seconds")
    cert_reqs = options.get("ssl_cert_reqs", "required")
    if cert_reqs not in _CERT_REQS:
        raise bad(f"ssl_cert_reqs {cert_reqs!r} is not one of {', '.join(_CERT_REQS)}")
    prefix = options.get("prefix", DEFAULT_PREFIX)
    if not prefix:
        raise bad("empty prefix")
    return RedisURL(
        tls=parts.scheme == "rediss",
        host=parts.hostname,
        port=port,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
        prefix=prefix,
        timeout=timeout,
        ssl_ca_certs=options.get("ssl_ca_certs") or None,
        ssl_certfile=options.get("ssl_certfile") or None,
        ssl_keyfile=options.get("ssl_keyfile") or None,
        ssl_cert_reqs=cert_reqs,
        masked=masked,
    )


class RedisDatastore(Datastore):
    """One Redis hash per namespace, written in MULTI/EXEC transactions."""

    scheme: ClassVar[str] = "redis"
    #: Namespaces up to this many fields are read with one HGETALL, larger ones with HSCAN.
    scan_chunk: int = 5000

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.config = parse_url(url)
        self._client: aioredis.Redis | None = None

    def _key(self, namespace: str) -> str:
        return f"{self.config.prefix}:{namespace}"

    @contextlib.asynccontextmanager
    async def _edge(self, doing: str) -> AsyncIterator[None]:
        """Turn the library's (and the socket's) exceptions into DatastoreError."""
        try:
            yield
        except (RedisError, OSError) as exc:  # OSError includes ssl.SSLError
            raise DatastoreError(f"{self.config.masked}: {doing}: {exc}") from exc

    async def start(self) -> None:
        cfg = self.config
        tls: dict[str, Any] = {}
        if cfg.tls:
            tls = {
                "ssl": True,
                "ssl_ca_certs": cfg.ssl_ca_certs,
                "ssl_certfile": cfg.ssl_certfile,
                "ssl_keyfile": cfg.ssl_keyfile,
                "ssl_cert_reqs": cfg.ssl_cert_reqs,
                "ssl_check_hostname": cfg.ssl_cert_reqs == "required",
            }
        client = aioredis.Redis(
            host=cfg.host,
            port=cfg.port,
            db=cfg.db,
            username=cfg.username,
            password=cfg.password,
            socket_timeout=cfg.timeout,
            socket_connect_timeout=cfg.timeout,
            # A dropped connection (Redis restarted) is retried twice, 50-500 ms apart.
            # Every write is an idempotent HSET/HDEL, so resending a transaction whose
            # reply was lost is safe. Longer outages surface as DatastoreError, and the
            # server's write-behind retries those itself.
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
            decode_responses=False,
            **tls,
        )
        try:
            async with self._edge("cannot connect to redis"):
                await client.ping()
        except DatastoreError:
            await client.aclose()
            raise
        await self.close()
        self._client = client

    def _conn(self) -> aioredis.Redis:
        if self._client is None:
            raise DatastoreError(f"{self.config.masked}: datastore not started")
        return self._client

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def get(self, namespace: str, key: str) -> Value | None:
        client = self._conn()
        async with self._edge(f"get {namespace}/{key}"):
            blob = await client.hget(self._key(namespace), key)
        return None if blob is None else self._decode(namespace, key.encode(), blob)[1]

    async def scan(self, namespace: str) -> dict[str, Value]:
        client = self._conn()
        name = self._key(namespace)
        async with self._edge(f"scan {namespace}"):
            if await client.hlen(name) <= self.scan_chunk:
                fields = await client.hgetall(name)
                return dict(self._decode(namespace, f, b) for f, b in fields.items())
            # HSCAN may return a field twice; the dict keeps one copy.
            out: dict[str, Value] = {}
            cursor = 0
            while True:
                cursor, page = await client.hscan(name, cursor, count=self.scan_chunk)
                if not isinstance(page, dict):
                    raise DatastoreError(f"{self.config.masked}: HSCAN returned no values")
                out.update(self._decode(namespace, f, b) for f, b in page.items())
                if cursor == 0:
                    return out

    def _decode(self, namespace: str, field: object, blob: object) -> tuple[str, Value]:
        """One stored field as ``(key, value)``; raises DatastoreError if unreadable."""
        raw = field if isinstance(field, bytes) else str(field).encode()
        where = f"{self.config.masked} {namespace}/{raw.decode(errors='replace')}"
        if not isinstance(blob, bytes):
            raise DatastoreError(f"{where}: unexpected reply type {type(blob).__name__}")
        try:
            key = raw.decode()
        except UnicodeDecodeError:
            raise DatastoreError(f"{where}: key is not UTF-8") from None
        return key, unpack_value(blob, where)

    async def apply(self, puts: Puts, deletes: Deletes | None = None) -> None:
        client = self._conn()
        # Pack everything before the transaction is sent: a value msgpack cannot pack
        # fails the whole batch instead of a part of it.
        try:
            packed: dict[str, dict[FieldT, EncodableT]] = {
                ns: {key: pack_value(dict(value)) for key, value in items.items()}
                for ns, items in puts.items()
                if items
            }
        except (TypeError, ValueError, OverflowError) as exc:
            raise DatastoreError(f"{self.config.masked}: value cannot be stored: {exc}") from None
        removals = {ns: list(keys) for ns, keys in (deletes or {}).items() if keys}
        if not packed and not removals:
            return
        async with self._edge("write failed"), client.pipeline(transaction=True) as pipe:
            for ns, mapping in packed.items():
                pipe.hset(self._key(ns), mapping=mapping)
            for ns, keys in removals.items():
                pipe.hdel(self._key(ns), *keys)
            await pipe.execute()

    async def clear(self, namespace: str) -> None:
        client = self._conn()
        async with self._edge(f"clear {namespace}"):
            await client.delete(self._key(namespace))
