"""Cores shared by demand: the share follows how many workers generate, and never adds up to more
threads than cores."""
from __future__ import annotations

import subprocess
import sys

from workers.config.files import write_atomic
from workers.engine.core_share import CoreShare


def test_a_worker_alone_gets_every_core_and_busy_workers_split_them(tmp_path):
    a, b = CoreShare(tmp_path, "a", 2), CoreShare(tmp_path, "b", 2)
    assert a.share() == 2  # nobody generating: all cores for whoever starts
    a.begin()
    assert a.share() == 2  # the other worker is idle
    b.begin()
    assert a.share() == 1 and b.share() == 1
    a.begin()  # a second generation inside a: still one worker, its steps take turns
    assert a.share() + b.share() <= 2
    b.end()
    assert a.share() == 2
    a.end(), a.end()
    assert a.generating_workers() == 0


def test_the_threads_never_exceed_the_cores(tmp_path):
    cores = 4
    shares = [CoreShare(tmp_path, f"w{i}", cores) for i in range(5)]
    for busy in range(1, 6):
        for s in shares[:busy]:
            s.begin()
        total = sum(s.share() for s in shares[:busy])
        assert total <= max(cores, busy), (busy, total)  # one thread each at least, once workers outnumber cores
        for s in shares[:busy]:
            s.end()


def test_a_crashed_worker_no_longer_counts(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_atomic(tmp_path / "crashed", f"{int(dead.stdout)} 1\n")  # it died while generating
    assert CoreShare(tmp_path, "alive", 2).share() == 2
    write_atomic(tmp_path / "garbage", "not a count\n")
    assert CoreShare(tmp_path, "alive2", 2).generating_workers() == 0
