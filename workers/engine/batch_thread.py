"""The thread a batcher runs its loop on: started by the request that finds none, gone as soon as nothing is
under way and nothing waits. A batcher nobody holds any more is then freed with its model and caches; a thread
that waited for work forever would keep them (a tool that loads several models in one process, a reload)."""
from __future__ import annotations

import queue
import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class BatchThread(Generic[T]):
    def __init__(self, name: str, loop: Callable[[], None]):
        """`loop` runs on the thread: it takes what arrived with `drain()` and returns when `idle()` says so."""
        self._name, self._loop = name, loop
        self._intake: queue.SimpleQueue[T] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def put(self, item: T) -> None:
        """Hand `item` to the loop, starting its thread where none runs."""
        self._intake.put(item)  # before the check: a thread that is ending then sees it (idle() is under the lock)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()

    def drain(self) -> list[T]:
        """Everything put since the last call, without waiting."""
        items = []
        while True:
            try:
                items.append(self._intake.get_nowait())
            except queue.Empty:
                return items

    def idle(self) -> bool:
        """Called by the loop when it has nothing under way: True (and the loop must return) unless something
        arrived meanwhile."""
        with self._lock:
            if not self._intake.empty():
                return False
            self._thread = None
            return True
