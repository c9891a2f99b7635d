"""A request whose client left is cancelled; the cancellation must win even when it lands as the awaited thing ends.

asyncio.wait_for on Python 3.11 returns the result instead when both happen in one turn of the event loop: the API
then streamed a left client's answer to its end (the worker never saw the client go), and a queued request that was
cancelled as its slot arrived went on to run.
"""
from __future__ import annotations

import asyncio

import httpx

from workers.serving.admission import Admission
from workers.serving.worker_client import Upstream, WorkerStream


async def _endless_chunks():
    n = 0
    while True:
        await asyncio.sleep(0)  # each chunk ready one turn after the last: cancellations land as chunks arrive
        n += 1
        yield b'{"text": "x"}\0'
        if n > 2000:
            return  # the answer's end: a swallowed cancellation lets the stream run to it


async def _consume(stream: WorkerStream) -> str:
    async for _ in stream.chunks():
        pass
    return "streamed to the end"


def test_a_stream_cancelled_as_a_chunk_arrives_stops():
    async def trial(turns_before_cancel: int) -> bool:
        response = httpx.Response(200, content=_endless_chunks())
        stream = WorkerStream(Upstream(lambda: "http://controller"), response, "http://worker", "m", 5.0)
        task = asyncio.ensure_future(_consume(stream))
        for _ in range(turns_before_cancel):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.wait({task})
        return task.cancelled()

    async def trials():
        return [await trial(k % 7 + 1) for k in range(60)]

    results = asyncio.run(trials())
    assert all(results), f"{results.count(False)} of {len(results)} cancelled streams went on to their end"


def test_a_queued_request_cancelled_as_its_slot_frees_gives_the_slot_back():
    async def scenario():
        admission = Admission(slots=1, max_queue=4, queue_timeout_s=60)
        never_gone = asyncio.Event()

        async def disconnected():
            return never_gone.is_set()

        await admission.acquire(disconnected)  # the slot is taken
        queued = asyncio.ensure_future(admission.acquire(disconnected))
        await asyncio.sleep(0.01)
        assert admission.waiting == 1
        admission.release()  # the slot goes to the queued request ...
        queued.cancel()  # ... whose client leaves in the same turn
        await asyncio.wait({queued})
        return queued.cancelled(), admission.running, admission.waiting

    cancelled, running, waiting = asyncio.run(scenario())
    assert cancelled, "the cancelled request took the slot and would run for a client that left"
    assert (running, waiting) == (0, 0)
