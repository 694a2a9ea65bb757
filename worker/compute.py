"""One compute thread per worker, fed by a priority queue.

torch releases the GIL, so the asyncio loop keeps receiving while a block runs.
A single thread keeps steps of one session in order and makes the cache safe
without locks; the priority order lets an inference step jump ahead of queued
training work, so training cannot starve interactive users.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from typing import Any, Callable

from corolla.bus.errors import ErrorCode
from corolla.bus.server import RequestError

PRIORITY_INFERENCE = 0
PRIORITY_FORWARD = 1
PRIORITY_TRAINING = 2


class PriorityExecutor:
    def __init__(self, name: str = "corolla-compute", max_queue: int = 1024):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()
        self.max_queue = max_queue
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def pending(self) -> int:
        return self._queue.qsize()

    def submit(self, priority: int, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Queue `fn(*args)`; the returned future resolves on the caller's event loop.

        A full queue answers BUSY at once: the client routes elsewhere instead of waiting behind it."""
        if self._queue.qsize() >= self.max_queue:
            raise RequestError(ErrorCode.BUSY, f"{self._queue.qsize()} requests queued; try another worker")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((priority, next(self._order), fn, args, future, loop))
        return future

    def _run(self) -> None:
        while True:
            _, _, fn, args, future, loop = self._queue.get()
            if fn is None:
                return
            try:
                result, error = fn(*args), None
            except BaseException as e:  # handed to the awaiting request, which turns it into an error reply
                result, error = None, e
            loop.call_soon_threadsafe(_settle, future, result, error)

    def shutdown(self) -> None:
        self._queue.put((-1, -1, None, (), None, None))
        self._thread.join(timeout=30)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
