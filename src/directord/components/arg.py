"""ARG and ENV: store a key and value in the node's ``args`` / ``envs`` cache.

The value is read as a YAML/Python literal when it is one (``['a']``, ``1``,
``{"a": "b"}``, ``1.2``, ``true``), else kept as a string. ENV values are
strings in RUN's environment.
"""

from __future__ import annotations

import argparse
import ast
import json
from typing import Any, ClassVar

import yaml

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError


def parse_value(text: str) -> Any:
    """A literal if the text is one, else the text itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, bool | int | float):
        return value
    # Only bracketed text is a collection: `a: b` stays the string it looks like.
    if isinstance(value, list | dict) and text.lstrip()[:1] in ("[", "{"):
        return value
    return text


class Arg(Component):
    """``ARG: KEY VALUE``."""

    verb: ClassVar[str] = "ARG"
    summary: ClassVar[str] = "Store KEY=VALUE in the node's args cache (for templates)."
    positional: ClassVar[str] = "raw"
    section: ClassVar[str] = "args"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--extend-args",
            action="store_true",
            help="extend an existing list/dict value instead of replacing it",
        )

    def validate(self, options: dict[str, Any]) -> None:
        parts = options["argv"].split(None, 1)
        if len(parts) != 2:
            raise ComponentArgsError(f"{self.verb}: expected KEY VALUE, got {options['argv']!r}")
        options["key"], raw = parts
        options["value"] = parse_value(raw) if self.section == "args" else raw

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        store = ctx.args if self.section == "args" else ctx.envs
        key = ctx.render(options["key"])
        value = options["value"]
        if isinstance(value, str):
            value = ctx.render(value)
        if options.get("extend_args"):
            old = store.get(key)
            if isinstance(old, list) and isinstance(value, list):
                value = old + [v for v in value if v not in old]
            elif isinstance(old, dict) and isinstance(value, dict):
                value = {**old, **value}
        ctx.update_cache(self.section, {key: value})
        # The value stored is the output (`--stdout-arg` copies it under another key).
        return Outcome.ok(value if isinstance(value, str) else json.dumps(value))


class Env(Arg):
    """``ENV: KEY VALUE``."""

    verb: ClassVar[str] = "ENV"
    summary: ClassVar[str] = "Store KEY=VALUE in the node's envs cache (RUN's environment)."
    section: ClassVar[str] = "envs"
