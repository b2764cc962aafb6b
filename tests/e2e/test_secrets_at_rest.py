"""End-to-end: what the client and server keep on disk is private (0600 files, 0700 dirs).

The node cache and journal hold job output and cached args; the server's datastore
holds every job's output. A real server and client start, run a job (so SQLite has
written its -wal and -shm files), and the test reads the modes.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from tests.e2e.component_helpers import by_node, token


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _run_a_secret_job(cluster: Any) -> None:
    reply = cluster.json(
        "exec", "--verb", "RUN", f"--stdout-arg secret_{token()} echo s3cret", "--wait"
    )
    assert {r["state"] for r in by_node(reply).values()} == {"success"}


def test_cache_and_sqlite_datastore_are_private(make_cluster: Any) -> None:
    cluster = make_cluster(nodes=1, start=False)
    # An older install left the node's cache directory and the server's database open.
    old_cache = cluster.root / "cache" / "node0"
    old_cache.mkdir(parents=True)
    old_cache.chmod(0o755)
    (cluster.root / "cache").chmod(0o755)
    db = cluster.root / "directord.db"
    db.touch()
    db.chmod(0o644)
    cluster.start()
    _run_a_secret_job(cluster)

    assert _mode(old_cache) == 0o700
    log = cluster.log("node0").read_text()
    assert f"{old_cache} was mode 0755; now 0700: it holds secrets" in log
    for name in ("cache.db", "cache.db-wal", "cache.db-shm"):
        assert _mode(old_cache / name) == 0o600, name
    for path in (db, Path(f"{db}-wal"), Path(f"{db}-shm")):
        assert _mode(path) == 0o600, path

    # A cache directory the client creates is 0700 from the start (nothing to tighten).
    fresh = make_cluster(nodes=1)
    _run_a_secret_job(fresh)
    for folder in (fresh.root / "cache", fresh.root / "cache" / "node0"):
        assert _mode(folder) == 0o700, folder
    assert "now 0700" not in fresh.log("node0").read_text()


def test_file_datastore_is_private(make_cluster: Any, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cluster = make_cluster(nodes=1, datastore=f"file://{store}")
    _run_a_secret_job(cluster)
    files = [p for p in store.rglob("*") if p.is_file()]
    folders = [store, *(p for p in store.rglob("*") if p.is_dir())]
    assert any(p.suffix == ".json" for p in files)
    assert {str(p): _mode(p) for p in files} == {str(p): 0o600 for p in files}
    assert {str(p): _mode(p) for p in folders} == {str(p): 0o700 for p in folders}
