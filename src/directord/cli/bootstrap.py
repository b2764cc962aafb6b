"""``directord bootstrap``: set up servers and clients over SSH from catalogs."""

from __future__ import annotations

import argparse
import asyncio
import os

from directord.config import Settings
from directord.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Bootstrap's own options (Directord's, plus host-key and timeout control)."""
    p.add_argument(
        "--catalog",
        action="append",
        required=True,
        metavar="FILE",
        help="catalog file (repeatable; merged in order). A bare name such as "
        "grpc-mtls.yaml names a catalog shipped with directord",
    )
    p.add_argument(
        "--key-file",
        action="append",
        default=[],
        metavar="PATH",
        help="SSH private key (repeatable; default: ssh-agent and ~/.ssh's keys)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("DIRECTORD_BOOTSTRAP_THREADS", "10")),
        metavar="N",
        help="clients bootstrapped at once (10)",
    )
    p.add_argument(
        "--known-hosts",
        default="~/.ssh/known_hosts",
        metavar="FILE",
        help="trusted host keys (~/.ssh/known_hosts)",
    )
    p.add_argument(
        "--insecure-host-keys",
        action="store_true",
        help="accept any host key (only on a network you trust: keys and "
        "certificates are sent to whoever answers)",
    )
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="S", help="per host (30)")
    p.add_argument(
        "--step-timeout", type=float, default=1800.0, metavar="S", help="per step (1800)"
    )


def run_bootstrap(ns: argparse.Namespace, settings: Settings) -> int:
    """Bootstrap every host; exit 1 if any failed."""
    from directord.bootstrap import catalog as catalogs
    from directord.bootstrap.ssh import HostResult, SshSettings, bootstrap

    if ns.threads < 1:
        raise ConfigError("--threads must be at least 1", key="threads")
    catalog = catalogs.load(ns.catalog)
    ssh = SshSettings(
        key_files=tuple(ns.key_file),
        known_hosts=ns.known_hosts,
        insecure_host_keys=ns.insecure_host_keys,
        connect_timeout=ns.connect_timeout,
        step_timeout=ns.step_timeout,
        threads=ns.threads,
    )
    print(f"bootstrap: {len(catalog.hosts)} hosts", flush=True)

    def report(result: HostResult) -> None:
        print(result.line(), flush=True)

    results = asyncio.run(bootstrap(catalog, ssh, report))
    failed = [r.host.name or r.host.host for r in results if not r.ok]
    if failed:
        print(f"bootstrap: {len(failed)} of {len(results)} hosts failed: {', '.join(failed)}")
        return 1
    print(f"bootstrap: all {len(results)} hosts done")
    return 0
