"""Cross-node unit dependencies: a node's proxy unit asks for a unit on another node.

A unit on node A that ``Wants=directord-proxy@B_web.service.service`` starts
that proxy on A; the proxy asks A's client, which asks this server (a node
request, ``unit_proxy``), to start ``web.service`` on B. The server runs a
UNIT job on B and answers with systemd's result, so the proxy on A succeeds
or fails with the remote unit. When the proxy stops, the remote unit is
stopped once no proxy wants it any more.

Only pairs the server's configuration allows (``--unit-proxy-allow
A>B,...``; ``*`` for any node) are served: a node may not start units on
other nodes unless the operator said so.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from typing import Any

from directord.components.unit import unit_name
from directord.errors import ComponentArgsError, ConfigError, OrchestrationError
from directord.security.identities import identity_problem
from directord.server.jobs import JobBook
from directord.server.submit import Submissions

log = logging.getLogger(__name__)
PROXY_TIMEOUT = 300.0


def parse_allow(text: str) -> list[tuple[str, str]]:
    """``"a>b, web*>db1"`` into (source glob, destination glob) pairs.

    Raises:
        ConfigError: an entry is not ``SOURCE>DESTINATION``.
    """
    pairs = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        source, sep, dest = entry.partition(">")
        if not sep or not source.strip() or not dest.strip():
            raise ConfigError(f"{entry!r} is not SOURCE>DESTINATION", key="unit_proxy_allow")
        pairs.append((source.strip(), dest.strip()))
    return pairs


class UnitProxies:
    """Serves ``unit_proxy`` requests; keeps who wants which remote unit."""

    def __init__(self, submissions: Submissions, jobs: JobBook, allow: str) -> None:
        self._submissions = submissions
        self._jobs = jobs
        self._allow = parse_allow(allow)
        # (destination node, unit) -> the nodes whose proxies want it
        self._wanted: dict[tuple[str, str], set[str]] = {}

    def allowed(self, source: str, dest: str) -> bool:
        """Whether ``source``'s proxies may drive units on ``dest``."""
        return source != dest and any(
            fnmatch.fnmatchcase(source, s) and fnmatch.fnmatchcase(dest, d) for s, d in self._allow
        )

    async def request(self, source: str, params: dict[str, Any]) -> dict[str, Any]:
        """Start or stop a unit on another node for ``source``'s proxy.

        Returns ``{"result": "done" | systemd's other result, "error": text}``.

        Raises:
            OrchestrationError: a malformed request, or a pair the configuration does
                not allow (the text goes back to the proxy and its journal).
        """
        op, dest, unit = params.get("op"), params.get("node"), params.get("unit")
        if op not in ("start", "stop") or not isinstance(dest, str) or not isinstance(unit, str):
            raise OrchestrationError(
                "unit_proxy: expected op start|stop, node, unit", path="<node>"
            )
        problem = identity_problem(dest)
        if problem:
            raise OrchestrationError(f"unit_proxy: node {dest[:80]!r}: {problem}", path="<node>")
        try:
            unit = unit_name(unit)
        except ComponentArgsError as exc:
            raise OrchestrationError(f"unit_proxy: {exc}", path="<node>") from None
        if not self.allowed(source, dest):
            log.warning("node %s asked to %s %s on %s: not allowed", source, op, unit, dest)
            raise OrchestrationError(
                f"refused: {source} may not {op} units on {dest} (the server's "
                "unit_proxy_allow does not list that pair)",
                path="<node>",
            )
        wanted = self._wanted.setdefault((dest, unit), set())
        if op == "stop":
            wanted.discard(source)
            if wanted:
                return {"result": "done", "error": "", "kept": sorted(wanted)}
        else:
            wanted.add(source)
        log.info("node %s's proxy: %s %s on %s", source, op, unit, dest)
        return await self._run(source, op, dest, unit)

    async def _run(self, source: str, op: str, dest: str, unit: str) -> dict[str, Any]:
        reply = await self._submissions.submit(
            {
                "orchestrations": [
                    {
                        "name": f"unit proxy for {source}",
                        "targets": [dest],
                        "async": True,
                        "jobs": [
                            {"verb": "UNIT", "args": f"--timeout {PROXY_TIMEOUT:g} {op} {unit}"}
                        ],
                    }
                ],
                "targets": [dest],
                "force_async": True,
            }
        )
        [job_id] = reply["parents"][0]["jobs"]
        watcher = self._jobs.watch([job_id], output=False)
        try:
            while True:
                watcher.take()
                if not watcher.pending:
                    break
                await watcher.wake.wait()
        finally:
            self._jobs.unwatch(watcher)
        target = self._jobs.jobs[job_id].results[dest]
        try:
            document = json.loads(target.stdout or "{}")
        except ValueError:
            document = {}
        result = (document.get("jobs") or {}).get(unit) or target.state.value
        return {"result": str(result), "error": target.stderr or ""}
