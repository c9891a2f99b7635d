"""Work that later tests wait for, started beside tests that leave a core idle: with the session, beside the unit
lane, which keeps about one of the two cores busy (building an INT8 entry, running the neural-speed cases' own pytest
process); or deferred until the integration lane begins (preparing the model families; the fidelity cases' own pytest
process): the unit lane and the work started with it already keep both cores busy, and most integration modules keep
about one.
Each piece runs in a thread (each waits on a child process); a test that needs one waits for its result, and one
that runs without the session having started it (a single file, say) computes it itself."""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, TypeVar

T = TypeVar("T")


class Background:
    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="test-background")
        self._started: dict[str, Future] = {}
        self._deferred: dict[str, Callable[[], object]] = {}

    def start(self, name: str, work: Callable[[], object]) -> None:
        self._started[name] = self._pool.submit(work)

    def defer(self, name: str, work: Callable[[], object]) -> None:
        """`work` starts with `start_deferred`, or when a test asks for its result, whichever comes first."""
        self._deferred[name] = work

    def start_deferred(self) -> None:
        while self._deferred:
            self.start(*self._deferred.popitem())

    def result(self, name: str, otherwise: Callable[[], T]) -> T:
        """What `name` gave (waiting for it; its exception raised here), or `otherwise()` where it was not started."""
        if name in self._deferred:
            self.start(name, self._deferred.pop(name))
        started = self._started.get(name)
        return started.result() if started is not None else otherwise()

    def wait(self, name: str) -> None:
        """Until `name`, where it was started, has ended (its exception, if any, is for `result` to raise)."""
        started = self._started.get(name)
        if started is not None:
            wait([started])

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
