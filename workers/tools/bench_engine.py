"""In-process engine benchmark: fp32 vs ITREX INT8 variants vs llama.cpp, side by side in one run.

Each measurement runs in a fresh child process (so load time and RSS are clean), variants are
interleaved round by round (so machine noise hits all of them alike), and the report gives
medians and ratios to fp32 and to llama.cpp Q8_0 and Q4_0. Every variant decodes the same prompt (the same
token ids, from the model's HF tokenizer) greedily, timed from the first new token to the last.
Each also gets an effective read bandwidth, weight bytes read per decode step x tok/s, shown next
to the machine's read bandwidth measured with numpy in each round. Prints figures; asserts nothing.

    python -m workers.tools.bench_engine                      # embedded model + random 1 B Llama
    python -m workers.tools.bench_engine --explore            # also group sizes and 1 thread
    python -m workers.tools.bench_engine --int4-groups        # also INT4 (bits: 4) at each group size
    python -m workers.tools.bench_engine --llama-cpp          # also llama.cpp F16, Q8_0 and Q4_0 (.venv-bench)
    python -m workers.tools.bench_engine --batch 4            # also 1 vs 4 sequences through the batcher
    python -m workers.tools.bench_engine --models random-1.5b # a 32-layer Llama (neural-speed runs it unpadded)

llama.cpp runs in .venv-bench (scripts/setup_bench.sh, llama-cpp-python built from source with
native flags), through workers/tools/bench_llama_cpp.py: this environment never imports llama_cpp.
The models are converted with llama.cpp's own converter and cached under var/bench/gguf.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from workers.config import cpu
from workers.config.files import GIB
from workers.config.paths import ROOT, reports_dir, var_dir
from workers.models import memory_budget
from workers.models.weight_shapes import StoredTensor, checkpoint_tensors
from workers.tools import random_model

PROMPT_TOKENS = 128
DECODE_TOKENS = 64


BENCH_PYTHON = ROOT / ".venv-bench" / "bin" / "python"  # scripts/setup_bench.sh
LLAMA_CPP_CHILD = Path(__file__).with_name("bench_llama_cpp.py")
GGUF_TYPES = ("f16", "q8_0", "q4_0")
MEMBW_BYTES = 1 << 30  # the numpy array of the read-bandwidth measurement


@dataclass(frozen=True)
class Variant:
    backend: str  # fp32 | bf16 | itrex-int8 | llama.cpp (.venv-bench's, the reference)
    threads: int = 2
    compute_dtype: str = "fp32"
    group_size: int | str = "auto"  # what the bundle serves by default (config/int8.py)
    gguf: str = ""  # llama.cpp: f16 | q8_0 | q4_0
    runtime: str = "qbits"  # itrex-int8: qbits | neural-speed | llama-cpp (the bundle's runtime)
    bits: int = 8  # itrex-int8: 8 | 4 (int8.bits)
    library: str = "prebuilt"  # itrex-int8 on llama-cpp: prebuilt | native (int8.library)

    @property
    def int8(self):
        from workers.config.int8 import Int8Settings

        return Int8Settings(compute_dtype=self.compute_dtype, group_size=self.group_size, runtime=self.runtime,
                            bits=self.bits, library=self.library)

    @property
    def label(self) -> str:
        if self.backend == "llama.cpp":
            return f"llama.cpp {self.gguf.upper()} t{self.threads}"
        if self.backend != "itrex-int8":
            return f"{self.backend} t{self.threads}"
        built = " native" if self.library == "native" else ""
        return f"int{self.bits} {self.runtime}{built} {self.compute_dtype} g{self.group_size} t{self.threads}"


# --models: random-weight Llamas (speed does not depend on the weights), by folder name and shape
RANDOM_MODELS = {
    "random-1b": ("random-llama-1.1b", random_model.TINYLLAMA_EMBEDDED_VOCAB),  # TinyLlama-shaped, 22 layers
    "random-1.5b": ("random-llama-1.5b", random_model.TINYLLAMA_32_LAYERS),    # the same at 32 layers
}
MODEL_CHOICES = ("embedded", *RANDOM_MODELS, "both")  # both: embedded and random-1b


def bench_models(names: list[str]) -> list[Path]:
    """The model folders for --models, in the order given, each once (random ones built on first use)."""
    from workers.models.embedded import prepare

    wanted = [n for name in names for n in (("embedded", "random-1b") if name == "both" else (name,))]
    return [prepare() if name == "embedded" else random_model.random_llama(*RANDOM_MODELS[name], "float32")
            for name in dict.fromkeys(wanted)]


def bench_job(model_path: Path, batch: int = 0, prompt_tokens: int = PROMPT_TOKENS) -> dict:
    """The token ids every variant of `model_path` runs: the perplexity paragraph and the prompt (the
    paragraph repeated to `prompt_tokens`), from the model's HF tokenizer, plus the lengths."""
    from transformers import AutoTokenizer

    text = (ROOT / "tests" / "data" / "perplexity_paragraph.txt").read_text()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenizer(text).input_ids
    prompt = (ids * (prompt_tokens // len(ids) + 1))[:prompt_tokens]
    bos = tokenizer.bos_token_id
    if bos is not None:  # neural-speed's graph takes only BOS-first sequences: every variant gets the same
        ids, prompt = ([bos] + ids if ids[:1] != [bos] else ids), [bos] + prompt[:-1]
    return {"ppl_ids": ids, "prompt_ids": prompt, "decode_tokens": DECODE_TOKENS, "batch": batch}


def measure(model_path: Path, variant: Variant, cache_root: Path, job: dict | None) -> dict:
    """Runs in the child process."""
    from workers.engine import threads

    threads.configure(variant.threads)
    job = job or bench_job(model_path)
    import psutil
    import torch
    from transformers import StoppingCriteria

    from workers.engine.loader import load_model

    t0 = time.perf_counter()
    model, tokenizer = load_model(
        model_path, variant.backend, cache_root=cache_root, n_threads=variant.threads,
        int8=variant.int8,
    )
    load_s = time.perf_counter() - t0
    threads.apply_to_torch(variant.threads)
    if not isinstance(model, torch.nn.Module):  # a runtime with its own graph (neural-speed, llama.cpp): no forward()
        figures = measure_engine(model_path, model, tokenizer, job)
        getattr(model, "close", lambda: None)()
        del model  # the batched copy below allocates its own slots
        return {**figures, **engine_batched_decode(model_path, variant, cache_root, job), "load_s": load_s}

    class TokenTimes(StoppingCriteria):  # generate() calls it once per new token, right after it
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    ids = torch.tensor([job["ppl_ids"]])
    prompt = torch.tensor([job["prompt_ids"]])
    n_new = job["decode_tokens"]
    with torch.no_grad():
        ppl = torch.exp(model(ids, labels=ids).loss).item()
        model(prompt)  # warm-up
        t0 = time.perf_counter()
        model(prompt)
        prefill_s = time.perf_counter() - t0
        # Greedy, n_new tokens after the prompt, end-of-text ignored; timed from the first new token.
        times = TokenTimes()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n_new,
                       min_new_tokens=n_new, do_sample=False, stopping_criteria=[times],
                       pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    batched = batched_decode(model, job["prompt_ids"], n_new, job.get("batch", 0))
    return {
        **batched,
        "load_s": load_s,
        "prompt_tok_s": prompt.shape[1] / prefill_s,
        "decode_tok_s": (len(times.times) - 1) / (times.times[-1] - times.times[0]),
        "steady_rss_gib": psutil.Process().memory_info().rss / GIB,
        "peak_rss_gib": memory_budget.peak_rss_bytes() / GIB,
        "ppl": ppl,
    }


def served_model(model_path: Path, model, tokenizer, concurrency: int = 1):
    """`model` as a worker serves it (its runtime's engine), with limit_concurrency `concurrency`."""
    from workers.config.schema import ModelSpec
    from workers.engine.served_model import ServedModel

    spec = ModelSpec(names=["bench"], source={"path": str(model_path)}, port=1, limit_concurrency=concurrency)
    return ServedModel.build(spec, model_path, model, tokenizer)


def measure_engine(model_path: Path, model, tokenizer, job: dict) -> dict:
    """The same figures for a runtime that drives its own graph, through its engine as the worker drives it (the
    prompt, then one evaluation per token), timed by the Result it returns; perplexity from its all_logits()."""
    import psutil
    import torch

    from workers.engine.generate import Job

    ppl_ids, prompt, n_new = job["ppl_ids"], job["prompt_ids"], job["decode_tokens"]
    engine = served_model(model_path, model, tokenizer).engine

    def run(ids):  # no stop tokens: n_new tokens
        return engine.submit(Job(prompt_ids=list(ids), max_new_tokens=n_new, temperature=0.0, top_p=1.0, top_k=0,
                                 repetition_penalty=1.0))

    run(prompt)  # warm-up
    run(prompt[:1])  # a prompt that does not continue the last one: the timed one starts from an empty cache
    result = run(prompt)
    # perplexity last: after an all-positions evaluation llama.cpp keeps an output buffer for that many positions,
    # and its later decode steps were slower (measured: 15.0 -> 12.3 tok/s), which serving never does
    logits = model.all_logits(ppl_ids)
    ppl = float(torch.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ppl_ids[1:]))))
    return {
        "prompt_tok_s": len(prompt) / result.first_token_s,
        "decode_tok_s": (n_new - 1) / result.decode_s,
        "steady_rss_gib": psutil.Process().memory_info().rss / GIB,
        "peak_rss_gib": memory_budget.peak_rss_bytes() / GIB,
        "ppl": ppl,
    }


def engine_batched_decode(model_path: Path, variant: Variant, cache_root: Path, job: dict) -> dict:
    """batched_decode for a runtime with its own graph: the model loaded as a worker with limit_concurrency `batch`
    loads it (KV cache slots for the sequences), through its engine. {} when batch < 2 or it does not batch."""
    from workers.engine.loader import load_model

    batch = job.get("batch", 0)
    if batch < 2:
        return {}
    model, tokenizer = load_model(model_path, variant.backend, cache_root=cache_root, n_threads=variant.threads,
                                  int8=variant.int8, concurrency=batch)
    engine = served_model(model_path, model, tokenizer, batch).engine
    if engine.batching_state()["mode"] != "continuous batching":
        return {}
    return decode_rates(engine.submit, lambda: engine.batching_state()["widest_step"], job["prompt_ids"],
                        job["decode_tokens"], batch)


def decode_rates(submit, widest, prompt_ids: list[int], n_new: int, batch: int) -> dict:
    """Decode tok/s of one sequence, then of `batch` sequences at once (aggregate, over the steps where all
    of them decode), each submitted to a batcher's `submit` from its own thread."""
    from workers.engine.generate import Job

    def rate(n: int) -> float:
        jobs = [Job(prompt_ids=list(prompt_ids), max_new_tokens=n_new, temperature=0.0, top_p=1.0, top_k=0,
                    repetition_penalty=1.0) for _ in range(n)]  # no stop tokens: every sequence runs n_new
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(n) as pool:
            results = list(pool.map(submit, jobs))
        all_decoding = max(t0 + r.first_token_s for r in results)  # the last one's first token: all joined
        end = max(t0 + r.first_token_s + r.decode_s for r in results)
        return n * (n_new - 1) / (end - all_decoding)

    rate(1)  # warm-up: a model loaded with many KV cache slots decodes its first answers slower (docs/benchmarks.md)
    one = rate(1)
    many = rate(batch)
    return {"batch1_tok_s": one, "batchN_tok_s": many, "batch": batch, "widest": widest()}


def batched_decode(model, prompt_ids: list[int], n_new: int, batch: int) -> dict:
    """Decode tok/s through the bundle's continuous batcher: one sequence, then `batch` sequences at
    once (aggregate, over the steps where all of them decode). {} when batch < 2 or the model's code
    cannot be batched."""
    import torch

    from workers.engine import generate
    from workers.engine.batcher import Batcher, batch_axes

    axes = batch_axes(None, model)
    if batch < 2 or axes is None:
        return {}
    batcher = Batcher(model, axes, decode=lambda ids: "", postprocess=lambda text: text,
                      prefill=lambda ids: (*generate.prefill(model, ids, None, 0), 0))
    with torch.inference_mode():
        return decode_rates(batcher.submit, lambda: batcher.widest, prompt_ids, n_new, batch)


def measure_read_bandwidth(repeats: int = 5) -> dict:
    """This machine's memory read bandwidth as numpy sees it (a child process, like the variants):
    summing a 1 GiB array of 64-bit integers (bytes read; integer adds keep up with memory, numpy's
    pairwise float sum barely does) and copying it (bytes read + written), on 1 thread and on 2
    threads (each half of the array; numpy releases the GIL in these loops). GB/s: medians of
    `repeats`, and the best sum (the least disturbed by other processes)."""
    import numpy as np

    src = np.ones(MEMBW_BYTES // 8, dtype=np.uint64)
    dst = np.empty_like(src)
    halves = [slice(0, len(src) // 2), slice(len(src) // 2, None)]

    def timed(work, n_threads: int, best: bool = False) -> float:
        parts = halves if n_threads == 2 else [slice(None)]
        runs = []
        for _ in range(repeats):
            pool = [threading.Thread(target=work, args=(part,)) for part in parts]
            t0 = time.perf_counter()
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            runs.append(time.perf_counter() - t0)
        return min(runs) if best else statistics.median(runs)

    def sum_part(part):
        src[part].sum()

    def copy_part(part):
        np.copyto(dst[part], src[part])

    copy_part(slice(None))  # touch every page of both arrays first
    return {
        "sum_t1_gb_s": MEMBW_BYTES / timed(sum_part, 1) / 1e9,
        "sum_t2_gb_s": MEMBW_BYTES / timed(sum_part, 2) / 1e9,
        "sum_t1_best_gb_s": MEMBW_BYTES / timed(sum_part, 1, best=True) / 1e9,
        "sum_t2_best_gb_s": MEMBW_BYTES / timed(sum_part, 2, best=True) / 1e9,
        "copy_t1_gb_s": 2 * MEMBW_BYTES / timed(copy_part, 1) / 1e9,
        "copy_t2_gb_s": 2 * MEMBW_BYTES / timed(copy_part, 2) / 1e9,
    }


CHILD_TIMEOUT_S = 1800


def _result(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return {"error": f"{last} (exit code {proc.returncode})" if proc.returncode else last}
    return json.loads(lines[-1][len("RESULT "):])


def _machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _run_measured(cmd: list[str], **kwargs) -> dict:
    """Run one child; add `others_cores`: how many cores other processes kept busy meanwhile (the
    machine's busy time minus the child's own, over the wall time), to judge the noise of a figure."""
    busy0, own0, t0 = _machine_busy_s(), resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False, **kwargs)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
    own1, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - t0
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    result = _result(proc)
    if "error" not in result:
        result["others_cores"] = max(0.0, (_machine_busy_s() - busy0 - own) / wall)
    return result


def run_child(model_path: Path, variant: Variant, cache_root: Path, job_file: Path | None = None,
              gguf_files: dict | None = None, bench_python: Path = BENCH_PYTHON) -> dict:
    """One measurement in a fresh process. Without `job_file` (bench_quantize, bench_api) an HF child
    makes the job itself from the model's tokenizer."""
    env = dict(os.environ)
    if variant.backend == "llama.cpp":
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(variant.threads)
        job = dict(json.loads(job_file.read_text()), threads=variant.threads)
        with tempfile.NamedTemporaryFile("w", suffix=".json", dir=job_file.parent, delete=False) as f:
            json.dump(job, f)
        try:
            cmd = [str(bench_python), str(LLAMA_CPP_CHILD), "measure", gguf_files[variant.gguf], f.name]
            return _run_measured(cmd, cwd=cache_root, env=env)
        finally:
            os.unlink(f.name)
    cmd = [sys.executable, "-m", "workers.tools.bench_engine", "--child", str(model_path),
           json.dumps(asdict(variant)), str(cache_root)] + ([str(job_file)] if job_file else [])
    return _run_measured(cmd, cwd=cache_root, env=env)  # the package is installed: no PYTHONPATH


def run_membw_child() -> dict:
    return _run_measured([sys.executable, "-m", "workers.tools.bench_engine", "--child-membw"], cwd=ROOT)


_ST_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                   "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
EMBEDDING_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "transformer.embedding.word_embeddings.weight")
OUTPUT_NAMES = ("lm_head.weight", "transformer.output_layer.weight")


def read_bytes_per_token(tensors: dict[str, StoredTensor], bytes_per_element: float | None = None) -> int:
    """Weight bytes one decode step reads: every tensor (in its stored size, or at `bytes_per_element`
    for a model loaded in another dtype), except the input embedding table when a separate output
    matrix exists: a step reads one row of it. With tied embeddings the table is the output matrix."""
    def size(t: StoredTensor):
        return t.elements * bytes_per_element if bytes_per_element else t.nbytes

    total = sum(size(m) for m in tensors.values())
    if any(name in tensors for name in OUTPUT_NAMES):
        total -= sum(size(tensors[name]) for name in EMBEDDING_NAMES if name in tensors)
    return int(total)


def weight_read_bytes(model_path: Path, variant: Variant, int8_entries: dict) -> int | None:
    """For the HF variants (llama.cpp children report their own, from the GGUF file)."""
    if variant.backend in ("fp32", "bf16"):
        return read_bytes_per_token(checkpoint_tensors(model_path), 4 if variant.backend == "fp32" else 2)
    from workers.engine.runtimes.neural_speed.quantize import WEIGHTS

    entry = int8_entries.get((model_path.name, variant.int8))
    gguf = next(entry.glob("*.gguf"), None) if entry else None
    if gguf:  # llama.cpp's Q8_0 file: all of it but the embedding table (one row a step) when an output matrix exists
        config = json.loads((model_path / "config.json").read_text())
        tied = config.get("tie_word_embeddings", False)
        return gguf.stat().st_size - (0 if tied else config["vocab_size"] * config["hidden_size"] * 34 // 32)
    if entry and (entry / WEIGHTS).is_file():  # a neural-speed graph file
        # Its whole INT8 file (every layer, the identity padding too, and the INT8 output matrix) but
        # the embedding table, of which a step reads one row.
        config = json.loads((model_path / "config.json").read_text())
        return (entry / WEIGHTS).stat().st_size - config["vocab_size"] * config["hidden_size"]
    if variant.backend == "itrex-int8" and entry:
        # ITREX's checkpoint as stored: INT8 weights + scales, the embedding and lm_head kept in fp32.
        return read_bytes_per_token(checkpoint_tensors(entry))
    return None


def llama_cpp_version() -> str:
    for line in (ROOT / "requirements-bench.txt").read_text().splitlines():
        if line.startswith("llama-cpp-python=="):
            return line.split("==", 1)[1].strip()
    return "unknown"


def ensure_gguf(model_path: Path, bench_python: Path) -> dict:
    """var/bench/gguf/<model folder>-<key>/model-{f16,q8_0,q4_0}.gguf, converted once by llama.cpp's own
    converter; the key covers the source folder's content and the llama-cpp-python version."""
    from workers.engine.int8_cache import source_fingerprint

    root = var_dir() / "bench" / "gguf"
    root.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{source_fingerprint(model_path, root)}\0{llama_cpp_version()}".encode()).hexdigest()[:16]
    out = root / f"{model_path.name}-{key}"
    files = {t: out / f"model-{t}.gguf" for t in GGUF_TYPES}
    if all(f.is_file() for f in files.values()):
        return {t: str(f) for t, f in files.items()}
    print(f"bench: converting {model_path.name} to GGUF F16, Q8_0 and Q4_0 (once) in {out}", flush=True)
    proc = subprocess.run([str(bench_python), str(LLAMA_CPP_CHILD), "convert", str(model_path), str(out)],
                          stdout=subprocess.PIPE, text=True, check=False)  # the converter's progress: stderr
    result = _result(proc)
    if "error" in result:
        raise SystemExit(f"GGUF conversion of {model_path} failed (rc {proc.returncode}); see the output above")
    return result


def cpu_compute_dtypes(flags: frozenset[str] | None = None) -> tuple[str, ...]:
    """The INT8 compute dtypes this CPU runs correctly (int8 needs VNNI or AMX, bf16 AMX): every one is
    measured, since which is fastest differs between CPUs and runtimes."""
    from workers.config.int8 import Int8Settings
    from workers.engine.runtimes.registry import unsupported_reason

    return tuple(d for d in ("fp32", "int8", "bf16") if unsupported_reason(Int8Settings(compute_dtype=d), flags) is None)


INT4_GROUP_SIZES = (32, 64, 128, -1)


def int4_group_variants() -> list[Variant]:
    """INT4 at each group size on both runtimes (how config/int8.AUTO_GROUP_SIZES[4] was chosen)."""
    return [Variant("itrex-int8", runtime=r, group_size=g, bits=4) for r in ("qbits", "neural-speed")
            for g in INT4_GROUP_SIZES]


def variants_for(explore: bool, bf16_backend: bool = False, llama_cpp: bool = False,
                 threads: tuple[int, ...] = (2,), compute_dtypes: tuple[str, ...] = ("fp32",),
                 int4_groups: bool = False, native_llama_cpp: bool = False) -> list[Variant]:
    variants = []
    for t in threads:
        variants.append(Variant("fp32", threads=t))
        variants += [Variant("itrex-int8", threads=t, runtime=r, compute_dtype=d, bits=b)
                     for b in (8, 4) for d in compute_dtypes for r in ("qbits", "neural-speed")]
        variants += [Variant("itrex-int8", threads=t, runtime="llama-cpp", group_size=32, bits=b, library=lib)
                     for b in (8, 4) for lib in ("prebuilt", "native")[:1 + native_llama_cpp]]  # Q8_0, Q4_0
        if llama_cpp:
            variants += [Variant("llama.cpp", threads=t, gguf=g) for g in GGUF_TYPES]
    if explore:
        variants += [
            Variant("itrex-int8", group_size=-1), Variant("itrex-int8", runtime="neural-speed", group_size=-1),
            Variant("itrex-int8", group_size=128), Variant("itrex-int8", group_size=32),
            *int4_group_variants(),
            Variant("fp32", threads=1), Variant("itrex-int8", threads=1),
            Variant("itrex-int8", threads=1, runtime="neural-speed"),
        ]
    if int4_groups:
        variants += int4_group_variants()
    if bf16_backend:  # opt-in: without AVX512-BF16/AMX, torch computes bf16 slowly (minutes per 1 B run)
        variants.append(Variant("bf16"))
    return list(dict.fromkeys(variants))


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def llama_cpp_features(system_info: str) -> str:
    """`CPU : SSE3 = 1 | AVX512 = 1 | AMX_INT8 = 0 | ...` -> `SSE3 AVX512 ...`: the features the build uses."""
    on = [part.split("=")[0].split(":")[-1].strip() for part in system_info.split("|") if part.strip().endswith("= 1")]
    return " ".join(on) or system_info.strip()


def summarize(results: dict, models: list[Path], variants: list[Variant], membw: list[dict],
              read_bytes: dict, int8_entries: dict, prompt_tokens: int = PROMPT_TOKENS) -> str:
    lines = [f"CPU: {cpu.describe()}", "",
             (f"Engine benchmark ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, "
              f"medians over {len(membw)} interleaved rounds; prompt {prompt_tokens} tokens, {DECODE_TOKENS} new "
              f"tokens greedy, decode timed after the first new token, each run in a fresh process)"),
             "The machine is shared: absolute figures are noisy, the ratios within one run are what counts.", ""]
    bw = _median([m for m in membw if "error" not in m]) if any("error" not in m for m in membw) else {}
    if bw:
        lines += [
            (f"Measured read bandwidth (numpy, 1 GiB array, one measurement per round): sum {bw['sum_t1_gb_s']:.1f} "
             f"GB/s on 1 thread, {bw['sum_t2_gb_s']:.1f} GB/s on 2 threads (best {bw.get('sum_t1_best_gb_s', 0):.1f} / "
             f"{bw.get('sum_t2_best_gb_s', 0):.1f}); copy (bytes read + written) {bw['copy_t1_gb_s']:.1f} / "
             f"{bw['copy_t2_gb_s']:.1f} GB/s (others' load meanwhile {bw.get('others_cores', 0):.1f} cores)."),
            ("Effective GB/s of a variant = weight bytes read per decode step x decode tok/s; "
             "% = of the sum bandwidth at the variant's thread count. Ratios compare variants at the same "
             "thread count. Others' load = cores kept busy by other processes during the run (median)."), ""]
    else:
        lines += [f"Read bandwidth measurement failed: {membw[0].get('error', '?') if membw else 'not run'}", ""]
    builds = {r["system_info"] for runs in results.values() for r in runs if r.get("system_info")}
    for info in sorted(builds):
        lines += [f"llama.cpp build (its system info, features on): {llama_cpp_features(info)}", ""]
    header = ("| model | variant | decode tok/s | x fp32 | x llama.cpp Q8_0 | x llama.cpp Q4_0 | GB read/token | "
              "effective GB/s | % of read bw | prompt tok/s | x fp32 | load s | steady RSS GiB | peak RSS GiB | ppl | "
              "others' load |")
    ncols = header.count("|") - 1
    for model in models:
        lines += [header, "|" + "---|" * ncols]
        med = {}
        for v in variants:
            runs = [r for r in results[(model.name, v.label)] if "error" not in r]
            if runs:
                med[v] = _median(runs)
        for v in variants:
            # ratios against fp32 and llama.cpp Q8_0 and Q4_0 at the same thread count
            base = med.get(Variant("fp32", threads=v.threads))
            q8 = med.get(Variant("llama.cpp", threads=v.threads, gguf="q8_0"))
            q4 = med.get(Variant("llama.cpp", threads=v.threads, gguf="q4_0"))
            if v not in med:
                err = results[(model.name, v.label)][0].get("error", "?")
                lines.append(f"| {model.name} | {v.label} | failed: {err} |" + " |" * (ncols - 3))
                continue
            m = med[v]
            def ratio(ref, k, m=m):
                return f"{m[k] / ref[k]:.2f}" if ref else "-"

            read = m.get("read_bytes_per_token") or read_bytes.get((model.name, v.label))
            if read:
                eff = read * m["decode_tok_s"] / 1e9
                ref_bw = bw.get("sum_t2_gb_s" if v.threads >= 2 else "sum_t1_gb_s")
                read_cols = f"{read / 1e9:.3f} | {eff:.1f} | " + (f"{100 * eff / ref_bw:.0f} %" if ref_bw else "-")
            else:
                read_cols = "- | - | -"
            lines.append(
                f"| {model.name} | {v.label} | {m['decode_tok_s']:.1f} | {ratio(base, 'decode_tok_s')} | "
                f"{ratio(q8, 'decode_tok_s')} | {ratio(q4, 'decode_tok_s')} | {read_cols} | {m['prompt_tok_s']:.0f} | "
                f"{ratio(base, 'prompt_tok_s')} | "
                f"{m['load_s']:.1f} | {m['steady_rss_gib']:.2f} | {m['peak_rss_gib']:.2f} | {m['ppl']:.2f} | "
                + (f"{m['others_cores']:.1f} |" if "others_cores" in m else "- |")
            )
        batch_rows = [(v, med[v]) for v in variants if v in med and med[v].get("batchN_tok_s")]
        if batch_rows:
            n = int(batch_rows[0][1]["batch"])
            lines += ["", f"{model.name}, {n} sequences decoding together (aggregate decode tok/s): the bundle's "
                          f"continuous batcher, and on the llama.cpp rows llama.cpp's own (one llama_decode call with "
                          f"a token of every sequence per step), its limit on this CPU:", "",
                      f"| variant | 1 sequence | {n} sequences | x 1 sequence |", "|---|---|---|---|"]
            lines += [f"| {v.label} | {m['batch1_tok_s']:.1f} | {m['batchN_tok_s']:.1f} | "
                      f"{m['batchN_tok_s'] / m['batch1_tok_s']:.2f} |" for v, m in batch_rows]
        notes = []
        for (name, settings), entry in int8_entries.items():
            if name == model.name:
                size = sum(f.stat().st_size for f in [*entry.glob("*.safetensors"), *entry.glob("*.bin"),
                                                       *entry.glob("*.gguf")])
                notes.append(f"INT{settings.bits} {settings.runtime} g{settings.group_size} {entry.name} "
                             f"{size / GIB:.3f} GiB on disk")
        for gguf in dict.fromkeys(v.gguf for v in variants if v.backend == "llama.cpp"):
            sizes = [m["tensor_bytes"] for v, m in med.items() if v.gguf == gguf and m.get("tensor_bytes")]
            if sizes:
                notes.append(f"GGUF {gguf.upper()} tensors {sizes[0] / GIB:.2f} GiB")
        if notes:  # two libraries of one runtime read the same entry
            lines.append(f"\n{model.name}: " + "; ".join(dict.fromkeys(notes)) + ".\n")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        model_path, variant, cache_root = Path(argv[1]), Variant(**json.loads(argv[2])), Path(argv[3])
        job = json.loads(Path(argv[4]).read_text()) if len(argv) > 4 else None
        print("RESULT " + json.dumps(measure(model_path, variant, cache_root, job)), flush=True)
        return 0
    if argv and argv[0] == "--child-membw":
        print("RESULT " + json.dumps(measure_read_bandwidth()), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--explore", action="store_true", help="also other group sizes and 1 thread")
    p.add_argument("--models", choices=MODEL_CHOICES, nargs="+", default=["both"],
                   help="embedded: SmolLM2; random-1b: a TinyLlama-shaped 22-layer 1.1 B Llama; random-1.5b: the "
                        "same at 32 layers (neural-speed runs it unpadded); both: embedded and random-1b")
    p.add_argument("--int4-groups", action="store_true",
                   help="also INT4 (bits: 4) at group sizes 32, 64, 128 and per channel, on both runtimes")
    p.add_argument("--bf16-backend", action="store_true", help="also the plain bf16 backend (slow on CPUs without bf16 units)")
    p.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None,
                   help="also llama.cpp F16, Q8_0 and Q4_0 (default: when .venv-bench exists; scripts/bench_engine.sh "
                        "--llama-cpp builds it)")
    p.add_argument("--native-llama-cpp", action="store_true",
                   help="also the llama-cpp runtime with int8.library: native (compiles llama.cpp for this CPU once)")
    p.add_argument("--bench-python", type=Path, default=BENCH_PYTHON, help="python of the llama.cpp environment")
    p.add_argument("--threads", type=int, nargs="+", default=[2], help="thread counts to run every variant at")
    p.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                   help="only the variants whose label holds one of these, e.g. --only llama Q4_0 (labels: the "
                        "report's variant column)")
    p.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS,
                   help="the prompt's length, whose processing rate the report's prompt column shows")
    p.add_argument("--batch", type=int, default=0,
                   help="also decode 1 and this many sequences at once: through the bundle's continuous batcher, and "
                        "llama.cpp's own batched decode on its rows")
    args = p.parse_args(argv)
    # auto: when scripts/setup_bench.sh has finished building the environment (its stamp file)
    ready = (args.bench_python.parent.parent / ".requirements.sha256").is_file()
    use_llama_cpp = ready if args.llama_cpp is None else args.llama_cpp
    if use_llama_cpp and not args.bench_python.is_file():
        p.error(f"{args.bench_python} is missing: run scripts/setup_bench.sh (or scripts/bench_engine.sh --llama-cpp)")
    print(f"CPU: {cpu.describe()}", flush=True)

    from workers.config.paths import int8_cache_dir
    from workers.engine import int8_cache
    from workers.engine.runtimes.base import RuntimeUnavailable
    from workers.engine.runtimes.registry import by_name, resolve, unsupported_reason

    models = bench_models(args.models)
    variants = variants_for(args.explore, args.bf16_backend, use_llama_cpp, tuple(args.threads), cpu_compute_dtypes(),
                            args.int4_groups, args.native_llama_cpp)
    variants = [v for v in variants if not args.only or any(text in v.label for text in args.only)]
    if not variants:
        p.error(f"--only {' '.join(args.only)} leaves no variant")
    cache_root = int8_cache_dir()
    int8_entries, gguf_files, refused = {}, {}, {}
    for model in models:  # quantize and convert up front so load times below are cache loads
        for v in variants:
            settings = v.int8
            key = (model.name, settings)
            if v.backend == "itrex-int8" and unsupported_reason(settings) is None and key not in int8_entries:
                try:  # resolved as the bundle resolves it: a group size the model's rows refuse is refused here
                    resolved = resolve(settings, model)
                    by_name(resolved.runtime).prepare(resolved, print)  # e.g. llama.cpp compiled for this CPU
                    int8_entries[key] = int8_cache.ensure(model, resolved, cache_root)
                except (int8_cache.CacheBuildError, RuntimeUnavailable) as exc:  # e.g. a group size the model refuses
                    refused[key] = str(exc)
        if use_llama_cpp:
            gguf_files[model.name] = ensure_gguf(model, args.bench_python)
    read_bytes = {(m.name, v.label): weight_read_bytes(m, v, int8_entries) for m in models for v in variants}
    job_dir = var_dir() / "bench" / "jobs"
    job_dir.mkdir(parents=True, exist_ok=True)
    job_files = {}
    for model in models:
        job_files[model.name] = job_dir / f"{model.name}.json"
        job_files[model.name].write_text(json.dumps(bench_job(model, args.batch, args.prompt_tokens)))
    results = {(m.name, v.label): [] for m in models for v in variants}
    membw: list[dict] = []
    # Each round: the machine's read bandwidth, then every model x variant, each in a fresh process.
    jobs = []
    for r in range(args.rounds):
        jobs += [(r, None, None)] + [(r, m, v) for m in models for v in variants]
    for _, model, v in tqdm(jobs, desc="bench (interleaved rounds)", unit="run"):
        if model is None:
            membw.append(run_membw_child())
            continue
        if v.backend == "itrex-int8":
            problem = unsupported_reason(v.int8) or refused.get((model.name, v.int8))
            if problem:
                results[(model.name, v.label)].append({"error": problem})
                continue
        results[(model.name, v.label)].append(
            run_child(model, v, cache_root, job_files[model.name], gguf_files.get(model.name), args.bench_python))
    report = summarize(results, models, variants, membw, read_bytes, int8_entries, args.prompt_tokens)
    out = reports_dir() / "bench-engine.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report + "\n")
    raw = {"membw": membw, "runs": [{"model": m, "variant": label, "results": r} for (m, label), r in results.items()]}
    out.with_suffix(".json").write_text(json.dumps(raw, indent=1))  # every round's figures, for a closer look
    print(report)
    print(f"\nwritten to {out} (every run's figures: {out.with_suffix('.json').name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
