"""The node's persistent cache and job journal (one SQLite file under --cache-path).

Cache: ``args``, ``envs`` and ``query`` mappings, the last state of every job
fingerprint (sha) and every orchestration (parent) seen here. Journal: every
job received, with its status (``queued`` -> ``running`` -> ``done`` ->
``acked``) and its result, and when a running job started, so that a
restarted client resumes queued jobs, re-attaches to jobs it was running,
resends results the server has not acknowledged, and never runs a job id
twice.

Writes join one open transaction; :meth:`commit` is called before
acknowledging jobs and before starting each one, so the journal on disk is
never behind what the server or the running process believe.

Job output and cached args are secrets: the directory is 0700 (tightened,
and logged, if an older install left it wider) and ``cache.db`` with its
``-wal`` and ``-shm`` files 0600 from their creation.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from directord.errors import ConfigError
from directord.protocol import Job, Result, encode
from directord.security.private import private_directory, private_file

log = logging.getLogger(__name__)

SECTIONS = ("args", "envs", "query")
EVICTABLE = ("args", "envs", "query", "jobs", "parents", "all")
ACKED_RETENTION = 7 * 24 * 3600.0
# A running client forgets old acknowledged jobs this often, looking at the oldest
# this many rows at a time: a bounded scan (a millisecond or two), never a stall
# over a large journal, and up to 300,000 jobs an hour.
PRUNE_INTERVAL = 60.0
PRUNE_ROWS = 5000


class NodeCache:
    """Cache and journal of one client."""

    def __init__(self, cache_path: str, *, read_only: bool = False) -> None:
        self.path = Path(cache_path) / "cache.db"
        if read_only:
            # An operator's `manage --dump-cache` beside a running client: look only.
            try:
                self._db = sqlite3.connect(
                    f"file:{self.path}?mode=ro", uri=True, isolation_level=None
                )
                self._load()
            except sqlite3.Error as exc:
                raise ConfigError(
                    f"cannot read cache {self.path}: {exc}", key="cache_path"
                ) from None
            return
        try:
            private_directory(self.path.parent, tighten=True)
            # SQLite gives the -wal and -shm files the mode of the database file.
            private_file(self.path)
            for leftover in ("-wal", "-shm"):
                private_file(f"{self.path}{leftover}", create=False)
            self._db = sqlite3.connect(str(self.path), isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                "CREATE TABLE IF NOT EXISTS kv (section TEXT, key TEXT, value TEXT,"
                " PRIMARY KEY (section, key));"
                "CREATE TABLE IF NOT EXISTS shas (sha TEXT PRIMARY KEY, state TEXT, ts REAL);"
                "CREATE TABLE IF NOT EXISTS parents (id TEXT PRIMARY KEY, state TEXT, ts REAL);"
                "CREATE TABLE IF NOT EXISTS jobs (id TEXT PRIMARY KEY, body BLOB, status TEXT,"
                " result BLOB, ts REAL);"
                # No index on status: keeping one cost every job's commit two to
                # four more pages, and only a start reads by status (a scan of
                # at most a week of jobs). Caches written before lose theirs.
                "DROP INDEX IF EXISTS jobs_status;"
            )
            self._db.execute(
                "DELETE FROM jobs WHERE status='acked' AND ts < ?", (time.time() - ACKED_RETENTION,)
            )
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open cache {self.path}: {exc}", key="cache_path") from None
        self._load()

    def _load(self) -> None:
        self.sections: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        for section, key, value in self._db.execute("SELECT section, key, value FROM kv"):
            if section in self.sections:
                self.sections[section][key] = json.loads(value)
        self._shas: dict[str, str] = dict(self._db.execute("SELECT sha, state FROM shas"))
        self._parents: dict[str, str] = dict(self._db.execute("SELECT id, state FROM parents"))
        self._in_tx = False
        self._after_commit: list[Callable[[], None]] = []
        self._pruned = time.monotonic()  # a writer's open has just pruned

    # ---- transactions ------------------------------------------------------------------
    def _w(self, sql: str, params: tuple[Any, ...]) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True
        self._db.execute(sql, params)

    def commit(self) -> None:
        """Make every write so far durable against a crash of this process."""
        if self._in_tx:
            self._db.execute("COMMIT")
            self._in_tx = False
        if self._after_commit:
            done, self._after_commit = self._after_commit, []
            for action in done:
                action()

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once what is written so far is durable."""
        self._after_commit.append(action)

    def close(self) -> None:
        """Commit and close."""
        self.commit()
        self._db.close()

    # ---- args / envs / query -------------------------------------------------------------
    def update(self, section: str, values: dict[str, Any]) -> None:
        """Merge values into a section."""
        store = self.sections[section]
        for key, value in values.items():
            store[key] = value
            self._w(
                "INSERT OR REPLACE INTO kv VALUES (?, ?, ?)",
                (section, key, json.dumps(value, default=str)),
            )

    def evict(self, what: str) -> None:
        """Clear a part of the cache: args, envs, query, jobs, parents or all."""
        if what not in EVICTABLE:
            raise ValueError(f"cannot evict {what!r}; one of {', '.join(EVICTABLE)}")
        parts = (*SECTIONS, "jobs", "parents") if what == "all" else (what,)
        for part in parts:
            if part in SECTIONS:
                self.sections[part].clear()
                self._w("DELETE FROM kv WHERE section=?", (part,))
            elif part == "jobs":
                self._shas.clear()
                self._w("DELETE FROM shas", ())
            elif part == "parents":
                self._parents.clear()
                self._w("DELETE FROM parents", ())

    # ---- fingerprints and parents --------------------------------------------------------
    def sha_state(self, sha: str) -> str | None:
        """Last state of a job fingerprint here."""
        return self._shas.get(sha)

    def set_sha_state(self, sha: str, state: str) -> None:
        """Record a fingerprint's last state."""
        if self._shas.get(sha) == state:
            return
        self._shas[sha] = state
        self._w("INSERT OR REPLACE INTO shas VALUES (?, ?, ?)", (sha, state, time.time()))

    def parent_failed(self, parent: str) -> bool:
        """True once a job of this orchestration failed here."""
        return self._parents.get(parent) == "failed"

    def set_parent_state(self, parent: str, state: str) -> None:
        """Record an orchestration's state here."""
        if self._parents.get(parent) != state:
            self._parents[parent] = state
            self._w("INSERT OR REPLACE INTO parents VALUES (?, ?, ?)", (parent, state, time.time()))

    # ---- journal -------------------------------------------------------------------------
    def job_status(self, job_id: str) -> str | None:
        """Journal status of a job id, or None if never seen."""
        row = self._db.execute("SELECT status FROM jobs WHERE id=?", (job_id,)).fetchone()
        return row[0] if row else None

    def add_job(self, job: Job) -> None:
        """Journal a received job as queued."""
        self._w(
            "INSERT INTO jobs VALUES (?, ?, 'queued', NULL, ?)", (job.id, encode(job), time.time())
        )

    def add_cancelled(self, result: Result) -> None:
        """Journal the result of a job cancelled before it arrived (it will never run)."""
        self._w(
            "INSERT OR REPLACE INTO jobs VALUES (?, NULL, 'done', ?, ?)",
            (result.id, encode(result), time.time()),
        )

    def set_running(self, job_id: str, started: float) -> None:
        """Journal that a job started (its deadline counts from ``started``)."""
        self._w("UPDATE jobs SET status='running', ts=? WHERE id=?", (started, job_id))

    def set_done(self, result: Result) -> None:
        """Journal a job's result (not yet acknowledged by the server)."""
        self._w(
            "UPDATE jobs SET status='done', result=?, ts=? WHERE id=?",
            (encode(result), time.time(), result.id),
        )

    def running_jobs(self) -> list[tuple[Job, float]]:
        """The jobs that were running when the agent stopped, with their start, oldest first."""
        rows = self._db.execute(
            "SELECT id, body, ts FROM jobs WHERE status='running' ORDER BY rowid"
        )
        return [
            (job, started)
            for job_id, blob, started in rows
            if (job := _decode(_JOB, blob, job_id)) is not None
        ]

    def set_acked(self, job_ids: list[str]) -> None:
        """The server stored these results."""
        self._w_many(
            "UPDATE jobs SET status='acked', body=NULL WHERE id=?", [(i,) for i in job_ids]
        )

    def prune_acked(self, *, force: bool = False) -> int | None:
        """Forget acknowledged jobs past ACKED_RETENTION among the oldest rows; how many.

        A client that runs for weeks would otherwise keep every job it ever ran:
        the start forgets them, and so does this, once per PRUNE_INTERVAL (or
        now, with ``force``), looking at PRUNE_ROWS rows at most. None when it
        is not due; otherwise the caller commits.
        """
        if not force and time.monotonic() - self._pruned < PRUNE_INTERVAL:
            return None
        self._pruned = time.monotonic()
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True
        cursor = self._db.execute(
            "DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs ORDER BY rowid LIMIT ?)"
            " AND status='acked' AND ts < ?",
            (PRUNE_ROWS, time.time() - ACKED_RETENTION),
        )
        return cursor.rowcount

    def _w_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        if not self._in_tx:
            self._db.execute("BEGIN")
            self._in_tx = True
        self._db.executemany(sql, rows)

    def ids_with_status(self, status: str) -> list[str]:
        """Ids of the journal's jobs in a status, oldest first."""
        rows = self._db.execute("SELECT id FROM jobs WHERE status=? ORDER BY rowid", (status,))
        return [row[0] for row in rows]

    def queued_jobs(self) -> list[Job]:
        """The jobs received and not yet started, oldest first."""
        rows = self._db.execute("SELECT id, body FROM jobs WHERE status='queued' ORDER BY rowid")
        return [job for job_id, blob in rows if (job := _decode(_JOB, blob, job_id)) is not None]

    def unacked_results(self) -> list[Result]:
        """Results the server has not acknowledged yet, oldest first."""
        rows = self._db.execute("SELECT id, result FROM jobs WHERE status='done' ORDER BY rowid")
        return [r for job_id, blob in rows if (r := _decode(_RESULT, blob, job_id)) is not None]

    def result_of(self, job_id: str) -> Result | None:
        """Stored result of a finished job, if still kept."""
        row = self._db.execute("SELECT result FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _decode(_RESULT, row[0], job_id) if row else None

    def unacked_ids(self) -> list[str]:
        """Ids of every job not yet acknowledged as finished by the server."""
        return [r[0] for r in self._db.execute("SELECT id FROM jobs WHERE status!='acked'")]

    def dump(self) -> dict[str, Any]:
        """Everything, for ``manage --dump-cache``."""
        return {
            **{s: dict(v) for s, v in self.sections.items()},
            "jobs": dict(self._shas),
            "parents": dict(self._parents),
            "journal": dict(self._db.execute("SELECT status, count(*) FROM jobs GROUP BY status")),
        }


_JOB = msgspec.msgpack.Decoder(Job)
_RESULT = msgspec.msgpack.Decoder(Result)
T = TypeVar("T")


def _decode(decoder: msgspec.msgpack.Decoder[T], blob: bytes | None, job_id: str) -> T | None:
    """A journal entry; a damaged one is logged and skipped, never fatal."""
    if not blob:
        return None
    try:
        return decoder.decode(blob)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.error("journal entry of job %s is damaged (%s); skipped", job_id, exc)
        return None
