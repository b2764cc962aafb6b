"""Job processes that outlive their agent (RUN's shells).

A durable job's shell writes its output to files in the journal directory,
not to pipes, and records its own exit status from an ``EXIT`` trap. So a
job keeps running when its agent is killed, stopped or re-executed, and its
result reaches the disk without the agent.

Nothing is journalled per process: the job's environment carries
``DIRECTORD_JOB_ID``, and a returning agent finds the shell by it (the
session leader whose initial environment names the job, read from /proc,
which a process cannot change afterwards), so a recycled pid is never taken
for the job. It re-attaches through a pidfd, kills the group at the job's
deadline (its start, journalled with ``running``, plus its timeout), and
reads the status file.

A job that leaves no status (SIGKILLed, or the node rebooted under it) has
an outcome nobody can know: :func:`reattach` returns ``None`` and the job is
``lost``. A command that ``exec``-s, or replaces the ``EXIT`` trap, leaves
no status either; while its agent lives this does not matter (the agent is
its parent and reaps it), only across an agent restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shlex
import signal
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from directord.agent.executor import (
    JOB_PREFIX,
    MAX_CAPTURE,
    SHELL,
    Environment,
    OutputCallback,
    devnull,
    encoded_environment,
)
from directord.components.base import ProcessResult

# Live output of a --stream job is read from its files this often.
TAIL_INTERVAL = 0.1
# A running job's output files are cut back to MAX_CAPTURE this often: what is
# beyond is never reported, and must not fill the disk (or, on tmpfs, memory).
CAP_INTERVAL = 1.0
# The shell's status file is named in a variable, so the trap needs no quoting
# of the path and the user's command stays on line 1.
_STATUS_TRAP = "trap 'echo $? > \"$directord_status_file\"' EXIT; "


class ProcFiles:
    """Where one job's process writes its stdout, stderr and exit status."""

    __slots__ = ("base", "err", "out", "status")

    def __init__(self, base: str) -> None:
        self.base = base
        self.out = base + ".out"
        self.err = base + ".err"
        self.status = base + ".rc"

    def __repr__(self) -> str:
        return f"ProcFiles({self.base!r})"

    @classmethod
    def of(cls, folder: str | Path, job_id: str) -> ProcFiles:
        """The files of ``job_id`` (named by a digest: a job id never becomes a path)."""
        return cls(f"{folder}/{hashlib.sha256(job_id.encode()).hexdigest()[:40]}")

    def exist(self) -> bool:
        """Whether a job process was started with these files."""
        try:
            os.stat(self.out)
        except OSError:
            return False
        return True

    def remove(self) -> None:
        """Delete the files (the result is journalled)."""
        for path in (self.out, self.err, self.status):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def exit_status(self) -> tuple[int, float] | None:
        """The exit status the shell recorded, with the time it did; None if it did not."""
        try:
            with open(self.status, "rb") as fh:
                text = fh.read(32)
                ended = os.fstat(fh.fileno()).st_mtime
        except OSError:
            return None
        try:
            return int(text), ended
        except ValueError:  # killed between creating the file and writing it
            return None

    def cap(self) -> None:
        """Cut each output file back to MAX_CAPTURE bytes (the writer goes on into a hole)."""
        for path in (self.out, self.err):
            with contextlib.suppress(OSError):
                if os.stat(path).st_size > MAX_CAPTURE:
                    os.truncate(path, MAX_CAPTURE)

    def read(self, name: str, offset: int = 0) -> bytes:
        """What one stream holds from ``offset`` (at most MAX_CAPTURE bytes in all)."""
        try:
            fd = os.open(self.out if name == "stdout" else self.err, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return b""
        try:
            return os.pread(fd, max(0, MAX_CAPTURE - offset), offset)
        except OSError:
            return b""
        finally:
            os.close(fd)


JOB_ID_VAR = b"DIRECTORD_JOB_ID"


def find_job_processes() -> dict[str, int]:
    """Running job shells on this machine, by job id (one scan of /proc)."""
    found: dict[str, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (job_id := _job_of(int(entry.name))) is not None:
            found[job_id] = int(entry.name)
    return found


def _job_of(pid: int) -> str | None:
    """The job id ``pid`` was started for, if it is a job shell (a session leader).

    Only a process of this agent's own user counts: another local user could
    start a session leader whose environment names a job, never one of ours.
    """
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.geteuid():
            return None
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[3]) != pid:  # not the leader of its own session
            return None
        with open(f"/proc/{pid}/environ", "rb") as fh:
            environ = fh.read()
    except (OSError, ValueError, IndexError):
        return None
    for item in environ.split(b"\0"):
        name, _, value = item.partition(b"=")
        if name == JOB_ID_VAR:
            return value.decode("utf-8", "replace")
    return None


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _Tail:
    """Forwards the lines a running job appends to its files (``--stream``)."""

    def __init__(self, files: ProcFiles, on_output: OutputCallback, from_end: bool) -> None:
        self.files = files
        self.on_output = on_output
        self.offsets = {"stdout": 0, "stderr": 0}
        self.partial = {"stdout": b"", "stderr": b""}
        if from_end:  # re-attached: the lines written from now on
            for name, path in (("stdout", files.out), ("stderr", files.err)):
                with contextlib.suppress(OSError):
                    self.offsets[name] = os.stat(path).st_size

    def poll(self) -> None:
        for name in ("stdout", "stderr"):
            data = self.files.read(name, self.offsets[name])
            if not data:
                continue
            self.offsets[name] += len(data)
            lines = (self.partial[name] + data).split(b"\n")
            self.partial[name] = lines.pop()
            for line in lines:
                self.on_output(name, line.decode("utf-8", "replace"))

    def finish(self) -> None:
        self.poll()
        for name, rest in self.partial.items():
            if rest:
                self.on_output(name, rest.decode("utf-8", "replace"))


class _Capper:
    """Cuts back the output files of every running job of a loop, on one timer for all.

    A timer per job cost every job a timer to arm and cancel, and an idle
    wake-up a second per running job.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.files: set[ProcFiles] = set()
        self.timer: asyncio.TimerHandle | None = None

    def add(self, files: ProcFiles) -> None:
        self.files.add(files)
        if self.timer is None:
            self.timer = self.loop.call_later(CAP_INTERVAL, self._tick)

    def discard(self, files: ProcFiles) -> None:
        self.files.discard(files)

    def _tick(self) -> None:
        for files in list(self.files):
            files.cap()
        self.timer = self.loop.call_later(CAP_INTERVAL, self._tick) if self.files else None


_cappers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Capper] = (
    weakref.WeakKeyDictionary()
)


def _capper(loop: asyncio.AbstractEventLoop) -> _Capper:
    capper = _cappers.get(loop)
    if capper is None:
        capper = _cappers[loop] = _Capper(loop)
    return capper


class _Watch:
    """Waits for one job process: its exit, its deadline, and (``--stream``) its output."""

    def __init__(
        self, pid: int, pidfd: int, files: ProcFiles, deadline: float | None, tail: _Tail | None
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.pid = pid
        self.pidfd = pidfd
        self.files = files
        self.tail = tail
        self.timed_out = False
        self.exited = self.loop.create_future()
        self.loop.add_reader(pidfd, self._exited)
        self.timer = (
            self.loop.call_later(max(0.0, deadline - time.time()), self._expire)
            if deadline is not None
            else None
        )
        # A --stream job is read (and cut back) often; the others share one timer.
        self.ticker: asyncio.TimerHandle | None = None
        if tail is not None:
            self.ticker = self.loop.call_later(TAIL_INTERVAL, self._tick)
        else:
            _capper(self.loop).add(files)

    def _exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def _expire(self) -> None:
        self.timed_out = True
        _kill_group(self.pid)

    def _tick(self) -> None:
        if self.tail is not None:
            self.tail.poll()
        self.files.cap()
        self.ticker = self.loop.call_later(TAIL_INTERVAL, self._tick)

    def close(self) -> None:
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        if self.timer is not None:
            self.timer.cancel()
        if self.ticker is not None:
            self.ticker.cancel()
        else:
            _capper(self.loop).discard(self.files)


async def _watch(
    pid: int,
    pidfd: int,
    files: ProcFiles,
    *,
    deadline: float | None,
    tail: _Tail | None,
    leave: Callable[[], bool],
) -> bool:
    """Wait until the process exits; kill its group at the deadline. True if it timed out.

    While it runs, its output files are cut back to MAX_CAPTURE every
    CAP_INTERVAL. Cancelled (the agent stops), the process is left running when
    ``leave()`` says so (the next agent collects it), and killed otherwise.
    """
    watch = _Watch(pid, pidfd, files, deadline, tail)
    try:
        await watch.exited
    except asyncio.CancelledError:
        if not leave():
            _kill_group(pid)
        raise
    finally:
        watch.close()
    if tail is not None:
        tail.finish()
    return watch.timed_out


def _result(files: ProcFiles, rc: int | None, timed_out: bool) -> ProcessResult:
    return ProcessResult(
        rc=None if timed_out else rc,
        stdout=files.read("stdout").decode("utf-8", "replace"),
        stderr=files.read("stderr").decode("utf-8", "replace"),
        timed_out=timed_out,
    )


def _read_head(fd: int) -> str:
    """The first MAX_CAPTURE bytes of an output file, through the agent's own descriptor."""
    return os.pread(fd, MAX_CAPTURE, 0).decode("utf-8", "replace")


async def run_durable(
    command: str,
    files: ProcFiles,
    job_id: str,
    *,
    env: Environment | None = None,
    timeout: float | None = None,
    on_output: OutputCallback | None = None,
    on_spawn: Callable[[int], None] | None = None,
    leave: Callable[[], bool],
    again: bool = False,
) -> ProcessResult:
    """Run ``/bin/sh -c command`` as the process of job ``job_id``, which may outlive this agent.

    ``on_spawn`` gets the pid as soon as it exists; ``leave()`` says, when the
    caller is cancelled, whether the process is left running. ``again``: an
    earlier process of the job used these files (RUN --retry).
    """
    # Opened read-write: the agent reads the result through the same descriptors.
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW
    out = os.open(files.out, flags, 0o600)
    try:
        err = os.open(files.err, flags, 0o600)
    except BaseException:
        os.close(out)
        raise
    if again:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(files.status)
    environment = {
        **(env if env is not None else encoded_environment()),
        JOB_ID_VAR: job_id.encode(),
    }
    try:
        # posix_spawn returns as soon as the child has exec'd; it does not wait.
        pid = os.posix_spawn(  # noqa: ASYNC221
            SHELL,
            [
                SHELL,
                "-c",
                f"directord_status_file={shlex.quote(files.status)}; {_STATUS_TRAP}{JOB_PREFIX}"
                + command,
            ],
            environment,
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull(), 0),
                (os.POSIX_SPAWN_DUP2, out, 1),
                (os.POSIX_SPAWN_DUP2, err, 2),
            ],
            setsid=True,
        )
        pidfd = os.pidfd_open(pid)
        if on_spawn is not None:
            on_spawn(pid)
        deadline = time.time() + timeout if timeout else None
        tail = _Tail(files, on_output, from_end=False) if on_output is not None else None
        try:
            timed_out = await _watch(pid, pidfd, files, deadline=deadline, tail=tail, leave=leave)
        except asyncio.CancelledError:
            if not leave():
                _reap(pid)
            raise
        rc = _reap(pid)
        return ProcessResult(
            rc=None if timed_out else rc,
            stdout=_read_head(out),
            stderr=_read_head(err),
            timed_out=timed_out,
        )
    finally:
        os.close(out)
        os.close(err)


async def reattach(
    job_id: str,
    pid: int | None,
    files: ProcFiles,
    *,
    deadline: float | None,
    on_output: OutputCallback | None = None,
    leave: Callable[[], bool],
) -> tuple[ProcessResult, float] | None:
    """Collect the process of ``job_id`` an earlier agent started: wait, or read how it ended.

    ``pid`` is where :func:`find_job_processes` found it running, if it did.
    Returns its result and the time it ended, or None when nobody can know
    (no process, no status).
    """
    pidfd = -1
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            pidfd = os.pidfd_open(pid)
        # The pid may have ended, and been recycled, since the scan.
        if pidfd != -1 and _job_of(pid) != job_id:
            os.close(pidfd)
            pidfd = -1
    timed_out = False
    if pid is not None and pidfd != -1:
        if deadline is not None and time.time() >= deadline:
            _kill_group(pid)
            timed_out = True
        tail = _Tail(files, on_output, from_end=True) if on_output is not None else None
        timed_out = (
            await _watch(pid, pidfd, files, deadline=deadline, tail=tail, leave=leave) or timed_out
        )
        # After a re-exec (RESTART) the process is still this agent's child.
        rc = _reap(pid)
        if rc is not None:
            return _result(files, rc, timed_out), time.time()
    if timed_out:
        return _result(files, None, True), time.time()
    status = files.exit_status()
    if status is None:
        return None
    rc, ended = status
    return _result(files, rc, False), ended


def _reap(pid: int) -> int | None:
    """The exit code of ``pid`` if it is this process's child; None otherwise."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)
