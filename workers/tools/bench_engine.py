"""In-process engine benchmark: fp32 vs ITREX INT8 variants, side by side in one run.

Each measurement runs in a fresh child process (so load time and RSS are clean), variants are
interleaved round by round (so machine noise hits all of them alike), and the report gives
medians and ratios to fp32. Prints figures; asserts nothing.

    python -m workers.tools.bench_engine                      # embedded model + random 1 B Llama
    python -m workers.tools.bench_engine --explore            # also group sizes, compute dtypes, threads
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from workers.config import cpu
from workers.config.files import GIB
from workers.config.paths import ROOT, reports_dir
from workers.tools import random_model

PROMPT_TOKENS = 128
DECODE_TOKENS = 64


@dataclass(frozen=True)
class Variant:
    backend: str  # fp32 | bf16 | itrex-int8
    threads: int = 2
    compute_dtype: str = "fp32"
    group_size: int = -1

    @property
    def label(self) -> str:
        if self.backend != "itrex-int8":
            return f"{self.backend} t{self.threads}"
        return f"int8 {self.compute_dtype} g{self.group_size} t{self.threads}"


def random_llama_1b() -> Path:
    """A TinyLlama-shaped model (1.1 B parameters) with random weights: speed does not depend on them."""
    return random_model.random_llama("random-llama-1.1b", random_model.TINYLLAMA_EMBEDDED_VOCAB, "float32")


def measure(model_path: Path, variant: Variant, cache_root: Path) -> dict:
    """Runs in the child process."""
    from workers.engine import threads

    threads.configure(variant.threads)
    import psutil
    import resource

    import torch

    from workers.config.int8 import Int8Settings
    from workers.engine.loader import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(
        model_path, variant.backend, cache_root=cache_root,
        int8=Int8Settings(compute_dtype=variant.compute_dtype, group_size=variant.group_size),
    )
    load_s = time.perf_counter() - t0
    threads.apply_to_torch(variant.threads)
    text = (ROOT / "tests" / "data" / "perplexity_paragraph.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        ppl = torch.exp(model(ids, labels=ids).loss).item()
        prompt = ids.repeat(1, PROMPT_TOKENS // ids.shape[1] + 1)[:, :PROMPT_TOKENS]
        model(prompt)  # warm-up
        t0 = time.perf_counter()
        model(prompt)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(prompt[:, :16], max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False)
        decode_s = time.perf_counter() - t0
    return {
        "load_s": load_s,
        "prompt_tok_s": PROMPT_TOKENS / prefill_s,
        "decode_tok_s": DECODE_TOKENS / decode_s,
        "steady_rss_gib": psutil.Process().memory_info().rss / GIB,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,  # ru_maxrss is KiB
        "ppl": ppl,
    }


def run_child(model_path: Path, variant: Variant, cache_root: Path) -> dict:
    cmd = [sys.executable, "-m", "workers.tools.bench_engine", "--child", str(model_path),
           json.dumps(asdict(variant)), str(cache_root)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cache_root)  # the package is installed: no PYTHONPATH
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1][len("RESULT "):])


def int8_weight_bytes(cache_root: Path, model_path: Path) -> int:
    sizes = [f.stat().st_size for d in cache_root.glob(f"{model_path.name}-*") for f in d.glob("*.safetensors")]
    return min(sizes) if sizes else 0


def variants_for(explore: bool, bf16_backend: bool = False) -> list[Variant]:
    variants = [Variant("fp32"), Variant("itrex-int8")]
    if explore:
        variants += [
            Variant("itrex-int8", group_size=128), Variant("itrex-int8", group_size=32),
            Variant("itrex-int8", compute_dtype="int8"), Variant("itrex-int8", compute_dtype="bf16"),
            Variant("fp32", threads=1), Variant("itrex-int8", threads=1),
        ]
    if bf16_backend:  # opt-in: without AVX512-BF16/AMX, torch computes bf16 slowly (minutes per 1 B run)
        variants.append(Variant("bf16"))
    return variants


def summarize(results: dict, models: list[Path], variants: list[Variant], cache_root: Path) -> str:
    lines = [f"Engine benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
             f"medians over rounds; prompt {PROMPT_TOKENS} tokens, decode {DECODE_TOKENS} tokens)",
             f"CPU: {cpu.describe()}", ""]
    header = "| model | variant | decode tok/s | x fp32 | prompt tok/s | x fp32 | load s | steady RSS GiB | peak RSS GiB | ppl |"
    for model in models:
        lines += [header, "|" + "---|" * 10]
        base = None
        for v in variants:
            runs = [r for r in results[(model.name, v.label)] if "error" not in r]
            if not runs:
                err = results[(model.name, v.label)][0].get("error", "?")
                lines.append(f"| {model.name} | {v.label} | failed: {err} |" + " |" * 7)
                continue
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            if v == Variant("fp32"):
                base = med
            ratio = (lambda k: f"{med[k] / base[k]:.2f}") if base else (lambda k: "-")
            lines.append(
                f"| {model.name} | {v.label} | {med['decode_tok_s']:.1f} | {ratio('decode_tok_s')} | "
                f"{med['prompt_tok_s']:.0f} | {ratio('prompt_tok_s')} | {med['load_s']:.1f} | "
                f"{med['steady_rss_gib']:.2f} | {med['peak_rss_gib']:.2f} | {med['ppl']:.2f} |"
            )
        weight = int8_weight_bytes(cache_root, model)
        if weight:
            lines.append(f"\nINT8 checkpoint of {model.name}: {weight / GIB:.2f} GiB on disk.\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        model_path, variant, cache_root = Path(argv[1]), Variant(**json.loads(argv[2])), Path(argv[3])
        print("RESULT " + json.dumps(measure(model_path, variant, cache_root)), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--explore", action="store_true", help="also other group sizes, compute dtypes, threads")
    p.add_argument("--models", choices=("embedded", "random-1b", "both"), default="both")
    p.add_argument("--bf16-backend", action="store_true", help="also the plain bf16 backend (slow on CPUs without bf16 units)")
    args = p.parse_args(argv)
    print(f"CPU: {cpu.describe()}", flush=True)

    from workers.engine import int8_cache
    from workers.models.embedded import prepare
    from workers.config.int8 import Int8Settings, unsupported_reason
    from workers.config.paths import int8_cache_dir

    models = ([prepare()] if args.models != "random-1b" else []) + ([random_llama_1b()] if args.models != "embedded" else [])
    variants = variants_for(args.explore, args.bf16_backend)
    cache_root = int8_cache_dir()
    for model in models:  # quantize up front so load times below are cache loads
        for v in variants:
            settings = Int8Settings(compute_dtype=v.compute_dtype, group_size=v.group_size)
            if v.backend == "itrex-int8" and unsupported_reason(settings) is None:
                int8_cache.ensure(model, settings, cache_root)
    results = {(m.name, v.label): [] for m in models for v in variants}
    jobs = [(r, m, v) for r in range(args.rounds) for m in models for v in variants]
    for _, model, v in tqdm(jobs, desc="bench (interleaved rounds)", unit="run"):
        if v.backend == "itrex-int8":
            problem = unsupported_reason(Int8Settings(compute_dtype=v.compute_dtype, group_size=v.group_size))
            if problem:
                results[(model.name, v.label)].append({"error": problem})
                continue
        results[(model.name, v.label)].append(run_child(model, v, cache_root))
    report = summarize(results, models, variants, cache_root)
    out = reports_dir() / "bench-engine.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    print(report)
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
