"""Transport registry: drivers register in the ``directord.transports`` entry-point group.

Only the selected driver's library is imported: every driver module imports
without it (config.py reads each driver's options from its module), and the
driver's constructor imports it.
"""

from __future__ import annotations

import difflib

from directord import config
from directord.config import Settings, TransportOptions
from directord.errors import ConfigError
from directord.transports.base import Connection, Link, Transport

__all__ = ["Connection", "Link", "Transport", "TransportOptions", "load_transport"]


def load_transport(settings: Settings) -> Transport:
    """Instantiate the driver ``settings.driver`` names, with its resolved options.

    Raises:
        ConfigError: unknown driver (lists the known ones and the closest), or one
            whose options are malformed.
        MissingDependencyError: the driver's library is not installed.
    """
    eps = config.driver_entry_points()
    ep = eps.get(settings.driver)
    if ep is None:
        close = difflib.get_close_matches(settings.driver, list(eps), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"unknown driver {settings.driver!r}{hint}; known: {', '.join(sorted(eps))}",
            key="driver",
        )
    cls = ep.load()
    problem = config.drivers().problems.get(settings.driver)
    if problem or not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise ConfigError(
            f"driver {settings.driver!r}: {problem or f'{ep.value} is not a Transport'}",
            key="driver",
        )
    return cls(settings, settings.options(cls.options))
