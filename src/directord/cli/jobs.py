"""``directord exec`` and ``directord orchestrate``: build, submit, and optionally wait."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from directord import orchestration
from directord.cli.render import first_line, seconds, table, to_json
from directord.components import ExecHelp, build_job
from directord.config import Settings
from directord.connect import client_for, submit
from directord.protocol import ApiEvent

OK_STATES = ("success", "skipped-cache")
FULL_TABLE_LIMIT = 50


def _orchestrations(command: str, ns: argparse.Namespace) -> list[dict[str, Any]]:
    if command == "exec":
        args = " ".join(ns.args)
        return [
            {
                "name": f"exec {ns.verb}",
                "targets": [],
                "async": False,
                "source": "<exec>",
                "jobs": [
                    {
                        "verb": ns.verb,
                        "args": args,
                        "vars": {},
                        "name": "",
                        "assign": [],
                        "line": None,
                    }
                ],
            }
        ]
    return orchestration.load_files(ns.files)


def _finger_print(orchs: list[dict[str, Any]], fmt: str) -> int:
    rows = []
    for index, orch in enumerate(orchs):
        for job in orch["jobs"]:
            spec = build_job(
                job["verb"],
                job["args"],
                job_vars=job["vars"],
                prepare=True,
                cwd=os.getcwd(),
                where=orch["source"],
                line=job["line"],
            )
            rows.append(
                {
                    "orchestration": index,
                    "name": orch["name"],
                    "sha": spec.sha,
                    "verb": spec.verb,
                    "args": job["args"],
                    "file": orch["source"],
                    "line": job["line"],
                }
            )
    if fmt == "json":
        print(to_json(rows))
    else:
        print(
            table(
                [
                    [r["orchestration"], r["sha"], r["verb"], first_line(r["args"], 50)]
                    for r in rows
                ],
                ["ORCH", "SHA", "VERB", "ARGS"],
            )
        )
    return 0


def run_jobs(command: str, ns: argparse.Namespace, settings: Settings) -> int:
    """Submit jobs; with --wait/--poll/--stream follow them and set the exit code."""
    orchs = _orchestrations(command, ns)
    try:
        orchestration.check(orchs)
    except ExecHelp as exc:
        print(exc.text)
        return 0
    if getattr(ns, "finger_print", False):
        return _finger_print(orchs, ns.format)
    return asyncio.run(_submit_and_follow(ns, settings, orchs))


async def _submit_and_follow(
    ns: argparse.Namespace, settings: Settings, orchs: list[dict[str, Any]]
) -> int:
    async with client_for(settings) as client:
        parents = await submit(
            client,
            orchs,
            targets=ns.target,
            restrict=getattr(ns, "restrict", []),
            ignore_cache=getattr(ns, "ignore_cache", False),
            force_async=ns.force_async,
            stream=ns.stream,
        )
        if not (ns.wait or ns.poll or ns.stream):
            if ns.format == "json":
                print(to_json(parents))
            else:
                for parent in parents:
                    for job_id in parent["jobs"]:
                        print(job_id)
            return 0
        results: list[ApiEvent] = []
        expected = sum(len(p["jobs"]) * len(p["targets"]) for p in parents)
        summary = ns.format != "json" and ns.wait and expected > FULL_TABLE_LIMIT
        async for event in client.watch(
            parents=[p["id"] for p in parents], output=ns.stream, summary=summary
        ):
            if event.ev == "out":
                print(
                    f"{event.node} | {event.data}",
                    flush=True,
                    file=sys.stderr if event.stream == "stderr" else sys.stdout,
                )
            elif event.ev == "result" and event.result is not None:
                results.append(event)
                if ns.poll and ns.format != "json":
                    r = event.result
                    print(
                        f"{event.node}  {event.name or event.verb}  {r['state']}  "
                        f"{seconds(r['exec_time'])}  {first_line(r['stdout'] or r['stderr'])}",
                        flush=True,
                    )
        return _report(results, parents, ns.format)


def _report(results: list[ApiEvent], parents: list[dict[str, Any]], fmt: str) -> int:
    rows = [(e, e.result or {}) for e in results]
    failed = [(e, r) for e, r in rows if r["state"] not in OK_STATES]
    if fmt == "json":
        print(
            to_json(
                {
                    "parents": parents,
                    "results": [
                        {"job": e.job, "node": e.node, "verb": e.verb, "name": e.name, **r}
                        for e, r in rows
                    ],
                }
            )
        )
        return 1 if failed else 0
    if len(results) <= FULL_TABLE_LIMIT:
        print(
            table(
                [
                    [
                        e.node,
                        e.name or e.verb,
                        e.job[:8],
                        r["state"],
                        r["rc"],
                        seconds(r["exec_time"]),
                        first_line(r["stdout"]),
                    ]
                    for e, r in rows
                ],
                ["NODE", "JOB", "ID", "STATE", "RC", "EXEC", "STDOUT"],
            )
        )
    counts: dict[str, int] = {}
    for _, r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    print(f"{len(results)} results: {summary}")
    for e, r in failed:
        print(
            f"FAILED {e.node}: job {e.job} ({e.name or e.verb}) {r['state']}"
            f" rc={r['rc']}: {r['stderr'].strip() or '(no stderr)'}",
            file=sys.stderr,
        )
    return 1 if failed else 0
