"""CACHEEVICT: clear part of the node cache: args, envs, query, jobs, parents or all."""

from __future__ import annotations

from typing import Any, ClassVar

from directord.agent.cache import EVICTABLE
from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError


class CacheEvict(Component):
    """``CACHEEVICT: args|envs|query|jobs|parents|all``."""

    verb: ClassVar[str] = "CACHEEVICT"
    summary: ClassVar[str] = "Clear part of the node cache."
    needs_lock: ClassVar[bool] = True

    def validate(self, options: dict[str, Any]) -> None:
        argv = options["argv"]
        if len(argv) != 1 or argv[0] not in EVICTABLE:
            raise ComponentArgsError(f"CACHEEVICT: expected one of {', '.join(EVICTABLE)}")

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        ctx.evict_cache(options["argv"][0])
        return Outcome.ok(f"evicted {options['argv'][0]}")
