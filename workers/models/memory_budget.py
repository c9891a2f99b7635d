"""Will the configured workers fit in RAM? Estimated before anything starts.

Per worker, from the model's config.json and weight index:
- INT8 (ITREX weight-only): 1 byte per linear weight plus one fp32 scale per group; the embedding
  and the output layer stay fp32 (ITREX skips lm_head / output_layer), 4 bytes each;
- fp32: 4 bytes per parameter; bf16: 2;
- KV cache in fp32 for `limit_concurrency` requests of KV_TOKENS_PER_REQUEST tokens, plus the
  prefix cache of recent conversations (`prefix_cache_tokens`); a runtime that allocates its KV memory at
  load (its Runtime.memory_extra, e.g. a KV cache slot of a whole context per sequence) counts when that is more;
- RUNTIME_GIB for the Python process itself (torch, ITREX, FastChat; measured, docs/benchmarks.md).
Plus SERVICES_GIB once, for the controller, the API server and the web UI.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workers.config.files import GIB
from workers.config.int8 import AUTO_GROUP_SIZES
KV_TOKENS_PER_REQUEST = 1024
RUNTIME_GIB = 0.9
SERVICES_GIB = 1.5
# Quantizing: the INT8 model times this factor (save temporaries) plus the process's runtime.
QUANTIZE_SAVE_FACTOR = 1.1
QUANTIZE_RUNTIME_GIB = 1.0
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelShape:
    params: int           # all parameters
    embedding: int        # input embedding parameters
    output: int           # output layer parameters (0 when tied to the embedding)
    kv_bytes_per_token: int  # fp32 K and V over all layers


class UnknownShape(ValueError):
    pass


def kv_bytes_per_token(config: dict) -> int:
    """fp32 K and V of one token over all layers, from a config.json (llama, qwen and chatglm families)."""
    missing = [k for k in ("hidden_size", "num_attention_heads") if k not in config]
    if missing or not (config.get("num_hidden_layers") or config.get("num_layers")):
        raise UnknownShape(f"config.json lacks {', '.join(missing) or 'num_hidden_layers'}")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    layers = config.get("num_hidden_layers") or config.get("num_layers")
    # chatglm: kv_channels; Qwen3, Gemma: head_dim, which need not be hidden / heads (Qwen3-4B: 128, not 80)
    head_dim = config.get("kv_channels") or config.get("head_dim") or hidden // heads
    if config.get("multi_query_attention"):
        kv_heads = config["multi_query_group_num"]  # chatglm
    else:
        kv_heads = config.get("num_key_value_heads") or heads
    return 2 * layers * kv_heads * head_dim * 4


def shape_from_config(config: dict, total_weight_bytes: int | None = None) -> ModelShape:
    """ModelShape from a config.json (llama, qwen and chatglm families) and the index's total_size."""
    kv = kv_bytes_per_token(config)
    hidden = config["hidden_size"]
    vocab = config.get("padded_vocab_size") or config["vocab_size"]
    tied = bool(config.get("tie_word_embeddings", False)) and config.get("model_type") not in ("chatglm", "qwen")
    if total_weight_bytes is None:
        raise UnknownShape("total weight bytes unknown: the model folder has no weight index or weights")
    # transformers >= 4.56 writes the checkpoint dtype as "dtype", earlier versions as "torch_dtype"
    dtype = config.get("torch_dtype") or config.get("dtype") or ("bfloat16" if config.get("bf16") else "float32")
    params = total_weight_bytes // DTYPE_BYTES.get(dtype, 4)
    return ModelShape(params=params, embedding=vocab * hidden, output=0 if tied else vocab * hidden,
                      kv_bytes_per_token=kv)


def shape_of_folder(folder: Path) -> ModelShape:
    config = json.loads((folder / "config.json").read_text())
    total = None
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).is_file():
            total = json.loads((folder / index).read_text()).get("metadata", {}).get("total_size")
            break
    if total is None:
        single = [folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()]
        total = single[0].stat().st_size if single else None
    return shape_from_config(config, total)


def weight_bytes(shape: ModelShape, backend: str, group_size: int | str = -1, bits: int = 8) -> int:
    """`bits`: of the quantized weights (int8.bits), with one fp32 scale per group."""
    if backend == "fp32":
        return shape.params * 4
    if backend == "bf16":
        return shape.params * 2
    linear = shape.params - shape.embedding - shape.output
    if group_size == "auto":  # an upper bound: auto may also resolve to per channel (fewer scales)
        group_size = AUTO_GROUP_SIZES[bits]
    per_weight = bits / 8 + 4 / (group_size if group_size > 0 else 4096)
    return int(linear * per_weight) + (shape.embedding + shape.output) * 4


def worker_bytes(shape: ModelShape, backend: str, limit_concurrency: int, group_size: int | str = -1,
                 prefix_cache_tokens: int = 0, runtime_kv: int = 0, bits: int = 8) -> int:
    """`runtime_kv`: KV memory the worker's runtime allocates at load (Runtime.memory_extra)."""
    kv = shape.kv_bytes_per_token * (KV_TOKENS_PER_REQUEST * limit_concurrency + prefix_cache_tokens)
    return weight_bytes(shape, backend, group_size, bits) + max(kv, runtime_kv) + int(RUNTIME_GIB * GIB)


def quantize_peak_bytes(shape: ModelShape) -> int:
    """Peak anonymous memory of quantizing (workers/engine/runtimes/*/quantize.py) when no INT8 cache exists yet.

    The source is memory-mapped in its checkpoint dtype, so its pages are page cache the kernel
    can drop, not counted here; what must fit is the INT8 model being built plus the save's
    temporaries: QUANTIZE_SAVE_FACTOR x the INT8 size + QUANTIZE_RUNTIME_GIB, as scripts/bench_quantize.sh
    measured (docs/benchmarks.md).
    """
    return int(QUANTIZE_SAVE_FACTOR * weight_bytes(shape, "itrex-int8")) + int(QUANTIZE_RUNTIME_GIB * GIB)


def quantize_peak_of_folder(folder: Path) -> int | None:
    """quantize_peak_bytes of the model in `folder`, or None when its shape cannot be read."""
    try:
        return quantize_peak_bytes(shape_of_folder(folder))
    except (UnknownShape, OSError, ValueError):
        return None


@dataclass(frozen=True)
class Need:
    name: str
    backend: str
    shape: ModelShape
    limit_concurrency: int
    group_size: int | str = -1
    prefix_cache_tokens: int = 0
    runtime_kv: int = 0  # KV memory its runtime allocates at load, on this backend only
    bits: int = 8  # of its quantized weights (int8.bits)

    @property
    def bytes(self) -> int:
        return self.bytes_as(self.backend)

    def bytes_as(self, backend: str) -> int:
        return worker_bytes(self.shape, backend, self.limit_concurrency, self.group_size, self.prefix_cache_tokens,
                            self.runtime_kv if backend == self.backend else 0, self.bits)


def check(needs: list[Need], available_bytes: int) -> str | None:
    """None when everything fits, else a message naming what does not fit and what would."""
    total = sum(n.bytes for n in needs) + int(SERVICES_GIB * GIB)
    if total <= available_bytes:
        return None
    lines = [f"not enough memory: the workers need about {total / GIB:.1f} GiB "
             f"(including {SERVICES_GIB} GiB for controller, API and web), {available_bytes / GIB:.1f} GiB is available."]
    for n in sorted(needs, key=lambda n: -n.bytes):
        line = f"  - {n.name} ({n.backend}): about {n.bytes / GIB:.1f} GiB"
        if n.backend != "itrex-int8":
            int8 = n.bytes_as("itrex-int8")
            line += f"; with backend itrex-int8 about {int8 / GIB:.1f} GiB"
        lines.append(line)
    all_int8 = sum(n.bytes_as("itrex-int8") for n in needs) + int(SERVICES_GIB * GIB)
    if all_int8 <= available_bytes:
        lines.append(f"Everything in itrex-int8 would fit (about {all_int8 / GIB:.1f} GiB): set backend: itrex-int8.")
    else:
        fitting, used = [], int(SERVICES_GIB * GIB)
        for n in sorted(needs, key=lambda n: n.bytes_as("itrex-int8")):
            b = n.bytes_as("itrex-int8")
            if used + b <= available_bytes:
                fitting.append(n.name)
                used += b
        lines.append("Even in itrex-int8 not all fit; in itrex-int8 these would: " + (", ".join(fitting) or "none") + ".")
    return "\n".join(lines)


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux VmHWM). Not getrusage's ru_maxrss: that survives fork and
    exec, so a child started by a big parent reports the parent's peak, not its own (docs/benchmarks.md)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
