"""``directord manage``: list, inspect, export, purge and analyse."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from directord.cli.render import ago, seconds, table, to_json, until
from directord.config import Settings
from directord.connect import APIClient, client_for
from directord.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The manage actions (exactly one) and their modifiers."""
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--list-nodes", action="store_true", help="every node and its status")
    g.add_argument("--list-jobs", action="store_true", help="every job and its counts")
    g.add_argument("--job-info", metavar="ID", help="one job in full (ID, prefix or 'last')")
    g.add_argument("--purge-jobs", action="store_true", help="forget finished jobs")
    g.add_argument("--purge-nodes", action="store_true", help="forget offline nodes")
    g.add_argument("--export-jobs", metavar="FILE", help="write every job in full as JSON")
    g.add_argument("--export-nodes", metavar="FILE", help="write every node as JSON")
    g.add_argument("--analyze-job", metavar="ID", help="timings of one job")
    g.add_argument("--analyze-parent", metavar="ID", help="timings of one orchestration run")
    g.add_argument("--analyze-all", action="store_true", help="timings over every job")
    g.add_argument(
        "--dump-cache", action="store_true", help="print this machine's client cache (--cache-path)"
    )
    g.add_argument(
        "--cancel-job",
        nargs="+",
        metavar="ID",
        help="cancel jobs (IDs or prefixes): waiting ones are dropped, running ones killed",
    )
    g.add_argument(
        "--cancel-parent", nargs="+", metavar="ID", help="cancel every job of orchestration runs"
    )
    g.add_argument(
        "--is-online",
        metavar="NODE",
        help="exit 0 if NODE is online, else 1 (like bluechi-is-online)",
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="with --is-online: wait up to SECONDS for the node to be online",
    )
    p.add_argument(
        "--no-kill",
        action="store_true",
        help="with --cancel-*: leave running jobs to finish (cancel only those waiting)",
    )
    p.add_argument(
        "--filter",
        choices=("success", "failed", "processing"),
        help="with --list-jobs: only these jobs",
    )
    p.add_argument(
        "--format", choices=("table", "json"), default="table", help="output format (table)"
    )


def run_manage(ns: argparse.Namespace, settings: Settings) -> int:
    """Run one manage action."""
    if ns.dump_cache:
        return _dump_cache(settings)
    return asyncio.run(_remote(ns, settings))


async def _is_online(client: Any, node: str, wait: float) -> int:
    """0 once NODE is online (polling up to ``wait`` seconds), else 1; prints its status."""
    deadline = asyncio.get_running_loop().time() + max(wait, 0.0)
    while True:
        rows = {row["identity"]: row for row in await client.call("nodes")}
        status = rows[node]["status"] if node in rows else "unknown"
        if status == "online":
            print(f"{node} is online")
            return 0
        if asyncio.get_running_loop().time() >= deadline:
            print(f"{node} is {status}")
            return 1
        await asyncio.sleep(0.25)


def _dump_cache(settings: Settings) -> int:
    from directord.agent.cache import NodeCache

    if not (Path(settings.cache_path) / "cache.db").exists():
        raise ConfigError(f"no client cache in {settings.cache_path}", key="cache_path")
    cache = NodeCache(settings.cache_path, read_only=True)
    try:
        print(to_json(cache.dump()))
    finally:
        cache.close()
    return 0


async def _export_jobs(client: APIClient) -> list[dict[str, Any]]:
    """Every job's whole record: each job's results in pages of their own.

    One job's outputs alone can be more than one message carries, so a job is
    asked for by itself.
    """
    records = []
    for row in await client.jobs():
        try:
            records.append(await client.job_info(row["id"]))
        except ConfigError:  # forgotten (purged, or past the retention) since it was listed
            continue
    return records


async def _remote(ns: argparse.Namespace, settings: Settings) -> int:
    async with client_for(settings) as client:
        if ns.is_online:
            return await _is_online(client, ns.is_online, ns.wait)
        if ns.list_nodes:
            nodes = await client.call("nodes")
            print(to_json(nodes) if ns.format == "json" else _nodes_table(nodes))
        elif ns.list_jobs:
            jobs = await client.jobs(ns.filter)
            print(to_json(jobs) if ns.format == "json" else _jobs_table(jobs))
        elif ns.job_info:
            info = await client.job_info(ns.job_info)
            print(to_json(info) if ns.format == "json" else _job_info(info))
        elif ns.cancel_job or ns.cancel_parent:
            reply = await client.call(
                "cancel",
                {
                    "jobs": ns.cancel_job or [],
                    "parents": ns.cancel_parent or [],
                    "kill": not ns.no_kill,
                },
            )
            if ns.format == "json":
                print(to_json(reply))
            else:
                for job_id, targets in reply["cancelled"].items():
                    for node, what in sorted(targets.items()):
                        print(f"{job_id}  {node}  {what}")
        elif ns.purge_jobs or ns.purge_nodes:
            what = "jobs" if ns.purge_jobs else "nodes"
            reply = await client.call(f"purge_{what}")
            print(to_json(reply) if ns.format == "json" else f"purged {reply['purged']} {what}")
        elif ns.export_jobs or ns.export_nodes:
            data = await _export_jobs(client) if ns.export_jobs else await client.call("nodes")
            path = ns.export_jobs or ns.export_nodes
            try:
                text = json.dumps(data, indent=2, default=str) + "\n"
                await asyncio.to_thread(Path(path).write_text, text)
            except OSError as exc:
                raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
            print(f"exported {len(data)} {'jobs' if ns.export_jobs else 'nodes'} to {path}")
        else:
            params = (
                {"job": ns.analyze_job}
                if ns.analyze_job
                else {"parent": ns.analyze_parent}
                if ns.analyze_parent
                else {}
            )
            report = await client.call("analyze", params)
            print(to_json(report) if ns.format == "json" else _analysis(report))
    return 0


def _nodes_table(nodes: list[dict[str, Any]]) -> str:
    rows = [
        [
            n["identity"],
            n["status"],
            n["version"],
            n["driver"],
            seconds(n["host_uptime"]),
            seconds(n["agent_uptime"]),
            ago(n["last_seen"]),
            until(n["expiry"]),
            n["machine_id"],
        ]
        for n in nodes
    ]
    return table(
        rows,
        [
            "IDENTITY",
            "STATUS",
            "VERSION",
            "DRIVER",
            "HOST UPTIME",
            "AGENT UPTIME",
            "LAST HEARTBEAT",
            "EXPIRY",
            "MACHINE ID",
        ],
    )


def _jobs_table(jobs: list[dict[str, Any]]) -> str:
    rows = [
        [
            j["id"],
            j["parent_name"] or "-",
            j["name"] or "-",
            j["verb"],
            seconds(j["execution_time"]),
            j["processing"],
            j["success"],
            j["failed"],
        ]
        for j in jobs
    ]
    return table(
        rows, ["ID", "PARENT NAME", "NAME", "VERB", "EXEC TIME", "PROCESSING", "SUCCESS", "FAILED"]
    )


def _job_info(info: dict[str, Any]) -> str:
    head = [
        [k, info.get(k)]
        for k in (
            "id",
            "parent_id",
            "parent_name",
            "name",
            "verb",
            "sha",
            "timeout",
            "skip_cache",
            "run_once",
        )
    ]
    head.append(["options", json.dumps({k: v for k, v in info["options"].items()}, default=str)])
    rows = [
        [
            node,
            r["state"],
            r["rc"],
            seconds(r["exec_time"]),
            seconds(r["roundtrip"]),
            (r["stdout"] or "").strip()[:80],
            (r["stderr"] or "").strip()[:80],
        ]
        for node, r in sorted(info["results"].items())
    ]
    return (
        table(head, ["FIELD", "VALUE"])
        + "\n\n"
        + table(rows, ["NODE", "STATE", "RC", "EXEC", "ROUNDTRIP", "STDOUT", "STDERR"])
    )


def _analysis(report: dict[str, Any]) -> str:
    rows = []
    for key, value in report.items():
        if isinstance(value, dict):
            value = f"{value['node']} ({seconds(value['seconds'])})"
        elif isinstance(value, float):
            value = seconds(value)
        rows.append([key, value])
    return table(rows, ["KEY", "VALUE"])
