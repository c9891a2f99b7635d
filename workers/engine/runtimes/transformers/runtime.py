"""fp32 / bf16: plain transformers baselines in exactly that precision.

Every floating parameter is float32 (bfloat16), whatever the family's code would pick (ChatGLM3 builds its
layers in config.torch_dtype, float16 as shipped; Qwen-7B picks from its fp32/bf16/fp16 flags); the family's
config overrides (families.py) say how, and any parameter still in another dtype is cast.
"""
from __future__ import annotations

import logging

import torch

from workers.engine.runtimes.base import Engine, LoadRequest, Runtime
from workers.models.families import prepare_cpu_config

log = logging.getLogger("loader")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_parameters(model, dtype: torch.dtype) -> int:
    """Cast every floating parameter not in `dtype` to it (buffers stay: rotary tables are float32 by
    design); returns how many were cast. A family whose config overrides work casts none."""
    wrong = [(name, p) for name, p in model.named_parameters() if p.is_floating_point() and p.dtype != dtype]
    if wrong:
        log.warning("%d parameters were not %s after loading (e.g. %s is %s); casting them",
                    len(wrong), dtype, wrong[0][0], wrong[0][1].dtype)
        with torch.no_grad():
            for _, p in wrong:
                p.data = p.data.to(dtype)
    return len(wrong)


class TransformersRuntime(Runtime):
    name = "transformers"
    backends = tuple(DTYPES)

    def load(self, request: LoadRequest, tokenizer):
        from transformers import AutoModelForCausalLM

        dtype = DTYPES[request.backend]
        model = AutoModelForCausalLM.from_pretrained(
            str(request.source),
            config=prepare_cpu_config(request.source, request.trust_remote_code, dtype),
            torch_dtype=dtype,
            low_cpu_mem_usage=True,
            trust_remote_code=request.trust_remote_code,
        )
        cast_parameters(model, dtype)
        return model

    def owns(self, model) -> bool:
        return isinstance(model, torch.nn.Module)  # any transformers model: the qbits runtime's are served here too

    def serve(self, model, served, share=None, batching: bool = True) -> Engine:
        from workers.engine.runtimes.transformers.engine import TransformersEngine

        return TransformersEngine(model, served, share, batching)
