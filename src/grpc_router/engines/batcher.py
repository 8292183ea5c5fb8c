"""Dynamic batching: asyncio callers enqueue work, one worker thread runs it in batches.

A batch closes when it holds max_batch_size jobs or when its first job has waited max_wait_us.
The queue is bounded; past it, submit raises Overloaded at once instead of queueing forever.
A job whose caller has gone (cancelled, or its deadline passed, which cancels it) is dropped
before it runs: abandoned work must not delay the callers still waiting.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import structlog

from grpc_router.errors import EngineUnavailable, Overloaded
from grpc_router.observability.metrics import count_dropped

log = structlog.get_logger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(slots=True)
class Job(Generic[In, Out]):
    payload: In
    future: asyncio.Future[Out]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0


# Processes a batch; returns one result or exception per job, in order.
BatchFn = Callable[[list[Job[In, Out]]], list[Out | BaseException]]


class Batcher(Generic[In, Out]):
    def __init__(
        self, process: BatchFn[In, Out], *, max_batch_size: int, max_wait_us: int, max_queue: int
    ) -> None:
        self._process = process
        self._max_batch = max_batch_size
        self._max_wait = max_wait_us / 1e6
        self._max_queue = max_queue
        self._queue: queue.Queue[Job[In, Out] | None] = queue.Queue(maxsize=max_queue)
        self._thread: threading.Thread | None = None
        self.batches = 0
        self.largest_batch = 0

    @property
    def max_batch_size(self) -> int:
        return self._max_batch

    @max_batch_size.setter
    def max_batch_size(self, value: int) -> None:
        """Settable until start(): an engine may pick it once it knows its device."""
        if self._thread is not None:
            raise RuntimeError("max_batch_size is fixed once the batcher runs")
        self._max_batch = max(1, value)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="arch-router", daemon=True)
            self._thread.start()

    async def submit(self, payload: In) -> Out:
        if self._thread is None:
            raise EngineUnavailable("arch-router engine is not started")
        loop = asyncio.get_running_loop()
        job: Job[In, Out] = Job(payload, loop.create_future(), loop)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise Overloaded(
                f"arch-router queue is full ({self._max_queue} waiting); retry later"
            ) from None
        return await job.future

    def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    def _collect(self, first: Job[In, Out]) -> tuple[list[Job[In, Out]], bool]:
        batch, deadline = [first], first.enqueued + self._max_wait
        while len(batch) < self._max_batch:
            timeout = deadline - time.perf_counter()
            try:
                job = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            batch, stopping = self._collect(first)
            batch = self._live(batch)
            if not batch:
                continue
            now = time.perf_counter()
            for job in batch:
                job.started = now
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            try:
                results = self._process(batch)
            except Exception as exc:  # a bug in one batch must not kill the worker
                log.exception("batch failed", size=len(batch))
                results = [EngineUnavailable(f"arch-router engine failed: {exc}")] * len(batch)
            for job, result in zip(batch, results, strict=True):
                job.loop.call_soon_threadsafe(_settle, job.future, result)

    def _live(self, batch: list[Job[In, Out]]) -> list[Job[In, Out]]:
        """The jobs whose callers still wait (a cancelled future stays cancelled)."""
        live = [job for job in batch if not job.future.cancelled()]
        if len(live) < len(batch):
            count_dropped(len(batch) - len(live))
            log.info("dropped abandoned work", jobs=len(batch) - len(live))
        return live


def _settle(future: asyncio.Future[Out], result: Out | BaseException) -> None:
    if future.done():  # the caller gave up (cancelled)
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
