"""ITREX weight-only INT8 settings, and which of them this CPU can run correctly."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from workers.config import cpu
from workers.config.loading import Strict

# Measured with ITREX 1.4.2 / neural-speed 1.0 on an AVX2-only EPYC and an AMX Xeon (README "Benchmarks"):
#   qbits "int8": wrong results on both (SmolLM2 perplexity 17 -> 2.5e6 with group 128 on the AMX
#     Xeon, 2.4e7 on AVX2), and qbits refuses it per channel ("Illegal config"): refused everywhere;
#   qbits "bf16": refused by qbits without AMX-BF16; with it correct (17.24), prompts 1.6x, decode 0.9x;
#   neural-speed "int8" with VNNI/AMX: perplexity as fp32 and decode 1.1-1.2x, prompts 2-2.8x, but
#     top-1 agreement with fp32 per decode step fell from 93 % to 78 %, and a prompt evaluated in two
#     parts gives other logits than in one (prefix reuse then changes answers). So fp32 stays the default.
_REQUIRED_FLAGS = {
    "int8": ({"avx512_vnni", "avx_vnni", "amx_int8"}, "AVX512-VNNI, AVX-VNNI or AMX-INT8"),
    "bf16": ({"amx_bf16"}, "AMX-BF16"),
}


RUNTIMES = ("auto", "neural-speed", "qbits")


class Int8Settings(Strict):
    """What goes into RtnConfig (qbits) or neural-speed's quantizer. Part of the INT8 cache key."""

    # Which ITREX CPU runtime runs the INT8 weights. "auto": neural-speed (ITREX's own runtime, its
    # bestla kernels and model graphs; 3-4x qbits' decode speed measured, README "Benchmarks") for
    # the architectures it has a graph for (models/families.py NEURAL_SPEED_GRAPHS), else qbits
    # (ITREX's kernels under the transformers model: every family, batching, embeddings, shared cores).
    runtime: Literal[RUNTIMES] = "auto"  # type: ignore[valid-type]
    compute_dtype: Literal["fp32", "bf16", "int8"] = "fp32"
    # -1 = one scale per output channel. Chosen by measurement (README "Benchmarks"): on the 1.1 B
    # model it decoded fastest (1.66x fp32 vs 1.52x for 128, 1.61x for 32) with the smallest RSS,
    # and its perplexity on the embedded model matched fp32.
    group_size: int = Field(default=-1)
    scale_dtype: Literal["fp32", "bf16"] = "fp32"

    def rtn_kwargs(self) -> dict:
        return dict(
            bits=8,
            weight_dtype="int8",
            compute_dtype=self.compute_dtype,
            group_size=self.group_size,
            scale_dtype=self.scale_dtype,
        )


def unsupported_reason(settings: Int8Settings, flags: frozenset[str] | None = None) -> str | None:
    """Why this CPU cannot run `settings` correctly, or None when it can."""
    flags = cpu.flags() if flags is None else flags
    if settings.group_size != -1 and (settings.group_size < 32 or settings.group_size % 32):
        return f"group_size={settings.group_size}: use -1 (per channel) or a multiple of 32"
    if settings.runtime == "neural-speed" and "avx2" not in flags:
        return "int8.runtime='neural-speed' needs AVX2, which this CPU lacks; use runtime: qbits"
    if settings.runtime == "qbits" and settings.compute_dtype == "int8":
        return ("compute_dtype='int8' gives wrong results in the qbits runtime on every CPU measured "
                "(and qbits refuses it per channel); use compute_dtype: fp32, or runtime: neural-speed")
    need = _REQUIRED_FLAGS.get(settings.compute_dtype)
    if need and not (need[0] & flags):
        return (
            f"compute_dtype={settings.compute_dtype!r} needs {need[1]}, which this CPU lacks "
            f"(ITREX gives wrong results or refuses); use compute_dtype='fp32'"
        )
    return None
