"""Transport registry: drivers register in the ``directord.transports`` entry-point group.

Only the selected driver's module is imported.
"""

from __future__ import annotations

import difflib
from importlib.metadata import entry_points

from directord.config import Settings
from directord.errors import ConfigError
from directord.transports.base import Connection, Link, Transport

__all__ = ["Connection", "Link", "Transport", "load_transport"]


def load_transport(settings: Settings) -> Transport:
    """Instantiate the driver ``settings.driver`` names.

    Raises:
        ConfigError: unknown driver (lists the known ones and the closest).
        MissingDependencyError: the driver's library is not installed.
    """
    eps = {ep.name: ep for ep in entry_points(group="directord.transports")}
    ep = eps.get(settings.driver)
    if ep is None:
        close = difflib.get_close_matches(settings.driver, list(eps), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown driver {settings.driver!r}{hint}; known: {', '.join(sorted(eps))}",
            key="driver",
        )
    cls: type[Transport] = ep.load()
    return cls(settings)
