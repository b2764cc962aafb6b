"""Run shell commands on the node, each in its own process group.

Children are started with ``posix_spawn`` (vfork-fast) in a new session, and
awaited through a pidfd on the event loop: no thread, no SIGCHLD handler, and
no asyncio task per child (plain reader callbacks complete one future). On
timeout or cancellation the whole process group is killed, so a job's
grandchildren die with it. Output beyond ``MAX_CAPTURE`` per stream is cut
(the head is kept) so a chatty job cannot exhaust the agent's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping

from directord.components.base import ProcessResult
from directord.components.files import JOB_UMASK

MAX_CAPTURE = 8 * 1024 * 1024
# After the shell exits, descendants it put in the background may keep its
# pipes open; wait this long for end-of-file before giving up on them.
PIPE_GRACE = 0.5
# Most jobs end within a few milliseconds and write less than a pipe holds;
# their pipes are read once at exit. A job still running after this long gets
# pipe readers, so it can never block on a full pipe.
EAGER_READ_AFTER = 0.003
SHELL = "/bin/sh"
OutputCallback = Callable[[str, str], None]
Environment = Mapping[bytes, bytes]

_ENV_CACHE: dict[tuple[tuple[str, str], ...], dict[bytes, bytes]] = {}


def encoded_environment(extra: Mapping[str, str] | None = None) -> dict[bytes, bytes]:
    """The agent's environment plus ``extra``, encoded once and cached.

    posix_spawn would otherwise decode and re-encode every variable of
    ``os.environ`` for every child, which costs more than the spawn itself.
    """
    key = tuple(sorted((extra or {}).items()))
    env = _ENV_CACHE.get(key)
    if env is None:
        if len(_ENV_CACHE) > 64:
            _ENV_CACHE.clear()
        env = dict(os.environb)
        env.update({os.fsencode(k): os.fsencode(v) for k, v in key})
        _ENV_CACHE[key] = env
    return env


# posix_spawn cannot set a umask: the job's shell sets it first, on the same line so
# that the shell's line numbers in error messages stay the user's.
JOB_PREFIX = f"umask {JOB_UMASK:04o}; "


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


class _Child:
    """One running child: its pipes, its pidfd, and the future that ends it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pid: int,
        out_fd: int,
        err_fd: int,
        on_output: OutputCallback | None,
    ) -> None:
        self.loop = loop
        self.pid = pid
        self.on_output = on_output
        self.done: asyncio.Future[None] = loop.create_future()
        self.rc: int | None = None
        self.timed_out = False
        self.buffers: dict[int, list[bytes]] = {out_fd: [], err_fd: []}
        self.sizes = {out_fd: 0, err_fd: 0}
        self.partial = {out_fd: b"", err_fd: b""}
        self.names = {out_fd: "stdout", err_fd: "stderr"}
        self.open_fds = {out_fd, err_fd}
        self.pidfd = os.pidfd_open(pid)
        self.grace: asyncio.TimerHandle | None = None
        self.watching = False
        for fd in (out_fd, err_fd):
            os.set_blocking(fd, False)
        loop.add_reader(self.pidfd, self._exited)
        if on_output is not None:
            self.watch_pipes()
            self.lazy: asyncio.TimerHandle | None = None
        else:
            self.lazy = loop.call_later(EAGER_READ_AFTER, self.watch_pipes)

    def watch_pipes(self) -> None:
        """Read the pipes as data arrives (long or streaming jobs)."""
        self.lazy = None
        if not self.watching:
            self.watching = True
            for fd in self.open_fds:
                self.loop.add_reader(fd, self._read, fd)

    def _drain(self, fd: int) -> bool:
        """Read what a pipe holds now; True at end-of-file."""
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return False
            except OSError:
                return True
            if not data:
                return True
            self._keep(fd, data)

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_fd(fd)
            return
        self._keep(fd, data)

    def _keep(self, fd: int, data: bytes) -> None:
        if self.sizes[fd] < MAX_CAPTURE:
            self.buffers[fd].append(data[: MAX_CAPTURE - self.sizes[fd]])
            self.sizes[fd] += len(data)
        if self.on_output is not None:
            lines = (self.partial[fd] + data).split(b"\n")
            self.partial[fd] = lines.pop()
            for line in lines:
                self.on_output(self.names[fd], line.decode("utf-8", "replace"))

    def _close_fd(self, fd: int) -> None:
        if fd in self.open_fds:
            self.open_fds.discard(fd)
            if self.watching:
                self.loop.remove_reader(fd)
            os.close(fd)
            if self.partial[fd] and self.on_output is not None:
                self.on_output(self.names[fd], self.partial[fd].decode("utf-8", "replace"))
        self._maybe_done()

    def _exited(self) -> None:
        self.loop.remove_reader(self.pidfd)
        os.close(self.pidfd)
        self.pidfd = -1
        _, status = os.waitpid(self.pid, 0)
        self.rc = os.waitstatus_to_exitcode(status)
        if self.lazy is not None:
            self.lazy.cancel()
            self.lazy = None
        if not self.watching:
            for fd in list(self.open_fds):
                if self._drain(fd):
                    self._close_fd(fd)
            # A background descendant still holds a pipe: follow it a moment.
            self.watch_pipes()
        if self.open_fds:
            self.grace = self.loop.call_later(PIPE_GRACE, self.close_pipes)
        self._maybe_done()

    def close_pipes(self) -> None:
        """Stop reading: the remaining writers are background descendants."""
        for fd in list(self.open_fds):
            self._close_fd(fd)

    def _maybe_done(self) -> None:
        if self.pidfd == -1 and not self.open_fds and not self.done.done():
            if self.grace is not None:
                self.grace.cancel()
            self.done.set_result(None)

    def kill(self, timed_out: bool = False) -> None:
        """SIGKILL the child's whole process group."""
        self.timed_out = self.timed_out or timed_out
        _kill_group(self.pid)

    def text(self, fd_name: str) -> str:
        fd = next(fd for fd, name in self.names.items() if name == fd_name)
        return b"".join(self.buffers[fd]).decode("utf-8", "replace")

    def abandon(self) -> None:
        """Cancelled: kill the group and reap synchronously (it dies at once)."""
        if self.lazy is not None:
            self.lazy.cancel()
        self.kill()
        self.close_pipes()
        if self.pidfd != -1:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = -1
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)


_DEVNULL: list[int] = []


def devnull() -> int:
    """A descriptor of /dev/null, opened once (a job's stdin)."""
    if not _DEVNULL:
        _DEVNULL.append(os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC))
    return _DEVNULL[0]


async def run_shell(
    command: str,
    env: Environment | None = None,
    *,
    timeout: float | None = None,
    on_output: OutputCallback | None = None,
) -> ProcessResult:
    """Run ``/bin/sh -c command``; kill its process group at ``timeout`` seconds.

    Returns a ProcessResult; ``timed_out`` is set when the group was killed.
    Cancelling the caller also kills the group.
    """
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    try:
        # posix_spawn returns as soon as the child has exec'd; it does not wait.
        pid = os.posix_spawn(  # noqa: ASYNC221
            SHELL,
            [SHELL, "-c", JOB_PREFIX + command],
            env if env is not None else encoded_environment(),
            file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull(), 0),
                (os.POSIX_SPAWN_DUP2, out_w, 1),
                (os.POSIX_SPAWN_DUP2, err_w, 2),
            ],
            setsid=True,
        )
    except BaseException:
        os.close(out_r)
        os.close(err_r)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    child = _Child(loop, pid, out_r, err_r, on_output)
    timer = loop.call_later(timeout, child.kill, True) if timeout else None
    try:
        await child.done
    except asyncio.CancelledError:
        child.abandon()
        raise
    finally:
        if timer is not None:
            timer.cancel()
    return ProcessResult(
        rc=None if child.timed_out else child.rc,
        stdout=child.text("stdout"),
        stderr=child.text("stderr"),
        timed_out=child.timed_out,
    )


async def spawn_detached(command: str, env: Environment | None = None) -> int:
    """Start ``/bin/sh -c command`` detached (``--no-block``); reap it in the background."""
    null = devnull()
    pid = os.posix_spawn(  # noqa: ASYNC221 - returns once the child has exec'd
        SHELL,
        [SHELL, "-c", JOB_PREFIX + command],
        env if env is not None else encoded_environment(),
        setsid=True,
        file_actions=[
            (os.POSIX_SPAWN_DUP2, null, 0),
            (os.POSIX_SPAWN_DUP2, null, 1),
            (os.POSIX_SPAWN_DUP2, null, 2),
        ],
    )
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)

    def reap() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)

    loop.add_reader(pidfd, reap)
    return pid
