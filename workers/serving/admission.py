"""Admission control of one worker: a fixed number of slots, a bounded queue, a wait limit.

- A free slot: the request runs at once.
- No free slot and fewer than `max_queue` waiting: it waits, at most `queue_timeout_s`
  (then Busy, answered 503), and stops waiting as soon as its client disconnects (ClientGone).
- The queue full: QueueFull at once (answered 429 with Retry-After), so clients back off
  instead of piling up requests nobody will wait for.

A slot is released by whoever ends the work (the generation thread), through `release()`, which
is safe to call from any thread: the slot count is always the number of generations running.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Awaitable, Callable

POLL_S = 0.25  # how often a waiting request checks that its client is still there


class QueueFull(Exception):
    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"{waiting} requests are already waiting")
        self.waiting, self.retry_after_s = waiting, retry_after_s


class Busy(Exception):
    def __init__(self, waited_s: float):
        super().__init__(f"waited {waited_s:.0f} s for a slot")
        self.waited_s = waited_s


class ClientGone(Exception):
    pass


class Admission:
    def __init__(self, slots: int, max_queue: int, queue_timeout_s: float):
        self.slots, self.max_queue, self.queue_timeout_s = slots, max_queue, queue_timeout_s
        self._free = slots
        self._waiters: list[asyncio.Future] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mean_service_s: float | None = None

    @property
    def running(self) -> int:
        return self.slots - self._free

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def queue_length(self) -> int:
        return self.running + self.waiting

    def retry_after_s(self) -> int:
        """About when a slot frees for a newcomer: mean service time x (queue ahead / slots)."""
        mean = self._mean_service_s or 10.0
        return int(min(600, max(1, math.ceil(mean * (self.waiting + 1) / self.slots))))

    async def acquire(self, disconnected: Callable[[], Awaitable[bool]]) -> None:
        self._loop = asyncio.get_running_loop()
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        if self.waiting >= self.max_queue:
            raise QueueFull(self.waiting, self.retry_after_s())
        waiter = self._loop.create_future()
        self._waiters.append(waiter)
        start = time.monotonic()
        try:
            while True:
                # asyncio.wait, not wait_for: wait_for on Python 3.11 drops a cancellation that lands as the slot
                # arrives, and the request of a client that left would then be served.
                await asyncio.wait({waiter}, timeout=POLL_S)
                if waiter.done():
                    return  # release() handed this waiter the slot
                if await disconnected():
                    raise ClientGone()
                if time.monotonic() - start > self.queue_timeout_s:
                    raise Busy(time.monotonic() - start)
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._hand_over()  # the slot arrived as we gave up: pass it on
            else:
                waiter.cancel()
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

    def _hand_over(self) -> None:
        while self._waiters:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def release(self, service_s: float | None = None) -> None:
        """End of one request's work; callable from any thread."""
        def done():
            if service_s is not None:
                self._mean_service_s = service_s if self._mean_service_s is None else (
                    0.8 * self._mean_service_s + 0.2 * service_s)
            self._hand_over()

        loop = self._loop
        try:
            running_here = asyncio.get_running_loop() is loop
        except RuntimeError:
            running_here = False
        if loop is None or running_here:
            done()
        else:
            loop.call_soon_threadsafe(done)
