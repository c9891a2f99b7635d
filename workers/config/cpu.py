"""What this CPU can do, detected at run time (machines differ: AVX2-only EPYC, Xeon with VNNI/AMX)."""
from __future__ import annotations

from functools import lru_cache

import cpuinfo  # py-cpuinfo


@lru_cache(maxsize=1)
def info() -> dict:
    return cpuinfo.get_cpu_info()


def flags() -> frozenset[str]:
    return frozenset(info().get("flags", []))


def describe() -> str:
    """One line for benchmark reports: model name and the SIMD features that matter for INT8."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16")
    have = [f for f in wanted if f in flags()]
    return f"{info().get('brand_raw', 'unknown CPU')}; features: {' '.join(have) or 'none of ' + ' '.join(wanted)}"
