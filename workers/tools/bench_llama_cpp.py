"""The llama.cpp side of bench_engine, run by the benchmark-only environment's python (.venv-bench).

Standalone on purpose: it imports only the standard library, numpy, llama_cpp and gguf, never the
bundle (the bundle's .venv does not have llama_cpp, and this environment has none of ITREX).

    .venv-bench/bin/python workers/tools/bench_llama_cpp.py convert HF_DIR OUT_DIR   # F16, Q8_0 and Q4_0 GGUF
    .venv-bench/bin/python workers/tools/bench_llama_cpp.py measure GGUF JOB_JSON    # prints RESULT {...}

JOB_JSON holds threads, prompt/decode lengths, the prompt ids and the perplexity ids, all computed
by bench_engine with the model's own HF tokenizer, so every variant sees the same tokens.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024 ** 3
# GGUF types quantized from the F16 file by llama.cpp's own quantizer (the anchors of INT8 and of bits: 4)
QUANTIZED = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0"}


def llama_cpp_source() -> Path:
    """The llama.cpp tree inside the llama-cpp-python source that scripts/setup_bench.sh built from."""
    src = Path(sys.prefix) / "src"
    trees = sorted(src.glob("llama_cpp_python-*/vendor/llama.cpp"))
    if not trees:
        raise SystemExit(f"no llama-cpp-python source under {src}; run scripts/setup_bench.sh")
    return trees[-1]


def convert(hf_dir: Path, out_dir: Path) -> dict[str, str]:
    """HF folder -> out_dir/model-f16.gguf (llama.cpp's converter) -> out_dir/model-{q8_0,q4_0}.gguf."""
    import llama_cpp

    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "model-f16.gguf"
    if not f16.is_file():
        tmp = f16.with_suffix(".tmp")
        converter = llama_cpp_source() / "convert_hf_to_gguf.py"
        print(f"llama.cpp: converting {hf_dir} -> {f16}", flush=True)
        subprocess.run([sys.executable, str(converter), str(hf_dir), "--outtype", "f16", "--outfile", str(tmp)],
                       check=True)
        tmp.rename(f16)
    files = {"f16": str(f16)}
    for gguf_type, ftype in QUANTIZED.items():
        out = out_dir / f"model-{gguf_type}.gguf"
        if not out.is_file():
            tmp = out.with_suffix(".tmp")
            print(f"llama.cpp: quantizing {f16.name} -> {out.name}", flush=True)
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, ftype)
            params.nthread = os.cpu_count() or 1
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params)
            if rc != 0:
                raise SystemExit(f"llama_model_quantize to {gguf_type} failed with {rc}")
            tmp.rename(out)
        files[gguf_type] = str(out)
    return files


def weight_bytes_per_token(path: Path) -> dict:
    """Bytes of the tensors one decode step reads: every tensor of the file, except the token
    embedding table when the model has a separate output matrix (then a step reads one row of it)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    total = sum(tensors.values())
    untied = "output.weight" in tensors
    read = total - (tensors.get("token_embd.weight", 0) if untied else 0)
    return {"tensor_bytes": total, "read_bytes_per_token": read}


def _status_gib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: it keeps the parent's peak across fork+exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GIB
    return 0.0


def measure(path: Path, job: dict) -> dict:
    import llama_cpp
    import numpy as np

    threads = int(job["threads"])
    prompt, ppl_ids, n_new = list(job["prompt_ids"]), list(job["ppl_ids"]), int(job["decode_tokens"])
    n_ctx = max(len(prompt) + n_new, len(ppl_ids)) + 16
    common = {"n_threads": threads, "n_threads_batch": threads, "n_ctx": n_ctx, "n_batch": n_ctx,
              "n_ubatch": n_ctx, "verbose": False}

    # Perplexity on the same paragraph and tokens as the HF variants (all logits of one pass).
    llm = llama_cpp.Llama(str(path), logits_all=True, **common)
    llm.eval(ppl_ids)
    logits = np.asarray(llm.scores[: len(ppl_ids)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    nll = -np.mean([logp[i, ppl_ids[i + 1]] for i in range(len(ppl_ids) - 1)])
    llm.close()
    del llm

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(path), logits_all=False, **common)
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()

    def last_logits():
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    llm.eval(prompt)  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - t0
    # Greedy decode of n_new tokens after the prompt, end-of-text ignored (HF's min_new_tokens);
    # timed from the first new token to the last, as for the HF variants.
    token = int(np.argmax(last_logits()))
    t_first = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([token])
        token = int(np.argmax(last_logits()))
    decode_s = time.perf_counter() - t_first
    batched = batched_decode(llm, prompt, n_new, threads, int(job.get("batch", 0)))
    return {
        **batched,
        "load_s": load_s,
        "prompt_tok_s": len(prompt) / prefill_s,
        "decode_tok_s": (n_new - 1) / decode_s,
        "steady_rss_gib": _status_gib("VmRSS"),
        "peak_rss_gib": _status_gib("VmHWM"),
        "ppl": math.exp(nll),
        # which kernels this build has (on an AMX CPU setup_bench.sh builds without AMX tiles)
        "system_info": llama_cpp.llama_print_system_info().decode(),
        **weight_bytes_per_token(path),
    }


def batched_decode(llm, prompt: list[int], n_new: int, threads: int, batch: int) -> dict:
    """llama.cpp's own decode of `batch` sequences at once, each step one llama_decode call with a token of every
    sequence (what llama-batched-bench does), beside one sequence in a context of the same kind: the reference for the
    bundle's batchers. Aggregate tok/s over the decode steps. {} when batch < 2."""
    import llama_cpp
    import numpy as np

    if batch < 2:
        return {}
    n_vocab = llm.n_vocab()

    def rate(n: int) -> float:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = batch * (len(prompt) + n_new + 16)
        params.n_seq_max, params.n_batch, params.n_ubatch = batch, len(prompt) * batch, len(prompt) * batch
        params.n_threads = params.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
        step = llama_cpp.llama_batch_init(len(prompt) * n, 0, 1)
        try:
            def decode(rows: list[tuple[int, int, int, bool]]) -> None:  # (sequence, position, token, wants logits)
                step.n_tokens = len(rows)
                for i, (seq, pos, token, logits) in enumerate(rows):
                    step.token[i], step.pos[i], step.n_seq_id[i] = token, pos, 1
                    step.seq_id[i][0], step.logits[i] = seq, logits
                if llama_cpp.llama_decode(ctx, step) != 0:
                    raise RuntimeError("llama_decode failed")

            def greedy(i: int) -> int:
                return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(n_vocab,))))

            decode([(s, p, t, p == len(prompt) - 1) for s in range(n) for p, t in enumerate(prompt)])
            tokens = [greedy(s * len(prompt) + len(prompt) - 1) for s in range(n)]
            t0 = time.perf_counter()
            for k in range(n_new - 1):
                decode([(s, len(prompt) + k, tokens[s], True) for s in range(n)])
                tokens = [greedy(s) for s in range(n)]
            return n * (n_new - 1) / (time.perf_counter() - t0)
        finally:
            llama_cpp.llama_batch_free(step)
            llama_cpp.llama_free(ctx)

    rate(1)  # warm-up, as the bundle's batchers get
    return {"batch1_tok_s": rate(1), "batchN_tok_s": rate(batch), "batch": batch}


def main(argv: list[str]) -> int:
    if argv[:1] == ["convert"]:
        print("RESULT " + json.dumps(convert(Path(argv[1]), Path(argv[2]))), flush=True)
        return 0
    if argv[:1] == ["measure"]:
        print("RESULT " + json.dumps(measure(Path(argv[1]), json.loads(Path(argv[2]).read_text()))), flush=True)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
