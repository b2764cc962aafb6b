"""Output helpers: aligned tables for people, JSON for scripts."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any


def to_json(data: Any) -> str:
    """Stable, indented JSON."""
    return json.dumps(data, indent=2, sort_keys=True, default=str)


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def seconds(value: float | None) -> str:
    """A duration, compact."""
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.1f}ms"
    if value < 120:
        return f"{value:.2f}s"
    if value < 7200:
        return f"{value / 60:.1f}m"
    if value < 172800:
        return f"{value / 3600:.1f}h"
    return f"{value / 86400:.1f}d"


def ago(stamp: float | None) -> str:
    """How long ago an epoch time was."""
    if not stamp:
        return "-"
    return f"{seconds(max(0.0, time.time() - stamp))} ago"


def until(stamp: float | None) -> str:
    """How long until an epoch time (or how long past)."""
    if not stamp:
        return "-"
    delta = stamp - time.time()
    return f"in {seconds(delta)}" if delta >= 0 else f"{seconds(-delta)} ago"


def first_line(text: str, width: int = 60) -> str:
    """The first line of text, cut to width."""
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= width else line[: width - 1] + "…"
