"""File datastore (``--datastore file:///DIRECTORY``): one JSON file per key.

Human-readable and easy to back up; slower than sqlite for large histories.
Each value is written to a temporary file and renamed into place, so a crash
never leaves a half-written value. :meth:`apply` is atomic per key, not across
keys: after a crash some keys of one batch may be new and others old.

Values hold job output, so every directory is 0700 (the root is tightened,
and that logged, if an older install left it wider) and every file 0600
from its creation.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import ClassVar
from urllib.parse import quote, unquote

from directord.datastores.base import Datastore, Deletes, Puts, Value
from directord.errors import ConfigError, DatastoreError
from directord.security.private import private_directory


class FileDatastore(Datastore):
    """A directory tree ``DIR/<namespace>/<quoted key>.json``."""

    scheme: ClassVar[str] = "file"

    def __init__(self, url: str) -> None:
        super().__init__(url)
        prefix = "file://"
        if not url.startswith(prefix) or len(url) <= len(prefix):
            raise ConfigError(f"expected file:///DIRECTORY, got {url!r}", key="datastore")
        self.root = Path(url[len(prefix) :])

    async def start(self) -> None:
        try:
            private_directory(self.root, tighten=True)
        except OSError as exc:
            raise DatastoreError(f"{self.root}: cannot create datastore: {exc}") from None

    def _path(self, ns: str, key: str) -> Path:
        return self.root / quote(ns, safe="") / (quote(key, safe="") + ".json")

    async def get(self, namespace: str, key: str) -> Value | None:
        path = self._path(namespace, key)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise DatastoreError(f"{path}: unreadable: {exc}") from None
        return dict(value)

    async def scan(self, namespace: str) -> dict[str, Value]:
        folder = self.root / quote(namespace, safe="")
        out: dict[str, Value] = {}
        if not folder.is_dir():
            return out
        for path in folder.glob("*.json"):
            try:
                out[unquote(path.name[:-5])] = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise DatastoreError(f"{path}: unreadable: {exc}") from None
        return out

    async def apply(self, puts: Puts, deletes: Deletes | None = None) -> None:
        try:
            for ns, items in puts.items():
                for key, value in items.items():
                    path = self._path(ns, key)
                    path.parent.mkdir(mode=0o700, exist_ok=True)
                    text = json.dumps(value, default=_bytes_to_text)
                    tmp = path.with_suffix(".tmp")
                    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                    with os.fdopen(fd, "w", encoding="utf-8") as fh:
                        os.fchmod(fd, 0o600)  # a .tmp an older version left keeps its mode
                        fh.write(text)
                    os.replace(tmp, path)
            for ns, keys in (deletes or {}).items():
                for key in keys:
                    self._path(ns, key).unlink(missing_ok=True)
        except OSError as exc:
            raise DatastoreError(f"{self.root}: write failed: {exc}") from None
        except (TypeError, ValueError) as exc:
            raise DatastoreError(f"{self.root}: value cannot be stored: {exc}") from None

    async def clear(self, namespace: str) -> None:
        shutil.rmtree(self.root / quote(namespace, safe=""), ignore_errors=True)


def _bytes_to_text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
