"""Dynamic batching: concurrent requests are grouped into one backend call.

Each request submits one or more *items* (e.g. one per input text) with a grouping `key`; a single
worker task takes the oldest queued item and every other queued item with the same key, up to
`max_batch_size`, waiting for more until `max_wait_ms` after the oldest item arrived. Under load
the oldest item has already waited while the backend was busy, so a batch leaves as soon as the
backend is free (no added latency); while requests overlap, an item waits at most `max_wait_ms`
for company (0 = never wait); a lone request at low load is dispatched at once. The batch runs in
one dedicated thread, so the backend sees one call at a time and the event loop keeps serving HTTP.

The queue is bounded (in items): a request that does not fit is refused as a whole with
`QueueFull`, before anything of it is queued; one larger than the whole queue with `TooLarge` (a
retry could never help). `close()` refuses new work, lets queued and running
items finish, then stops the worker.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

RunBatch = Callable[[str, list[Any]], list[Any]]


class QueueFull(Exception):
    """The bounded queue cannot take the request; `retry_after_s` estimates when it will."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"server overloaded: request queue is full, retry in {retry_after_s}s")
        self.retry_after_s = retry_after_s


class TooLarge(Exception):
    """The request has more items than the whole queue holds: it could never be queued (not a retry)."""

    def __init__(self, items: int, max_queue: int):
        super().__init__(f"the request has {items} items but the queue holds at most {max_queue} "
                         "(--max-queue): it can never be queued; split it")


class ShuttingDown(Exception):
    """The batcher no longer accepts work (graceful shutdown in progress)."""


@dataclass
class _Item:
    key: str
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class Done:
    """What an item's future resolves to: its result, and how long it queued and its batch ran."""

    result: Any
    queued_s: float
    run_s: float


@dataclass(frozen=True)
class BatchStats:
    key: str
    size: int
    seconds: float
    queue_depth: int


class DynamicBatcher:
    """`await batcher.submit(key, payloads)` -> results, computed by `run_batch(key, payloads)` in batches."""

    def __init__(self, run_batch: RunBatch, *, max_batch_size: int, max_wait_ms: float, max_queue: int,
                 on_batch: Callable[[BatchStats], None] | None = None):
        if max_batch_size < 1 or max_queue < 1 or max_wait_ms < 0:
            raise ValueError("max_batch_size and max_queue must be >= 1 and max_wait_ms >= 0")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1e3
        self.max_queue = max_queue
        self._on_batch = on_batch or (lambda stats: None)
        self._queue: collections.deque[_Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sparsec-batch")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._running = 0  # items in the batch being computed
        self._last_size = 0  # items in the previous batch
        self._ewma_item_s = 0.0  # smoothed backend seconds per item, for Retry-After

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._worker(), name="sparsec-batcher")

    def enqueue(self, key: str, payloads: list[Any]) -> list[asyncio.Future]:
        """Queue `payloads` (all or nothing); their futures resolve to `Done` records, in order."""
        if self._closing:
            raise ShuttingDown("server is shutting down")
        if len(payloads) > self.max_queue:
            raise TooLarge(len(payloads), self.max_queue)
        if len(self._queue) + len(payloads) > self.max_queue:
            raise QueueFull(self._retry_after(len(self._queue) + self._running))
        loop = asyncio.get_running_loop()
        items = [_Item(key, p, loop.create_future()) for p in payloads]
        self._queue.extend(items)
        self._wakeup.set()
        return [i.future for i in items]

    async def submit(self, key: str, payloads: list[Any]) -> list[Any]:
        """Queue `payloads` and wait for their results, in order."""
        return [done.result for done in await asyncio.gather(*self.enqueue(key, payloads))]

    def _retry_after(self, pending: int) -> int:
        per_item = self._ewma_item_s or 0.05
        return max(1, int(round(pending * per_item)))

    async def close(self) -> None:
        """Stop accepting work, finish what is queued or running, stop the worker thread."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._gather()
            if not batch:
                continue
            self._running = self._last_size = len(batch)
            start = time.perf_counter()
            started = time.monotonic()
            try:
                results = await loop.run_in_executor(self._executor, self._run_batch, batch[0].key,
                                                     [i.payload for i in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except BaseException as exc:  # noqa: BLE001 - delivered to every waiting request
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
            else:
                run_s = time.perf_counter() - start
                for item, result in zip(batch, results):
                    if not item.future.done():
                        item.future.set_result(Done(result, started - item.enqueued, run_s))
            finally:
                self._running = 0
            seconds = time.perf_counter() - start
            per_item = seconds / len(batch)
            self._ewma_item_s = 0.8 * self._ewma_item_s + 0.2 * per_item if self._ewma_item_s else per_item
            self._on_batch(BatchStats(batch[0].key, len(batch), seconds, len(self._queue)))

    async def _gather(self) -> list[_Item]:
        """The oldest item plus same-key items, up to max_batch_size, waiting until its deadline."""
        head = self._queue[0]
        # A lone request at low load is never delayed: waiting only pays when requests overlap
        # (the previous batch grouped several, or several are queued now).
        concurrent = self._last_size > 1 or len(self._queue) > 1
        deadline = head.enqueued + (self.max_wait_s if concurrent else 0.0)
        while not self._closing:
            same = sum(1 for i in self._queue if i.key == head.key)
            remaining = deadline - time.monotonic()
            if same >= self.max_batch_size or remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                break
        batch: list[_Item] = []
        rest: collections.deque[_Item] = collections.deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():  # its request was cancelled (client gone): skip the work
                continue
            (batch if item.key == head.key and len(batch) < self.max_batch_size else rest).append(item)
        self._queue.extendleft(reversed(rest))
        return batch
