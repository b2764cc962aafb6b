"""End-to-end: a local user on a node plants symlinks where WORKDIR and COPY write.

The client runs as root on a real node, so a symlink at a job's destination (or at
a temporary name next to it) must never hand root's write, chown or chmod to the
file it points to. Here the test process is the same user as the client, so each
test points the symlink at a victim in its own directory and checks the victim's
content, mode and owner afterwards.

For COPY, a symlink at DEST is replaced by the copied file, atomically: the rename
replaces the name itself, so the victim is untouched, DEST ends up holding what
the operator asked for, and a user who plants links cannot make jobs fail. WORKDIR
cannot replace a symlink by a directory in one step, so it fails the job naming
the path.

The attacks do not depend on the driver (they happen on the node's disk), so one
gRPC cluster serves the module.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import Cluster
from tests.e2e.component_helpers import by_node, exec_wait, token

# Not the test's own uid/gid, so a chown that reaches the victim shows.
OTHER = 65534


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server and one client (node0) on gRPC."""
    c = Cluster(tmp_path_factory.mktemp("attacks"), nodes=1, heartbeat=1.0)
    c.start()
    try:
        yield c
    finally:
        c.stop()


@dataclass(frozen=True)
class Snapshot:
    """What must not change about a victim."""

    content: bytes | None
    mode: int
    uid: int
    gid: int

    @classmethod
    def of(cls, path: Path) -> Snapshot:
        st = path.stat()
        content = path.read_bytes() if path.is_file() else None
        return cls(content, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)


def _victim_file(root: Path, content: bytes) -> Path:
    victim = root / f"victim-{token()}"
    victim.write_bytes(content)
    victim.chmod(0o600)
    return victim


def _regular(path: Path) -> os.stat_result:
    st = path.lstat()
    assert stat.S_ISREG(st.st_mode), f"{path} is not a regular file"
    return st


@pytest.mark.parametrize("blueprint", [False, True], ids=["stream", "blueprint"])
def test_copy_replaces_a_symlink_at_dest_whose_target_matches(
    node: Cluster, blueprint: bool
) -> None:
    # The victim holds exactly what is being copied, so a check that follows the link
    # would call DEST "unchanged" and chown/chmod the victim instead.
    content = f"public content {token()}\n".encode()
    src = node.root / f"src-{token()}.conf"
    src.write_bytes(content)
    victim = _victim_file(node.root, content)
    before = Snapshot.of(victim)
    dest = node.root / f"dest-{token()}.conf"
    dest.symlink_to(victim)
    flags = "--blueprint " if blueprint else ""
    reply = exec_wait(
        node,
        "COPY",
        f"{flags}--chown {OTHER}:{OTHER} --chmod 0644 {src} {dest}",
        "--target",
        "node0",
    )
    r = by_node(reply)["node0"]
    assert r["state"] == "success", r
    assert Snapshot.of(victim) == before
    assert r["stdout"] == f"copied {dest}"
    st = _regular(dest)
    assert dest.read_bytes() == content
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o644, OTHER, OTHER)
    assert sorted(p.name for p in node.root.glob(".directord-*")) == []


def test_copy_blueprint_ignores_a_symlink_at_the_old_temporary_name(node: Cluster) -> None:
    # The blueprint used to write through the fixed name DEST.directord-tmp.
    src = node.root / f"bp-{token()}.j2"
    src.write_text("rendered for {{ identity }}\n")
    victim = _victim_file(node.root, b"root's secret\n")
    before = Snapshot.of(victim)
    dest = node.root / f"bp-dest-{token()}.conf"
    planted = Path(f"{dest}.directord-tmp")
    planted.symlink_to(victim)
    reply = exec_wait(node, "COPY", f"--blueprint --chmod 0640 {src} {dest}", "--target", "node0")
    r = by_node(reply)["node0"]
    assert r["state"] == "success", r
    assert Snapshot.of(victim) == before
    st = _regular(dest)
    assert dest.read_text() == "rendered for node0\n"
    assert stat.S_IMODE(st.st_mode) == 0o640
    # The planted link is left as it was: the job never used that name.
    assert planted.is_symlink() and os.readlink(planted) == str(victim)


@pytest.mark.parametrize("kind", ["directory", "file"])
def test_workdir_refuses_a_symlink_where_the_directory_should_be(node: Cluster, kind: str) -> None:
    if kind == "directory":
        victim = node.root / f"victim-dir-{token()}"
        victim.mkdir(mode=0o700)
        victim.chmod(0o700)
    else:
        victim = _victim_file(node.root, b"root:x:0:0\n")
    before = Snapshot.of(victim)
    path = node.root / f"wd-{token()}"
    path.symlink_to(victim)
    reply = exec_wait(
        node,
        "WORKDIR",
        f"--chown {OTHER}:{OTHER} --chmod 0777 {path}",
        "--target",
        "node0",
        rc=1,
    )
    r = by_node(reply)["node0"]
    assert r["state"] == "failed"
    assert r["stderr"] == f"WORKDIR {path}: is a symbolic link; refusing to follow it"
    assert Snapshot.of(victim) == before
    assert path.is_symlink()
