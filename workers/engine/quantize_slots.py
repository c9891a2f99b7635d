"""Which quantizations may run at once on this machine (every process that builds INT8 cache entries asks here).

A quantizer child spends seconds importing its libraries on one core before it quantizes, so small models build
faster side by side. Large ones must not: each needs more than its INT8 size at its peak
(memory_budget.quantize_peak_bytes), and two 7 B models at once would not fit. So a build is let in when a slot is
free (one per core) and the peaks of the builds running, its own included, stay within half the available memory
(room for the estimates' error and the memory-mapped checkpoints' pages); a build alone is always let in.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

log = logging.getLogger("int8_cache")

POLL_S = 0.5


def admits(running_needs: list[int], need: int, available: int) -> bool:
    """Whether a build needing `need` bytes at its peak may start beside builds needing `running_needs`."""
    return not running_needs or sum(running_needs) + need <= available // 2


def _slot_files(root: Path, slot: int) -> tuple[Path, Path]:
    return root / f".quantize-slot-{slot}.lock", root / f".quantize-slot-{slot}.json"


@contextlib.contextmanager
def admitted(root: Path, need: int | None, name: str, slots: int | None = None):
    """Hold a quantization slot of cache `root` while inside; wait until `admits` lets this build in.

    need: the build's peak memory estimate in bytes; None (unknown) runs it alone."""
    slots = slots or os.cpu_count() or 1
    need = psutil.virtual_memory().total if need is None else need  # unknown: as if it needed everything
    said = False
    while True:
        with FileLock(str(root / ".quantize-admission.lock")):  # one admission decision at a time
            running, free = [], None
            for slot in range(slots):
                lock_path, note = _slot_files(root, slot)
                lock = FileLock(str(lock_path))
                try:
                    lock.acquire(timeout=0)
                except Timeout:  # a build holds it: its need is in its note (none yet or unreadable: the most)
                    try:
                        running.append(int(json.loads(note.read_text())["need"]))
                    except (OSError, ValueError, KeyError):
                        running.append(psutil.virtual_memory().total)
                    continue
                if free is None:
                    free = (lock, note)
                else:
                    lock.release()
            if free and admits(running, need, psutil.virtual_memory().available):
                lock, note = free
                note.write_text(json.dumps({"need": need, "model": name, "pid": os.getpid()}))
                break
            if free:
                free[0].release()
        if not said:
            log.info("another model is being quantized; %s waits for it to finish", name)
            said = True
        time.sleep(POLL_S)
    try:
        yield
    finally:
        note.unlink(missing_ok=True)
        lock.release()
