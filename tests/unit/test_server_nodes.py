"""The node registry's writes: a heartbeat reaches the datastore at most every 30 s a node."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from directord.datastores.memory import MemoryDatastore
from directord.protocol import Hello
from directord.server import nodes
from directord.server.nodes import NodeRegistry
from directord.server.persist import Persister, Storable


class RecordingPersister(Persister):
    """Counts what would be written, by key."""

    def __init__(self) -> None:
        super().__init__(MemoryDatastore())
        self.writes: list[str] = []

    def put(self, namespace: str, key: str, record: Storable) -> None:
        self.writes.append(key)

    def delete(self, namespace: str, key: str) -> None:
        self.writes.append(f"-{key}")


def attach(registry: NodeRegistry, identity: str) -> Any:
    session = SimpleNamespace(
        identity=identity, link=SimpleNamespace(closed=False, conn=SimpleNamespace(peer="p"))
    )
    assert registry.attach(session, Hello(proto=1, identity=identity)) is not None  # type: ignore[arg-type]
    return session


def test_heartbeats_are_written_at_most_every_interval_and_a_loss_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    persister = RecordingPersister()
    registry = NodeRegistry(persister)
    session = attach(registry, "n0")
    assert persister.writes == ["n0"]  # the join
    for _ in range(5):
        registry.touch("n0", persist=True)
    assert persister.writes == ["n0"]  # within 30 s of the join: memory only
    seen = registry.records["n0"].last_seen
    monkeypatch.setattr(nodes, "SEEN_PERSIST_INTERVAL", 0.0)
    registry.touch("n0", persist=True)
    assert persister.writes == ["n0", "n0"] and registry.records["n0"].last_seen >= seen
    monkeypatch.setattr(nodes, "SEEN_PERSIST_INTERVAL", 30.0)
    registry.touch("n0", persist=True)
    assert registry.detach(session, "gone")
    assert persister.writes == ["n0", "n0", "n0"]  # the loss, with the latest last_seen
    assert not registry._seen_persisted  # nothing kept for a node that is offline
