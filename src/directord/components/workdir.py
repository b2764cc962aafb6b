"""WORKDIR: create a directory (and its parents), optionally chown/chmod it."""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.components.files import apply_owner_mode, parse_mode
from directord.errors import ComponentArgsError


class Workdir(Component):
    """``WORKDIR: [--chown USER[:GROUP]] [--chmod MODE] PATH``."""

    verb: ClassVar[str] = "WORKDIR"
    summary: ClassVar[str] = "Create a directory and its parents."

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--chown", metavar="USER[:GROUP]", help="owner of the directory")
        parser.add_argument("--chmod", metavar="MODE", help="octal mode, e.g. 0755")

    def validate(self, options: dict[str, Any]) -> None:
        if len(options["argv"]) != 1:
            raise ComponentArgsError("WORKDIR: expected exactly one PATH")
        if options.get("chmod"):
            parse_mode(options["chmod"])

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        path = ctx.render(options["argv"][0])
        try:
            await asyncio.to_thread(os.makedirs, path, exist_ok=True)
            apply_owner_mode(path, options.get("chown"), options.get("chmod"))
        except (OSError, KeyError, ValueError) as exc:
            return Outcome.fail(f"WORKDIR {path}: {exc}")
        return Outcome.ok()
