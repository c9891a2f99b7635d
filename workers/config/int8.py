"""ITREX weight-only INT8 settings, and which of them this CPU can run correctly."""
from __future__ import annotations

from typing import Callable, Literal

from workers.config import cpu
from workers.config.loading import Strict

# The compute dtypes other than fp32 need these CPU features (without them ITREX gives wrong results or refuses);
# where they run, fp32 stays the default (measured per runtime: docs/benchmarks.md). A runtime's own limits are
# its Runtime.unsupported_reason (engine/runtimes).
_REQUIRED_FLAGS = {
    "int8": ({"avx512_vnni", "avx_vnni", "amx_int8"}, "AVX512-VNNI, AVX-VNNI or AMX-INT8"),
    "bf16": ({"amx_bf16"}, "AMX-BF16"),
}


# The INT8 runtimes config accepts (engine/runtimes/registry.py asserts they are its INT8 runtimes' names).
RUNTIMES = ("auto", "neural-speed", "qbits")
AUTO_GROUP_SIZE = 64


class Int8Settings(Strict):
    """What goes into RtnConfig (qbits) or neural-speed's quantizer. Part of the INT8 cache key."""

    # Which ITREX CPU runtime runs the INT8 weights. "auto": the registry's first that serves the model
    # (engine/runtimes/registry.py): neural-speed (ITREX's own runtime, its bestla kernels and model graphs,
    # much faster decoding: docs/benchmarks.md) for the architectures it has a graph for, else qbits
    # (ITREX's kernels under the transformers model: every family, batching, embeddings, shared cores).
    runtime: Literal[RUNTIMES] = "auto"  # type: ignore[valid-type]
    compute_dtype: Literal["fp32", "bf16", "int8"] = "fp32"
    # Weights per scale along each row; -1 = one scale per output channel. "auto" (engine/runtimes/registry):
    # AUTO_GROUP_SIZE when it divides every weight row of the model, else per channel: group 64 keeps the
    # embedded model within the +0.5 % perplexity bound where per channel does not (docs/benchmarks.md);
    # with fp32 scales it stores 8.5 bits per weight, as llama.cpp's Q8_0.
    group_size: int | Literal["auto"] = "auto"
    scale_dtype: Literal["fp32", "bf16"] = "fp32"

    def rtn_kwargs(self) -> dict:
        if self.group_size == "auto":
            raise ValueError("group_size 'auto' is resolved per model first (engine/runtimes/registry.resolve)")
        return dict(
            bits=8,
            weight_dtype="int8",
            compute_dtype=self.compute_dtype,
            group_size=self.group_size,
            scale_dtype=self.scale_dtype,
        )


def unsupported_reason(settings: Int8Settings, flags: frozenset[str] | None = None,
                       runtime_reason: Callable[[Int8Settings, frozenset[str]], str | None] | None = None) -> str | None:
    """Why this CPU cannot run `settings` correctly, or None when it can. `runtime_reason`: the named runtime's own
    check (engine/runtimes/registry.unsupported_reason passes it; config alone checks what every runtime needs)."""
    flags = cpu.flags() if flags is None else flags
    if settings.group_size not in ("auto", -1) and (settings.group_size < 32 or settings.group_size % 32):
        return f"group_size={settings.group_size}: use -1 (per channel) or a multiple of 32"
    problem = runtime_reason(settings, flags) if runtime_reason is not None else None
    if problem:
        return problem
    need = _REQUIRED_FLAGS.get(settings.compute_dtype)
    if need and not (need[0] & flags):
        return (
            f"compute_dtype={settings.compute_dtype!r} needs {need[1]}, which this CPU lacks "
            f"(ITREX gives wrong results or refuses); use compute_dtype='fp32'"
        )
    return None
