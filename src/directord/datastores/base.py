"""Datastore interface: where the server keeps nodes, jobs and results.

Semantics every implementation keeps:

* Data lives in namespaces (``nodes``, ``jobs``, ``results``, ``parents``);
  a namespace maps string keys to msgpack-serialisable dicts.
* :meth:`apply` is the only write: puts and deletes over several namespaces,
  applied all together or not at all. When it returns, the data survives a
  crash of the server process (for persistent stores).
* :meth:`scan` returns a whole namespace; :meth:`get` one key.
* Values round-trip exactly (dict in, equal dict out). Nothing is pickled.

A new store (Redis, ...) implements these five methods and registers in the
``directord.datastores`` entry-point group under its URL scheme.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

Value = dict[str, Any]
Puts = Mapping[str, Mapping[str, Value]]
Deletes = Mapping[str, Sequence[str]]


class Datastore(ABC):
    """A persistent (or not) home for server state."""

    scheme: ClassVar[str]
    persistent: ClassVar[bool] = True

    def __init__(self, url: str) -> None:
        self.url = url

    async def start(self) -> None:
        """Open connections / files. Raises DatastoreError."""

    async def close(self) -> None:
        """Release resources; idempotent."""

    @abstractmethod
    async def get(self, namespace: str, key: str) -> Value | None:
        """One value, or None."""

    @abstractmethod
    async def scan(self, namespace: str) -> dict[str, Value]:
        """Every key and value of a namespace."""

    @abstractmethod
    async def apply(self, puts: Puts, deletes: Deletes | None = None) -> None:
        """Write puts and deletes atomically (all namespaces together)."""

    @abstractmethod
    async def clear(self, namespace: str) -> None:
        """Drop a whole namespace."""

    async def __aenter__(self) -> Datastore:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
