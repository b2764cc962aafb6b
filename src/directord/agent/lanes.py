"""Lanes: the order in which a node runs its jobs.

Jobs of ordinary orchestrations share one serial lane and run in arrival
order; each ``async`` orchestration gets a lane of its own, at most
``min(2 x CPUs, 16)`` of them running at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
from collections.abc import Callable, Coroutine
from typing import Any

from directord.protocol import Job

ASYNC_LANES = min(2 * (os.cpu_count() or 1), 16)
#: Runs one job; ``more`` says whether more wait behind it in its lane.
RunJob = Callable[[Job, bool], Coroutine[Any, Any, None]]


class Lane:
    """A FIFO of jobs run one after another."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.queue: collections.deque[Job] = collections.deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


class Lanes:
    """Every lane of the node, and the tasks draining them."""

    def __init__(self, run_job: RunJob, may_start: Callable[[], bool]) -> None:
        self._run_job = run_job
        self._may_start = may_start  # False once a RESTART waits: nothing new starts
        self._lanes: dict[str, Lane] = {}
        self._async_slots = asyncio.Semaphore(ASYNC_LANES)
        self._queued: set[str] = set()
        self._at_once: set[asyncio.Task[None]] = set()

    def enqueue(self, job: Job) -> None:
        """Queue a job in its lane (once, whatever the journal and the server resend)."""
        if job.id in self._queued:
            return
        self._queued.add(job.id)
        lane = self._lanes.get(job.lane)
        if lane is None:
            lane = self._lanes[job.lane] = Lane(job.lane)
        lane.queue.append(job)
        lane.wake.set()
        if lane.task is None or lane.task.done():
            lane.task = asyncio.create_task(self._loop(lane), name=f"lane-{job.lane or 'serial'}")

    def run_now(self, job: Job) -> None:
        """Run a job at once, past every lane (QUEUESENTINEL)."""
        if job.id in self._queued:
            return
        self._queued.add(job.id)
        task = asyncio.create_task(self._run_job(job, False), name=f"now-{job.id}")
        self._at_once.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            self._at_once.discard(finished)
            self._queued.discard(job.id)

        task.add_done_callback(done)

    def drop(self, job_id: str) -> Job | None:
        """Take a job out of its lane if it is still waiting there."""
        for lane in self._lanes.values():
            for job in lane.queue:
                if job.id == job_id:
                    lane.queue.remove(job)
                    self._queued.discard(job_id)
                    return job
        return None

    def drop_waiting(self) -> list[Job]:
        """Take every waiting job out of every lane (jobs running are left alone)."""
        dropped: list[Job] = []
        for lane in self._lanes.values():
            dropped.extend(lane.queue)
            lane.queue.clear()
        for job in dropped:
            self._queued.discard(job.id)
        return dropped

    async def close(self) -> None:
        """Stop every lane (jobs running are cancelled)."""
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        tasks.extend(self._at_once)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self, lane: Lane) -> None:
        if lane.key:
            async with self._async_slots:
                await self._drain(lane)
            if not lane.queue:
                self._lanes.pop(lane.key, None)
        else:
            while True:
                await self._drain(lane)
                lane.wake.clear()
                await lane.wake.wait()

    async def _drain(self, lane: Lane) -> None:
        while lane.queue and self._may_start():
            job = lane.queue.popleft()
            try:
                await self._run_job(job, bool(lane.queue))
            finally:
                self._queued.discard(job.id)
