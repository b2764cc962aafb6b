"""The ExecContext a component gets on the node: cache, templates, processes, server."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from directord.agent import executor, jobprocs
from directord.agent.cache import NodeCache
from directord.agent.templates import render_template
from directord.agent.uplink import Uplink
from directord.components.base import ProcessResult
from directord.components.files import apply_owner_mode
from directord.errors import ComponentError
from directord.models import FileRef
from directord.protocol import Job, Output

CHUNK = 1024 * 1024
WINDOW = 4  # chunk requests in flight per file transfer


class ProcessKeeper(Protocol):
    """Where durable job processes are journalled (the runner)."""

    procs_dir: str

    def spawned(self, job_id: str, pid: int) -> None:
        """A job process exists."""
        ...

    def leaving(self) -> bool:
        """Whether a cancelled job process is left running (the agent stops)."""
        ...

    def cancel_waiting(self, reason: str) -> int:
        """Cancel every job waiting in the lanes; returns how many."""
        ...

    def request_reboot(self, job_id: str, delay: float) -> None:
        """Reboot the node ``delay`` seconds after this job's result is acknowledged."""
        ...


class JobContext:
    """Implements components.base.ExecContext for one job."""

    def __init__(
        self,
        job: Job,
        identity: str,
        cache: NodeCache,
        uplink: Uplink,
        on_restart: Callable[[str], None],
        keeper: ProcessKeeper | None = None,
    ) -> None:
        self.job = job
        self.job_id = job.id
        self.identity = identity
        self.timeout = job.timeout
        self.vars = dict(job.vars)
        self.files: list[FileRef] = list(job.files)
        self._cache = cache
        self._uplink = uplink
        self._on_restart = on_restart
        self._keeper = keeper
        self._durable_runs = 0
        sections = cache.sections
        self.args = sections["args"]
        self.envs = sections["envs"]
        self.query = sections["query"]

    def render(self, text: str) -> str:
        """Render a job's text; what other nodes reported (``query``) is untrusted there."""
        if "{{" not in text and "{%" not in text:
            return text  # plain text: no names to gather (the node's args may be many)
        return render_template(
            text, {"identity": self.identity, **self.args, **self.vars}, query=self.query
        )

    def update_cache(self, section: str, values: Mapping[str, Any]) -> None:
        self._cache.update(section, dict(values))

    def evict_cache(self, section: str) -> None:
        self._cache.evict(section)

    def environment(self) -> Mapping[bytes, bytes]:
        """The agent's environment plus cached ENV values, encoded for spawning."""
        return executor.encoded_environment({k: str(v) for k, v in self.envs.items()})

    async def run_shell(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        block: bool = True,
        durable: bool = False,
    ) -> ProcessResult:
        environment = executor.encoded_environment(env) if env is not None else (self.environment())
        if not block:
            await executor.spawn_detached(command, environment)
            return ProcessResult(rc=0, stdout="", stderr="")
        on_output = self._output if self.job.stream else None
        keeper = self._keeper
        if durable and keeper is not None:
            job_id = self.job_id
            self._durable_runs += 1
            return await jobprocs.run_durable(
                command,
                jobprocs.ProcFiles.of(keeper.procs_dir, job_id),
                job_id,
                env=environment,
                timeout=timeout,
                on_output=on_output,
                on_spawn=lambda pid: keeper.spawned(job_id, pid),
                leave=keeper.leaving,
                again=self._durable_runs > 1,
            )
        return await executor.run_shell(command, environment, timeout=timeout, on_output=on_output)

    def _output(self, stream: str, line: str) -> None:
        """Forward one line of output live (``--stream``); lost while disconnected."""
        self._uplink.post(Output(id=self.job_id, stream=stream, data=line))

    def output_line(self, stream: str, line: str) -> None:
        if self.job.stream:
            self._output(stream, line)

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        return await self._uplink.request(method, params)

    async def fetch_bytes(self, index: int, limit: int) -> bytes:
        info = self.files[index]
        if info.size > limit:
            raise ComponentError(
                f"{info.name}: {info.size} bytes is too large for a blueprint (limit {limit})"
            )
        data = bytearray()
        while len(data) < info.size:
            reply = await self.request(
                "chunk", {"job": self.job_id, "index": index, "offset": len(data)}
            )
            if not reply["data"]:
                break
            data += reply["data"]
        if hashlib.sha256(data).hexdigest() != info.sha256:
            raise ComponentError(f"{info.name}: checksum mismatch after transfer")
        return bytes(data)

    async def fetch_file(
        self,
        index: int,
        dest: str,
        expected_sha256: str,
        size: int,
        *,
        uid: int = -1,
        gid: int = -1,
        mode: int | None = None,
    ) -> None:
        """Stream a job file into ``dest`` via a temp file; keep at most WINDOW chunks queued.

        mkstemp creates the temporary file with O_EXCL (so never through a
        planted symlink) and mode 0600; it gets ``uid``/``gid``/``mode`` on its
        descriptor before the rename, so ``dest`` never shows other rights.
        """
        folder = os.path.dirname(dest) or "."
        fd, tmp = tempfile.mkstemp(prefix=".directord-", dir=folder)
        digest = hashlib.sha256()
        offsets = list(range(0, size, CHUNK))
        pending: dict[int, asyncio.Task[Any]] = {}
        try:
            with os.fdopen(fd, "wb") as fh:
                for i, offset in enumerate(offsets):
                    for ahead in offsets[i : i + WINDOW]:
                        if ahead not in pending:
                            pending[ahead] = asyncio.create_task(
                                self.request(
                                    "chunk", {"job": self.job_id, "index": index, "offset": ahead}
                                )
                            )
                    reply = await pending.pop(offset)
                    data = reply["data"]
                    digest.update(data)
                    fh.write(data)
                if digest.hexdigest() != expected_sha256:
                    raise ComponentError(
                        f"checksum mismatch for {dest}: the file changed on the "
                        f"server or was damaged in transfer"
                    )
                apply_owner_mode(fh.fileno(), uid, gid, mode)
            os.replace(tmp, dest)
        except BaseException:
            for task in pending.values():
                task.cancel()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def request_restart(self) -> None:
        self._on_restart(self.job_id)

    def request_reboot(self, delay: float) -> None:
        if self._keeper is None:
            raise ComponentError("this client cannot reboot the node")
        self._keeper.request_reboot(self.job_id, delay)

    def cancel_waiting(self) -> int:
        if self._keeper is None:
            return 0
        return self._keeper.cancel_waiting(f"cancelled by QUEUESENTINEL job {self.job_id}")

    async def query_exchange(self, value: Any, wait: bool) -> dict[str, Any] | None:
        return await self._uplink.query_exchange(self.job_id, value, wait)
