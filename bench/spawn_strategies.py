"""What a RUN job's process costs, by how it is started: the agent's way, and two fork servers.

Issue 13 asks for an agent CPU of 0.2 ms a job and a wall of 1.3x the spawn
floor. The shell a job runs in costs more than the agent; the only way to a
cheaper shell is to fork it from a resident one instead of exec'ing
``/bin/sh`` per job. This measures, for ``--jobs`` jobs of ``echo hello
world`` with at most ``--concurrency`` running at once:

* ``agent``: the agent's own code path, :func:`directord.agent.jobprocs.run_durable`
  (``posix_spawn`` of ``/bin/sh -c``, a session of its own, output and status files).
* ``bash-fork``: a resident ``bash`` with job control (``set -m``) forks a subshell
  per job, which gets a process group of its own as a job needs (so a timeout
  kills all it started). The subshell writes the same output and status files.
* ``dash-fork``: the same with a resident ``dash``. It is shown only as the lower
  bound: dash refuses job control without a terminal, so its subshells share the
  resident's process group, and a job could not be killed alone.
* ``dash-pty``: a resident ``dash`` that turns job control on while a pseudo-terminal
  is its controlling terminal; the terminal is then hung up, which leaves the
  session without one and job control on. Its subshells lead process groups of
  their own and, like the agent's jobs, have no controlling terminal. What no
  fork server can give: a forked subshell's ``$$`` is the resident's, the same
  for every job (``kill $$`` would hit the resident, and ``/tmp/x.$$`` names
  collide between jobs running at once).

For each it prints the wall per job, the CPU per job of the driving Python
process (the agent's share), and of the shells (the resident one and the
jobs'), read with getrusage. Run it on the loop the agent uses (uvloop when
installed).

    python bench/spawn_strategies.py [--jobs 3000] [--concurrency 8] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from directord.agent.jobprocs import ProcFiles, run_durable

COMMAND = "echo hello world"
# The resident shell reads "<files base> <command>" lines; each job is a subshell
# that records its status from an EXIT trap, as the agent's jobs do.
FORK_SERVER = """{jobctl}
while IFS=' ' read -r base line; do
  ( {reset}directord_status_file=$base.rc; trap 'echo $? > "$directord_status_file"' EXIT; \
  eval "$line" ) >"$base.out" 2>"$base.err" </dev/null &
  echo $!
  {forget}
done
"""
# dash turns job control on only with a controlling terminal: the session leader
# opens the pty's slave (so it becomes that), turns it on and says so; the driver
# then hangs the terminal up. SIGHUP is ignored for the hang-up, and set back for jobs.
PTY_JOBCTL = """trap '' HUP
exec 9<>"$1"
set -m
exec 9>&-
echo ready"""


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def exited(pid: int) -> None:
    """Wait for a process that need not be our child (a pidfd)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone, and reaped by its parent
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)


class ForkServer:
    """A resident shell that forks one subshell per job."""

    def __init__(self, shell: str) -> None:
        self.shell = shell
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        shell, _, how = self.shell.partition("-")
        pty = how == "pty"
        script = FORK_SERVER.format(
            jobctl="set -m" if shell == "bash" else PTY_JOBCTL if pty else "",
            # Each shell keeps a table of its jobs: without this, forking slows as it grows.
            forget="disown" if shell == "bash" else "jobs >/dev/null" if pty else "",
            reset="trap - HUP; " if pty else "",
        )
        master, slave = os.openpty() if pty else (-1, -1)
        self.proc = await asyncio.create_subprocess_exec(
            shutil.which(shell) or shell,
            "-c",
            script,
            "sh",
            os.ttyname(slave) if pty else "",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        if pty:
            os.close(slave)
            assert self.proc.stdout is not None
            if await self.proc.stdout.readline() != b"ready\n":
                raise SystemExit(f"{shell} did not turn job control on")
            os.close(master)  # the hang-up: the session loses its terminal

    async def run(self, files: ProcFiles) -> int:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        async with self.lock:
            self.proc.stdin.write(f"{files.base} {COMMAND}\n".encode())
            pid = int(await self.proc.stdout.readline())
        await exited(pid)
        status = files.exit_status()
        if status is None:
            raise SystemExit(f"{self.shell}: job {files.base} left no status")
        return status[0]

    async def isolation(self, files: ProcFiles) -> str:
        """Whether a job's subshell leads a process group of its own, and has no terminal."""
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        async with self.lock:
            self.proc.stdin.write(f"{files.base} sleep 0.2\n".encode())
            pid = int(await self.proc.stdout.readline())
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        own_group, terminal = int(fields[2]) == pid, int(fields[4]) != 0
        await exited(pid)
        files.remove()
        if not own_group:
            return "NO: shares the resident's"
        return "yes, but has a terminal" if terminal else "yes"

    async def stop(self) -> None:
        assert self.proc is not None and self.proc.stdin
        self.proc.stdin.close()
        await self.proc.wait()


async def measure(
    label: str, job: Callable[[ProcFiles], Awaitable[int]], folder: str, jobs: int, concurrency: int
) -> tuple[float, float]:
    """Run the jobs; returns (wall s, own CPU s) and checks every result."""
    limit = asyncio.Semaphore(concurrency)

    async def one(index: int) -> None:
        async with limit:
            files = ProcFiles.of(folder, f"{label}-{index}")
            rc = await job(files)
            if rc != 0 or Path(files.out).read_bytes() != b"hello world\n":
                raise SystemExit(f"{label}: job {index} ended {rc}")
            files.remove()

    start, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(jobs)))
    return time.perf_counter() - start, time.process_time() - cpu


async def agent_job(files: ProcFiles) -> int:
    result = await run_durable(COMMAND, files, files.base, leave=lambda: False)
    return -1 if result.rc is None else result.rc


async def strategy(name: str, folder: str, jobs: int, concurrency: int) -> str:
    shells_before = children_cpu()
    if name == "agent":
        wall, own = await measure(name, agent_job, folder, jobs, concurrency)
        group = "yes (a session)"
    else:
        server = ForkServer(name.removesuffix("-fork"))
        await server.start()
        group = await server.isolation(ProcFiles.of(folder, "probe"))
        shells_before = children_cpu()
        wall, own = await measure(name, server.run, folder, jobs, concurrency)
        await server.stop()  # its CPU is counted once it is reaped
    shells = children_cpu() - shells_before
    per = 1000 / jobs
    return (
        f"{name:<10} wall {wall * per:6.3f}  driver {own * per:6.3f}  shells {shells * per:6.3f}"
        f"  total CPU {(own + shells) * per:6.3f}   own process group: {group}"
    )


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="directord-spawn-") as folder:
        for round_ in range(args.rounds):
            print(f"round {round_ + 1}: ms per job, {args.jobs} jobs, {args.concurrency} at once")
            for name in ("agent", "bash-fork", "dash-fork", "dash-pty"):
                if name != "agent" and shutil.which(name.split("-")[0]) is None:
                    print(f"{name:<10} ({name.split('-')[0]} is not installed)")
                    continue
                print(await strategy(name, folder, args.jobs, args.concurrency))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds (2)")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main_async(args))
    else:
        print("loop: uvloop")
        uvloop.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
