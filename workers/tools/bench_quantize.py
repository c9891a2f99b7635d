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
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import typing
from pathlib import Path

import psutil
from tqdm import tqdm

from workers.config import cpu
from workers.config.files import GIB
from workers.config.int8 import RUNTIMES, Int8Settings
from workers.config.paths import var_dir
from workers.tools import random_model

LIBRARIES = typing.get_args(Int8Settings.model_fields["library"].annotation)  # int8.library's values


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


def build_cache(source: Path, cache_root: Path, settings_json: str) -> None:
    """Child: what `start_all.sh` step [2/4] does for a model without an INT8 cache entry."""
    from workers.engine import int8_cache

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    int8_cache.ensure(source, Int8Settings.model_validate_json(settings_json), cache_root)


def reference_gguf(bits: int) -> str:
    """llama.cpp's type of the same weight width: Q8_0 beside INT8, Q4_0 beside INT4."""
    return {8: "q8_0", 4: "q4_0"}[bits]


def speed_variants(runtime: str, group_size: int | str, llama_cpp: bool, threads=(1, 2), bits: int = 8,
                   library: str = "prebuilt") -> list:
    """The entry just built at each thread count, each beside llama.cpp's type of its width at the same count."""
    from workers.tools.bench_engine import Variant

    return [v for t in threads
            for v in (Variant("itrex-int8", threads=t, runtime=runtime, group_size=group_size, bits=bits,
                              library=library),
                      *([Variant("llama.cpp", threads=t, gguf=reference_gguf(bits))] if llama_cpp else []))]


def print_speeds(runs: dict) -> None:
    """runs: Variant -> [result per round]; medians, and the entry as a ratio to llama.cpp at its thread count."""
    import statistics

    def median(v, key):
        return statistics.median(r[key] for r in runs[v])

    ref = {v.threads: (v.gguf.upper(), [r["decode_tok_s"] for r in runs[v]]) for v in runs
           if v.backend == "llama.cpp" and "error" not in runs[v][0]}
    for v, results in runs.items():
        built = " (library built for this CPU)" if v.library == "native" else ""
        name = f"llama.cpp {v.gguf.upper()}" if v.backend == "llama.cpp" else f"INT{v.bits}{built}"
        if "error" in results[0]:
            print(f"  {name} {v.threads} thread(s): error {results[0]['error']}")
            continue
        decode = median(v, "decode_tok_s")
        ratio = rounds = ""
        if v.backend != "llama.cpp" and v.threads in ref:
            gguf, decodes = ref[v.threads]
            ratio = f" ({decode / statistics.median(decodes):.2f}x llama.cpp {gguf})"
            if len(results) > 1:  # each round's two runs, minutes apart: how far a shared machine's noise reaches
                rounds = "; per round " + ", ".join(f"{r['decode_tok_s'] / d:.2f}x" for r, d in zip(results, decodes))
        print(f"  {name} {v.threads} thread(s): decode {decode:.2f} tok/s{ratio}, prompt {median(v, 'prompt_tok_s'):.1f} "
              f"tok/s, load {median(v, 'load_s'):.0f} s, steady RSS {median(v, 'steady_rss_gib'):.2f} GiB "
              f"(median of {len(results)}{rounds})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(random_model.SHAPES), default="llama-1.1b")
    p.add_argument("--keep", action="store_true", help="keep the generated model, its INT8 cache entry and GGUF files")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="int8.runtime of the entry built (default auto: what a first start picks for this model)")
    p.add_argument("--bits", type=int, choices=(8, 4), default=8, help="int8.bits of the entry built")
    p.add_argument("--library", choices=LIBRARIES, default="prebuilt",
                   help="int8.library of the entry measured (native: llama.cpp compiled for this CPU first, once; "
                        "not counted in the quantization time)")
    p.add_argument("--llama-cpp", action="store_true",
                   help="also llama.cpp Q8_0 (Q4_0 with --bits 4) on the same model, prompt and threads (.venv-bench, "
                        "scripts/setup_bench.sh; converts to GGUF F16, Q8_0 and Q4_0: about 1.8x the bf16 size more disk)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the speed runs (medians)")
    p.add_argument("--child-build", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_build:
        source, cache_root, settings_json = args.child_build
        build_cache(Path(source), Path(cache_root), settings_json)
        return 0
    print(f"CPU: {cpu.describe()}", flush=True)
    from workers.engine.runtimes.registry import by_name, resolve, unsupported_reason
    from workers.models import memory_budget
    from workers.tools.bench_engine import (
        BENCH_PYTHON,
        bench_job,
        ensure_gguf,
        run_child,
    )

    asked = Int8Settings(runtime=args.runtime, bits=args.bits, library=args.library)
    if reason := unsupported_reason(asked):
        p.error(reason)
    source = random_bf16_model(args.shape)
    settings = resolve(asked, source)  # what a first start builds
    if reason := unsupported_reason(settings):  # e.g. library: native on the runtime auto picked
        p.error(reason)
    by_name(settings.runtime).prepare(settings, print)  # e.g. llama.cpp compiled for this CPU, before the timing
    shape = memory_budget.shape_of_folder(source)
    checkpoint = sum(f.stat().st_size for f in source.glob("*.safetensors"))
    cache_root = var_dir() / "bench" / "int8-cache"
    built = sample_tree([sys.executable, "-m", "workers.tools.bench_quantize", "--child-build", str(source),
                         str(cache_root), settings.model_dump_json()])
    int8_bytes = sum(f.stat().st_size for d in cache_root.glob(f"{source.name}-*") if d.is_dir() for f in d.iterdir())
    runs = {v: [] for v in speed_variants(settings.runtime, settings.group_size, args.llama_cpp, bits=args.bits,
                                          library=settings.library)}
    gguf = ensure_gguf(source, BENCH_PYTHON) if args.llama_cpp and built["exit"] == 0 else None
    job_file = cache_root / f"{source.name}-job.json"  # the same token ids for every run
    job_file.write_text(json.dumps(bench_job(source)))
    speed_runs = [(v, results) for _ in range(args.rounds if built["exit"] == 0 else 0) for v, results in runs.items()]
    for v, results in tqdm(speed_runs, desc="speed (interleaved rounds)", unit="run"):
        results.append(run_child(source, v, cache_root, job_file, gguf))
    print(f"\nfirst-start quantization of a {args.shape}-shaped model ({shape.params:,} parameters, "
          f"bf16 checkpoint {checkpoint / GIB:.1f} GiB), {os.cpu_count()} cores:")
    print(f"  CPU: {cpu.describe()}")
    print(f"  {settings.describe()} (resolved for it from runtime {args.runtime}, bits {args.bits})")
    print(f"  exit code {built['exit']}, {built['seconds'] / 60:.1f} min (incl. fingerprint and checksums)")
    print(f"  peak anonymous memory {built['peak_anon_gib']:.2f} GiB "
          f"(the bundle's estimate: {memory_budget.quantize_peak_bytes(shape) / GIB:.2f} GiB)")
    print(f"  peak file-backed memory (mmapped checkpoint, reclaimable) {built['peak_file_gib']:.2f} GiB")
    print(f"  INT8 cache entry {int8_bytes / GIB:.2f} GiB")
    if built["exit"] == 0:
        print_speeds(runs)
    if not args.keep:
        shutil.rmtree(source)
        for entry in [*cache_root.glob(f"{source.name}-*"), *(var_dir() / "bench" / "gguf").glob(f"{source.name}-*")]:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return built["exit"]


if __name__ == "__main__":
    sys.exit(main())
