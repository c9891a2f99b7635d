"""Cores shared by demand (`models[].threads: shared`).

A worker uses every shared core while the other shared workers are idle, and its share while they
generate too: before each forward pass it counts the workers generating right now (one small file
per worker in var/run/demand/, holding its pid and how many generations it runs) and sets its
thread count to cores // generating workers. Within one worker, forward passes take turns (a lock),
so concurrent requests never put more threads on the cores than the share: in all, the threads never
exceed the cores, except for at most one decode step while a worker notices that another started.

ITREX's qbits kernels split each matmul into as many parts as *their* thread count, and a team with
fewer threads leaves parts uncomputed (garbage output), so the two are always set together, under
the lock.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import psutil

from workers.config.files import write_atomic
from workers.engine import threads


class CoreShare:
    def __init__(self, folder: Path, name: str, cores: int):
        self.folder, self.name, self.cores = folder, name, cores
        self.folder.mkdir(parents=True, exist_ok=True)
        self._mine = folder / name
        self._active = 0
        self._count_lock = threading.Lock()
        self.step_lock = threading.Lock()
        self._threads = threading.local()
        self._publish()

    def _publish(self) -> None:
        write_atomic(self._mine, f"{os.getpid()} {self._active}\n", mode=0o644)

    def begin(self) -> None:
        with self._count_lock:
            self._active += 1
            self._publish()

    def end(self) -> None:
        with self._count_lock:
            self._active -= 1
            self._publish()

    def generating_workers(self) -> int:
        """Workers generating now, this one included when it is."""
        count = 0
        for entry in os.scandir(self.folder):
            if entry.name.startswith("."):
                continue
            try:
                pid, active = (int(x) for x in Path(entry.path).read_text().split())
            except (OSError, ValueError):
                continue
            if active > 0 and (pid == os.getpid() or psutil.pid_exists(pid)):
                count += 1
        return count

    def share(self) -> int:
        return max(1, self.cores // max(1, self.generating_workers()))

    def apply(self) -> int:
        """Set this thread's torch and qbits thread counts to the current share (call under step_lock)."""
        n = self.share()
        if getattr(self._threads, "n", None) != n or threads.kernel_threads() != n:
            threads.apply_to_torch(n)
            self._threads.n = n
        return n


def share_forward(model, share: CoreShare) -> None:
    """Make every forward pass of `model` take the step lock and run with the current share."""
    original = model.forward

    def forward(*args, **kwargs):
        with share.step_lock:
            share.apply()
            return original(*args, **kwargs)

    model.forward = forward
