"""Does the memory budget's estimate of an INT8 worker hold? Measured on a real-shape random-weight model.

    python -m workers.tools.memory_check --shape qwen3-8b [--delete]

Builds a random-weight checkpoint with a real model's shape (SHAPES) in bf16, as the real checkpoints
ship, tensor by tensor in 2 GB shards (the whole model never exists in memory), quantizes it into the
INT8 cache the way a first start does, then loads it in a fresh process set up like a worker (malloc
arenas, threads, the worker's imports), runs one short generation and reads its resident memory. That
is compared with memory_budget.worker_bytes for the same model, concurrency 1 and no prefix cache.
Prints figures; asserts nothing. --delete removes the checkpoint and its INT8 entry afterwards (disk).
The model is loaded by the Python running this tool: run it with `.venv-current/bin/python` to measure
the qbits loader of transformers >= 4.50 (runtimes/qbits/saved.py), which today's families get.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from workers.config.files import GIB
from workers.config.paths import int8_cache_dir, var_dir

# config.json values of real checkpoints (their published config.json files). Qwen3-8B is written as
# model_type qwen2 in the pinned transformers (4.40 has no qwen3): the same linear layers, embedding and
# KV heads; qwen3's q/k norms (2 x 128 weights a layer) become qwen2's q/k/v biases (6,144 a layer).
SHAPES = {
    "qwen3-8b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
                     tie_word_embeddings=False, torch_dtype="bfloat16"),
    "qwen2.5-7b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
                       tie_word_embeddings=False, torch_dtype="bfloat16"),
    "qwen2.5-1.5b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                         tie_word_embeddings=True, torch_dtype="bfloat16"),
    "qwen2.5-3b": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=2048,
                       intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                       tie_word_embeddings=True, torch_dtype="bfloat16"),
}
SHARD_BYTES = 2 * 10**9
PROMPT_TOKENS, NEW_TOKENS = 64, 4


def random_checkpoint(name: str, config: dict) -> Path:
    """var/bench/<name>: seeded N(0, 0.02) weights (norm scales 1) of `config`'s model, written one tensor
    at a time into safetensors shards with their index; the embedded model's tokenizer."""
    out = var_dir() / "bench" / name
    if (out / "model.safetensors.index.json").is_file():
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workers.config.files import publish_dir
    from workers.models.embedded import prepare as prepare_embedded

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:  # a tied checkpoint has no lm_head.weight of its own
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, total, shards = {}, {}, 0, 0, []

    def flush(staging: Path) -> None:
        nonlocal shard, shard_bytes
        if shard:
            path = staging / f"part-{len(shards):05d}.safetensors"
            save_file(shard, str(path), metadata={"format": "pt"})
            shards.append((path, list(shard)))
            shard, shard_bytes = {}, 0

    with publish_dir(out) as staging:
        print(f"memory_check: writing a random {name} ({sum(map(_numel, shapes.values())):,} parameters)", flush=True)
        for key, shape in shapes.items():
            if key.endswith("norm.weight"):
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
            size = tensor.numel() * 2
            if shard_bytes + size > SHARD_BYTES:
                flush(staging)
            shard[key], shard_bytes, total = tensor, shard_bytes + size, total + size
        flush(staging)
        for i, (path, keys) in enumerate(shards):
            final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            path.rename(staging / final)
            weight_map.update({k: final for k in keys})
        (staging / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        cfg.save_pretrained(staging)
        AutoTokenizer.from_pretrained(prepare_embedded()).save_pretrained(staging)  # ids < 49152 fit any vocab
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def serve_once(folder: Path) -> dict:
    """In this process, as a worker does: load the INT8 model, generate once, then its resident memory."""
    from workers.serving.worker import limit_malloc_arenas

    limit_malloc_arenas()
    from workers.engine import threads

    threads.configure(1, None, shared=False)
    import uvicorn  # noqa: F401 - a worker's imports count in its memory
    from fastchat.serve.base_model_worker import BaseModelWorker  # noqa: F401

    from workers.engine import generate
    from workers.engine.loader import load_model, release_freed_memory
    from workers.models.memory_budget import peak_rss_bytes

    model, tokenizer = load_model(folder, "itrex-int8", n_threads=1)
    threads.apply_to_torch(1)
    job = generate.Job(prompt_ids=list(range(1000, 1000 + PROMPT_TOKENS)), max_new_tokens=NEW_TOKENS,
                       temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)
    started = time.monotonic()
    result = generate.run(model, tokenizer.decode, lambda t: t, job)
    release_freed_memory()
    with open("/proc/self/status") as f:
        rss = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    import transformers

    return {"rss_bytes": rss, "peak_bytes": peak_rss_bytes(), "tokens": result.completion_tokens,
            "generate_s": time.monotonic() - started, "transformers": transformers.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-8b")
    p.add_argument("--delete", action="store_true", help="delete the checkpoint and its INT8 entry afterwards")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)  # the measured child
    args = p.parse_args(argv)
    if args.serve:
        print(json.dumps(serve_once(args.serve)))
        return 0

    from workers.config.int8 import Int8Settings
    from workers.engine import int8_cache
    from workers.engine.runtimes import registry
    from workers.models import memory_budget

    folder = random_checkpoint(f"random-{args.shape}-bf16", SHAPES[args.shape])
    _, settings = registry.select("itrex-int8", Int8Settings(), folder)
    entry = int8_cache.ensure(folder, settings, int8_cache_dir())
    shape = memory_budget.shape_of_folder(folder)
    estimate = memory_budget.worker_bytes(shape, "itrex-int8", 1, settings.group_size)
    child = subprocess.run([sys.executable, "-m", "workers.tools.memory_check", "--serve", str(folder)],
                           capture_output=True, text=True, env=dict(os.environ))
    if child.returncode != 0:
        print(child.stderr[-4000:], file=sys.stderr)
        return child.returncode
    measured = json.loads(child.stdout.strip().splitlines()[-1])
    rss = measured["rss_bytes"]
    print(f"{args.shape} (random weights, INT8 {settings.runtime}, group size {settings.group_size}): "
          f"{shape.params:,} parameters")
    print(f"  estimate (memory_budget.worker_bytes, concurrency 1): {estimate / GIB:.2f} GiB")
    print(f"  measured RSS after loading and one generation ({PROMPT_TOKENS} + {measured['tokens']} tokens): "
          f"{rss / GIB:.2f} GiB (peak {measured['peak_bytes'] / GIB:.2f} GiB)")
    print(f"  estimate / measured: {estimate / rss:.3f} (RSS), "
          f"{estimate / measured['peak_bytes']:.3f} (peak, what must fit)")
    print(f"  loaded by transformers {measured['transformers']} in {sys.executable}")
    if args.delete:
        shutil.rmtree(entry, ignore_errors=True)
        shutil.rmtree(folder, ignore_errors=True)
        print(f"  deleted {folder} and {entry}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
