"""Long answers in pages: no reply may outgrow a frame, however long the history.

A frame carries at most ``MAX_FRAME`` bytes (16 MiB). A week of jobs, or one
job's results from many nodes that printed a lot, can be more, so the API
answers such lists a page at a time: whole items, up to ``PAGE_BYTES`` and
``PAGE_ITEMS`` a page (at least one item, whatever its size), with where the
next page starts. A client asks again from there until no page is left.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from directord.errors import ConfigError
from directord.protocol.messages import encoded_size

#: Bytes of items a page holds, leaving a frame room for one item of the largest
#: size a result can have (two outputs of MAX_OUTPUT) over a full page.
PAGE_BYTES = 4 * 1024 * 1024
PAGE_ITEMS = 1000


def start_of(params: dict[str, Any], key: str = "from") -> int:
    """Where the page asked for starts (an integer >= 0 the last page gave as ``next``).

    Raises:
        ConfigError: not an integer >= 0.
    """
    value = params.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{key}: expected an integer >= 0, got {value!r}", key=key)
    return value


Item = dict[str, Any]


def take_page(items: Iterable[tuple[int, Item]]) -> tuple[list[Item], int | None]:
    """Take ``(position, item)`` pairs until the page is full.

    Returns the items taken and the position the next page starts at: that of
    the first item left out, or None once ``items`` ran out.
    """
    taken: list[Item] = []
    size = 0
    for position, item in items:
        size += encoded_size(item)
        if taken and (size > PAGE_BYTES or len(taken) >= PAGE_ITEMS):
            return taken, position
        taken.append(item)
    return taken, None


def in_pages(items: list[Item]) -> Iterator[list[Item]]:
    """``items`` cut into pages, in order (a burst of events to send)."""
    rest: Iterable[tuple[int, Item]] = enumerate(items)
    while True:
        page, next_page = take_page(rest)
        if page:
            yield page
        if next_page is None:
            return
        rest = ((i, items[i]) for i in range(next_page, len(items)))
