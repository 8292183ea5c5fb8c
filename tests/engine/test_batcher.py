"""The batcher drops work whose caller has gone before it runs."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from grpc_router.engines.batcher import Batcher, Job
from grpc_router.observability import metrics


def test_abandoned_jobs_are_dropped_before_they_run() -> None:
    release = threading.Event()
    ran: list[str] = []

    def process(jobs: list[Job[str, str]]) -> list[str | BaseException]:
        ran.extend(job.payload for job in jobs)
        release.wait(10)
        return [f"done {job.payload}" for job in jobs]

    async def run() -> None:
        batcher: Batcher[str, str] = Batcher(process, max_batch_size=1, max_wait_us=0, max_queue=8)
        batcher.start()
        try:
            first = asyncio.create_task(batcher.submit("first"))
            await asyncio.sleep(0.2)  # the worker is now busy with "first"
            gone = asyncio.create_task(batcher.submit("gone"))
            late = asyncio.create_task(asyncio.wait_for(batcher.submit("late"), 0.5))
            kept = asyncio.create_task(batcher.submit("kept"))
            await asyncio.sleep(0.2)  # all three are queued behind "first"
            assert batcher._queue.qsize() == 3
            gone.cancel()
            with contextlib.suppress(TimeoutError):  # its deadline passes in the queue
                await late
            before = metrics.DROPPED._value.get()
            release.set()
            assert await first == "done first"
            assert await kept == "done kept"
            with contextlib.suppress(asyncio.CancelledError):
                await gone
            await asyncio.to_thread(batcher.stop)  # the worker has seen every queued job
            assert ran == ["first", "kept"]
            assert metrics.DROPPED._value.get() - before == 2
        finally:
            await asyncio.to_thread(batcher.stop)

    asyncio.run(run())
