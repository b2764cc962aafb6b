"""Datastores and the node cache create their files 0600 in 0700 directories.

Real files on disk, without the processes around them (the end-to-end twin is
tests/e2e/test_secrets_at_rest.py).
"""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest

from directord.agent.cache import NodeCache
from directord.datastores.file import FileDatastore
from directord.datastores.sqlite import SqliteDatastore
from directord.errors import ConfigError


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_sqlite_datastore_creates_its_directories_0700_and_files_0600(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    path = shared / "new" / "state" / "d.db"

    async def go() -> None:
        store = SqliteDatastore(f"sqlite://{path}")
        await store.start()
        try:
            await store.apply({"results": {"j": {"stdout": "s3cret"}}})
            for name in ("d.db", "d.db-wal", "d.db-shm"):
                assert _mode(path.parent / name) == 0o600, name
        finally:
            await store.close()

    asyncio.run(go())
    assert _mode(shared / "new") == 0o700
    assert _mode(shared / "new" / "state") == 0o700
    # A directory that was already there may be shared: it is left as it was.
    assert _mode(shared) == 0o755


def test_sqlite_datastore_tightens_files_left_open(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    for name in ("d.db", "d.db-wal", "d.db-shm"):
        (tmp_path / name).touch(mode=0o644)
        (tmp_path / name).chmod(0o644)

    async def go() -> None:
        store = SqliteDatastore(f"sqlite://{path}")
        await store.start()
        await store.close()

    asyncio.run(go())
    for name in ("d.db", "d.db-wal", "d.db-shm"):
        if (tmp_path / name).exists():  # SQLite removes the -wal and -shm on a clean close
            assert _mode(tmp_path / name) == 0o600, name


def test_file_datastore_is_0700_and_0600_and_tightens_its_root(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    root.mkdir(mode=0o750)
    root.chmod(0o750)
    # A temporary file an older version left world-readable is not reused as it was.
    (root / "jobs").mkdir()
    (root / "jobs" / "j.tmp").touch(mode=0o644)
    (root / "jobs" / "j.tmp").chmod(0o644)

    async def go() -> None:
        store = FileDatastore(f"file://{root}")
        await store.start()
        await store.apply({"jobs": {"j": {"a": 1}}, "results": {"r": {"stdout": "s3cret"}}})
        await store.close()

    with caplog.at_level(logging.INFO, logger="directord.security.private"):
        asyncio.run(go())
    assert _mode(root) == 0o700
    assert f"{root} was mode 0750; now 0700" in caplog.text
    assert _mode(root / "results") == 0o700
    assert _mode(root / "results" / "r.json") == 0o600
    assert _mode(root / "jobs" / "j.json") == 0o600


def test_node_cache_refuses_a_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ConfigError, match="shared directory") as info:
        NodeCache(str(shared))
    assert str(shared) in str(info.value)
    assert _mode(shared) == 0o1777
