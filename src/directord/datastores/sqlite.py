"""SQLite datastore (``--datastore sqlite:///ABSOLUTE/PATH``), the server's default.

One table ``kv(ns, key, value)`` with msgpack values, in WAL mode. Each
:meth:`apply` is one transaction; with ``synchronous=NORMAL`` a committed
transaction survives the server process being killed (SIGKILL); only a power
loss can drop the last few. The calls are made on the event loop thread: each
is a single short transaction over local disk, far cheaper than a hop to a
thread, and the server batches its writes.

The file holds every job's output: it is created 0600 (SQLite gives its
``-wal`` and ``-shm`` files the same mode), one left wider by an older
install is tightened, and a directory created for it is 0700.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import ClassVar

from directord.datastores.base import Datastore, Deletes, Puts, Value
from directord.datastores.packing import pack_value, unpack_value
from directord.errors import ConfigError, DatastoreError
from directord.security.private import private_directory, private_file


class SqliteDatastore(Datastore):
    """A single SQLite file."""

    scheme: ClassVar[str] = "sqlite"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        prefix = "sqlite://"
        if not url.startswith(prefix) or len(url) <= len(prefix):
            raise ConfigError(f"expected sqlite:///PATH, got {url!r}", key="datastore")
        self.path = url[len(prefix) :]
        self._db: sqlite3.Connection | None = None

    async def start(self) -> None:
        try:
            # The directory may be shared (/var/lib/directord): made private only if new.
            private_directory(Path(self.path).parent, tighten=False)
            private_file(self.path)
            for leftover in ("-wal", "-shm"):
                private_file(f"{self.path}{leftover}", create=False)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(
                "CREATE TABLE IF NOT EXISTS kv (ns TEXT NOT NULL, key TEXT NOT NULL,"
                " value BLOB NOT NULL, PRIMARY KEY (ns, key)) WITHOUT ROWID"
            )
        except (OSError, sqlite3.Error) as exc:
            raise DatastoreError(f"{self.path}: cannot open sqlite datastore: {exc}") from None
        self._db = db

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise DatastoreError("datastore not started")
        return self._db

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    async def get(self, namespace: str, key: str) -> Value | None:
        row = (
            self._conn()
            .execute("SELECT value FROM kv WHERE ns=? AND key=?", (namespace, key))
            .fetchone()
        )
        return unpack_value(row[0], f"{namespace}/{key}") if row else None

    async def scan(self, namespace: str) -> dict[str, Value]:
        rows = self._conn().execute("SELECT key, value FROM kv WHERE ns=?", (namespace,))
        return {key: unpack_value(blob, f"{namespace}/{key}") for key, blob in rows}

    async def apply(self, puts: Puts, deletes: Deletes | None = None) -> None:
        db = self._conn()
        # Pack everything before the transaction opens: a value msgpack cannot pack must
        # fail the whole batch, not leave its earlier rows written in an open transaction.
        try:
            rows = [
                (ns, key, pack_value(dict(value)))
                for ns, items in puts.items()
                for key, value in items.items()
            ]
        except (TypeError, ValueError, OverflowError) as exc:
            raise DatastoreError(f"{self.path}: value cannot be stored: {exc}") from None
        try:
            db.execute("BEGIN")
            db.executemany("INSERT OR REPLACE INTO kv (ns, key, value) VALUES (?, ?, ?)", rows)
            for ns, keys in (deletes or {}).items():
                db.executemany("DELETE FROM kv WHERE ns=? AND key=?", [(ns, k) for k in keys])
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise DatastoreError(f"{self.path}: write failed: {exc}") from None

    async def clear(self, namespace: str) -> None:
        try:
            self._conn().execute("DELETE FROM kv WHERE ns=?", (namespace,))
        except sqlite3.Error as exc:
            raise DatastoreError(f"{self.path}: clear failed: {exc}") from None
