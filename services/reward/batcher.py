"""Dynamic batching: the items of concurrent Score calls share forward passes.

A call's items join one FIFO queue, tagged with the model they must be scored by (the served version when the
call arrived). When the worker is free, it takes up to `max_batch` items from the head of the queue, all for
the head's model, waiting up to `max_wait_s` for more to arrive if the batch is not full, and runs the
forward pass in a worker thread (torch releases the GIL, so the event loop keeps accepting calls meanwhile).
Calls that arrive during a forward pass make up the next batch, so under load batches fill without waiting.

A call larger than `max_batch` spans several batches; all of them use the model it was tagged with, so a
version swap never splits a call. A forward pass that raises fails the calls it held items of, and no
others. A call whose caller went away (its future cancelled) loses its items that were not yet taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

M = TypeVar("M")  # what scores: opaque to the batcher, compared by identity
T = TypeVar("T")  # one item, e.g. a rendered text

Forward = Callable[[M, list[T]], Sequence[float]]


class BatcherStopped(RuntimeError):
    """The batcher stopped before the call's items were scored."""


@dataclass(eq=False)
class _Job(Generic[M, T]):
    model: M
    items: Sequence[T]
    future: asyncio.Future
    results: list[float] = field(default_factory=list)
    taken: int = 0  # items handed to a batch so far
    left: int = 0  # items not scored yet

    @property
    def untaken(self) -> int:
        return len(self.items) - self.taken


class Batcher(Generic[M, T]):
    """Merges concurrent `submit` calls into forward passes of at most `max_batch` items."""

    def __init__(
        self,
        forward: Forward,
        *,
        max_batch: int,
        max_wait_s: float,
        executor: Executor | None = None,
        on_batch: Callable[[M, int, float], None] | None = None,
    ) -> None:
        """`forward(model, items)` runs in `executor` (default: one worker thread) and returns one score per
        item, in order. `on_batch(model, size, seconds)` is called after each successful forward pass."""
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max(0.0, max_wait_s)
        self._own_executor = executor is None
        # One thread: on a CPU, two forward passes at once only fight over the same cores.
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-forward")
        self.on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task | None = None
        self.batches = 0

    # ---- callers -------------------------------------------------------------------------------------------
    async def submit(self, model: M, items: Sequence[T]) -> list[float]:
        """Scores `items` with `model`, sharing forward passes with concurrent calls; one float per item."""
        if not self.running:
            raise BatcherStopped("the batcher is not running")
        if not items:
            return []
        future = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(model, items, future, [0.0] * len(items), left=len(items)))
        self._wakeup.set()
        # Cancelling the caller cancels `future`; the worker then skips the job's remaining items.
        return await future

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def queued_items(self) -> int:
        """Items waiting for a forward pass (not counting the one running)."""
        return sum(j.untaken for j in self._jobs if not j.future.done())

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reward-batcher")

    async def stop(self) -> None:
        """Stops the worker; calls still queued fail with BatcherStopped."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail(list(self._jobs), BatcherStopped("the reward service is stopping"))
        self._jobs.clear()
        if self._own_executor:
            self.executor.shutdown(wait=False, cancel_futures=True)

    # ---- the worker ----------------------------------------------------------------------------------------
    @staticmethod
    def _fail(jobs: list[_Job], exc: BaseException) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    async def _run(self) -> None:
        while True:
            parts = await self._next_batch()
            await self._forward(parts)

    def _prune(self) -> None:
        """Drops jobs at the head that need nothing more: fully taken, or their caller is gone."""
        while self._jobs and (self._jobs[0].untaken == 0 or self._jobs[0].future.done()):
            self._jobs.popleft()

    def _fillable(self) -> tuple[int, bool]:
        """Items available for a batch on the head's model, and whether waiting could add more."""
        head = self._jobs[0].model
        n = 0
        for job in self._jobs:
            if job.model is not head:
                # A newer version is queued behind: nothing more will arrive for the head's model.
                return n, False
            if not job.future.done():
                n += job.untaken
        return n, True

    async def _next_batch(self) -> list[tuple[_Job, int, int]]:
        loop = asyncio.get_running_loop()
        while True:
            self._prune()
            while not self._jobs:
                self._wakeup.clear()
                await self._wakeup.wait()
                self._prune()
            deadline = loop.time() + self.max_wait_s
            while self._jobs:
                available, more_may_come = self._fillable()
                remaining = deadline - loop.time()
                if available >= self.max_batch or not more_may_come or remaining <= 0:
                    break
                self._wakeup.clear()
                try:
                    async with asyncio.timeout(remaining):
                        await self._wakeup.wait()
                except TimeoutError:
                    pass
                self._prune()
            if self._jobs:  # else every waiting caller went away meanwhile: wait for new work
                return self._take()

    def _take(self) -> list[tuple[_Job, int, int]]:
        """Up to max_batch items from the head of the queue, all for the head's model: (job, start, end)s."""
        head = self._jobs[0].model
        parts: list[tuple[_Job, int, int]] = []
        size = 0
        for job in self._jobs:
            if job.model is not head or size >= self.max_batch:
                break
            if job.future.done() or job.untaken == 0:
                continue
            k = min(job.untaken, self.max_batch - size)
            parts.append((job, job.taken, job.taken + k))
            job.taken += k
            size += k
        self._prune()
        return parts

    async def _forward(self, parts: list[tuple[_Job, int, int]]) -> None:
        model = parts[0][0].model
        items = [item for job, start, end in parts for item in job.items[start:end]]
        jobs = [job for job, _, _ in parts]
        started = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            scores = await loop.run_in_executor(self.executor, self.forward, model, items)
            if len(scores) != len(items):
                raise RuntimeError(f"the forward pass returned {len(scores)} scores for {len(items)} items")
        except asyncio.CancelledError:
            self._fail(jobs, BatcherStopped("the reward service is stopping"))
            raise
        except Exception as exc:
            self._fail(jobs, exc)
            return
        self.batches += 1
        if self.on_batch is not None:
            self.on_batch(model, len(items), time.perf_counter() - started)
        pos = 0
        for job, start, end in parts:
            n = end - start
            if not job.future.done():
                job.results[start:end] = [float(s) for s in scores[pos:pos + n]]
                job.left -= n
                if job.left == 0:
                    job.future.set_result(job.results)
            pos += n
