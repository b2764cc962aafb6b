"""FACTS (and Directord's FACTER): gather host facts into the node's args as ``facts``.

What is gathered, each value read from the host with a size bound:

* ``os``: ``id``, ``version_id``, ``pretty_name``, ``name`` and ``id_like`` (a
  list) from ``/etc/os-release`` (else ``/usr/lib/os-release``);
* ``kernel``: ``name``, ``release``, ``version``, ``machine`` (``uname``);
* ``cpus``: logical CPUs; ``memory``: ``{"total": bytes}`` (``MemTotal`` of
  ``/proc/meminfo``);
* ``addresses``: interface -> ``{"ipv4": [...], "ipv6": [...]}``, from
  ``ip -j addr show`` when it works, else from the kernel (``SIOCGIFADDR``
  for IPv4, ``/proc/net/if_inet6`` for IPv6);
* ``hostname``, ``fqdn`` and ``machine_id`` (``/etc/machine-id``, else
  ``/var/lib/dbus/machine-id``);
* ``facter``: when ``facter`` is on the PATH (the agent's, with the node's
  cached ENV values), the mapping ``facter --json`` prints, kept whole
  under this one key rather than merged (facter's ``os`` has another shape).
  A facter that fails, prints no JSON mapping or prints more than 4 MiB
  fails the job.

The facts replace the cached arg ``facts``, so later jobs render
``{{ facts.os.id }}``; the job's stdout is the same facts as JSON. A fact
that cannot be read is ``null`` (an empty list for ``id_like``).

``FACTER`` is Directord's verb (a component it shipped beside its built-ins):
the same gathering, and Directord's contract kept too: facter must be
installed (the job fails without it) and its output is also stored as the
top-level arg ``facter``. Both take Directord's ``--custom-dir`` and
``--external-dir``, passed to facter.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import shlex
import socket
import struct
from typing import Any, ClassVar

from directord.components.base import Component, ExecContext, Outcome
from directord.errors import ComponentArgsError

#: Bytes read from a small host file (os-release, meminfo, machine-id).
FILE_LIMIT = 64 * 1024
#: Characters kept of any one string fact.
VALUE_LIMIT = 1024
#: Interfaces, and addresses per interface, kept.
MAX_INTERFACES = 256
MAX_ADDRESSES = 64
#: Bytes of ``ip -j addr`` / ``facter --json`` output accepted.
IP_OUTPUT_LIMIT = 4 * 1024 * 1024
FACTER_OUTPUT_LIMIT = 4 * 1024 * 1024
#: Seconds ``ip`` and the fully qualified name lookup may take.
PROBE_TIMEOUT = 10.0
SIOCGIFADDR = 0x8915
OS_KEYS = ("id", "version_id", "pretty_name", "name", "id_like")


def read_bounded(path: str, limit: int = FILE_LIMIT) -> str | None:
    """The first ``limit`` bytes of a file as text, or None if it cannot be read."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the job.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as fh:
        try:
            return fh.read(limit).decode("utf-8", "replace")
        except OSError:
            return None


def clip(value: str) -> str:
    """A string fact cut to VALUE_LIMIT characters."""
    return value[:VALUE_LIMIT]


def os_release(text: str | None) -> dict[str, Any]:
    """The ``os`` facts from the text of an os-release file (shell-style KEY=value lines)."""
    found: dict[str, str] = {}
    for line in (text or "").splitlines():
        key, sep, raw = line.partition("=")
        key = key.strip().lower()
        if not sep or key not in OS_KEYS:
            continue
        try:
            words = shlex.split(raw, comments=False)
        except ValueError:
            words = [raw.strip()]
        found[key] = clip(" ".join(words))
    facts: dict[str, Any] = {k: found.get(k) for k in OS_KEYS if k != "id_like"}
    facts["id_like"] = found.get("id_like", "").split()[:MAX_ADDRESSES]
    return facts


def mem_total(text: str | None) -> int | None:
    """``MemTotal`` of a /proc/meminfo text, in bytes."""
    for line in (text or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                unit = parts[2].lower() if len(parts) > 2 else ""
                return int(parts[1]) * (1024 if unit == "kb" else 1)
    return None


def machine_id() -> str | None:
    """The host's machine id."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        text = read_bounded(path, 256)
        if text and text.strip():
            return clip(text.strip())
    return None


def addresses_from_ip(output: str) -> dict[str, dict[str, list[str]]] | None:
    """Addresses by interface from ``ip -j addr show``; None if it is not that JSON."""
    try:
        links = json.loads(output)
    except ValueError:
        return None
    if not isinstance(links, list):
        return None
    out: dict[str, dict[str, list[str]]] = {}
    for link in links[:MAX_INTERFACES]:
        if not isinstance(link, dict) or not isinstance(link.get("ifname"), str):
            continue
        entry = out.setdefault(clip(link["ifname"]), {"ipv4": [], "ipv6": []})
        infos = link.get("addr_info")
        for info in infos[: 2 * MAX_ADDRESSES] if isinstance(infos, list) else ():
            if not isinstance(info, dict) or not isinstance(info.get("local"), str):
                continue
            family = {"inet": "ipv4", "inet6": "ipv6"}.get(str(info.get("family")))
            if family and len(entry[family]) < MAX_ADDRESSES:
                entry[family].append(clip(info["local"]))
    return out


def addresses_from_kernel() -> dict[str, dict[str, list[str]]]:
    """Addresses by interface without ``ip``: one IPv4 each (SIOCGIFADDR), IPv6 from /proc."""
    out: dict[str, dict[str, list[str]]] = {}
    try:
        names = [name for _, name in socket.if_nameindex()][:MAX_INTERFACES]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name in names:
            entry = out.setdefault(clip(name), {"ipv4": [], "ipv6": []})
            request = struct.pack("256s", name.encode()[:15])
            # An interface without an IPv4 address answers EADDRNOTAVAIL.
            with contextlib.suppress(OSError):
                reply = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
                entry["ipv4"].append(socket.inet_ntoa(reply[20:24]))
    # Lines: address (32 hex digits), index, prefix length, scope, flags, name.
    for line in (read_bounded("/proc/net/if_inet6", IP_OUTPUT_LIMIT) or "").splitlines():
        fields = line.split()
        if len(fields) != 6 or len(fields[0]) != 32 or len(out) > MAX_INTERFACES:
            continue
        try:
            packed = bytes.fromhex(fields[0])
        except ValueError:
            continue
        entry = out.setdefault(clip(fields[5]), {"ipv4": [], "ipv6": []})
        if len(entry["ipv6"]) < MAX_ADDRESSES:
            entry["ipv6"].append(socket.inet_ntop(socket.AF_INET6, packed))
    return out


class Facts(Component):
    """``FACTS: [--custom-dir DIR] [--external-dir DIR]``."""

    verb: ClassVar[str] = "FACTS"
    summary: ClassVar[str] = (
        "Gather host facts (os, kernel, cpus, memory, addresses, machine id, facter's "
        "when installed) into the node's args as `facts`."
    )
    # Directord's FACTER: facter must be there, and its output is also arg `facter`.
    facter_required: ClassVar[bool] = False

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--custom-dir", metavar="DIR", help="facter's --custom-dir")
        parser.add_argument("--external-dir", metavar="DIR", help="facter's --external-dir")

    def validate(self, options: dict[str, Any]) -> None:
        if options["argv"]:
            raise ComponentArgsError(f"{self.verb} takes no arguments, only options")
        # Facts change (an upgrade, a reboot): an earlier FACTS's success is no cache hit.
        options["skip_cache"] = True

    async def execute(self, options: dict[str, Any], ctx: ExecContext) -> Outcome:
        facts = await self.gather(ctx)
        facter, problem = await self._facter(options, ctx)
        if problem:
            return Outcome.fail(f"{self.verb}: {problem}")
        facts["facter"] = facter
        update: dict[str, Any] = {"facts": facts}
        if self.facter_required:
            update["facter"] = facter
        ctx.update_cache("args", update)
        return Outcome.ok(json.dumps(facts, sort_keys=True))

    async def gather(self, ctx: ExecContext) -> dict[str, Any]:
        """Every fact but facter's."""
        uname = os.uname()
        hostname = clip(socket.gethostname())
        try:
            # getfqdn may ask DNS: off the event loop, and bounded.
            fqdn = clip(await asyncio.wait_for(asyncio.to_thread(socket.getfqdn), PROBE_TIMEOUT))
        except (TimeoutError, OSError):
            fqdn = hostname
        release = read_bounded("/etc/os-release") or read_bounded("/usr/lib/os-release")
        return {
            "os": os_release(release),
            "kernel": {
                "name": clip(uname.sysname),
                "release": clip(uname.release),
                "version": clip(uname.version),
                "machine": clip(uname.machine),
            },
            "cpus": os.cpu_count(),
            "memory": {"total": mem_total(read_bounded("/proc/meminfo"))},
            "addresses": await self._addresses(ctx),
            "hostname": hostname,
            "fqdn": fqdn,
            "machine_id": machine_id(),
        }

    async def _addresses(self, ctx: ExecContext) -> dict[str, dict[str, list[str]]]:
        proc = await ctx.run_shell(
            "ip -j addr show", env={}, timeout=min(PROBE_TIMEOUT, ctx.timeout)
        )
        if proc.rc == 0 and len(proc.stdout) <= IP_OUTPUT_LIMIT:
            found = addresses_from_ip(proc.stdout)
            if found is not None:
                return found
        return await asyncio.to_thread(addresses_from_kernel)

    async def _facter(
        self, options: dict[str, Any], ctx: ExecContext
    ) -> tuple[dict[str, Any] | None, str]:
        """Facter's facts (None when it is not installed and need not be), or why not."""
        # The node's cached ENV values apply (a PATH there finds facter), as for RUN.
        where = await ctx.run_shell("command -v facter", timeout=min(PROBE_TIMEOUT, ctx.timeout))
        if where.rc != 0:
            return None, ("facter is not installed on the node" if self.facter_required else "")
        command = "facter --json"
        for flag in ("custom_dir", "external_dir"):
            if options.get(flag):
                command += f" --{flag.replace('_', '-')} {shlex.quote(ctx.render(options[flag]))}"
        proc = await ctx.run_shell(command, timeout=ctx.timeout)
        if proc.timed_out:
            return None, f"`{command}` timed out after {ctx.timeout:g}s"
        if proc.rc != 0:
            return None, f"`{command}` exited {proc.rc}: {proc.stderr.strip()[:VALUE_LIMIT]}"
        if len(proc.stdout) > FACTER_OUTPUT_LIMIT:
            return None, f"`{command}` printed over {FACTER_OUTPUT_LIMIT} bytes"
        try:
            data = json.loads(proc.stdout)
        except ValueError:
            return None, f"`{command}` printed no JSON"
        if not isinstance(data, dict):
            return None, f"`{command}` printed JSON that is not a mapping"
        return data, ""


class Facter(Facts):
    """``FACTER: [--custom-dir DIR] [--external-dir DIR]`` (Directord's)."""

    verb: ClassVar[str] = "FACTER"
    summary: ClassVar[str] = (
        "Directord's FACTER: FACTS, with facter required and its output also stored as "
        "arg `facter`."
    )
    facter_required: ClassVar[bool] = True
