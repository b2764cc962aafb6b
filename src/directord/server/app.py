"""The server: wires the transport, the datastore and the server's parts, and runs them.

Parts, each depending only on what it uses:

* NodeRegistry (nodes.py): who is known, who is online, through which session.
* JobBook (jobs.py): jobs, their targets' results, watchers.
* Dispatcher (dispatch.py): jobs to nodes; lost and undelivered targets.
* ParkingLot (parking.py): jobs waiting in a broker for absent nodes.
* ComponentHooks (hooks.py): what nodes ask and report about their jobs.
* Submissions (submit.py): the API's ``submit``.
* AgentSession (sessions.py): one node's connection; APIServer and ApiMethods
  (api.py, api_methods.py): the users'.
* FileStore (filestore.py), Persister (persist.py): files and records on disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from directord import __version__
from directord.components import preload
from directord.config import Settings
from directord.datastores import Datastore, open_datastore
from directord.errors import ConfigError
from directord.protocol import FROM_NODE
from directord.server.api import APIServer
from directord.server.api_methods import ApiMethods, ApiParts
from directord.server.dispatch import Dispatcher
from directord.server.filestore import FileStore
from directord.server.hooks import ComponentHooks
from directord.server.jobs import JOBS, PARENTS, RESULTS, JobBook
from directord.server.nodes import NS as NODES
from directord.server.nodes import NodeRegistry
from directord.server.parking import NS as PARKED
from directord.server.parking import ParkingLot
from directord.server.persist import Persister
from directord.server.proxies import UnitProxies
from directord.server.sessions import AgentSession, SessionParts
from directord.server.submit import Submissions
from directord.transports import Connection, Link, Transport, load_transport

log = logging.getLogger(__name__)


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
        self.files = FileStore.for_settings(settings.file_store, settings.datastore)
        self.persister = Persister(self.store)
        self.nodes = NodeRegistry(self.persister, settings.reboot_grace)
        self.jobs = JobBook(self.persister, settings.job_timeout_grace, settings.job_retention)
        self.parking = ParkingLot(
            self.transport, self.jobs, self.persister, lambda i: i in self.nodes.sessions
        )
        self.dispatcher = Dispatcher(
            self.jobs,
            self.nodes,
            self.parking,
            lambda job_id: self.hooks.on_target_final(job_id),
            settings.heartbeat_interval,
        )
        self.hooks = ComponentHooks(
            self.jobs,
            self.files,
            self.persister,
            self.dispatcher.send_to,
            settings.query_max_bytes,
            self.nodes.mark_rebooting,
        )
        self.submissions = Submissions(self.nodes, self.jobs, self.persister, self.dispatcher)
        self.proxies = UnitProxies(self.submissions, self.jobs, settings.unit_proxy_allow)
        allowed = frozenset(n.strip() for n in settings.allowed_node_names.split(",") if n.strip())
        self._session_parts = SessionParts(
            nodes=self.nodes,
            jobs=self.jobs,
            persister=self.persister,
            parking=self.parking,
            dispatcher=self.dispatcher,
            hooks=self.hooks,
            proxies=self.proxies,
            admit=lambda identity: _admit(allowed, identity),
        )
        methods = ApiMethods(
            ApiParts(
                nodes=self.nodes,
                jobs=self.jobs,
                persister=self.persister,
                files=self.files,
                submissions=self.submissions,
                address=lambda: self.address,
                cancel=self.dispatcher.cancel,
            )
        )
        self.api = APIServer(settings, methods, self.files, activated.get("api"))
        self.address = ""
        self._sessions: set[AgentSession] = set()
        self._stopped = asyncio.Event()

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
        self.dispatcher.start()
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
                "docs/security.md), listen on 127.0.0.1, or pass --insecure to accept this",
                key="insecure",
            )
        log.warning("--insecure: %s", exposure)

    async def wait_closed(self) -> None:
        """Block until :meth:`close` is called."""
        await self._stopped.wait()

    async def close(self) -> None:
        """Stop everything this server started; pending writes are flushed."""
        await self.dispatcher.close()
        await self.api.close()
        await self.parking.close()
        for session in list(self._sessions):
            await session.link.close()
        await self.transport.close()
        await self.persister.close()
        await self.store.close()
        self.files.close()
        self._stopped.set()

    async def _on_connection(self, conn: Connection) -> None:
        session = AgentSession(self._session_parts, Link(conn, FROM_NODE, f"node@{conn.peer}"))
        self._sessions.add(session)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)


def _admit(allowed: frozenset[str], identity: str) -> str | None:
    """Why an identity may not register (not on ``--allowed-node-names``), or None."""
    if allowed and identity not in allowed:
        return f"identity {identity!r} is not in allowed_node_names"
    return None


def _write_ready(path: str, data: dict[str, Any]) -> None:
    """Tell a supervisor (or the test harness) where we listen, atomically."""
    tmp = f"{path}.tmp"
    Path(tmp).write_text(json.dumps(data) + "\n")
    os.replace(tmp, path)
