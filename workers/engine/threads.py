"""Per-worker CPU threads and core pinning.

Two workers on two cores with 2 threads each made requests many times slower (OpenMP spin-waiting on
busy cores; docs/benchmarks.md), so each worker gets an explicit thread count and, optionally, its own cores.
Must run before torch is imported: OpenMP reads OMP_NUM_THREADS once, at load time.
"""
from __future__ import annotations

import os
import sys

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def configure(threads: int, cores: list[int] | None = None, shared: bool = False) -> None:
    """`shared`: the thread count is only the most this worker uses (cores shared by demand); its
    idle OpenMP threads then sleep instead of spinning, so they cost the other workers nothing."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if "torch" in sys.modules:
        raise RuntimeError("threads.configure() must run before torch is imported")
    for name in _THREAD_ENV:
        os.environ[name] = str(threads)
    if shared:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if cores:
        available = os.sched_getaffinity(0)
        unknown = sorted(set(cores) - available)
        if unknown:
            raise ValueError(f"cpu cores {unknown} are not available (this process may use {sorted(available)})")
        os.sched_setaffinity(0, cores)


_kernel_threads: dict[str, int] = {}  # the thread count last applied in this process
# Thread-count setters of kernel libraries that split work by their own count (a runtime adds its own at load)
_kernel_pools: list = []


def add_kernel_pool(set_threads) -> None:
    """Keep a kernel library's thread count equal to torch's from now on (apply_to_torch calls `set_threads(n)`),
    starting with the count last applied."""
    if set_threads not in _kernel_pools:
        _kernel_pools.append(set_threads)
        if "n" in _kernel_threads:
            set_threads(_kernel_threads["n"])


def apply_to_torch(threads: int) -> None:
    """Set this thread's torch/OpenMP thread count, and that of the kernel libraries the loaded runtimes use, to
    `threads`. Call after the model is loaded: ITREX resets torch's thread count while loading."""
    import torch

    torch.set_num_threads(threads)  # this thread's OpenMP team, and torch's own pool
    for set_threads in _kernel_pools:
        set_threads(threads)
    _kernel_threads["n"] = threads


def kernel_threads() -> int | None:
    return _kernel_threads.get("n")


def align_this_thread() -> None:
    """Give the calling thread's OpenMP team the size last applied (the one kernel libraries split their work
    into). A thread started later (the batcher's, a request's) otherwise has the default team, which need not
    match."""
    n = _kernel_threads.get("n")
    if n is not None:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
