"""Real systemd nodes for the tests: systemd-nspawn containers booted from a Debian rootfs.

Issue 11's tests need systemd as PID 1 on the nodes; the machines running them do
not boot with systemd, and have no host D-Bus and no machined. What works here
(see ../shared/recipes/systemd-nspawn.md):

- ``.ci/rootfs.sh`` builds or reuses a Debian minbase rootfs and prints its directory
  (``rootfs()`` runs it once per test run).
- Each container boots it with ``--volatile=overlay`` (a throwaway tmpfs upper layer,
  so any number boot from one rootfs at once), ``--register=no --keep-unit`` (no host
  bus to ask for a scope), ``--console=pipe`` (its console goes to a log file) and its
  own ``--uuid`` (systemd takes the machine id from it).
- The host's Python (``sys.base_prefix``) and the project tree are bind-mounted
  read-only at the same paths, so a ``directord client`` inside runs the code under test
  with the venv's interpreter.
- Commands run inside through ``nsenter -t <pid1> -a``; a long-running program runs as
  a transient unit of the container's systemd (``systemd-run --unit``), so nsenter
  returns at once and the container can still shut down.
- The container's system bus is reachable from the host at
  ``unix:path=/proc/<pid1>/root/run/dbus/system_bus_socket`` (``Container.bus_address``).
- Each nspawn process starts in a cgroup of its own (``directord-ci/<name>`` under the
  name=systemd and unified hierarchies): with ``--keep-unit`` nspawn creates its
  ``payload/`` and ``supervisor/`` cgroups inside its own, so containers started from
  one process would collide otherwise. They are removed, depth first, after it stops.

Usage::

    with boot(2, tmp_path) as (a, b):
        a.run("systemctl", "is-active", "dbus.service")
        a.start_unit("directord-client", [sys.executable, "-m", "directord", "client", ...])
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOTFS_SCRIPT = ROOT / ".ci" / "rootfs.sh"
CGROUPS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
CGROUP_PARENT = "directord-ci"
INSIDE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_rootfs: Path | None = None


class NspawnError(RuntimeError):
    """A container failed to boot, to run a command, or to stop."""


def unavailable() -> str | None:
    """Why containers cannot run on this machine, or None if they can."""
    if os.geteuid() != 0:
        return "systemd-nspawn containers need root"
    if not ROOTFS_SCRIPT.exists():
        return f"{ROOTFS_SCRIPT} is missing"
    for hierarchy in CGROUPS:
        if not os.access(hierarchy, os.W_OK):
            return f"{hierarchy} is not writable (the recipe needs a cgroup v1 hybrid host)"
    return None


def rootfs(timeout: float = 600.0) -> Path:
    """The rootfs directory, built or unpacked by ``.ci/rootfs.sh`` (once per process).

    ``DIRECTORD_CI_ROOTFS`` names a ready directory instead.
    """
    global _rootfs
    if _rootfs is None:
        given = os.environ.get("DIRECTORD_CI_ROOTFS")
        if given:
            _rootfs = Path(given)
        else:
            proc = subprocess.run(
                ["bash", str(ROOTFS_SCRIPT)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            if proc.returncode != 0:
                raise NspawnError(f"{ROOTFS_SCRIPT} failed:\n{proc.stderr[-4000:]}")
            _rootfs = Path(proc.stdout.strip().splitlines()[-1])
    return _rootfs


def _cgroup_dirs(name: str) -> list[Path]:
    return [h / CGROUP_PARENT / name for h in CGROUPS]


def _remove_cgroups(top: Path) -> None:
    """rmdir ``top`` and every cgroup under it, deepest first (cgroups are empty dirs)."""
    if not top.is_dir():
        return
    dirs = sorted((Path(d) for d, _, _ in os.walk(top)), key=lambda p: len(p.parts), reverse=True)
    for d in dirs:
        with contextlib.suppress(FileNotFoundError):
            d.rmdir()


class Container:
    """One booted systemd-nspawn container with systemd as PID 1.

    Args:
        name: machine name and hostname.
        root: the rootfs directory (never written to: --volatile=overlay).
        log_dir: where its console log goes (``<name>.console.log``).
        binds: host paths bind-mounted read-only at the same paths.
    """

    def __init__(
        self, name: str, root: Path, log_dir: Path, binds: Sequence[str | Path] = ()
    ) -> None:
        self.name = name
        self.root = root
        self.uuid = uuid.uuid4()
        self.console = log_dir / f"{name}.console.log"
        self.binds = [str(b) for b in binds]
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid1 = 0
        self.boot_seconds = 0.0

    # -- lifecycle --

    def spawn(self) -> None:
        """Start systemd-nspawn (returns at once; :meth:`wait_running` waits for the boot)."""
        procs = []
        for cg in _cgroup_dirs(self.name):
            cg.mkdir(parents=True, exist_ok=True)
            procs.append(str(cg / "cgroup.procs"))
        argv = [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.root}",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=pipe",
            "--volatile=overlay",
            f"--machine={self.name}",
            f"--hostname={self.name}",
            f"--uuid={self.uuid}",
            *(f"--bind-ro={b}" for b in self.binds),
        ]
        # The shell moves itself into the container's own cgroups, then becomes nspawn.
        wrapper = 'for p in "$@"; do [ "$p" = -- ] && break; echo $$ > "$p"; shift; done; ' \
            'shift; exec "$@"'  # fmt: skip
        self._started = time.monotonic()
        with self.console.open("ab") as out:
            self.proc = subprocess.Popen(
                ["sh", "-c", wrapper, "sh", *procs, "--", *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_running(self, timeout: float = 60.0) -> None:
        """Wait until the container's systemd reports ``running`` or ``degraded``."""
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + timeout
        state = "no PID 1 yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NspawnError(
                    f"{self.name}: systemd-nspawn exited {self.proc.returncode}:\n"
                    f"{self.console_tail()}"
                )
            if not self.pid1:
                self.pid1 = self._find_pid1()
            if self.pid1:
                proc = self.run("systemctl", "is-system-running", check=False, timeout=10)
                state = proc.stdout.strip() or proc.stderr.strip()
                if state in ("running", "degraded"):
                    self.boot_seconds = time.monotonic() - self._started
                    return
            time.sleep(0.1)
        raise NspawnError(
            f"{self.name}: not running after {timeout:g}s (last: {state}):\n{self.console_tail()}"
        )

    def _find_pid1(self) -> int:
        """The container's PID 1 as a host pid: nspawn's child once it runs systemd."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            for child in children:
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        except OSError:
            pass
        return 0

    def stop(self, timeout: float = 30.0) -> float:
        """Power the container off (SIGTERM to nspawn), then remove its cgroups.

        Returns the seconds the shutdown took; SIGKILLs nspawn after ``timeout``.
        """
        started = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        for cg in _cgroup_dirs(self.name):
            _remove_cgroups(cg)
        self.pid1 = 0
        return time.monotonic() - started

    def __enter__(self) -> Container:
        self.spawn()
        try:
            self.wait_running()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inside --

    @property
    def bus_address(self) -> str:
        """The container's system bus, as a D-Bus address usable from the host."""
        return f"unix:path=/proc/{self.pid1}/root/run/dbus/system_bus_socket"

    def path(self, inside: str) -> Path:
        """A path inside the container as seen from the host (through PID 1's root)."""
        return Path(f"/proc/{self.pid1}/root") / inside.lstrip("/")

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container (all its namespaces) and wait for it."""
        if not self.pid1:
            raise NspawnError(f"{self.name} is not running")
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-a", "--", *argv],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={"PATH": INSIDE_PATH, "LANG": "C.UTF-8", **(env or {})},
        )
        if check and proc.returncode != 0:
            raise NspawnError(
                f"{self.name}: {' '.join(argv)} exited {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def systemctl(self, *args: str, check: bool = True) -> str:
        """``systemctl ARGS`` inside; returns its stdout."""
        return self.run("systemctl", *args, check=check).stdout

    def write_file(self, path: str, text: str, mode: str = "0644") -> None:
        """Write a file inside the container (its parent directories are created)."""
        self.run(
            "sh",
            "-c",
            'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod "$2" "$1"',
            "sh",
            path,
            mode,
            input=text,
        )

    def start_unit(
        self,
        unit: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        properties: Sequence[str] = (),
        workdir: str = "/",
    ) -> None:
        """Run a long-running program as a transient unit of the container's systemd.

        ``systemd-run`` returns once the unit has started; the program's output goes
        to the container's journal (see :meth:`journal`).
        """
        self.run(
            "systemd-run",
            f"--unit={unit}",
            f"--working-directory={workdir}",
            *(f"--setenv={k}={v}" for k, v in (env or {}).items()),
            *(f"--property={p}" for p in properties),
            "--",
            *argv,
        )

    def journal(self, unit: str, lines: int = 50) -> str:
        """The last lines of a unit's journal inside the container."""
        return self.run(
            "journalctl", "--no-pager", "-o", "cat", "-n", str(lines), "-u", unit, check=False
        ).stdout

    def console_tail(self, size: int = 4000) -> str:
        """The end of the container's console log (for error messages)."""
        try:
            return self.console.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return "(no console log)"


def default_binds() -> list[Path]:
    """The host Python and the project tree: what a node needs to run the code under test."""
    return [Path(sys.base_prefix), ROOT]


@contextlib.contextmanager
def boot(
    count: int,
    log_dir: Path,
    *,
    prefix: str = "dd",
    binds: Sequence[str | Path] | None = None,
    timeout: float = 60.0,
) -> Iterator[list[Container]]:
    """Boot ``count`` containers at once from the cached rootfs; stop them all on exit.

    Raises:
        NspawnError: nspawn is missing, the rootfs cannot be built, or a container
            does not reach ``running``/``degraded`` within ``timeout`` seconds.
    """
    reason = unavailable()
    if reason:
        raise NspawnError(reason)
    if shutil.which("systemd-nspawn") is None:
        rootfs()  # .ci/rootfs.sh installs systemd-container
    root = rootfs()
    log_dir.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:6]
    containers = [
        Container(f"{prefix}-{tag}-{i}", root, log_dir, default_binds() if binds is None else binds)
        for i in range(count)
    ]
    try:
        for c in containers:
            c.spawn()
        for c in containers:
            c.wait_running(timeout)
        yield containers
    finally:
        for c in containers:
            c.stop()
