"""Datastore registry: ``--datastore URL`` picks an implementation by URL scheme."""

from __future__ import annotations

from importlib.metadata import entry_points

from directord.datastores.base import Datastore
from directord.errors import ConfigError

__all__ = ["Datastore", "open_datastore"]


def open_datastore(url: str) -> Datastore:
    """Build (not start) the datastore a URL names.

    Raises:
        ConfigError: unknown scheme or malformed URL.
    """
    scheme = url.split(":", 1)[0] if ":" in url else url
    eps = {ep.name: ep for ep in entry_points(group="directord.datastores")}
    ep = eps.get(scheme)
    if ep is None:
        raise ConfigError(
            f"unknown datastore {url!r}; known schemes: {', '.join(sorted(eps))}", key="datastore"
        )
    cls: type[Datastore] = ep.load()
    return cls(url)
