"""Per-worker CPU threads and core pinning.

Two workers on two cores with 2 threads each made requests 10-20x slower (OpenMP spin-waiting on
busy cores), so each worker gets an explicit thread count and, optionally, its own cores.
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


def apply_to_torch(threads: int) -> None:
    """Call after the model is loaded: ITREX resets torch's thread count while loading."""
    import torch

    torch.set_num_threads(threads)
    # qbits (ITREX's INT8 kernels) splits each matmul into as many parts as *its* thread count,
    # which defaults to every core. A request thread whose OpenMP team is smaller then leaves
    # parts uncomputed: measured garbage output at 1 thread on 2 cores. Keep them equal.
    from intel_extension_for_transformers import qbits

    qbits.set_qbits_threads(threads)
