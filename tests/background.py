"""Work that later tests wait for, started beside tests that leave a core idle: with the session, beside the unit
lane, which keeps about one of the two cores busy (building an INT8 entry, running the neural-speed cases' own pytest
process); or deferred until the lane reaches a point named by a trigger: the integration lane begins (preparing the
model families: the unit lane and the work started with it already keep both cores busy, and the first integration
modules keep about one), or the families' module is done (the fidelity cases' own pytest process: the families'
bundles need most of the memory).
Each piece runs in a thread (each waits on a child process); a test that needs one waits for its result, and one
that runs without the session having started it (a single file, say) computes it itself."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

T = TypeVar("T")


class Background:
    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-background")
        self._started: dict[str, Future] = {}
        self._deferred: dict[str, tuple[str, Callable[[], object]]] = {}

    def start(self, name: str, work: Callable[[], object]) -> None:
        self._started[name] = self._pool.submit(work)

    def defer(self, name: str, work: Callable[[], object], trigger: str) -> None:
        """`work` starts with `start_deferred(trigger)`, or when a test asks for its result, whichever comes first."""
        self._deferred[name] = (trigger, work)

    def start_deferred(self, trigger: str) -> None:
        for name in [n for n, (t, _) in self._deferred.items() if t == trigger]:
            self.start(name, self._deferred.pop(name)[1])

    def result(self, name: str, otherwise: Callable[[], T]) -> T:
        """What `name` gave (waiting for it; its exception raised here), or `otherwise()` where it was not started."""
        if name in self._deferred:
            self.start(name, self._deferred.pop(name)[1])
        started = self._started.get(name)
        return started.result() if started is not None else otherwise()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
