"""Micro-batching in front of one engine: a bounded queue and a single worker thread.

Requests become ``Job``s carrying a compatibility key (sampler, steps, cfg, spacing, embedding
shape). The worker takes the oldest job, adds queued jobs with the same key while the batch stays
within the oldest job's capacity (images per engine run), runs them as one sampler run, and
resolves each job's ``concurrent.futures.Future``. Batches always start at the oldest job, so no
key starves. A full queue raises ``QueueFull`` (the app answers 429); jobs whose future was
cancelled (their request timed out) are skipped; ``close()`` drains what is queued, then stops.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("saq_deploy.serve")


class QueueFull(Exception):
    """The queue holds ``queue_size`` jobs already."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"queue full; retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


class ShuttingDown(Exception):
    """The batcher no longer accepts jobs."""


@dataclass
class Job:
    key: Hashable
    n: int  # images
    capacity: int  # images per engine run for this key
    payload: Any
    future: Future = field(default_factory=Future)
    enqueued_at: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    batches: int = 0
    jobs: int = 0
    images: int = 0
    largest_batch_jobs: int = 0
    failures: int = 0
    skipped_cancelled: int = 0
    busy_s: float = 0.0

    def as_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


class MicroBatcher:
    """``run_batch(payloads, batch_size) -> results`` runs on the worker thread, one call at a time."""

    def __init__(self, run_batch: Callable[[Sequence[Any], int], Sequence[Any]], *, queue_size: int,
                 wait_s: float = 0.002) -> None:
        self._run_batch = run_batch
        self.queue_size = queue_size
        self.wait_s = wait_s
        self._pending: deque[Job] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._ema_batch_s = 1.0
        self.stats = BatchStats()

    # -- client side -------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the batcher is already started")
        self._thread = threading.Thread(target=self._loop, name="saq-engine-worker", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    def depth(self) -> int:
        with self._cv:
            return len(self._pending)

    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._closed or self._thread is None:
                raise ShuttingDown("the server is not accepting work (starting up or shutting down)")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(self.retry_after(sum(j.n for j in self._pending), job.capacity))
            self._pending.append(job)
            self._cv.notify()
        return job.future

    def retry_after(self, queued_images: int, capacity: int) -> int:
        """Seconds until ``queued_images`` waiting images have likely drained: engine runs of up to
        ``capacity`` images each, at the recent time per run."""
        runs = math.ceil(max(1, queued_images) / max(1, capacity))
        return max(1, math.ceil(self._ema_batch_s * runs))

    def close(self, *, drain: bool = True, timeout: float | None = None) -> bool:
        """Stop accepting jobs; finish the queued ones (``drain``) or cancel them. True when the
        worker has stopped within ``timeout``."""
        with self._cv:
            self._closed = True
            if not drain:
                while self._pending:
                    self._pending.popleft().future.cancel()
            self._cv.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- worker side -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._execute(batch)

    def _take_first(self) -> Job | None:
        """Oldest job whose request is still waiting; None once closed and empty. Holds the lock."""
        while True:
            while not self._pending:
                if self._closed:
                    return None
                self._cv.wait()
            job = self._pending.popleft()
            if job.future.set_running_or_notify_cancel():
                return job
            self.stats.skipped_cancelled += 1

    def _next_batch(self) -> list[Job] | None:
        with self._cv:
            first = self._take_first()
            if first is None:
                return None
            batch, total = [first], first.n
            deadline = time.monotonic() + self.wait_s
            while True:
                total = self._gather(batch, total)
                left = deadline - time.monotonic()
                if total >= first.capacity or left <= 0 or self._closed:
                    return batch
                self._cv.wait(left)

    def _gather(self, batch: list[Job], total: int) -> int:
        """Move queued jobs with the first job's key into ``batch`` while they fit. Holds the lock."""
        first = batch[0]
        keep: deque[Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            if job.key == first.key and total + job.n <= first.capacity:
                if job.future.set_running_or_notify_cancel():
                    batch.append(job)
                    total += job.n
                else:
                    self.stats.skipped_cancelled += 1
            else:
                keep.append(job)
        self._pending.extendleft(reversed(keep))
        return total

    def _execute(self, batch: list[Job]) -> None:
        t0 = time.perf_counter()
        batch_size = batch[0].capacity
        try:
            results = self._run_batch([j.payload for j in batch], batch_size)
        except BaseException as e:
            log.exception("engine run failed for a batch of %d request(s)", len(batch))
            self.stats.failures += 1
            for j in batch:
                j.future.set_exception(e)
            if not isinstance(e, Exception):
                raise
            return
        finally:
            dt = time.perf_counter() - t0
            self.stats.busy_s += dt
            self._ema_batch_s = 0.8 * self._ema_batch_s + 0.2 * dt
        self.stats.batches += 1
        self.stats.jobs += len(batch)
        self.stats.images += sum(j.n for j in batch)
        self.stats.largest_batch_jobs = max(self.stats.largest_batch_jobs, len(batch))
        for j, r in zip(batch, results, strict=True):
            j.future.set_result(r)
