"""Talking to the server's user API: an asyncio client and the DirectordConnect library.

Example::

    from directord import DirectordConnect

    with DirectordConnect("/run/directord.sock") as conn:
        ids = conn.orchestrate([{"jobs": [{"RUN": "uptime"}]}])
        ok, info = conn.wait(ids[0])
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import socket
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from directord.config import Settings
from directord.errors import (
    APIError,
    ConfigError,
    JobTimeout,
    OrchestrationError,
    ProtocolError,
    ServerUnavailable,
    remote_error,
)
from directord.models import JobSpec, SourceFile
from directord.protocol import FROM_API, ApiEvent, ApiReply, ApiRequest, Bye, FrameDecoder, frame

if TYPE_CHECKING:
    # Imported by the methods that use them: the CLI's exec needs none of it.
    from directord.units import MonitorEvent, NodeReply

DEFAULT_SOCKET = "/var/run/directord.sock"
#: Bytes per ``file_put`` (the server takes at most this much at once).
UPLOAD_CHUNK = 1024 * 1024

log = logging.getLogger(__name__)


def _readable(writer: asyncio.StreamWriter) -> bool:
    """True when the connection has bytes (or its end) waiting to be read."""
    sock = writer.get_extra_info("socket")
    # Unix sockets only: on TLS, bytes may be the server's session tickets, and a write
    # to a closed TCP peer succeeds, so its ``bye`` is read as the answer.
    if sock is None or sock.family != socket.AF_UNIX:
        return False
    ready, _, _ = select.select([sock.fileno()], [], [], 0)
    return bool(ready)


def _refusal(reply: ApiReply | ApiEvent) -> APIError:
    """The error a refused call raises: the server's own class, and APIError."""
    error = reply.error if isinstance(reply, ApiReply) else None
    if error is None:
        return remote_error("protocol", "unexpected answer from the server")
    return remote_error(error.code, error.msg)


class _Closed(Exception):
    """The server said ``bye``: it closed the connection without reading what followed."""


class APIClient:
    """One connection to the server's API socket."""

    def __init__(
        self,
        socket_path: str = DEFAULT_SOCKET,
        *,
        url: str = "",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.url = url
        self._ssl = ssl_context
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._decoder = FrameDecoder(FROM_API)
        self._pending: list[ApiReply | ApiEvent | Bye] = []
        self._rid = 0

    def clone(self) -> APIClient:
        """A new, unconnected client for the same server (one connection reads one stream)."""
        return APIClient(self.socket_path, url=self.url, ssl_context=self._ssl)

    async def connect(self) -> None:
        """Open the socket. Raises ServerUnavailable naming the socket path."""
        if self.url:
            await self._connect_tcp()
            return
        try:
            self._reader, self._writer = await asyncio.open_unix_connection(
                self.socket_path, limit=2**20
            )
        except FileNotFoundError:
            raise ServerUnavailable(
                f"cannot reach the directord server: {self.socket_path} does not exist "
                "(is the server running? see --socket-path)"
            ) from None
        except PermissionError:
            raise ServerUnavailable(
                f"cannot reach the directord server: permission denied on {self.socket_path} "
                "(join its --socket-group)"
            ) from None
        except OSError as exc:
            raise ServerUnavailable(
                f"cannot reach the directord server at {self.socket_path}: {exc.strerror or exc}"
            ) from None

    async def _connect_tcp(self) -> None:
        parsed = urlsplit(self.url)
        if parsed.scheme != "tls" or not parsed.hostname or not parsed.port:
            raise ConfigError(
                f"--api-url must look like tls://HOST:PORT, not {self.url!r}", key="api_url"
            )
        try:
            self._reader, self._writer = await asyncio.open_connection(
                parsed.hostname,
                parsed.port,
                ssl=self._ssl,
                server_hostname=parsed.hostname,
                limit=2**20,
                ssl_handshake_timeout=10.0,
            )
        except ssl.SSLError as exc:
            raise ServerUnavailable(f"TLS with {self.url} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise ServerUnavailable(
                f"cannot reach the directord API at {self.url}: {exc.strerror or exc}"
            ) from None
        self.socket_path = self.url

    async def close(self) -> None:
        """Close the socket."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def __aenter__(self) -> APIClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _send(self, method: str, params: dict[str, Any]) -> int:
        if self._writer is not None and not self._pending and _readable(self._writer):
            # Nothing is asked, yet something came: the server's ``bye`` and the end of
            # a connection it closed while idle. Writing would fail and lose the bye.
            await self._reset()
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        self._rid += 1
        self._writer.write(frame([ApiRequest(rid=self._rid, method=method, params=params)]))
        with contextlib.suppress(OSError):
            # A closed connection shows when its answer is read: the server's last
            # words (a ``bye``), or the end of the stream.
            await self._writer.drain()
        return self._rid

    async def _next(self) -> ApiReply | ApiEvent:
        assert self._reader is not None
        hint = " (was this client's certificate refused?)" if self.url else ""
        while not self._pending:
            try:
                data = await self._reader.read(65536)
            except OSError as exc:  # reset, or a TLS alert (ssl.SSLError) from the server
                raise ServerUnavailable(
                    f"the server closed {self.socket_path}: {exc.strerror or exc}{hint}"
                ) from None
            if not data:
                raise ServerUnavailable(f"the server closed {self.socket_path}{hint}")
            for batch in self._decoder.feed(data):
                self._pending.extend(batch)
        message = self._pending.pop(0)
        if isinstance(message, Bye):
            raise _Closed(message.reason)
        return message

    async def _reset(self) -> None:
        await self.close()
        self._reader = None
        self._decoder = FrameDecoder(FROM_API)
        self._pending.clear()

    async def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        """Call an API method.

        Raises:
            APIError: the server refused (its ``kind`` names the server-side error).
            ServerUnavailable: the socket is unreachable or closed.
        """
        started = time.perf_counter()
        _, reply = await self._first(method, params or {})
        ok = isinstance(reply, ApiReply) and reply.ok
        log.debug(
            "API %s: %s in %.1f ms",
            method,
            "ok" if ok else "refused",
            (time.perf_counter() - started) * 1000,
        )
        if isinstance(reply, ApiReply) and reply.ok:
            return reply.result
        raise _refusal(reply)

    async def _first(self, method: str, params: dict[str, Any]) -> tuple[int, ApiReply | ApiEvent]:
        """Send a request; return its id and the first answer to it.

        A server that closed the connection without reading the request (it sat idle
        past ``--api-idle-timeout``) says ``bye`` first: the request goes again, once,
        on a new connection.
        """
        retried = False
        while True:
            rid = await self._send(method, params)
            try:
                while True:
                    message = await self._next()
                    if message.rid == rid:
                        return rid, message
            except _Closed as exc:
                await self._reset()
                if retried:
                    raise ServerUnavailable(
                        f"the server closed {self.socket_path}: {exc}"
                    ) from None
                retried = True

    async def jobs(self, filter: str | None = None, *, full: bool = False) -> list[dict[str, Any]]:
        """Every job's summary, or with ``full`` its whole record, oldest first.

        Asked for in pages, so that no history is too long to list.
        """
        rows: list[dict[str, Any]] = []
        start: int | None = 0
        while start is not None:
            page = await self.call("jobs", {"filter": filter, "full": full, "from": start})
            if isinstance(page, list):  # a server from before pages sends everything
                return page
            items, start = _page(page, "jobs", start)
            rows.extend(items)
        return rows

    async def job_info(self, job_id: str) -> dict[str, Any]:
        """Everything about one job (an id, a unique prefix of one, or ``last``).

        Its results are asked for in pages: a job's outputs from many nodes can be
        more than one message may carry.
        """
        page = await self.call("job_info", {"id": job_id, "from": 0})
        if isinstance(page, dict) and "next" not in page:  # a server from before pages
            return dict(page)
        info: dict[str, Any]
        info, start = _page(page, "job", 0)
        while start is not None:
            page = await self.call("job_info", {"id": info["id"], "from": start})
            more, start = _page(page, "job", start)
            info["results"].update(more["results"])
        return info

    async def watch(
        self,
        *,
        parents: list[str] | None = None,
        jobs: list[str] | None = None,
        output: bool = False,
        summary: bool = False,
    ) -> AsyncIterator[ApiEvent]:
        """Yield result (and output) events until every watched job has ended.

        With ``summary``, successful results come without stdout/stderr.
        """
        rid, event = await self._first(
            "watch",
            {"parents": parents or [], "jobs": jobs or [], "output": output, "summary": summary},
        )
        while True:
            if event.rid != rid:
                event = await self._next()
                continue
            if not isinstance(event, ApiEvent):
                raise _refusal(event)
            if event.ev == "done":
                return
            yield event
            event = await self._next()


def _page(page: Any, key: str, start: int) -> tuple[Any, int | None]:
    """A page's items (``page[key]``) and where the next starts, checked.

    Raises:
        ProtocolError: not a page, or a next page that does not start later (a
            server that would keep this client asking for ever).
    """
    items = page.get(key) if isinstance(page, dict) else None
    if key == "jobs":
        well_formed = isinstance(items, list)
    else:
        well_formed = isinstance(items, dict) and isinstance(items.get("results"), dict)
    if not well_formed:
        raise ProtocolError(f"the server's page of {key!r} is malformed")
    nxt = page.get("next")
    if nxt is not None and (not isinstance(nxt, int) or isinstance(nxt, bool) or nxt <= start):
        raise ProtocolError(f"the server's next page of {key!r} ({nxt!r}) does not follow {start}")
    return items, nxt


def prepare_files(
    orchestrations: list[dict[str, Any]], cwd: str, restrict: list[str] | None = None
) -> tuple[list[dict[str, Any]], list[SourceFile]]:
    """Find each job's files here, with this process's rights; the server never reads a path.

    Returns the orchestrations with ``files`` (name, size, sha256) added to the jobs
    that carry some, and the files to upload. Jobs that ``restrict`` filters out
    upload nothing.

    Raises:
        OrchestrationError: a file is missing or unreadable (file and line named).
    """
    from directord.components import build_job, job_key

    out: list[dict[str, Any]] = []
    sources: list[SourceFile] = []
    built: dict[str, JobSpec] = {}  # a job repeated is prepared once
    for orch in orchestrations:
        jobs = []
        for index, job in enumerate(orch.get("jobs") or []):
            line = job.get("line")
            key = job_key(job)
            spec = built.get(key)
            if spec is None:
                spec = built[key] = build_job(
                    str(job["verb"]),
                    str(job.get("args", "")),
                    job_vars=job.get("vars"),
                    cwd=cwd,
                    where=str(orch.get("source") or "<library>"),
                    line=int(line) if line is not None else index + 1,
                )
            if spec.files:
                job = {**job, "files": [f.to_dict() for f in spec.files]}
                if not restrict or any(spec.sha.startswith(r) for r in restrict):
                    sources.extend(spec.sources)
            jobs.append(job)
        out.append({**orch, "jobs": jobs})
    return out, sources


async def upload_files(client: APIClient, sources: list[SourceFile]) -> None:
    """Upload each distinct file once, checking it still is what was hashed.

    Raises:
        OrchestrationError: a file became unreadable or changed since it was hashed.
        APIError: the server refused an upload.
    """
    done: set[str] = set()
    for source in sources:
        if source.ref.sha256 not in done:
            await _upload(client, source)
            done.add(source.ref.sha256)


async def _upload(client: APIClient, source: SourceFile) -> None:
    ref = source.ref
    try:
        fh = await asyncio.to_thread(open, source.path, "rb")
    except OSError as exc:
        raise OrchestrationError(f"cannot read: {exc.strerror}", path=source.path) from None
    with fh:
        offset = 0
        while True:
            data = await asyncio.to_thread(fh.read, min(UPLOAD_CHUNK, ref.size - offset))
            if (not data and offset < ref.size) or (offset + len(data) > ref.size):
                raise OrchestrationError("the file changed while it was sent", path=source.path)
            await client.call(
                "file_put",
                {"sha256": ref.sha256, "size": ref.size, "offset": offset, "data": data},
            )
            offset += len(data)
            if offset >= ref.size:
                return


async def submit(
    client: APIClient,
    orchestrations: list[dict[str, Any]],
    *,
    targets: list[str] | None = None,
    restrict: list[str] | None = None,
    ignore_cache: bool = False,
    force_async: bool = False,
    stream: bool = False,
    cwd: str | None = None,
) -> list[dict[str, Any]]:
    """Upload the jobs' files, then submit; returns one record per orchestration run.

    Relative file names are found from ``cwd`` (the current directory by default).

    Raises:
        OrchestrationError: a bad job or an unreadable file, before anything is sent.
        APIError: the server refused the submission.
    """
    prepared, sources = prepare_files(orchestrations, cwd or os.getcwd(), restrict)
    await upload_files(client, sources)
    reply = await client.call(
        "submit",
        {
            "orchestrations": prepared,
            "targets": targets or [],
            "restrict": restrict or [],
            "ignore_cache": ignore_cache,
            "force_async": force_async,
            "stream": stream,
        },
    )
    parents: list[dict[str, Any]] = reply["parents"]
    return parents


def client_for(settings: Settings) -> APIClient:
    """The API client the settings describe: the local socket, or TLS over TCP."""
    if settings.api_url:
        from directord.security.tls import client_tls_context

        return APIClient(
            url=settings.api_url,
            ssl_context=client_tls_context(settings.ca, settings.cert, settings.key),
        )
    return APIClient(settings.socket_path)


async def collect(client: APIClient, parents: list[str]) -> dict[str, dict[str, Any]]:
    """Wait for orchestrations to end; return ``{job_id: {node: result}}``."""
    results: dict[str, dict[str, Any]] = {}
    async for event in client.watch(parents=parents):
        if event.ev == "result" and event.result is not None:
            results.setdefault(event.job, {})[event.node] = event.result
    return results


class DirectordConnect:
    """Synchronous library access to a directord server (a context manager).

    Scripts written for Directord's library run unchanged: its constructor
    arguments are accepted and its methods (``orchestrate``, ``poll``,
    ``list_nodes``, ``list_jobs``, ``purge_nodes``, ``purge_jobs``) return
    its shapes. The richer forms have their own names: ``wait``, ``nodes``,
    ``jobs``, ``job_info``, ``purge``, ``submit``.

    Args:
        socket_path: the server's API socket (``--socket-path``).
        api_url: ``tls://HOST:PORT`` to reach the API over TCP instead.
        ca: the CA certificate (PEM) that signed the server's, for ``api_url``.
        cert: this operator's certificate (PEM), for ``api_url``.
        key: its private key (PEM), for ``api_url``.
        debug: log directord's library at DEBUG level (Directord's argument).
        driver: accepted for Directord's scripts and ignored: the library talks
            to the API, whatever driver the nodes use.
        force_async: run every orchestration submitted here beside the others
            (``--force-async``).
    """

    def __init__(
        self,
        socket_path: str | bool = DEFAULT_SOCKET,
        *,
        api_url: str = "",
        ca: str = "",
        cert: str = "",
        key: str = "",
        debug: bool = False,
        driver: str = "",
        force_async: bool = False,
    ) -> None:
        if isinstance(socket_path, bool):
            # Directord's first positional argument is `debug`; a path is never a bool.
            debug, socket_path = socket_path, DEFAULT_SOCKET
        if debug:
            logging.getLogger("directord").setLevel(logging.DEBUG)
            if not logging.getLogger().handlers:
                logging.basicConfig(level=logging.DEBUG)
        self.force_async = force_async
        if api_url:
            from directord.security.tls import client_tls_context

            self._client = APIClient(url=api_url, ssl_context=client_tls_context(ca, cert, key))
        else:
            self._client = APIClient(socket_path)
        self._runner = asyncio.Runner()
        try:
            self._runner.run(self._client.connect())
        except BaseException:
            self._runner.close()  # no object to close later: do not leak the event loop
            raise

    def __enter__(self) -> DirectordConnect:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection."""
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()

    def _call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self._runner.run(self._client.call(method, params))

    def submit(
        self,
        orchestrations: list[dict[str, Any]],
        *,
        targets: list[str] | None = None,
        restrict: list[str] | None = None,
        ignore_cache: bool = False,
        force_async: bool = False,
        stream: bool = False,
    ) -> list[dict[str, Any]]:
        """Submit normalised orchestrations; returns one record per orchestration run.

        Files of COPY/ADD jobs are read here, with this process's rights, and uploaded.
        """
        parents: list[dict[str, Any]] = self._runner.run(
            submit(
                self._client,
                orchestrations,
                targets=targets,
                restrict=restrict,
                ignore_cache=ignore_cache,
                force_async=force_async or self.force_async,
                stream=stream,
            )
        )
        return parents

    def orchestrate(
        self,
        orchestrations: list[dict[str, Any]],
        defined_targets: list[str] | None = None,
        restrict: list[str] | None = None,
        ignore_cache: bool = False,
    ) -> list[str]:
        """Run orchestrations given as Python data (the YAML format); returns job ids.

        Raises:
            OrchestrationError: the data is not a valid orchestration.
            APIError: the server refused them (unknown target, bad job ...).
        """
        from directord.orchestration import from_python

        parents = self.submit(
            from_python(orchestrations),
            targets=defined_targets,
            restrict=restrict,
            ignore_cache=ignore_cache,
        )
        return [job for parent in parents for job in parent["jobs"]]

    def wait(self, job_id: str, timeout: float | None = None) -> tuple[bool, dict[str, Any]]:
        """Wait for a job to end everywhere; return (every target ok, job info).

        Raises:
            JobTimeout: it had not ended on every target after ``timeout`` seconds (a
                TimeoutError too).
        """

        async def wait() -> dict[str, Any]:
            async for _ in self._client.watch(jobs=[job_id]):
                pass
            return await self._client.job_info(job_id)

        try:
            info = self._runner.run(asyncio.wait_for(wait(), timeout))
        except TimeoutError:
            raise JobTimeout(f"job {job_id} did not end within {timeout:g}s") from None
        ok = all(r["state"] in ("success", "skipped-cache") for r in info["results"].values())
        return ok, info

    def poll(self, job_id: str, timeout: float = 600.0) -> tuple[bool | None, str]:
        """Directord's poll: wait for a job; ``(True, "Job Success: ID")``, or ``False``.

        After ``timeout`` seconds it returns ``(None, "Job in an unknown state:
        ID")``, as Directord's does. ``wait`` gives the job's whole record.
        """
        try:
            ok, _ = self.wait(job_id, timeout)
        except JobTimeout:
            return None, f"Job in an unknown state: {job_id}"
        return (True, f"Job Success: {job_id}") if ok else (False, f"Job Failed: {job_id}")

    def nodes(self) -> list[dict[str, Any]]:
        """Every known node with its status (the rows of ``manage --list-nodes``)."""
        nodes: list[dict[str, Any]] = self._call("nodes")
        return nodes

    def list_nodes(self) -> list[str]:
        """Directord's list_nodes: the identities of the nodes online now."""
        return [n["identity"] for n in self.nodes() if n["status"] == "online"]

    def jobs(self, filter: str | None = None) -> list[dict[str, Any]]:
        """Every job's summary (optionally only success / failed / processing)."""
        jobs: list[dict[str, Any]] = self._runner.run(self._client.jobs(filter))
        return jobs

    def list_jobs(self) -> dict[str, dict[str, Any]]:
        """Directord's list_jobs: every job's summary, keyed by job id."""
        return {job["id"]: job for job in self.jobs()}

    def job_info(self, job_id: str) -> dict[str, Any]:
        """Everything about one job (``last`` for the newest)."""
        info: dict[str, Any] = self._runner.run(self._client.job_info(job_id))
        return info

    def purge(self, what: str) -> int:
        """Forget finished ``jobs`` or offline ``nodes``; returns how many."""
        if what not in ("jobs", "nodes"):
            raise ValueError(f"purge what? {what!r} (jobs or nodes)")
        return int(self._call(f"purge_{what}")["purged"])

    def purge_nodes(self) -> bool:
        """Directord's purge_nodes: forget offline nodes; True once done."""
        self.purge("nodes")
        return True

    def purge_jobs(self) -> bool:
        """Directord's purge_jobs: forget finished jobs; True once done."""
        self.purge("jobs")
        return True

    # ---- systemd units (what `directord units` does) ---------------------------------
    def units(
        self,
        action: str,
        nodes: Sequence[str] = (),
        units: Sequence[str] = (),
        *,
        timeout: float = 600.0,
        **options: Any,
    ) -> list[NodeReply]:
        """Run a unit operation on nodes; one :class:`~directord.units.NodeReply` per node.

        ``action`` is one of ``directord units``' (``list``, ``list-unit-files``,
        ``status``, ``start``, ``stop``, ``restart``, ``reload``, ``enable``,
        ``disable``, ``daemon-reload``, ``kill``, ``reset-failed``, ``freeze``,
        ``thaw``); ``options`` are its flags (``filter="web*"``, ``now=True``,
        ``signal="KILL"``, ``whom="main"``). Without ``nodes``: every online node.
        Each reply's ``document`` holds what the node answered (``units`` rows,
        ``jobs`` results); ``ok`` is False with ``error`` saying why otherwise.

        Raises:
            UnitsError: a node named is unknown or offline.
        """
        from directord.units import UnitsError, online_nodes, run_unit_job, unit_args

        async def run() -> list[NodeReply]:
            chosen = await online_nodes(self._client, nodes)
            if not chosen:
                raise UnitsError("no node is online")
            return await run_unit_job(
                self._client, chosen, unit_args(action, units, **options), timeout=timeout
            )

        return self._runner.run(run())

    def monitor_units(
        self, nodes: Sequence[str] = (), patterns: Sequence[str] = ()
    ) -> Iterator[MonitorEvent]:
        """Unit state changes on the nodes (default every online node), until you stop iterating.

        The current state of the watched units comes first, and again after a
        node comes back (its ``note`` events say when it went away).
        """
        from directord.units import monitor, online_nodes

        async def start() -> AsyncGenerator[MonitorEvent, None]:
            chosen = await online_nodes(self._client, nodes)
            return monitor(self._client, chosen, patterns)

        events = self._runner.run(start())

        async def step() -> MonitorEvent:
            return await anext(events)

        try:
            while True:
                yield self._runner.run(step())
        finally:
            self._runner.run(events.aclose())

    def is_online(self, node: str, wait: float = 0.0) -> bool:
        """Whether ``node`` is online, waiting up to ``wait`` seconds for it to be."""
        deadline = time.monotonic() + wait
        while True:
            if any(r["identity"] == node and r["status"] == "online" for r in self.nodes()):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)


__all__ = ["APIClient", "DirectordConnect", "ProtocolError", "collect"]
