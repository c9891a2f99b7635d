"""First-start quantization on a model shaped like a seed model: time, peak memory, INT8 speed.

The seed models cannot be downloaded here, so this builds a random-weight Llama with the same
linear-layer and embedding sizes as Qwen-7B-Chat or ChatGLM3-6B, saved in bf16 like the real
checkpoints. It builds the model's INT8 cache entry the way a first start does (int8_cache, with
the default settings resolved to this model's runtime and group size, and its quantizer child)
while sampling the memory of that process tree, then measures INT8 decode speed from that entry
with bench_engine's measurement. Memory splits into anonymous memory (what
must fit in RAM) and file-backed pages of the memory-mapped checkpoint (page cache the kernel can
drop and re-read). Prints figures; asserts nothing. Needs about 2.3x the bf16 size in free disk on qbits, 3.5x on
neural-speed (its fp32 graph file, deleted once the INT8 file is written).

    python -m workers.tools.bench_quantize --shape qwen-7b
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from workers.config import cpu
from workers.config.files import GIB
from workers.config.paths import var_dir
from workers.tools import random_model


def random_bf16_model(shape: str) -> Path:
    """Saved in bf16 like the real checkpoints, in 2 GB shards."""
    return random_model.random_llama(f"random-{shape}-bf16", random_model.SHAPES[shape], "bfloat16", max_shard_size="2GB")


def sample_tree(cmd: list[str]) -> dict:
    """Run `cmd`, sampling the anonymous and file-backed resident memory of it and its children."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd)  # the package is installed: no PYTHONPATH
    root = psutil.Process(proc.pid)
    peak_anon = peak_file = 0
    while proc.poll() is None:
        anon = file = 0
        try:
            for p in [root] + root.children(recursive=True):
                mem = p.memory_info()
                anon, file = anon + mem.rss - mem.shared, file + mem.shared
        except psutil.NoSuchProcess:
            continue
        peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file)
        time.sleep(0.2)
    return {"exit": proc.returncode, "seconds": time.monotonic() - t0,
            "peak_anon_gib": peak_anon / GIB, "peak_file_gib": peak_file / GIB}


def build_cache(source: Path, cache_root: Path) -> None:
    """Child: what `start_all.sh` step [2/4] does for a model without an INT8 cache entry."""
    from workers.engine import int8_cache
    from workers.config.int8 import Int8Settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    int8_cache.ensure(source, Int8Settings(), cache_root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(random_model.SHAPES), default="llama-1.1b")
    p.add_argument("--keep", action="store_true", help="keep the generated model and its INT8 cache entry")
    p.add_argument("--child-build", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_build:
        build_cache(*args.child_build)
        return 0
    print(f"CPU: {cpu.describe()}", flush=True)
    from workers.models import memory_budget
    from workers.tools.bench_engine import Variant, run_child

    from workers.config.int8 import Int8Settings
    from workers.engine.int8_runtime import resolve

    source = random_bf16_model(args.shape)
    settings = resolve(Int8Settings(), source)  # what a first start with the default settings builds
    shape = memory_budget.shape_of_folder(source)
    checkpoint = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    cache_root = var_dir() / "bench" / "int8-cache"
    built = sample_tree([sys.executable, "-m", "workers.tools.bench_quantize", "--child-build", str(source), str(cache_root)])
    int8_bytes = sum(f.stat().st_size for d in cache_root.glob(f"{source.name}-*") if d.is_dir() for f in d.iterdir())
    variant = dict(runtime=settings.runtime, group_size=settings.group_size)  # the entry just built
    speeds = {t: run_child(source, Variant("itrex-int8", threads=t, **variant), cache_root) for t in (1, 2)} \
        if built["exit"] == 0 else {}
    print(f"\nfirst-start quantization of a {args.shape}-shaped model ({shape.params:,} parameters, "
          f"bf16 checkpoint {checkpoint / GIB:.1f} GiB), {os.cpu_count()} cores:")
    print(f"  CPU: {cpu.describe()}")
    print(f"  INT8 runtime {settings.runtime}, group size {settings.group_size} (the defaults, resolved for it)")
    print(f"  exit code {built['exit']}, {built['seconds'] / 60:.1f} min (incl. fingerprint and checksums)")
    print(f"  peak anonymous memory {built['peak_anon_gib']:.2f} GiB "
          f"(the bundle's estimate: {memory_budget.quantize_peak_bytes(shape) / GIB:.2f} GiB)")
    print(f"  peak file-backed memory (mmapped checkpoint, reclaimable) {built['peak_file_gib']:.2f} GiB")
    print(f"  INT8 cache entry {int8_bytes / GIB:.2f} GiB")
    for threads, r in speeds.items():
        if "error" in r:
            print(f"  INT8 {threads} thread(s): error {r['error']}")
        else:
            print(f"  INT8 {threads} thread(s): decode {r['decode_tok_s']:.2f} tok/s, prompt {r['prompt_tok_s']:.1f} tok/s, "
                  f"load from cache {r['load_s']:.0f} s, steady RSS {r['steady_rss_gib']:.2f} GiB")
    if not args.keep:
        shutil.rmtree(source)
        for entry in cache_root.glob(f"{source.name}-*"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return built["exit"]


if __name__ == "__main__":
    sys.exit(main())
