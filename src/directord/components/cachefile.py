"""CACHEFILE: load a YAML or JSON mapping from a file on the node into its args cache."""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import yaml

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError


def _load(path: str) -> object:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


class CacheFile(Component):
    """``CACHEFILE: PATH``."""

    verb: ClassVar[str] = "CACHEFILE"
    summary: ClassVar[str] = "Load a YAML/JSON mapping file on the node into its args."
    needs_lock: ClassVar[bool] = True

    def validate(self, options: dict[str, Any]) -> None:
        if len(options["argv"]) != 1:
            raise ComponentArgsError("CACHEFILE: expected exactly one PATH")

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        path = ctx.render(options["argv"][0])
        try:
            data = await asyncio.to_thread(_load, path)
        except OSError as exc:
            return Outcome.fail(f"CACHEFILE {path}: {exc.strerror}")
        except yaml.YAMLError as exc:
            return Outcome.fail(f"CACHEFILE {path}: not YAML/JSON: {exc}")
        if not isinstance(data, dict):
            return Outcome.fail(f"CACHEFILE {path}: expected a mapping at the top level")
        ctx.update_cache("args", {str(k): v for k, v in data.items()})
        return Outcome.ok(f"loaded {len(data)} args from {path}")
