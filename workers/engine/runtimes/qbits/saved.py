"""Load a saved ITREX INT8 (qbits) checkpoint from the INT8 cache.

ITREX 1.4.2's own `from_pretrained` reloads it on transformers < 4.50 only: from 4.50 on, the private
transformers APIs it calls changed (`_load_pretrained_model`'s signature, `no_init_weights(_enable=)`,
`_set_default_torch_dtype`) and it only logs "Saved low bit model loading failed". On those versions
the same steps are taken here through public APIs: the model is built on the meta device, ITREX's
`build_woq_model` puts its weight-only layers in place of the linear ones, the saved state dict is
assigned (`load_state_dict(assign=True)`), and ITREX's `replace_linear` packs them into qbits layers.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("qbits")

_ITREX_RELOADS_BELOW = (4, 50)


def load_saved(entry: Path, trust_remote_code: bool = False):
    """The INT8 model saved in cache folder `entry`, on CPU, in eval mode."""
    import transformers

    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) < _ITREX_RELOADS_BELOW:
        from intel_extension_for_transformers.transformers import AutoModelForCausalLM as ItrexAuto

        return ItrexAuto.from_pretrained(str(entry), use_neural_speed=False, trust_remote_code=trust_remote_code)
    return _load_on_meta(Path(entry), trust_remote_code)


def _load_on_meta(entry: Path, trust_remote_code: bool):
    import torch
    from accelerate import init_empty_weights
    from intel_extension_for_transformers.transformers import RtnConfig
    from intel_extension_for_transformers.transformers.llm.quantization.utils import replace_linear
    from intel_extension_for_transformers.transformers.modeling.modeling_auto import build_woq_model, save_low_bit
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = AutoConfig.from_pretrained(str(entry), trust_remote_code=trust_remote_code)
    quantization = config.quantization_config
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "rtn":
        raise ValueError(f"{entry}: config.json has no RTN quantization_config (not an INT8 cache entry)")
    rtn = RtnConfig.from_dict(quantization)
    rtn.compute_dtype = rtn.compute_dtype or "fp32"
    rtn.scale_dtype = rtn.scale_dtype or "fp32"
    with init_empty_weights():  # parameters on the meta device; buffers (rotary tables) are computed
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32, trust_remote_code=trust_remote_code)
    model = build_woq_model(model, rtn)
    state = _read_state(entry)
    result = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [k for k in result.missing_keys if _still_meta(model, k)]
    if left:
        raise ValueError(f"{entry}: the INT8 checkpoint lacks {len(left)} tensors (e.g. {left[0]})")
    model.eval()
    model = replace_linear(model, quantization_config=rtn, device="cpu", empty_weights=True)
    if model.can_generate() and (entry / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(entry))
    for param in model.parameters():
        param.requires_grad_(False)
    model.quantization_config = rtn
    model.save_pretrained = save_low_bit.__get__(model)
    log.info("loaded the INT8 checkpoint %s on transformers %s (meta-device build)", entry.name,
             __import__("transformers").__version__)
    return model


def _read_state(entry: Path) -> dict:
    import torch

    files = sorted(entry.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    files = sorted(entry.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{entry}: no weights file (model.safetensors or pytorch_model.bin)")
    state = {}
    for f in files:
        state.update(torch.load(str(f), map_location="cpu"))
    return state


def _still_meta(model, key: str) -> bool:
    try:
        tensor = model.get_parameter(key)
    except AttributeError:
        try:
            tensor = model.get_buffer(key)
        except AttributeError:
            return False
    return tensor.is_meta
