"""WAIT: sleep, poll a URL for a 2xx/3xx answer, or run a command until it succeeds."""

from __future__ import annotations

import argparse
import asyncio
import ssl
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError


def _probe(url: str, insecure: bool, timeout: float) -> int:
    # Imported here (in a worker thread): urllib.request and http.client cost
    # every agent memory for a verb few jobs use.
    import urllib.error
    import urllib.request

    context = ssl._create_unverified_context() if insecure else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError, ValueError):
        return 0


class Wait(Component):
    """``WAIT: --seconds N | --url URL | --cmd CMD [--retry N] [--retry-wait S]``."""

    verb: ClassVar[str] = "WAIT"
    summary: ClassVar[str] = "Sleep, wait for a URL to answer 2xx/3xx, or for a command to pass."
    positional: ClassVar[str] = "raw"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_mutually_exclusive_group()
        group.add_argument("--seconds", type=float, help="sleep this long")
        group.add_argument("--url", help="poll this URL until it answers 2xx/3xx")
        group.add_argument(
            "--cmd",
            action="store_true",
            help="run the rest of the arguments as a command until it exits 0",
        )
        parser.add_argument("--retry", type=int, default=30, help="attempts (30)")
        parser.add_argument(
            "--retry-wait", type=float, default=1.0, help="seconds between attempts (1)"
        )
        parser.add_argument(
            "--insecure", action="store_true", help="do not verify the URL's TLS certificate"
        )

    def validate(self, options: dict[str, Any]) -> None:
        argv = options.pop("argv").strip()
        if options.get("cmd"):
            if not argv:
                raise ComponentArgsError("WAIT: --cmd needs a command")
            options["command"] = argv
        elif argv:
            raise ComponentArgsError(f"WAIT: unexpected arguments {argv!r}")
        if options.get("seconds") is None and not options.get("url") and not options.get("cmd"):
            raise ComponentArgsError("WAIT: one of --seconds, --url or --cmd is required")
        if options["retry"] < 1:
            raise ComponentArgsError("WAIT: --retry must be >= 1")

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        if options.get("seconds") is not None:
            await asyncio.sleep(float(options["seconds"]))
            return Outcome.ok()
        attempts, pause = int(options["retry"]), float(options["retry_wait"])
        last = ""
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(pause)
            if options.get("url"):
                url = ctx.render(options["url"])
                status = await asyncio.to_thread(
                    _probe, url, bool(options.get("insecure")), max(pause, 5.0)
                )
                if 200 <= status < 400:
                    return Outcome.ok(f"{url} answered {status}")
                last = f"{url} answered {status or 'nothing'}"
            else:
                proc = await ctx.run_shell(ctx.render(options["command"]), timeout=ctx.timeout)
                if proc.rc == 0:
                    return Outcome.ok(proc.stdout)
                last = f"command exited {proc.rc}: {proc.stderr.strip()}"
        return Outcome.fail(f"WAIT gave up after {attempts} attempts; last: {last}")
