"""WORKDIR: create a directory (and its parents), optionally chown/chmod it.

Owner and mode are set on a descriptor of the directory opened with
``O_NOFOLLOW``: a symlink planted where the directory should be fails the
job instead of handing root's chown/chmod to whatever it points to.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.components.files import (
    apply_owner_mode,
    make_directories,
    open_directory,
    owner_ids,
    parse_mode,
)
from directord.errors import ComponentArgsError, ComponentError


def make_directory(path: str, uid: int, gid: int, mode: int | None) -> None:
    """Create ``path`` and its parents, then set its owner and mode through a descriptor."""
    # Something other than a directory already there: open_directory says what.
    make_directories(path, None if mode is None else mode & 0o777)
    fd = open_directory(path)
    try:
        apply_owner_mode(fd, uid, gid, mode)
    finally:
        os.close(fd)


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
            uid, gid = owner_ids(options.get("chown"))
            mode = parse_mode(options["chmod"]) if options.get("chmod") else None
            await asyncio.to_thread(make_directory, path, uid, gid, mode)
        except (OSError, ValueError, ComponentError) as exc:
            return Outcome.fail(f"WORKDIR {path}: {exc}")
        # The path is WORKDIR's output: `--stdout-arg KEY` keeps it for later jobs.
        return Outcome.ok(path)
