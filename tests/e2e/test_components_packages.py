"""End-to-end: PKG with real apt-get against a local repository, and DNF where dnf is absent.

The repository is a directory of .deb files built here with ``dpkg-deb`` and a
``Packages`` index written by this module (so the suite needs nothing beyond
dpkg and apt). apt finds it through a file in ``/etc/apt/sources.list.d``
that the fixture removes afterwards, with the package, its hold and apt's
lists of the repository; the tests run as root.

The cluster is one node on one driver: package managers act on the whole
machine, so three clients on one machine would contend for dpkg's lock, and
the verbs do nothing that depends on the transport.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Cluster
from tests.e2e.component_helpers import by_node, exec_wait, job_results, orch, token

PACKAGE = "directord-test-pkg"
VERSION_FILE = Path(f"/usr/share/{PACKAGE}/VERSION")
SOURCES_DIR = Path("/etc/apt/sources.list.d")
LISTS_DIR = Path("/var/lib/apt/lists")
NODE = "node0"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command of the test's own (not through directord)."""
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=120)


def installed_version() -> str | None:
    """The version of the test package dpkg has installed, or None."""
    proc = sh("dpkg-query", "-W", "-f", "${db:Status-Abbrev}\t${Version}", PACKAGE, check=False)
    status, _, version = proc.stdout.partition("\t")
    return version if proc.returncode == 0 and status[1:2] == "i" else None


@dataclass
class Repo:
    """A flat apt repository (``deb [trusted=yes] file:DIR ./``) served from ``path``."""

    path: Path
    sources: Path

    def publish(self, version: str) -> None:
        """Build the test package at ``version`` and add it to the index."""
        root = self.path / f"build-{version}"
        (root / "DEBIAN").mkdir(parents=True)
        payload = root / VERSION_FILE.relative_to("/")
        payload.parent.mkdir(parents=True)
        payload.write_text(f"{version}\n")
        control = (
            f"Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\n"
            "Maintainer: directord tests <tests@example.invalid>\n"
            "Description: directord's PKG test package\n"
        )
        (root / "DEBIAN" / "control").write_text(control)
        deb = self.path / f"{PACKAGE}_{version}_all.deb"
        sh("dpkg-deb", "--root-owner-group", "--build", str(root), str(deb))
        shutil.rmtree(root)
        data = deb.read_bytes()
        entry = (
            f"{control}Filename: ./{deb.name}\nSize: {len(data)}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n\n"
        )
        with (self.path / "Packages").open("a") as index:
            index.write(entry)
        # apt's fetcher runs as user _apt: everything must be world-readable.
        for item in self.path.iterdir():
            item.chmod(0o644)

    def update_lists(self) -> None:
        """Read this repository's index only: no network, no other list touched."""
        sh(
            "apt-get",
            "update",
            "-q",
            "-o",
            f"Dir::Etc::sourcelist={self.sources}",
            "-o",
            "Dir::Etc::sourceparts=-",
            "-o",
            "APT::Get::List-Cleanup=0",
        )


def forget_package() -> None:
    """Leave dpkg as it was before the tests: no package, no hold."""
    sh("apt-mark", "unhold", PACKAGE, check=False)
    sh("dpkg", "--purge", PACKAGE, check=False)


@pytest.fixture(scope="module")
def repo() -> Iterator[Repo]:
    """The local repository, known to apt for this module only."""
    assert os.geteuid() == 0, "the PKG tests install packages: run them as root"
    forget_package()
    # Not under pytest's 0700 tmp directories: apt's fetcher (user _apt) must read it.
    # Hex only: apt escapes other characters in the names of its list files, and the
    # cleanup below finds them by this name.
    path = Path(tempfile.gettempdir()) / f"directord-test-repo-{token()}"
    path.mkdir()
    path.chmod(0o755)
    sources = SOURCES_DIR / f"directord-test-{token()}.list"
    try:
        sources.write_text(f"deb [trusted=yes] file:{path} ./\n")
        r = Repo(path, sources)
        r.publish("1.0")
        r.update_lists()
        yield r
    finally:
        forget_package()
        sources.unlink(missing_ok=True)
        for stale in LISTS_DIR.glob(f"*{path.name}*"):
            stale.unlink()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A server and one client (node0)."""
    c = Cluster(tmp_path_factory.mktemp("cluster-pkg"), nodes=1, heartbeat=1.0)
    c.start()
    try:
        yield c
    finally:
        c.stop()


def pkg(cluster: Cluster, args: str, *, rc: int = 0) -> dict[str, Any]:
    """Run ``PKG: args`` on the node as an orchestration; its result there."""
    reply = orch(cluster, [{"jobs": [{"PKG": args}]}], "--target", NODE, rc=rc)
    result: dict[str, Any] = job_results(reply, 0)[NODE]
    return result


def test_pkg_installs_upgrades_holds_and_removes_with_apt(node: Cluster, repo: Repo) -> None:
    # Install 1.0; the job is cacheable: the same job again is a cache hit.
    r = pkg(node, PACKAGE)
    assert (r["state"], r["rc"]) == ("success", 0), r
    assert r["stdout"].endswith(f"installed {PACKAGE} 1.0\n")
    assert installed_version() == "1.0"
    assert VERSION_FILE.read_text() == "1.0\n"
    assert pkg(node, PACKAGE)["state"] == "skipped-cache"

    # With 1.1 published and the metadata refreshed, PKG without --latest keeps 1.0 ...
    repo.publish("1.1")
    r = pkg(node, f"--clear-metadata {PACKAGE}")
    assert r["state"] == "success", r
    assert f"changed {PACKAGE}" not in r["stdout"]
    assert installed_version() == "1.0"

    # ... and --latest upgrades it, saying so on stdout (kept by --stdout-arg).
    reply = orch(
        node,
        [
            {
                "jobs": [
                    {"PKG": f"--clear-metadata --latest --stdout-arg pkg_out {PACKAGE}"},
                    {"ECHO": "{{ pkg_out.splitlines()[-1] }}"},
                ]
            }
        ],
        "--target",
        NODE,
    )
    r = job_results(reply, 0)[NODE]
    assert r["state"] == "success", r
    assert f"{PACKAGE} (1.1)" in r["stdout"]  # apt-get's own "Unpacking" line
    assert job_results(reply, 1)[NODE]["stdout"] == f"changed {PACKAGE} 1.0 -> 1.1"
    assert installed_version() == "1.1"
    assert VERSION_FILE.read_text() == "1.1\n"

    # An excluded package is held back: removing it fails, and the hold is released.
    r = pkg(node, f"--absent --retry 0 --exclude {PACKAGE} {PACKAGE}", rc=1)
    assert r["state"] == "failed", r
    assert "Held packages were changed" in r["stderr"]
    assert installed_version() == "1.1"
    assert sh("apt-mark", "showhold").stdout.split() == []

    # --absent removes it; removing it again is a success that changes nothing.
    r = pkg(node, f"--absent {PACKAGE}")
    assert r["state"] == "success", r
    assert r["stdout"].endswith(f"removed {PACKAGE} 1.1\n")
    assert installed_version() is None
    assert not VERSION_FILE.exists()
    r = pkg(node, f"--skip-cache --absent {PACKAGE}")
    assert r["state"] == "success", r
    assert f"removed {PACKAGE}" not in r["stdout"]


def test_pkg_unknown_package_fails_with_apts_message(node: Cluster, repo: Repo) -> None:
    name = f"directord-no-such-pkg-{token()}"
    r = pkg(node, f"--retry 1 {name}", rc=1)
    assert (r["state"], r["rc"]) == ("failed", 100), r
    assert f"Unable to locate package {name}" in r["stderr"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("--foo vim", "PKG: unrecognized option --foo"),
        ("vim --foo", "PKG: '--foo' is not a package name"),
        ("'a;b'", "PKG: 'a;b' is not a package name"),
        ("--exclude=-y vim", "PKG: '-y' is not a package name"),
        ("--latest --absent vim", "not allowed with argument"),
    ],
)
def test_pkg_bad_arguments_are_refused_before_submit(
    node: Cluster, args: str, message: str
) -> None:
    before = len(node.json("manage", "--list-jobs"))
    path = node.root / f"bad-{token()}.yaml"
    path.write_text(f"- jobs:\n  - PKG: {args}\n")
    proc = node.run("orchestrate", str(path), "--wait", rc=2)
    [line] = proc.stderr.strip().splitlines()
    assert message in line, line
    proc = node.run("exec", "--verb", "PKG", "a;b", "--wait", rc=2)
    [line] = proc.stderr.strip().splitlines()
    assert "PKG: 'a;b' is not a package name" in line, line
    assert len(node.json("manage", "--list-jobs")) == before


def test_pkg_rendered_name_that_is_no_package_fails_on_the_node(node: Cluster) -> None:
    tok = token()
    reply = orch(
        node,
        [
            {
                "jobs": [
                    {"ARG": f"bad_{tok} 'x; touch /tmp/pwned-{tok}'"},
                    {"PKG": f"{{{{ bad_{tok} }}}}"},
                ]
            }
        ],
        "--target",
        NODE,
        rc=1,
    )
    r = job_results(reply, 1)[NODE]
    assert r["state"] == "failed", r
    assert "is not a package name" in r["stderr"]
    assert not Path(f"/tmp/pwned-{tok}").exists()


def test_dnf_fails_clearly_where_dnf_is_absent(node: Cluster) -> None:
    assert shutil.which("dnf") is None, "this test expects a node without dnf"
    reply = exec_wait(node, "DNF", "--latest --exclude kernel vim", rc=1)
    r = by_node(reply)[NODE]
    assert (r["state"], r["rc"]) == ("failed", 127), r
    assert r["stderr"].strip() == f"DNF: dnf not found on {NODE}"


@pytest.mark.parametrize("verb", ["PKG", "DNF"])
def test_exec_help_lists_the_package_options(node: Cluster, verb: str) -> None:
    proc = node.run("exec", "--verb", verb, "--exec-help")
    assert proc.stdout.startswith(f"usage: {verb}")
    for option in ("--clear-metadata", "--exclude", "--latest", "--absent", "--retry"):
        assert option in proc.stdout, option
