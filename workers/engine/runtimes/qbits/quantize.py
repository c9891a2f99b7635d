"""Quantize a model to ITREX INT8 for the qbits runtime and save it: run as a child process by int8_cache.

Why not simply `ITREX AutoModelForCausalLM.from_pretrained(..., quantization_config=RtnConfig)`:
that path loads the whole model in fp32 (ITREX also calls `.float()` on chatglm), and
neural-compressor then deep-copies the whole fp32 model before quantizing it: two fp32 copies of a
7 B model, more than the machines the bundle targets have (docs/benchmarks.md, 'Figures behind
constants in the code'). Here the model is loaded in its checkpoint's own dtype (bf16 / fp16 for the seed
models: 2 bytes per weight), and ITREX's own `convert_to_quantized_model` runs on one linear layer
at a time, so only that layer exists in fp32 and the deep copy is one layer. Round-to-nearest is
per layer, so the saved checkpoint is bit-identical to ITREX's whole-model path
(tests/integration/test_int8.py checks this).
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
import types
from pathlib import Path

import torch
from tqdm import tqdm

from workers.config.files import GIB
from workers.engine.quantize_child import check_memory, quantizer_cli
from workers.models import memory_budget

log = logging.getLogger("quantize")
# Files the INT8 folder needs besides the weights: custom modeling code for trust_remote_code.
_COPY_PATTERNS = ("*.py",)
# ITREX's replace_linear() leaves these output layers unquantized (matched inside the module name).
_ITREX_SKIPPED = ("lm_head", "output_layer", "embed_out")


def load_source(source: Path, trust_remote_code: bool):
    """The source model in its checkpoint dtype (what config.json's torch_dtype says)."""
    from transformers import AutoModelForCausalLM

    from workers.models.families import prepare_cpu_config

    model = AutoModelForCausalLM.from_pretrained(
        str(source),
        config=prepare_cpu_config(source, trust_remote_code),
        torch_dtype="auto",
        low_cpu_mem_usage=True,
        trust_remote_code=trust_remote_code,
    )
    return model.eval()


def quantize_linears(model, rtn_config) -> int:
    """Replace every linear layer ITREX would quantize by its INT8 qbits layer, one at a time."""
    from intel_extension_for_transformers.transformers.llm.quantization.utils import convert_to_quantized_model

    skipped = _ITREX_SKIPPED + tuple(rtn_config.llm_int8_skip_modules or ())
    targets = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(key in name for key in skipped)
    ]
    inc_logger = logging.getLogger("neural_compressor")
    inc_level = inc_logger.level
    inc_logger.setLevel(logging.ERROR)  # it logs a config table per call, hundreds of times
    try:
        for name in tqdm(targets, desc="quantize linear layers", unit="layer", mininterval=5):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            # A one-layer container, so neural-compressor's deep copy and fp32 cast cover one layer.
            box = torch.nn.Module()
            box.add_module(child, getattr(parent, child).float())
            setattr(parent, child, getattr(convert_to_quantized_model(box, rtn_config, device="cpu"), child))
    finally:
        inc_logger.setLevel(inc_level)
    return len(targets)


def quantize_and_save(source: Path, staging: Path, settings: dict, trust_remote_code: bool) -> None:
    from intel_extension_for_transformers.transformers import RtnConfig
    from intel_extension_for_transformers.transformers.modeling.modeling_auto import save_low_bit

    t0 = time.monotonic()
    check_memory(source)
    log.info("[1/3] loading %s in its checkpoint dtype", source)
    model = load_source(source, trust_remote_code)
    log.info("loaded as %s in %.0f s", next(model.parameters()).dtype, time.monotonic() - t0)
    log.info("[2/3] quantizing linear layers to INT8 with %s", settings)
    rtn_config = RtnConfig(**settings)
    rtn_config.post_init_cpu()
    count = quantize_linears(model, rtn_config)
    # What ITREX's from_pretrained does after quantizing on CPU: everything else in fp32, the
    # config recorded on the model, and its save_low_bit as save_pretrained.
    model.float()
    rtn_config.remove_redundant_parameters()
    model.config.quantization_config = rtn_config
    model.config.update({"low_cpu_mem_usage": True})
    model.device_map = "cpu"
    model.quantization_config = rtn_config
    model.save_pretrained = types.MethodType(save_low_bit, model)
    log.info("[3/3] saving INT8 checkpoint (%d layers quantized, %.0f s so far)", count, time.monotonic() - t0)
    model.save_pretrained(str(staging))
    for pattern in _COPY_PATTERNS:
        for f in source.glob(pattern):
            if not (staging / f.name).exists():
                shutil.copy2(f, staging / f.name)
    peak = memory_budget.peak_rss_bytes()
    log.info("quantized in %.0f s; peak resident memory %.2f GiB, counting the memory-mapped checkpoint's "
             "page cache, which the kernel can reclaim", time.monotonic() - t0, peak / GIB)


def main(argv: list[str] | None = None) -> int:
    return quantizer_cli(quantize_and_save, "quantize one model into an INT8 cache folder",
                         "RtnConfig keyword arguments as JSON", argv)


if __name__ == "__main__":
    sys.exit(main())
