"""Quantizations side by side where their memory allows (workers/engine/quantize_slots.py), with real file locks."""
from __future__ import annotations

import threading
import time

import psutil

from workers.engine import quantize_slots
from workers.engine.quantize_slots import admits

GIB = 2**30


def test_a_build_alone_is_always_let_in_and_beside_others_only_within_half_the_memory():
    assert admits([], 100 * GIB, 1 * GIB)
    assert admits([1 * GIB], 1 * GIB, 4 * GIB)
    assert not admits([1 * GIB], 1 * GIB + 1, 4 * GIB)
    assert not admits([10 * GIB], 10 * GIB, 22 * GIB)  # two 7-8 B models: one after the other


def inside_together(tmp_path, needs: list[int | None], slots: int = 2) -> tuple[bool, list[str]]:
    """Run one build per need from its own thread, the first entering first; whether they were ever inside at once,
    and the order of entering and leaving."""
    events, inside, together = [], [0], [False]
    lock = threading.Lock()
    first_in = threading.Event()

    def build(i, need):
        if i:
            first_in.wait(10)
        with quantize_slots.admitted(tmp_path, need, f"model-{i}", slots=slots):
            with lock:
                inside[0] += 1
                together[0] |= inside[0] > 1
                events.append(f"in {i}")
            first_in.set()
            time.sleep(1.0)
            with lock:
                inside[0] -= 1
                events.append(f"out {i}")

    threads = [threading.Thread(target=build, args=(i, need)) for i, need in enumerate(needs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return together[0], events


def test_small_builds_run_side_by_side(tmp_path):
    together, events = inside_together(tmp_path, [GIB // 4, GIB // 4])
    assert together, events


def test_a_build_too_large_to_share_the_memory_waits_for_the_running_one(tmp_path):
    big = psutil.virtual_memory().total  # more than half of what is available, however much other processes free
    together, events = inside_together(tmp_path, [GIB // 4, big])
    assert not together and events == ["in 0", "out 0", "in 1", "out 1"], events


def test_a_build_of_unknown_size_runs_alone(tmp_path):
    together, events = inside_together(tmp_path, [GIB // 4, None])
    assert not together and events == ["in 0", "out 0", "in 1", "out 1"], events


def test_no_more_builds_at_once_than_slots(tmp_path):
    together, events = inside_together(tmp_path, [GIB // 4, GIB // 4], slots=1)
    assert not together, events
    assert not list(tmp_path.glob("*.json")), "a build that left still holds its slot's note"
