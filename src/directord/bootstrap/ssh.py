"""Run catalog steps on hosts over SSH (asyncssh).

The server section's hosts go first, one at a time; if one fails, no client
is touched (its jobs would only fail later, against a server that is not
there). Then the clients, ``threads`` at a time. A failed host stops at its
failed step and never stops the others.

Host keys are checked against ``known_hosts`` unless the operator turns
that off: a bootstrap sends keys and certificates, and handing them to
whoever answers on port 22 is the mistake this prevents.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncssh
import jinja2

from directord.bootstrap.catalog import SHIPPED_DIR, Catalog, Host, Step, template_context

# What a failure line quotes of a command's output: its last lines, bounded.
TAIL_BYTES = 64 * 1024
TAIL_LINES = 5
# GET refuses a remote file larger than this: the host is not trusted to size it.
GET_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SshSettings:
    """How to reach the hosts."""

    key_files: Sequence[str] = ()
    known_hosts: str = "~/.ssh/known_hosts"
    insecure_host_keys: bool = False
    connect_timeout: float = 30.0
    step_timeout: float = 1800.0
    threads: int = 10


@dataclass(slots=True)
class HostResult:
    """How one host's bootstrap ended."""

    host: Host
    ok: bool
    steps_done: int
    seconds: float
    error: str = ""

    def line(self) -> str:
        """The host's one progress line."""
        total = len(self.host.steps)
        if self.ok:
            return f"ok      {self.host.label}: {total} steps in {self.seconds:.1f} s"
        return f"FAILED  {self.host.label}: {self.error}"


class StepFailed(Exception):
    """A step did not succeed; the message says why in one line."""


def _environment() -> jinja2.Environment:
    # StrictUndefined: a misspelt variable fails the step instead of running `rm -rf /`.
    env = jinja2.Environment(
        loader=jinja2.BaseLoader(),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["quote"] = shlex.quote  # `{{ path | quote }}` for a shell word
    return env


def _tail(data: bytes) -> str:
    text = data[-TAIL_BYTES:].decode("utf-8", "replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-TAIL_LINES:])


def local_path(path: str) -> str:
    """An ADD source: as given, else relative to the shipped catalogs (as Directord does)."""
    expanded = os.path.expanduser(path)
    if os.path.isabs(expanded) or os.path.exists(expanded):
        return expanded
    shipped = SHIPPED_DIR / expanded
    return str(shipped) if shipped.exists() else expanded


class HostRun:
    """One host's connection and the steps it runs."""

    def __init__(self, catalog: Catalog, host: Host, settings: SshSettings) -> None:
        self.catalog = catalog
        self.host = host
        self.settings = settings
        self.context = template_context(catalog, host)
        self.env = _environment()
        self.known_hosts = (
            None if settings.insecure_host_keys else os.path.expanduser(settings.known_hosts)
        )
        self.client_keys = [os.path.expanduser(k) for k in settings.key_files]

    def render(self, step: Step) -> str:
        try:
            return self.env.from_string(step.text).render(**self.context)
        except jinja2.TemplateError as exc:
            raise StepFailed(f"template error: {exc}") from None

    async def connect(self) -> asyncssh.SSHClientConnection:
        s = self.settings
        known_hosts = self.known_hosts
        if known_hosts is not None and not await asyncio.to_thread(os.path.exists, known_hosts):
            raise StepFailed(
                f"known_hosts file {known_hosts} does not exist; add the hosts' keys "
                "(ssh-keyscan) or pass --insecure-host-keys"
            )
        options: dict[str, Any] = {
            "port": self.host.port,
            "username": self.host.username,
            "known_hosts": known_hosts,
            "connect_timeout": s.connect_timeout,
        }
        if self.client_keys:
            options["client_keys"] = self.client_keys
        try:
            return await asyncssh.connect(self.host.host, **options)
        except asyncssh.HostKeyNotVerifiable as exc:
            raise StepFailed(
                f"host key not trusted ({exc.reason}): {self.host.host}:{self.host.port} "
                f"is not in {known_hosts} with this key; add it (ssh-keyscan -p "
                f"{self.host.port} {self.host.host}) or pass --insecure-host-keys"
            ) from None
        except asyncssh.PermissionDenied:
            raise StepFailed(
                f"SSH login refused for {self.host.username} (check --key-file)"
            ) from None
        except (OSError, asyncssh.Error, TimeoutError) as exc:
            raise StepFailed(f"cannot connect: {exc or type(exc).__name__}") from None

    async def run(self) -> HostResult:
        started = time.monotonic()
        done = 0
        step: Step | None = None
        try:
            conn = await self.connect()
            async with conn:
                for step in self.host.steps:
                    await self.run_step(conn, step)
                    done += 1
        except StepFailed as exc:
            where = (
                ""
                if step is None
                else (f" at step {done + 1} of {len(self.host.steps)} ({step.where})")
            )
            return HostResult(
                self.host, False, done, time.monotonic() - started, f"{str(exc).strip()}{where}"
            )
        return HostResult(self.host, True, done, time.monotonic() - started)

    async def run_step(self, conn: asyncssh.SSHClientConnection, step: Step) -> None:
        text = self.render(step)
        try:
            if step.kind == "RUN":
                await self.remote_command(conn, text)
            elif step.kind == "LOCAL":
                await self.local_command(text)
            elif step.kind == "ADD":
                source, dest = text.split(None, 1)
                await self.put(conn, local_path(source), dest.strip())
            else:
                source, dest = text.split(None, 1)
                await self.get(conn, source, dest.strip())
        except asyncssh.SFTPError as exc:
            raise StepFailed(f"{step.kind} {text.strip()}: {exc.reason}") from None
        except (TimeoutError, asyncssh.TimeoutError):
            raise StepFailed(f"timed out after {self.settings.step_timeout:g} s") from None
        except (OSError, asyncssh.Error) as exc:
            raise StepFailed(str(exc) or type(exc).__name__) from None

    async def remote_command(self, conn: asyncssh.SSHClientConnection, command: str) -> None:
        async with asyncio.timeout(self.settings.step_timeout):
            process = await conn.create_process(command, stdin=asyncssh.DEVNULL, encoding=None)
            output = await _drain(process.stdout, process.stderr)
            completed = await process.wait(check=False)
        status = completed.exit_status
        if status is None:
            raise StepFailed(f"killed by signal {completed.exit_signal}: {_tail(output)}")
        if status != 0:
            raise StepFailed(f"exit {status}: {_tail(output) or '(no output)'}")

    async def local_command(self, command: str) -> None:
        process = await asyncio.create_subprocess_shell(
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        assert process.stdout is not None
        try:
            async with asyncio.timeout(self.settings.step_timeout):
                output = await _drain(process.stdout)
                status = await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if status != 0:
            raise StepFailed(f"local command exit {status}: {_tail(output) or '(no output)'}")

    async def put(self, conn: asyncssh.SSHClientConnection, source: str, dest: str) -> None:
        if not await asyncio.to_thread(os.path.exists, source):
            raise StepFailed(f"ADD: no such local file or directory: {source}")
        async with asyncio.timeout(self.settings.step_timeout):
            async with conn.start_sftp_client() as sftp:
                parent = posixpath.dirname(dest.rstrip("/"))
                if parent:
                    await sftp.makedirs(parent, exist_ok=True)
                await sftp.put(source, dest, recurse=True, preserve=True)

    async def get(self, conn: asyncssh.SSHClientConnection, source: str, dest: str) -> None:
        async with asyncio.timeout(self.settings.step_timeout):
            async with conn.start_sftp_client() as sftp:
                attrs = await sftp.stat(source)
                if attrs.size is not None and attrs.size > GET_MAX_BYTES:
                    raise StepFailed(
                        f"GET {source}: {attrs.size} bytes, over the {GET_MAX_BYTES} limit"
                    )
                # Into a new file beside the destination, then renamed: a failed
                # transfer never leaves half a key where the old one was.
                dest, partial = await asyncio.to_thread(_partial_file, dest)
                try:
                    await sftp.get(source, partial, max_requests=16)
                    await asyncio.to_thread(_finish_get, source, partial, dest)
                finally:
                    await asyncio.to_thread(_discard, partial)


def _partial_file(dest: str) -> tuple[str, str]:
    """A GET destination (``~`` expanded) and a new empty file beside it."""
    dest = os.path.abspath(os.path.expanduser(dest))
    folder = os.path.dirname(dest)
    os.makedirs(folder, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".bootstrap-", dir=folder)
    os.close(fd)
    return dest, partial


def _finish_get(source: str, partial: str, dest: str) -> None:
    if os.path.getsize(partial) > GET_MAX_BYTES:
        raise StepFailed(f"GET {source}: grew over the {GET_MAX_BYTES} limit")
    os.replace(partial, dest)


def _discard(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _drain(*streams: Any) -> bytes:
    """Read streams to their end, keeping only the last TAIL_BYTES of them together."""
    kept = bytearray()

    async def pump(stream: Any) -> None:
        while chunk := await stream.read(65536):
            kept.extend(chunk)
            if len(kept) > 2 * TAIL_BYTES:
                del kept[: len(kept) - TAIL_BYTES]

    await asyncio.gather(*(pump(s) for s in streams))
    return bytes(kept)


async def bootstrap(
    catalog: Catalog,
    settings: SshSettings,
    report: Callable[[HostResult], None],
) -> list[HostResult]:
    """Bootstrap every host of the catalog; ``report`` gets each host's result as it ends."""
    results: list[HostResult] = []
    servers = [h for h in catalog.hosts if h.section == "directord_server"]
    clients = [h for h in catalog.hosts if h.section == "directord_clients"]
    for host in servers:
        result = await HostRun(catalog, host, settings).run()
        report(result)
        results.append(result)
        if not result.ok:
            for client in clients:
                skipped = HostResult(client, False, 0, 0.0, "not started: a server host failed")
                report(skipped)
                results.append(skipped)
            return results
    gate = asyncio.Semaphore(max(1, settings.threads))

    async def one(host: Host) -> None:
        async with gate:
            result = await HostRun(catalog, host, settings).run()
        report(result)
        results.append(result)

    await asyncio.gather(*(one(h) for h in clients))
    return results


__all__ = ["HostResult", "SshSettings", "bootstrap"]
