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
RUNTIMES = ("auto", "neural-speed", "qbits", "llama-cpp")
AUTO_GROUP_SIZE = 64
# Weight bits config accepts: 8 (the default) or 4, each with its own ITREX weight dtype and `auto` group size
# (4 bits: group 32 keeps the embedded model's perplexity cost smallest for the least decode speed given up;
# docs/int8.md "4-bit weights").
WEIGHT_DTYPES = {8: "int8", 4: "int4_clip"}
AUTO_GROUP_SIZES = {8: AUTO_GROUP_SIZE, 4: 32}


class Int8Settings(Strict):
    """What goes into RtnConfig (qbits) or neural-speed's quantizer. Part of the INT8 cache key."""

    # Which ITREX CPU runtime runs the INT8 weights. "auto": the registry's first that serves the model
    # (engine/runtimes/registry.py): neural-speed (ITREX's own runtime, its bestla kernels and model graphs,
    # much faster decoding: docs/benchmarks.md) for the architectures it has a graph for, else qbits
    # (ITREX's kernels under the transformers model: every family, batching, embeddings, shared cores).
    # "llama-cpp": llama.cpp's Q8_0 (its converter and kernels), only where named: every family its converter
    # knows, batching; faster than ITREX on AVX2-only CPUs (docs/int8.md); group_size and the dtypes do not apply.
    runtime: Literal[RUNTIMES] = "auto"  # type: ignore[valid-type]
    # 4: INT4 weights (half the bytes of INT8 to read per token, a larger perplexity cost: docs/int8.md)
    bits: Literal[8, 4] = 8
    compute_dtype: Literal["fp32", "bf16", "int8"] = "fp32"
    # Weights per scale along each row; -1 = one scale per output channel. "auto" (engine/runtimes/registry):
    # AUTO_GROUP_SIZE when it divides every weight row of the model, else per channel: group 64 keeps the
    # embedded model within the +0.5 % perplexity bound where per channel does not (docs/benchmarks.md);
    # with fp32 scales it stores 8.5 bits per weight, as llama.cpp's Q8_0.
    group_size: int | Literal["auto"] = "auto"
    scale_dtype: Literal["fp32", "bf16"] = "fp32"
    # Which build of the runtime's library runs the weights: "prebuilt" (what the pinned packages ship) or "native"
    # (compiled on this host for its CPU by the first start), for a runtime that offers it (Runtime.libraries; today
    # llama-cpp: docs/int8.md). Not part of the INT8 cache key: both read the same file.
    library: Literal["prebuilt", "native"] = "prebuilt"

    @property
    def auto_group_size(self) -> int:
        """The group size `auto` means for these bits where it divides every weight row."""
        return AUTO_GROUP_SIZES[self.bits]

    def describe(self) -> str:
        """How the start output and the worker's log name these settings, e.g. "INT4 weights, qbits, groups of 32"."""
        groups = {"auto": "group size auto", -1: "per channel"}.get(self.group_size, f"groups of {self.group_size}")
        built = ", built for this CPU" if self.library == "native" else ""
        return f"INT{self.bits} weights, {self.runtime}{built}, {groups}"

    def rtn_kwargs(self) -> dict:
        if self.group_size == "auto":
            raise ValueError("group_size 'auto' is resolved per model first (engine/runtimes/registry.resolve)")
        return dict(
            bits=self.bits,
            weight_dtype=WEIGHT_DTYPES[self.bits],
            compute_dtype=self.compute_dtype,
            group_size=self.group_size,
            scale_dtype=self.scale_dtype,
        )


def row_width_problem(settings: Int8Settings, widths: set[int]) -> str | None:
    """Why `settings` cannot quantize a model whose weight rows are `widths` wide, or None: with 4 bits, ITREX's
    kernels quietly give wrong results for a group size that does not divide every row (measured: group 128 on
    576-wide rows)."""
    if settings.bits != 4 or settings.group_size in ("auto", -1):
        return None
    uneven = sorted(w for w in widths if w % settings.group_size)
    if uneven:
        return (f"group_size={settings.group_size} does not divide the model's {'/'.join(map(str, uneven))}-wide weight "
                f"rows, and with bits: 4 ITREX's kernels give wrong results then; use auto, -1 (per channel) or a "
                f"group size that divides every row")
    return None


def unsupported_reason(settings: Int8Settings, flags: frozenset[str] | None = None,
                       runtime_reason: Callable[[Int8Settings, frozenset[str]], str | None] | None = None) -> str | None:
    """Why this CPU cannot run `settings` correctly, or None when it can. `runtime_reason`: the named runtime's own
    check (engine/runtimes/registry.unsupported_reason passes it; config alone checks what every runtime needs)."""
    flags = cpu.flags() if flags is None else flags
    if settings.group_size not in ("auto", -1) and (settings.group_size < 32 or settings.group_size % 32):
        return f"group_size={settings.group_size}: use -1 (per channel) or a multiple of 32"
    if settings.bits == 4 and settings.group_size not in ("auto", -1) and settings.group_size & (settings.group_size - 1):
        return (f"group_size={settings.group_size} with bits: 4: ITREX's INT4 kernels give wrong results for a group "
                f"size that is not a power of two (measured: 96, 192); use -1, 32, 64, 128, ...")
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
