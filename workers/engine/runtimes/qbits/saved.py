"""Load a saved ITREX INT8 (qbits) checkpoint from the INT8 cache.

ITREX 1.4.2's own `from_pretrained` reloads it on transformers < 4.50 only: from 4.50 on, the private
transformers APIs it calls changed (`_load_pretrained_model`'s signature, `no_init_weights(_enable=)`,
`_set_default_torch_dtype`) and it only logs "Saved low bit model loading failed". On those versions
the same steps are taken here through public APIs: the model is built on the meta device, ITREX's
`build_woq_model` puts its weight-only layers in place of the linear ones, the saved state dict is
assigned (`load_state_dict(assign=True)`), and ITREX's `replace_linear` packs them into qbits layers.

Memory: the zero-filled buffers build_woq_model allocates are dropped before the checkpoint is read, every
tensor is copied out of the checkpoint file into the process's own memory, one tensor per file mapping,
and the loader keeps no reference to the state dict while the layers are packed. A tensor
that safetensors hands out is a view of the file's mapping, and one live view keeps the whole mapping:
the INT8 weights read once for packing then stayed in the worker's resident memory beside their packed
copies, as did the embedding's file pages next to it (docs/benchmarks.md, 'INT8 worker memory against the
estimate').
"""
from __future__ import annotations

import ctypes
import logging
from contextlib import contextmanager
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
    with _large_blocks_unmapped_when_freed():
        model = build_woq_model(model, rtn)
        _drop_placeholders(model, entry)
        result = model.load_state_dict(_read_state(entry), strict=False, assign=True)  # the model holds the only
        model.tie_weights()                                   # refs: each INT8 weight is freed once it is packed
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


# glibc's mallopt parameter, and its largest dynamic threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
_M_MMAP_THRESHOLD = -3
_PACKING_MMAP_THRESHOLD = 1 << 20
_SERVING_MMAP_THRESHOLD = 32 << 20


@contextmanager
def _large_blocks_unmapped_when_freed():
    """While loading, blocks of 1 MiB and more get their own mapping, returned to the OS when freed. Each
    layer's INT8 weight and its unpacking temporaries are freed once it is packed; on glibc's heap (its
    dynamic threshold rises to the size of such blocks) they left holes that only malloc_trim returned,
    raising the load's peak (docs/benchmarks.md, 'INT8 worker memory against the estimate'). Afterwards
    the threshold is glibc's own dynamic maximum, so serving allocates as before."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, _PACKING_MMAP_THRESHOLD)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _SERVING_MMAP_THRESHOLD)


def _drop_placeholders(model, entry: Path) -> None:
    """Put on the meta device the tensors the checkpoint will replace. build_woq_model allocates every
    weight-only layer's buffers (qweight, scales, zeros) for real, zero-filled: as large as the INT8
    weights themselves, and alive beside the checkpoint's copies until load_state_dict replaces them."""
    from workers.models.weight_shapes import checkpoint_tensors

    for name in checkpoint_tensors(entry):
        path, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(path)
        except AttributeError:
            continue
        placeholder = module._buffers.get(attr)
        if placeholder is not None and not placeholder.is_meta:
            setattr(module, attr, placeholder.to("meta"))


def _read_state(entry: Path) -> dict:
    import torch

    files = sorted(entry.glob("*.safetensors"))
    if files:
        return {name: tensor for f in files for name, tensor in _copied_tensors(f)}
    files = sorted(entry.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"{entry}: no weights file (model.safetensors or pytorch_model.bin)")
    state = {}
    for f in files:
        state.update(torch.load(str(f), map_location="cpu"))
    return state


def _copied_tensors(path: Path):
    """(name, tensor) of a safetensors file, each in memory of its own: opened once per tensor, so that no
    file mapping outlives the copy of the one tensor it was opened for."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = list(f.keys())
    for name in names:
        with safe_open(str(path), framework="pt") as f:
            yield name, f.get_tensor(name).clone()


def _still_meta(model, key: str) -> bool:
    try:
        tensor = model.get_parameter(key)
    except AttributeError:
        try:
            tensor = model.get_buffer(key)
        except AttributeError:
            return False
    return tensor.is_meta
