"""The batchers' thread runs only while there is work, so a batcher (and its model) that nobody holds is freed."""
from __future__ import annotations

import sys
import threading
import weakref

from tests.helpers import freed
from workers.engine.batch_thread import BatchThread


class Collector:
    """A loop like the batchers': take what arrived, work while anything is under way, return when idle."""

    def __init__(self):
        self.seen: list[int] = []
        self.done = threading.Semaphore(0)
        self.work: BatchThread[int] = BatchThread("collector", self.loop)

    def loop(self):
        while True:
            items = self.work.drain()
            for item in items:
                self.seen.append(item)
                self.done.release()
            if not items and self.work.idle():
                return


def collector_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "collector"]


def test_the_thread_ends_when_idle_and_the_next_item_starts_another():
    c = Collector()
    c.work.put(1)
    assert c.done.acquire(timeout=10)
    for _ in range(200):
        if not collector_threads():
            break
        threading.Event().wait(0.01)
    assert not collector_threads()
    c.work.put(2)
    assert c.done.acquire(timeout=10)
    assert c.seen == [1, 2]


def test_no_item_is_lost_while_the_thread_is_ending():
    """Each item is put right after the previous one was taken, as the thread goes idle: the put and the thread's
    ending race every time."""
    c = Collector()
    count = 20000
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can: the race is met within the count
    try:
        for i in range(count):
            c.work.put(i)
            assert c.done.acquire(timeout=10), f"item {i} never reached the loop"
    finally:
        sys.setswitchinterval(interval)
    assert c.seen == list(range(count))


def test_a_collector_nobody_holds_is_freed_after_its_work():
    c = Collector()
    c.work.put(1)
    assert c.done.acquire(timeout=10)
    ref = weakref.ref(c)
    del c
    assert freed(ref), "the idle thread still holds the loop's owner"
