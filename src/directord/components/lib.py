"""Directord's component decorators, for components written for Directord.

``cacheargs`` and ``timeout`` pass through: the node itself stores
``--stdout-arg``/``--stderr-arg`` and enforces the job's timeout. ``retry``
runs ``client()`` again, up to the job's ``retry`` times, while it fails.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

Client = Callable[..., Any]


def cacheargs(func: Client) -> Client:
    """Kept for Directord's components: the node stores the output args itself."""
    return func


def timeout(func: Client) -> Client:
    """Kept for Directord's components: the node enforces the job's timeout."""
    return func


def retry(func: Client) -> Client:
    """Run ``client()`` up to ``job["retry"]`` times (1) while its outcome is false."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        attempts = int(kwargs["job"].get("retry", 1) or 1)
        returned = func(*args, **kwargs)
        for _ in range(attempts - 1):
            if returned[2]:
                break
            returned = func(*args, **kwargs)
        return returned

    return wrapper
