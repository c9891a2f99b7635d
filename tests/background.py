"""Work that later tests wait for, started with the test session: the unit lane keeps about one of the two cores
busy, so building an INT8 entry, running the neural-speed cases' own pytest process or preparing the model families
(building an environment is mostly download and install) beside it costs little time.
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

    def start(self, name: str, work: Callable[[], object]) -> None:
        self._started[name] = self._pool.submit(work)

    def result(self, name: str, otherwise: Callable[[], T]) -> T:
        """What `name` gave (waiting for it; its exception raised here), or `otherwise()` where it was not started."""
        started = self._started.get(name)
        return started.result() if started is not None else otherwise()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
