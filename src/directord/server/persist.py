"""Write-behind persistence: collapse record updates and write them in batches.

Records are marked dirty as they change and serialised only when a batch is
written, so a job that is queued, delivered and finished within one batch is
written once. Callbacks registered with :meth:`after_flush` run only once the
data they depend on is stored: the server acknowledges a node's result only
then, so a result a node saw acknowledged is never lost by a server crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from directord.datastores.base import Datastore
from directord.errors import DatastoreError

log = logging.getLogger(__name__)
RETRY_SECONDS = 1.0


class Storable(Protocol):
    """Anything with a ``to_dict``."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict form."""
        ...


class Persister:
    """Batches puts/deletes to a datastore from one background task."""

    def __init__(self, store: Datastore) -> None:
        self.store = store
        self._puts: dict[str, dict[str, Storable]] = {}
        self._deletes: dict[str, set[str]] = {}
        self._callbacks: list[Callable[[], None]] = []
        self._dirty = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the writer task."""
        self._task = asyncio.create_task(self._run(), name="persister")

    def put(self, namespace: str, key: str, record: Storable) -> None:
        """Mark a record for writing."""
        self._puts.setdefault(namespace, {})[key] = record
        self._deletes.get(namespace, set()).discard(key)
        self._mark()

    def delete(self, namespace: str, key: str) -> None:
        """Mark a key for deletion."""
        self._puts.get(namespace, {}).pop(key, None)
        self._deletes.setdefault(namespace, set()).add(key)
        self._mark()

    def after_flush(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once everything marked so far is stored."""
        self._callbacks.append(callback)
        self._mark()

    def _mark(self) -> None:
        self._idle.clear()
        self._dirty.set()

    async def _run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self.flush()
            except DatastoreError as exc:
                log.error("datastore write failed, will retry: %s", exc)
                self._dirty.set()
                await asyncio.sleep(RETRY_SECONDS)
            except Exception:  # a bug must not stop every later write
                log.exception("datastore write failed unexpectedly, will retry")
                self._dirty.set()
                await asyncio.sleep(RETRY_SECONDS)

    async def flush(self) -> None:
        """Write everything pending now. Raises DatastoreError (pending data is kept)."""
        puts, deletes, callbacks = self._puts, self._deletes, self._callbacks
        self._puts, self._deletes, self._callbacks = {}, {}, []
        try:
            if puts or deletes:
                await self.store.apply(
                    {ns: {k: r.to_dict() for k, r in items.items()} for ns, items in puts.items()},
                    {ns: sorted(keys) for ns, keys in deletes.items()},
                )
        except BaseException:
            # A failed (or cancelled, on close) write: put the batch back underneath
            # anything marked since, so that a newer put or delete of a key wins.
            for ns, items in puts.items():
                newer_deletes = self._deletes.get(ns, set())
                kept = {k: r for k, r in items.items() if k not in newer_deletes}
                self._puts[ns] = {**kept, **self._puts.get(ns, {})}
            for ns, keys in deletes.items():
                newer_puts = self._puts.get(ns, {})
                self._deletes.setdefault(ns, set()).update(k for k in keys if k not in newer_puts)
            self._callbacks[:0] = callbacks
            raise
        for callback in callbacks:
            callback()
        if not self._puts and not self._deletes and not self._callbacks:
            self._idle.set()

    async def stored(self, timeout: float = 10.0) -> None:
        """Return once everything marked so far is written.

        Raises:
            DatastoreError: the datastore did not take it within ``timeout``.
        """
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def mark() -> None:
            if not done.done():
                done.set_result(None)

        self.after_flush(mark)
        try:
            await asyncio.wait_for(done, timeout)
        except TimeoutError:
            raise DatastoreError(
                f"the datastore did not store the data within {timeout:.0f}s"
            ) from None

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait until everything marked has been written (bounded)."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("datastore: %.0fs drain timed out; some writes are pending", timeout)

    async def close(self) -> None:
        """Write what is pending and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except DatastoreError as exc:
            log.error("datastore: final write failed: %s", exc)
