"""One compute thread per worker, fed by a priority queue.

torch releases the GIL, so the asyncio loop keeps receiving while a block runs.
A single thread keeps steps of one session in order and makes the cache safe
without locks; the priority order lets an inference step jump ahead of queued
training work, so training cannot starve interactive users. Jobs that can share
one pass (decode steps of different sessions, see worker/batching.py) are taken
off the queue together when the thread comes to the first of them.
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable

from corolla.bus.errors import ErrorCode
from corolla.bus.server import RequestError

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 1
PRIORITY_TRAINING = 2
PRIORITY_NAMES = {PRIORITY_INFERENCE: "inference", PRIORITY_FORWARD: "forward", PRIORITY_TRAINING: "training"}


@dataclass(eq=False)
class _Job:
    fn: Callable[..., Any] | None  # None: the thread stops
    args: tuple
    future: asyncio.Future | None = None
    loop: asyncio.AbstractEventLoop | None = None
    batched: bool = False  # fn takes a list of items and returns one (result, error) per item
    group: Hashable | None = None  # batched jobs of one group may run together; None: always alone
    owner: Hashable | None = None  # jobs of one owner keep their order


class PriorityExecutor:
    def __init__(self, name: str = "corolla-compute", max_queue: int = 1024, max_batch: int = 1,
                 initializer: Callable[[], None] | None = None):
        self._heap: list[tuple[int, int, _Job]] = []
        self._ready = threading.Condition()
        self._order = itertools.count()
        self.max_queue = max_queue
        self.max_batch = max_batch
        # called from the compute thread after each pass with its priority and seconds: what a request's time from
        # receipt to reply spends computing, as opposed to waiting in the queue or being handed between threads
        self.observer: Callable[[int, float], None] | None = None
        self._initializer = initializer  # run first on the compute thread (per-thread state such as the CUDA device)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def pending(self) -> int:
        return len(self._heap)

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Queue `fn(*args)`; the returned future resolves on the caller's event loop.

        A full queue answers BUSY at once: the client routes elsewhere instead of waiting behind it."""
        return self._put(priority, _Job(fn, args))

    def submit_batched(self, priority: int, fn: Callable[[list], list[tuple[Any, BaseException | None]]], item: Any,
                       group: Hashable | None, owner: Hashable) -> asyncio.Future:
        """Queue `item` for `fn(items)`, which runs it with every queued item of the same group (up to max_batch)
        and returns one (result, error) per item. An item is never taken ahead of an earlier queued job of its
        owner, nor beside another of its owner's, so one session's steps stay in order."""
        return self._put(priority, _Job(fn, (item,), batched=True, group=group, owner=owner))

    def _put(self, priority: int, job: _Job) -> asyncio.Future:
        if len(self._heap) >= self.max_queue:
            raise RequestError(ErrorCode.BUSY, f"{len(self._heap)} requests queued; try another worker")
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        with self._ready:
            heapq.heappush(self._heap, (priority, next(self._order), job))
            self._ready.notify()
        return job.future

    def _take(self) -> tuple[int, list[_Job]]:
        """The next job's priority, the job, and the queued jobs that join it."""
        with self._ready:
            while not self._heap:
                self._ready.wait()
            priority, _, first = heapq.heappop(self._heap)
            if first.group is None or self.max_batch < 2:
                return priority, [first]
            jobs, owners, blocked = [first], {first.owner}, set()
            for entry in sorted(self._heap):
                job = entry[2]
                if len(jobs) == self.max_batch or entry[0] != priority:
                    break
                if job.group == first.group and job.owner not in owners and job.owner not in blocked:
                    jobs.append(job)
                    owners.add(job.owner)
                else:  # this job stays queued, so its owner's later jobs must too
                    blocked.add(job.owner)
            if len(jobs) > 1:
                taken = set(map(id, jobs))
                self._heap = [entry for entry in self._heap if id(entry[2]) not in taken]
                heapq.heapify(self._heap)
            return priority, jobs

    def _run(self) -> None:
        if self._initializer is not None:
            self._initializer()
        while True:
            priority, jobs = self._take()
            if jobs[0].fn is None:
                return
            started = time.perf_counter()
            try:
                if jobs[0].batched:
                    outcomes = jobs[0].fn([job.args[0] for job in jobs])
                else:
                    outcomes = [(jobs[0].fn(*jobs[0].args), None)]
            except BaseException as e:  # handed to the awaiting requests, which turn it into error replies
                outcomes = [(None, e)] * len(jobs)
            seconds = time.perf_counter() - started
            for job, (result, error) in zip(jobs, outcomes):
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)
            if self.observer is not None:  # after the replies are on their way
                self.observer(priority, seconds)

    def shutdown(self) -> None:
        with self._ready:
            heapq.heappush(self._heap, (-1, -1, _Job(None, ())))
            self._ready.notify()
        self._thread.join(timeout=30)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
