"""In-memory datastore (``--datastore memory``): nothing survives a restart."""

from __future__ import annotations

import copy
from typing import ClassVar

from directord.datastores.base import Datastore, Deletes, Puts, Value


class MemoryDatastore(Datastore):
    """Dicts in the server process."""

    scheme: ClassVar[str] = "memory"
    persistent: ClassVar[bool] = False

    def __init__(self, url: str = "memory") -> None:
        super().__init__(url)
        self._data: dict[str, dict[str, Value]] = {}

    async def get(self, namespace: str, key: str) -> Value | None:
        value = self._data.get(namespace, {}).get(key)
        return copy.deepcopy(value) if value is not None else None

    async def scan(self, namespace: str) -> dict[str, Value]:
        return copy.deepcopy(self._data.get(namespace, {}))

    async def apply(self, puts: Puts, deletes: Deletes | None = None) -> None:
        for ns, items in puts.items():
            space = self._data.setdefault(ns, {})
            for key, value in items.items():
                space[key] = copy.deepcopy(dict(value))
        for ns, keys in (deletes or {}).items():
            space = self._data.get(ns, {})
            for key in keys:
                space.pop(key, None)

    async def clear(self, namespace: str) -> None:
        self._data.pop(namespace, None)
