"""The server: wires a transport, a datastore, the node registry, the job book and the API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from directord import __version__
from directord.components import build_job, preload
from directord.components.copy import per_node_name
from directord.config import Settings
from directord.datastores import Datastore, open_datastore
from directord.errors import ConfigError, OrchestrationError
from directord.models import FileRef, State
from directord.protocol import pack
from directord.server.api import APIServer
from directord.server.filestore import FileStore, check_sha256, default_root
from directord.server.jobs import JOBS, PARENTS, RESULTS, JobBook, PlannedJob
from directord.server.nodes import NS as NODES
from directord.server.nodes import NodeRegistry
from directord.server.parking import NS as PARKED
from directord.server.parking import ParkingLot
from directord.server.persist import Persister
from directord.server.sessions import AgentSession
from directord.transports import Connection, Link, Transport, load_transport

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
DEFAULT_FILE_STORE = "/var/lib/directord/files"
MAX_JOB_FILES = 100_000


class Server:
    """A running directord server."""

    def __init__(
        self,
        settings: Settings,
        *,
        transport: Transport | None = None,
        store: Datastore | None = None,
        activated: dict[str, socket.socket] | None = None,
    ) -> None:
        self.settings = settings
        self.transport = transport or load_transport(settings)
        activated = activated or {}
        if "nodes" in activated:
            self.transport.adopt(activated["nodes"])
        self.store = store or open_datastore(settings.datastore)
        self._private_files: str | None = None
        root = settings.file_store or default_root(settings.datastore)
        if root is None and settings.datastore == "memory":
            # Nothing outlives the server with a memory datastore, its files neither.
            root = self._private_files = tempfile.mkdtemp(prefix="directord-files-")
        self.files = FileStore(root or DEFAULT_FILE_STORE)
        self.persister = Persister(self.store)
        self.nodes = NodeRegistry(self.persister)
        self.jobs = JobBook(self.persister, settings.job_timeout_grace)
        self.parking = ParkingLot(
            self.transport, self.jobs, self.persister, lambda i: i in self.nodes.sessions
        )
        self.api = APIServer(self, activated.get("api"))
        self.address = ""
        self._tasks: list[asyncio.Task[None]] = []
        self._sessions: set[AgentSession] = set()
        self._stopped = asyncio.Event()
        self._allowed = frozenset(
            n.strip() for n in settings.allowed_node_names.split(",") if n.strip()
        )

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Open the datastore, load history, listen for nodes and users."""
        preload()  # components: the first submission should not pay for their imports
        self.files.start()
        await self.store.start()
        self.nodes.load(await self.store.scan(NODES))
        self.jobs.load(
            await self.store.scan(JOBS),
            await self.store.scan(RESULTS),
            await self.store.scan(PARENTS),
        )
        self.parking.load(await self.store.scan(PARKED))
        self._check_exposure()
        self.persister.start()
        self.address = await self.transport.serve(self._on_connection)
        self.parking.start()
        await self.api.start()
        self._tasks.append(asyncio.create_task(self._sweeper(), name="sweeper"))
        log.info(
            "server %s ready: nodes on %s, API on %s, datastore %s",
            __version__,
            self.address,
            self.api.where,
            self.store.url.split("?")[0],
        )
        if self.settings.ready_file:
            _write_ready(
                self.settings.ready_file,
                {"address": self.address, "api": self.api.where, "pid": os.getpid()},
            )

    def _check_exposure(self) -> None:
        """Refuse an open listener on the network unless the operator said --insecure.

        Raises:
            ConfigError: the listener would be reachable beyond this machine unprotected.
        """
        exposure = self.transport.exposure()
        if exposure is None:
            return
        if not self.settings.insecure:
            raise ConfigError(
                f"refusing to start: {exposure}. Set up mutual TLS (`directord pki`, "
                "README 'Security'), listen on 127.0.0.1, or pass --insecure to accept this",
                key="insecure",
            )
        log.warning("--insecure: %s", exposure)

    async def wait_closed(self) -> None:
        """Block until :meth:`close` is called."""
        await self._stopped.wait()

    async def close(self) -> None:
        """Stop everything this server started; pending writes are flushed."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.api.close()
        await self.parking.close()
        for session in list(self._sessions):
            await session.link.close()
        await self.transport.close()
        await self.persister.close()
        await self.store.close()
        if self._private_files is not None:
            shutil.rmtree(self._private_files, ignore_errors=True)
        self._stopped.set()

    # ---- nodes -----------------------------------------------------------------------
    async def _on_connection(self, conn: Connection) -> None:
        session = AgentSession(self, Link(conn, f"node@{conn.peer}"))
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)

    def check_identity(self, identity: str) -> str | None:
        """Refusal reason for an identity not on ``--allowed-node-names``, else None."""
        allowed = self._allowed
        if allowed and identity not in allowed:
            return f"identity {identity!r} is not in allowed_node_names"
        return None

    def node_online(
        self, session: AgentSession, hello: dict[str, Any], parked: dict[str, str]
    ) -> None:
        """A node (re)registered: settle what it lost, send what waits for it.

        Jobs in ``parked`` (listed in its welcome) it takes from the broker.
        """
        identity = session.identity
        known = {str(i) for i in hello.get("known", [])}
        for target in self.jobs.delivered_to(identity):
            if target.job_id not in known:
                self.jobs.finish(
                    identity,
                    target,
                    State.LOST,
                    stderr=f"node {identity} restarted without the job",
                )
                self.on_target_final(target.job_id)
        queued = self.jobs.queued_for(identity)
        direct = 0
        for job in queued:
            if job.id in parked:
                self.jobs.mark_sent(job.results[identity])
            else:
                self._send(session, job.id)
                direct += 1
        if direct:
            log.info("node %s: sending %d queued jobs", identity, direct)
        if parked:
            log.info("node %s: %d jobs wait for it in the broker", identity, len(parked))

    def parked_taken(self, session: AgentSession, missing: list[str]) -> None:
        """The node took its parked jobs; send over the session those it did not find."""
        identity = session.identity
        self.parking.settle(identity)
        resend = [j for j in missing if self.parking.still_queued(identity, j)]
        for job_id in resend:
            self._send(session, job_id)
        if resend:
            log.warning(
                "node %s: %d parked jobs were missing from the broker; sent them directly",
                identity,
                len(resend),
            )

    def node_gone(self, session: AgentSession, reason: str) -> None:
        """A node's session ended."""
        self.nodes.detach(session, reason)

    def _send(self, session: AgentSession, job_id: str, packed: bytes | None = None) -> None:
        job = self.jobs.jobs[job_id]
        target = job.results[session.identity]
        self.jobs.mark_sent(target)
        session.link.post_packed(packed if packed is not None else pack(job.wire()))

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.settings.heartbeat_interval / 2))
            try:
                now = time.time()
                for session in self.nodes.expired(now):
                    log.warning(
                        "node %s silent for 3 heartbeat intervals; marking offline",
                        session.identity,
                    )
                    session.close("silent for 3 heartbeat intervals")
                last_seen = {i: r.last_seen for i, r in self.nodes.records.items()}
                for job_id in self.jobs.sweep(now, last_seen, set(self.nodes.sessions)):
                    self.on_target_final(job_id)
            except Exception:
                log.exception("sweeper pass failed")

    # ---- submission ------------------------------------------------------------------
    async def submit(
        self, request: dict[str, Any], uploaded: frozenset[str] = frozenset()
    ) -> dict[str, Any]:
        """Validate, record and dispatch orchestrations from the user API.

        Args:
            request: the ``submit`` parameters.
            uploaded: SHA-256 of the files the submitting connection uploaded; a job
                may carry only those (the server never reads a user's path).

        Raises:
            OrchestrationError: bad job, unknown target, no nodes, a file that was not
                uploaded; nothing is stored then.
        """
        try:
            plans = self._plan(request, set(self.nodes.records), self.nodes.online(), uploaded)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise OrchestrationError(
                f"malformed submit request: {type(exc).__name__} {exc}", path="<api>"
            ) from None
        stream = bool(request.get("stream"))
        recorded = [
            (self.jobs.record(name, is_async, planned, stream)) for name, is_async, planned in plans
        ]
        # Accepted means stored: a crash right after the reply loses nothing.
        await self.persister.stored()
        out = []
        for parent, records in recorded:
            for job in records:
                packed = pack(job.wire())  # encoded once, sent to every target
                for identity in job.targets:
                    session = self.nodes.sessions.get(identity)
                    if session is not None:
                        self._send(session, job.id, packed)
                    else:
                        self.parking.park(identity, job.id, packed)
            out.append(
                {
                    "id": parent.id,
                    "name": parent.name,
                    "jobs": [j.id for j in records],
                    "targets": sorted({t for j in records for t in j.targets}),
                    "shas": [j.sha for j in records],
                }
            )
        return {"parents": out}

    def _plan(
        self, request: dict[str, Any], known: set[str], online: list[str], uploaded: frozenset[str]
    ) -> list[tuple[str, bool, list[PlannedJob]]]:
        cli_targets = [str(t) for t in request.get("targets") or []]
        restrict = [str(r) for r in request.get("restrict") or []]
        ignore_cache = bool(request.get("ignore_cache"))
        force_async = bool(request.get("force_async"))
        orchestrations = request.get("orchestrations")
        if not isinstance(orchestrations, list) or not orchestrations:
            raise OrchestrationError("no orchestrations given", path="<api>")
        unknown = [t for t in cli_targets if t not in known]
        if unknown:
            raise OrchestrationError(
                f"unknown target node(s): {', '.join(unknown)}", path="--target"
            )
        plans = []
        for o_index, orch in enumerate(orchestrations):
            where = str(orch.get("source") or f"<api>[{o_index}]")
            o_targets = [str(t) for t in orch.get("targets") or []]
            planned = []
            for j_index, job in enumerate(orch.get("jobs") or []):
                line = job.get("line")
                line_no = int(line) if line is not None else j_index + 1
                spec = build_job(
                    str(job["verb"]),
                    str(job.get("args", "")),
                    job_vars=job.get("vars"),
                    name=str(job.get("name") or ""),
                    assign=tuple(str(a) for a in job.get("assign") or ()),
                    skip_cache=ignore_cache,
                    prepare=False,
                    files=_file_refs(job.get("files"), uploaded, where, line_no),
                    where=where,
                    line=line_no,
                )
                if restrict and not any(spec.sha.startswith(r) for r in restrict):
                    continue
                targets = cli_targets or list(spec.assign) or o_targets or online
                missing = [t for t in targets if t not in known]
                if missing:
                    raise OrchestrationError(
                        f"unknown target node(s): {', '.join(missing)}",
                        path=where,
                        line=int(line) if line is not None else None,
                    )
                if not targets:
                    raise OrchestrationError("no target nodes: none is online", path=where)
                if spec.run_once:
                    targets = targets[:1]
                targets = list(dict.fromkeys(targets))
                files = list(spec.files)
                if spec.options.get("per_node"):
                    # Only the targets' own files are kept, so no other node's can be had.
                    src = str(spec.options.get("src", ""))
                    names = {per_node_name(src, t) for t in targets}
                    files = [f for f in files if f.name in names]
                planned.append(
                    PlannedJob(spec=spec, targets=targets, files=[f.to_dict() for f in files])
                )
            if planned:
                plans.append(
                    (str(orch.get("name") or ""), bool(orch.get("async")) or force_async, planned)
                )
        if not plans:
            raise OrchestrationError("nothing to run (every job was filtered out)", path="<api>")
        return plans

    # ---- node requests -----------------------------------------------------------------
    def on_target_final(self, job_id: str) -> None:
        """A target of the job finished: a QUERY may now be complete."""
        job = self.jobs.jobs.get(job_id)
        if job is not None and job.verb == "QUERY":
            self._maybe_finish_query(job_id)

    def on_query_report(self, identity: str, job_id: str, value: Any) -> None:
        """A node reported its value for a QUERY job."""
        job = self.jobs.jobs.get(job_id)
        if job is None or identity not in job.results or job.verb != "QUERY":
            log.warning("node %s sent a query report for job %s not targeting it", identity, job_id)
            return
        size = len(pack(value))
        if size > self.settings.query_max_bytes:
            log.error(
                "node %s reported a QUERY value of %d bytes for job %s, over the %d byte limit "
                "(--query-max-bytes); its target fails",
                identity,
                size,
                job_id,
                self.settings.query_max_bytes,
            )
            self.jobs.finish(
                identity,
                job.results[identity],
                State.FAILED,
                stderr=f"QUERY value of {size} bytes is over the limit of "
                f"{self.settings.query_max_bytes} (--query-max-bytes)",
            )
            self.on_target_final(job_id)
            return
        job.query[identity] = value
        self.persister.put(JOBS, job.id, job)
        if job.query_done:
            session = self.nodes.sessions.get(identity)
            if session is not None:
                session.link.post(self._qdata(job_id))
        else:
            self._maybe_finish_query(job_id)

    def _qdata(self, job_id: str) -> dict[str, Any]:
        job = self.jobs.jobs[job_id]
        key = job.options["argv"][0]
        return {
            "t": "qdata",
            "id": job_id,
            "data": {node: {key: value} for node, value in job.query.items()},
        }

    def _maybe_finish_query(self, job_id: str) -> None:
        job = self.jobs.jobs[job_id]
        if job.query_done:
            return
        if all(node in job.query or target.state.final for node, target in job.results.items()):
            job.query_done = True
            self.persister.put(JOBS, job.id, job)
            envelope = self._qdata(job_id)
            for node in job.results:
                session = self.nodes.sessions.get(node)
                if session is not None:
                    session.link.post(envelope)

    async def node_request(self, identity: str, method: str, params: dict[str, Any]) -> Any:
        """Answer a node's request; only about jobs that target that node."""
        if method == "chunk":
            return await self._chunk(identity, params)
        if method == "job_status":
            return self._job_status(identity, params)
        raise OrchestrationError(f"unknown node request {method!r}", path="<node>")

    async def _chunk(self, identity: str, params: dict[str, Any]) -> dict[str, Any]:
        job = self.jobs.jobs.get(str(params.get("job")))
        if job is None or identity not in job.results:
            log.warning("node %s asked for a file of a job not targeting it; refused", identity)
            raise OrchestrationError("no such job for this node", path="<node>")
        index, offset = int(params.get("index", -1)), int(params.get("offset", -1))
        if not 0 <= index < len(job.files) or not 0 <= offset <= int(job.files[index]["size"]):
            raise OrchestrationError("no such file or offset in this job", path="<node>")
        if job.options.get("per_node") and job.files[index]["name"] != per_node_name(
            str(job.options.get("src", "")), identity
        ):
            log.warning(
                "node %s asked for %s, which is another node's file; refused",
                identity,
                job.files[index]["name"],
            )
            raise OrchestrationError("that file is not for this node", path="<node>")
        # Clamped: a node asks for at most CHUNK bytes, and a negative size would read it all.
        size = max(1, min(int(params.get("size", CHUNK)), CHUNK))
        sha256 = str(job.files[index].get("sha256", ""))
        data = await self.files.read(sha256, offset, size)
        return {"data": data, "eof": offset + len(data) >= job.files[index]["size"]}

    def _job_status(self, asker: str, params: dict[str, Any]) -> dict[str, Any]:
        """States of a job (by fingerprint) on some nodes, for a JOB_WAIT job of ``asker``.

        A node learns only what an operator let it wait for: the asking job must be a
        JOB_WAIT that targets it, and name that fingerprint and those nodes.
        """
        waiter = self.jobs.jobs.get(str(params.get("job")))
        sha = str(params.get("sha", ""))
        identities = [str(i) for i in params.get("identities") or []]
        if (
            waiter is None
            or asker not in waiter.results
            or waiter.verb != "JOB_WAIT"
            or list(waiter.options.get("argv") or [])[:1] != [sha]
            or not set(identities) <= set(waiter.options.get("identity") or [asker])
        ):
            log.warning(
                "node %s asked for the status of job %s on %s without a JOB_WAIT naming it; "
                "refused",
                asker,
                sha[:12],
                ",".join(identities)[:200],
            )
            raise OrchestrationError("no JOB_WAIT of this node names that job", path="<node>")
        status: dict[str, Any] = {i: None for i in identities}
        for job in self.jobs.by_sha(sha):
            for identity in identities:
                target = job.results.get(identity)
                if status[identity] is None and target is not None and target.state.final:
                    status[identity] = str(target.state)
        return status


def _write_ready(path: str, data: dict[str, Any]) -> None:
    """Tell a supervisor (or the test harness) where we listen, atomically."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)


def _file_refs(raw: object, uploaded: frozenset[str], where: str, line: int) -> list[FileRef]:
    """A job's files from a submit request, each one uploaded on this connection.

    Raises:
        OrchestrationError: malformed entries, or a file the submitter did not upload.
    """
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_JOB_FILES:
        raise OrchestrationError(
            f"files must be a list of at most {MAX_JOB_FILES}", path=where, line=line
        )
    refs = []
    for entry in raw:
        if not isinstance(entry, dict):
            raise OrchestrationError("each file must be a mapping", path=where, line=line)
        name, size, sha256 = entry.get("name"), entry.get("size"), entry.get("sha256")
        if (
            not isinstance(name, str)
            or not 0 < len(name) <= 255
            or "/" in name
            or "\0" in name
            or name in (".", "..")
        ):
            raise OrchestrationError(f"invalid file name {name!r}", path=where, line=line)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise OrchestrationError(f"{name}: invalid size {size!r}", path=where, line=line)
        if check_sha256(sha256) not in uploaded:
            raise OrchestrationError(
                f"{name}: its content was not uploaded on this connection", path=where, line=line
            )
        refs.append(FileRef(name, size, str(sha256)))
    return refs
