"""The node's cache and job journal (SQLite under --cache-path)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from directord.agent.cache import ACKED_RETENTION, EVICTABLE, SECTIONS, NodeCache
from directord.errors import ConfigError
from directord.models import State
from directord.protocol import Job, Result


@pytest.fixture
def cache(tmp_path: Path) -> Iterator[NodeCache]:
    c = NodeCache(str(tmp_path))
    try:
        yield c
    finally:
        c.close()


def reopen(cache: NodeCache) -> NodeCache:
    cache.close()
    return NodeCache(str(cache.path.parent))


def committed_rows(cache: NodeCache, sql: str) -> list[tuple]:
    # A separate reader sees only what is committed (WAL lets it read beside the writer).
    db = sqlite3.connect(str(cache.path))
    try:
        return list(db.execute(sql))
    finally:
        db.close()


def test_fresh_cache_is_empty(cache: NodeCache, tmp_path: Path) -> None:
    assert cache.path == tmp_path / "cache.db"
    assert cache.sections == {s: {} for s in SECTIONS}
    assert cache.sha_state("x") is None
    assert cache.parent_failed("p") is False
    assert cache.unacked_ids() == []
    assert cache.dump() == {
        "args": {},
        "envs": {},
        "query": {},
        "jobs": {},
        "parents": {},
        "journal": {},
    }


def test_update_merges_and_survives_reopen(cache: NodeCache) -> None:
    cache.update("args", {"a": 1, "nested": {"l": [1, "two", None], "f": 1.5}})
    cache.update("args", {"b": "ünï"})
    cache.update("args", {"a": 2})
    cache.update("envs", {"PATH_X": "/opt"})
    cache.update("query", {"node1": {"k": "v"}})
    assert cache.sections["args"] == {
        "a": 2,
        "nested": {"l": [1, "two", None], "f": 1.5},
        "b": "ünï",
    }
    cache = reopen(cache)
    try:
        assert cache.sections["args"] == {
            "a": 2,
            "nested": {"l": [1, "two", None], "f": 1.5},
            "b": "ünï",
        }
        assert cache.sections["envs"] == {"PATH_X": "/opt"}
        assert cache.sections["query"] == {"node1": {"k": "v"}}
    finally:
        cache.close()


def test_writes_are_durable_only_after_commit(cache: NodeCache) -> None:
    cache.update("args", {"a": 1})
    cache.set_sha_state("s1", "success")
    assert committed_rows(cache, "SELECT key FROM kv") == []
    assert committed_rows(cache, "SELECT sha FROM shas") == []
    cache.commit()
    assert committed_rows(cache, "SELECT key FROM kv") == [("a",)]
    assert committed_rows(cache, "SELECT sha, state FROM shas") == [("s1", "success")]
    cache.commit()  # nothing pending: harmless


@pytest.mark.parametrize("what", ["args", "envs", "query"])
def test_evict_one_section(cache: NodeCache, what: str) -> None:
    for section in SECTIONS:
        cache.update(section, {"k": section})
    cache.set_sha_state("s", "success")
    cache.set_parent_state("p", "failed")
    cache.evict(what)
    assert cache.sections[what] == {}
    assert all(cache.sections[s] == {"k": s} for s in SECTIONS if s != what)
    assert cache.sha_state("s") == "success" and cache.parent_failed("p")
    cache = reopen(cache)
    try:
        assert cache.sections[what] == {}
        assert all(cache.sections[s] == {"k": s} for s in SECTIONS if s != what)
    finally:
        cache.close()


def test_evict_jobs_and_parents(cache: NodeCache) -> None:
    cache.update("args", {"k": 1})
    cache.set_sha_state("s", "success")
    cache.set_parent_state("p", "failed")
    cache.evict("jobs")
    assert cache.sha_state("s") is None and cache.parent_failed("p")
    cache.evict("parents")
    assert cache.parent_failed("p") is False
    assert cache.sections["args"] == {"k": 1}
    cache = reopen(cache)
    try:
        assert cache.sha_state("s") is None and cache.parent_failed("p") is False
    finally:
        cache.close()


def test_evict_all(cache: NodeCache) -> None:
    for section in SECTIONS:
        cache.update(section, {"k": 1})
    cache.set_sha_state("s", "failed")
    cache.set_parent_state("p", "failed")
    cache.add_job(job("j1"))  # the journal is not part of the cache that can be evicted
    cache.evict("all")
    assert cache.dump()["args"] == {} and cache.dump()["jobs"] == {}
    cache = reopen(cache)
    try:
        dump = cache.dump()
        assert {k: dump[k] for k in ("args", "envs", "query", "jobs", "parents")} == {
            "args": {},
            "envs": {},
            "query": {},
            "jobs": {},
            "parents": {},
        }
        assert cache.job_status("j1") == "queued"
    finally:
        cache.close()


def test_evict_unknown_part(cache: NodeCache) -> None:
    with pytest.raises(ValueError, match="cannot evict 'nope'"):
        cache.evict("nope")
    assert "all" in EVICTABLE


def test_sha_and_parent_states(cache: NodeCache) -> None:
    cache.set_sha_state("s1", "success")
    cache.set_sha_state("s2", "failed")
    cache.set_sha_state("s1", "timeout")
    cache.set_parent_state("p1", "running")
    cache.set_parent_state("p2", "failed")
    assert cache.sha_state("s1") == "timeout" and cache.sha_state("s2") == "failed"
    assert cache.parent_failed("p1") is False and cache.parent_failed("p2") is True
    cache = reopen(cache)
    try:
        assert cache.sha_state("s1") == "timeout"
        assert cache.parent_failed("p2") is True and cache.parent_failed("p1") is False
        assert cache.dump()["jobs"] == {"s1": "timeout", "s2": "failed"}
        assert cache.dump()["parents"] == {"p1": "running", "p2": "failed"}
    finally:
        cache.close()


def job(job_id: str, **fields: Any) -> Job:
    return Job(
        id=job_id,
        parent="p",
        lane="",
        verb=fields.pop("verb", "RUN"),
        sha="s",
        options=fields.pop("options", {}),
        timeout=fields.pop("timeout", 5.0),
        **fields,
    )


def test_journal_transitions(cache: NodeCache) -> None:
    first = job("j1", options={"argv": "echo ü"})
    assert cache.job_status("j1") is None
    cache.add_job(first)
    cache.add_job(job("j2", verb="ECHO"))
    assert cache.job_status("j1") == "queued"
    assert cache.queued_jobs() == [first, job("j2", verb="ECHO")]
    cache.set_running("j1", 1.0)
    assert cache.job_status("j1") == "running"
    assert cache.ids_with_status("running") == ["j1"]
    assert [j.id for j in cache.queued_jobs()] == ["j2"]
    result = Result(id="j1", state=State.SUCCESS, rc=0, stdout="ü\n")
    cache.set_done(result)
    assert cache.job_status("j1") == "done"
    assert cache.result_of("j1") == result
    assert cache.unacked_results() == [result]
    assert sorted(cache.unacked_ids()) == ["j1", "j2"]
    cache.set_acked(["j1"])
    assert cache.job_status("j1") == "acked"
    assert cache.unacked_results() == []
    assert cache.result_of("j1") == result  # the result stays, for a server that asks again
    assert cache.unacked_ids() == ["j2"]
    assert cache.dump()["journal"] == {"acked": 1, "queued": 1}


def test_journal_survives_reopen(cache: NodeCache) -> None:
    for job_id in "qrda":
        cache.add_job(job(job_id))
    cache.set_running("r", 1.0)
    cache.set_done(Result(id="d", state=State.FAILED))
    cache.set_done(Result(id="a", state=State.SUCCESS))
    cache.set_acked(["a"])
    cache = reopen(cache)
    try:
        assert [cache.job_status(i) for i in "qrda"] == ["queued", "running", "done", "acked"]
        assert cache.queued_jobs() == [job("q")]
        assert cache.ids_with_status("running") == ["r"]
        assert cache.unacked_results() == [Result(id="d", state=State.FAILED)]
        assert sorted(cache.unacked_ids()) == ["d", "q", "r"]
    finally:
        cache.close()


def test_journal_reads_what_an_older_agent_wrote(cache: NodeCache) -> None:
    # The journal of the previous release held plain msgpack maps: the same keys.
    import msgpack

    old = {
        "t": "job",
        "id": "o",
        "parent": "",
        "lane": "",
        "verb": "RUN",
        "sha": "x",
        "options": {"argv": "true"},
        "timeout": 5.0,
        "skip_cache": False,
        "stream": False,
    }
    cache._w("INSERT INTO jobs VALUES (?, ?, 'queued', NULL, 0)", ("o", msgpack.packb(old)))
    cache._w("INSERT INTO jobs VALUES ('bad', X'c1', 'queued', NULL, 0)", ())
    assert [j.id for j in cache.queued_jobs()] == ["o"]  # the damaged one is skipped


def test_a_job_id_is_journaled_once(cache: NodeCache) -> None:
    cache.add_job(job("j1"))
    with pytest.raises(sqlite3.IntegrityError):
        cache.add_job(job("j1"))


def test_old_acked_jobs_are_forgotten_on_open(cache: NodeCache) -> None:
    for job_id in ("old", "recent", "old-unacked"):
        cache.add_job(job(job_id))
    cache.set_acked(["old", "recent"])
    cache.commit()
    db = sqlite3.connect(str(cache.path))
    db.execute(
        "UPDATE jobs SET ts=? WHERE id IN ('old', 'old-unacked')",
        (time.time() - ACKED_RETENTION - 60,),
    )
    db.commit()
    db.close()
    cache = reopen(cache)
    try:
        assert cache.job_status("old") is None
        assert cache.job_status("recent") == "acked"
        assert cache.job_status("old-unacked") == "queued"  # never dropped while unacked
    finally:
        cache.close()


def test_unusable_cache_path_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError) as info:
        NodeCache(str(blocker / "sub"))
    assert info.value.key == "cache_path"


def test_a_running_client_forgets_old_acked_jobs_a_bounded_batch_at_a_time(
    cache: NodeCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from directord.agent import cache as cache_module

    monkeypatch.setattr(cache_module, "PRUNE_ROWS", 3)
    for job_id in ("a", "b", "old-unacked", "c", "recent"):
        cache.add_job(job(job_id))
    cache.set_acked(["a", "b", "c", "recent"])
    cache.commit()
    cache._db.execute(
        "UPDATE jobs SET ts=? WHERE id != 'recent'", (time.time() - ACKED_RETENTION - 60,)
    )
    assert cache.prune_acked() is None  # the open pruned a moment ago: not due yet
    assert cache.prune_acked(force=True) == 2  # a and b: the 3 oldest rows hold 2 acked
    cache.commit()
    assert committed_rows(cache, "SELECT id FROM jobs ORDER BY rowid") == [
        ("old-unacked",),
        ("c",),
        ("recent",),
    ]
    assert cache.prune_acked(force=True) == 1  # c; an unacked job is never dropped
    assert cache.job_status("old-unacked") == "queued"
    assert cache.job_status("recent") == "acked"
