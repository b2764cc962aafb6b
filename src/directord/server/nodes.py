"""Node registry: who is known, who is online, through which session, and who is rebooting.

A node whose REBOOT succeeded is ``rebooting`` until a new client process of
it registers (its ``agent_start`` differs from the one that ran the REBOOT),
or until the server stops waiting (``rebooting_until``: the REBOOT's seconds
plus ``--reboot-grace``); the dispatcher then settles its jobs.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from directord.protocol import Hello
from directord.server.persist import Persister
from directord.server.records import NodeRecord, rebuild

if TYPE_CHECKING:
    from directord.server.sessions import AgentSession

log = logging.getLogger(__name__)
NS = "nodes"
# A heartbeat's time reaches the datastore at most this often per node: it is
# only shown (``--list-nodes`` after a restart), and a write per heartbeat was
# most of what an idle server spent.
SEEN_PERSIST_INTERVAL = 30.0


class NodeRegistry:
    """Every node ever registered (until purged) and the live sessions."""

    def __init__(self, persister: Persister, reboot_grace: float = 600.0) -> None:
        self._persister = persister
        self.reboot_grace = reboot_grace
        self.records: dict[str, NodeRecord] = {}
        self.sessions: dict[str, AgentSession] = {}
        self._seen_persisted: dict[str, float] = {}

    def load(self, stored: dict[str, dict[str, Any]]) -> None:
        """Adopt stored nodes; all start offline until they reconnect."""
        for identity, data in stored.items():
            rec = rebuild(NodeRecord.from_dict, NS, identity, data)
            if rec is not None:
                rec.online = False
                self.records[identity] = rec

    def attach(self, session: AgentSession, hello: Hello) -> NodeRecord | None:
        """Bind a registered session to its identity; None if the identity is in use."""
        identity = session.identity
        current = self.sessions.get(identity)
        if current is not None and current is not session and not current.link.closed:
            return None
        now = time.time()
        rec = self.records.get(identity) or NodeRecord(identity=identity, first_seen=now)
        if rec.rebooting_until and hello.agent_start != rec.reboot_agent:
            log.info("node %s is back from its reboot", identity)
            rec.rebooting_until = rec.reboot_agent = 0.0
        rec.machine_id = hello.machine_id
        rec.version = hello.version
        rec.driver = hello.driver
        rec.heartbeat_interval = hello.heartbeat_interval
        rec.host_boot = hello.host_boot
        rec.agent_start = hello.agent_start
        rec.last_seen = now
        rec.online = True
        rec.peer = session.link.conn.peer
        self.records[identity] = rec
        self.sessions[identity] = session
        self._persister.put(NS, identity, rec)
        self._seen_persisted[identity] = now
        log.info(
            "node %s joined from %s (driver %s, version %s)",
            identity,
            rec.peer,
            rec.driver,
            rec.version,
        )
        return rec

    def detach(self, session: AgentSession, reason: str) -> bool:
        """Unbind a session that ended; True if its node went offline."""
        identity = session.identity
        if self.sessions.get(identity) is not session:
            return False
        del self.sessions[identity]
        self._seen_persisted.pop(identity, None)  # kept for online nodes only
        rec = self.records.get(identity)
        if rec is not None:
            rec.online = False
            self._persister.put(NS, identity, rec)
        log.info("node %s lost: %s", identity, reason)
        return True

    def touch(self, identity: str, persist: bool = False) -> None:
        """Note a sign of life."""
        rec = self.records.get(identity)
        if rec is not None:
            rec.last_seen = now = time.time()
            if persist and now - self._seen_persisted.get(identity, 0.0) >= SEEN_PERSIST_INTERVAL:
                self._seen_persisted[identity] = now
                self._persister.put(NS, identity, rec)

    def online(self) -> list[str]:
        """Identities with a live session, sorted."""
        return sorted(self.sessions)

    def reachable(self) -> list[str]:
        """Identities online or rebooting (they will be back), sorted: default targets."""
        return sorted(set(self.sessions) | set(self.rebooting()))

    def rebooting(self) -> dict[str, float]:
        """Nodes marked rebooting: identity -> when the server stops waiting for it."""
        return {i: r.rebooting_until for i, r in self.records.items() if r.rebooting_until}

    def mark_rebooting(self, identity: str, seconds: float, started: float | None) -> None:
        """The node goes down for a reboot in ``seconds``; wait for it (plus the grace).

        ``started``: when its REBOOT job started, by the node's clock. A job that
        started before the node's current client did ran under an earlier one: the
        reboot is over (the result was only re-sent), and the node is not marked.
        """
        rec = self.records.get(identity)
        if rec is None:
            return
        if started is not None and started < rec.agent_start:
            log.info("node %s: a REBOOT result older than its client; it is back", identity)
            return
        wait = seconds + self.reboot_grace
        rec.rebooting_until = time.time() + wait
        rec.reboot_agent = rec.agent_start
        self._persister.put(NS, identity, rec)
        log.info("node %s is rebooting; its jobs wait up to %.0fs for it", identity, wait)

    def end_rebooting(self, identity: str) -> None:
        """Stop waiting for a node's return (the deadline passed)."""
        rec = self.records.get(identity)
        if rec is not None and rec.rebooting_until:
            rec.rebooting_until = rec.reboot_agent = 0.0
            self._persister.put(NS, identity, rec)

    def expired(self, now: float) -> list[AgentSession]:
        """Sessions whose node has been silent for three heartbeat intervals."""
        return [s for ident, s in self.sessions.items() if self.records[ident].expiry < now]

    def purge_offline(self) -> int:
        """Forget every node that is not online; returns how many."""
        gone = [i for i, r in self.records.items() if i not in self.sessions]
        for identity in gone:
            del self.records[identity]
            self._persister.delete(NS, identity)
        return len(gone)

    def listing(self) -> list[dict[str, Any]]:
        """Rows for ``manage --list-nodes``."""
        now = time.time()
        rows = []
        for identity in sorted(self.records):
            rec = self.records[identity]
            row = rec.to_dict()
            if rec.rebooting_until:
                row["status"] = "rebooting"
            else:
                row["status"] = "online" if identity in self.sessions else "offline"
            row["host_uptime"] = now - rec.host_boot if rec.host_boot else None
            row["agent_uptime"] = now - rec.agent_start if rec.agent_start else None
            row["expiry"] = rec.expiry
            rows.append(row)
        return rows
