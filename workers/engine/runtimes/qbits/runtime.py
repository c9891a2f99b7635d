"""The qbits runtime: ITREX weight-only INT8 (RtnConfig, quantized by quantize.py), its qbits kernels under the
transformers model. It runs every family, and is served exactly as the transformers runtime serves fp32/bf16
(continuous batching, prefix reuse, embeddings, cores shared by demand)."""
from __future__ import annotations

import json
from pathlib import Path

from workers.config.int8 import Int8Settings
from workers.engine import threads
from workers.engine.runtimes.base import LoadRequest
from workers.engine.runtimes.transformers.runtime import TransformersRuntime


def set_kernel_threads(n: int) -> None:
    """qbits splits each matmul into as many parts as *its* thread count, which defaults to every core; a thread
    whose OpenMP team differs then computes garbage (docs: INT8 runtimes). threads.apply_to_torch keeps them equal."""
    from intel_extension_for_transformers import qbits

    qbits.set_qbits_threads(n)


class QbitsRuntime(TransformersRuntime):
    name = "qbits"
    backends = ("itrex-int8",)
    quantizes = True

    def unsupported_reason(self, settings: Int8Settings, flags: frozenset[str]) -> str | None:
        if settings.compute_dtype == "int8":
            return ("compute_dtype='int8' gives wrong results in the qbits runtime on every CPU measured "
                    "(and qbits refuses it per channel); use compute_dtype: fp32, or runtime: neural-speed")
        return None

    def quantize_command(self, source: Path, staging: Path, inputs: dict, python: str) -> list[str]:
        return [python, "-m", "workers.engine.runtimes.qbits.quantize", "--source", str(source),
                "--staging", str(staging), "--settings", json.dumps(inputs["settings"])]

    def owns(self, model) -> bool:  # ITREX records its RtnConfig on the model's config
        return super().owns(model) and getattr(getattr(model, "config", None), "quantization_config", None) is not None

    def load(self, request: LoadRequest, tokenizer):
        from workers.engine.runtimes.qbits.saved import load_saved

        # Loading repacks the INT8 weights with qbits kernels: with a thread team that differs from
        # qbits' count, part of every matrix is left unpacked (a garbage model from then on).
        threads.add_kernel_pool(set_kernel_threads)
        threads.align_this_thread()
        return load_saved(request.entry, request.trust_remote_code)
