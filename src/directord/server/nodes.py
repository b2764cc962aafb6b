"""Node registry: who is known, who is online, and through which session."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from directord.protocol import Hello
from directord.server.persist import Persister
from directord.server.records import NodeRecord

if TYPE_CHECKING:
    from directord.server.sessions import AgentSession

log = logging.getLogger(__name__)
NS = "nodes"


class NodeRegistry:
    """Every node ever registered (until purged) and the live sessions."""

    def __init__(self, persister: Persister) -> None:
        self._persister = persister
        self.records: dict[str, NodeRecord] = {}
        self.sessions: dict[str, AgentSession] = {}

    def load(self, stored: dict[str, dict[str, Any]]) -> None:
        """Adopt stored nodes; all start offline until they reconnect."""
        for identity, data in stored.items():
            rec = NodeRecord.from_dict(data)
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
            rec.last_seen = time.time()
            if persist:
                self._persister.put(NS, identity, rec)

    def online(self) -> list[str]:
        """Identities with a live session, sorted."""
        return sorted(self.sessions)

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
            row["status"] = "online" if identity in self.sessions else "offline"
            row["host_uptime"] = now - rec.host_boot if rec.host_boot else None
            row["agent_uptime"] = now - rec.agent_start if rec.agent_start else None
            row["expiry"] = rec.expiry
            rows.append(row)
        return rows
