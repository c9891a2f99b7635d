"""ITREX weight-only INT8 settings, and which of them this CPU can run correctly."""
from __future__ import annotations

from typing import Literal

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
AUTO_GROUP_SIZE = 64


class Int8Settings(Strict):
    """What goes into RtnConfig (qbits) or neural-speed's quantizer. Part of the INT8 cache key."""

    # Which ITREX CPU runtime runs the INT8 weights. "auto": neural-speed (ITREX's own runtime, its
    # bestla kernels and model graphs; 3-4x qbits' decode speed measured, README "Benchmarks") for
    # the architectures it has a graph for (models/families.py NEURAL_SPEED_GRAPHS), else qbits
    # (ITREX's kernels under the transformers model: every family, batching, embeddings, shared cores).
    runtime: Literal[RUNTIMES] = "auto"  # type: ignore[valid-type]
    compute_dtype: Literal["fp32", "bf16", "int8"] = "fp32"
    # Weights per scale along each row; -1 = one scale per output channel. "auto" (engine/int8_runtime):
    # AUTO_GROUP_SIZE when it divides every weight row of the model, else per channel. Measured on the
    # embedded model, 558 tokens (README "INT8 and the quantized-weight cache"): per channel perplexity
    # +1.1 % of fp32 on neural-speed, group 64 +0.3 % (the +0.5 % quality bound), at 0.85-0.97x per
    # channel's decode speed; group 64 with fp32 scales stores 8.5 bits per weight, as llama.cpp's Q8_0.
    group_size: int | Literal["auto"] = "auto"
    scale_dtype: Literal["fp32", "bf16"] = "fp32"

    def rtn_kwargs(self) -> dict:
        if self.group_size == "auto":
            raise ValueError("group_size 'auto' is resolved per model first (engine/int8_runtime.resolve)")
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
    if settings.group_size not in ("auto", -1) and (settings.group_size < 32 or settings.group_size % 32):
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
