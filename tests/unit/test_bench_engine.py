"""bench_engine's bookkeeping, without running a model: weight bytes read per token, the report's
columns, and the split between the bundle's environment and the llama.cpp one."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from workers.models.weight_shapes import checkpoint_tensors
from workers.tools import bench_engine as be

ROOT = Path(__file__).resolve().parents[2]


def _folder(tmp_path: Path, tied: bool) -> Path:
    tensors = {
        "model.embed_tokens.weight": np.zeros((10, 4), np.float32),  # 160 bytes
        "model.layers.0.mlp.qweight": np.zeros((4, 4), np.int8),  # 16 bytes
        "model.norm.weight": np.zeros(4, np.float32),  # 16 bytes
    }
    if not tied:
        tensors["lm_head.weight"] = np.zeros((10, 4), np.float32)
    folder = tmp_path / ("tied" if tied else "untied")
    folder.mkdir()
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def test_untied_model_reads_the_output_matrix_not_the_embedding_table(tmp_path):
    tensors = checkpoint_tensors(_folder(tmp_path, tied=False))
    assert be.read_bytes_per_token(tensors) == 160 + 16 + 16


def test_tied_model_reads_the_embedding_table_as_its_output_matrix(tmp_path):
    assert be.read_bytes_per_token(checkpoint_tensors(_folder(tmp_path, tied=True))) == 160 + 16 + 16


def test_a_model_loaded_in_fp32_counts_four_bytes_per_weight(tmp_path):
    tensors = checkpoint_tensors(_folder(tmp_path, tied=False))
    assert be.read_bytes_per_token(tensors, 4) == 4 * (40 + 16 + 4)


def test_models_are_chosen_by_name_in_order_each_once(monkeypatch):
    """--models: 'both' is the embedded model and the 22-layer Llama; the 32-layer one is its own choice."""
    from workers.models import embedded
    from workers.tools import random_model

    monkeypatch.setattr(embedded, "prepare", lambda: Path("smollm2"))
    built = []
    monkeypatch.setattr(random_model, "random_llama", lambda name, shape, dtype: built.append(shape) or Path(name))
    assert be.bench_models(["both", "random-1.5b", "embedded"]) == [
        Path("smollm2"), Path("random-llama-1.1b"), Path("random-llama-1.5b")]
    assert [s["num_hidden_layers"] for s in built] == [22, 32]
    assert {k: v for k, v in built[1].items() if k != "num_hidden_layers"} == \
        {k: v for k, v in built[0].items() if k != "num_hidden_layers"}  # the same Llama but its layer count
    assert be.MODEL_CHOICES == ("embedded", "random-1b", "random-1.5b", "both")


def test_llama_cpp_variants_are_opt_in_and_labelled():
    assert all(v.backend != "llama.cpp" for v in be.variants_for(False))
    labels = [v.label for v in be.variants_for(False, llama_cpp=True)]
    assert labels == ["fp32 t2", "int8 qbits fp32 gauto t2", "int8 neural-speed fp32 gauto t2",
                      "int4 qbits fp32 gauto t2", "int4 neural-speed fp32 gauto t2", "int8 llama-cpp fp32 g32 t2",
                      "int4 llama-cpp fp32 g32 t2", "llama.cpp F16 t2", "llama.cpp Q8_0 t2", "llama.cpp Q4_0 t2"]


def test_every_compute_dtype_the_cpu_runs_is_measured_on_both_int8_runtimes():
    assert be.cpu_compute_dtypes(frozenset({"avx2"})) == ("fp32",)
    assert be.cpu_compute_dtypes(frozenset({"avx2", "avx512_vnni"})) == ("fp32", "int8")
    assert be.cpu_compute_dtypes(frozenset({"avx2", "avx512_vnni", "amx_int8", "amx_bf16"})) == ("fp32", "int8", "bf16")
    labels = [v.label for v in be.variants_for(False, compute_dtypes=("fp32", "int8"))]
    assert labels == ["fp32 t2", "int8 qbits fp32 gauto t2", "int8 neural-speed fp32 gauto t2",
                      "int8 qbits int8 gauto t2", "int8 neural-speed int8 gauto t2",
                      "int4 qbits fp32 gauto t2", "int4 neural-speed fp32 gauto t2",
                      "int4 qbits int8 gauto t2", "int4 neural-speed int8 gauto t2",
                      "int8 llama-cpp fp32 g32 t2", "int4 llama-cpp fp32 g32 t2"]  # the bundle's llama.cpp runtime:
    # Q8_0 and Q4_0, its own dtypes


def test_int4_group_sizes_are_measured_on_both_runtimes_on_request():
    fixed = "llama-cpp"  # Q4_0: groups of 32, whatever is asked
    int4 = [v for v in be.variants_for(False, int4_groups=True)
            if v.bits == 4 and v.group_size != "auto" and v.runtime != fixed]
    assert [(v.runtime, v.group_size) for v in int4] == [
        (r, g) for r in ("qbits", "neural-speed") for g in (32, 64, 128, -1)]
    assert all(v.int8.bits == 4 and v.int8.group_size == v.group_size for v in int4)
    assert not [v for v in be.variants_for(False) if v.bits == 4 and v.group_size != "auto" and v.runtime != fixed]


def test_report_starts_with_the_cpu_and_gives_ratios_and_bandwidth():
    model = Path("m")
    variants = [v for v in be.variants_for(False, llama_cpp=True) if v.bits == 8 or v.runtime == "neural-speed"]
    run = {"load_s": 1.0, "prompt_tok_s": 100.0, "steady_rss_gib": 1.0, "peak_rss_gib": 1.0, "ppl": 10.0}
    speeds = {"fp32 t2": 10.0, "int8 qbits fp32 gauto t2": 20.0, "int8 neural-speed fp32 gauto t2": 30.0,
              "int4 neural-speed fp32 gauto t2": 45.0, "llama.cpp F16 t2": 30.0, "llama.cpp Q8_0 t2": 40.0,
              "llama.cpp Q4_0 t2": 60.0, "int8 llama-cpp fp32 g32 t2": 38.0}
    results = {("m", label): [dict(run, decode_tok_s=tok_s)] for label, tok_s in speeds.items()}
    results[("m", "llama.cpp Q8_0 t2")][0].update(read_bytes_per_token=1e9, tensor_bytes=1.1e9)
    for label in ("llama.cpp F16 t2", "llama.cpp Q8_0 t2"):
        results[("m", label)][0]["system_info"] = "CPU : SSE3 = 1 | AVX512_VNNI = 1 | AMX_INT8 = 0 | OPENMP = 1 | "
    membw = [{"sum_t1_gb_s": 20.0, "sum_t2_gb_s": 40.0, "copy_t1_gb_s": 15.0, "copy_t2_gb_s": 25.0}]
    read_bytes = {("m", "fp32 t2"): 4e9, ("m", "int8 qbits fp32 gauto t2"): 1e9, ("m", "int8 neural-speed fp32 gauto t2"): 1e9}
    report = be.summarize(results, [model], variants, membw, read_bytes, {})
    assert report.splitlines()[0].startswith("CPU: ")
    assert "sum 20.0 GB/s on 1 thread, 40.0 GB/s on 2 threads" in report
    # which kernels llama.cpp ran with (an AMX CPU's build has no AMX tiles): once, features that are on
    assert report.count("llama.cpp build") == 1
    assert "llama.cpp build (its system info, features on): SSE3 AVX512_VNNI OPENMP\n" in report
    rows = {line.split(" | ")[1]: line.split(" | ") for line in report.splitlines() if line.startswith("| m |")}
    # | model | variant | tok/s | x fp32 | x Q8_0 | x Q4_0 | GB/token | GB/s | % | ...
    assert rows["fp32 t2"][2:9] == ["10.0", "1.00", "0.25", "0.17", "4.000", "40.0", "100 %"]
    assert rows["int8 qbits fp32 gauto t2"][2:9] == ["20.0", "2.00", "0.50", "0.33", "1.000", "20.0", "50 %"]
    assert rows["int8 neural-speed fp32 gauto t2"][2:9] == ["30.0", "3.00", "0.75", "0.50", "1.000", "30.0", "75 %"]
    assert rows["int4 neural-speed fp32 gauto t2"][2:6] == ["45.0", "4.50", "1.12", "0.75"]  # INT4 beside Q4_0
    assert rows["llama.cpp F16 t2"][6:9] == ["-", "-", "-"]  # no byte count reported: no bandwidth
    assert rows["llama.cpp Q8_0 t2"][2:9] == ["40.0", "4.00", "1.00", "0.67", "1.000", "40.0", "100 %"]
    assert rows["int8 llama-cpp fp32 g32 t2"][2:5] == ["38.0", "3.80", "0.95"]  # the runtime beside its reference


def test_the_bundle_environment_never_imports_llama_cpp(tmp_path):
    (tmp_path / "llama_cpp.py").write_text("")  # importable here, as in .venv-bench: an import would show
    code = "import sys, workers.tools.bench_engine; print('llama_cpp' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert out.stdout.strip() == "False"
    child = ROOT / "workers" / "tools" / "bench_llama_cpp.py"
    imported = set()
    for node in ast.walk(ast.parse(child.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "workers" not in imported  # it runs under .venv-bench, where the bundle is not installed


def test_the_prompt_has_the_length_asked_for_and_the_report_says_it(embedded_model):
    for n in (128, 512):
        job = be.bench_job(embedded_model, prompt_tokens=n)
        assert len(job["prompt_ids"]) == n
    report = be.summarize({}, [], [], [], {}, {}, prompt_tokens=512)
    assert "prompt 512 tokens" in report


def test_batched_decode_runs_every_sequence_together_through_the_batcher(embedded_model):
    from workers.engine.loader import load_model

    model, tokenizer = load_model(embedded_model, "fp32")
    ids = tokenizer("The old town sat between two hills.").input_ids
    figures = be.batched_decode(model, ids, 8, 3)
    assert figures["batch"] == 3 and figures["widest"] == 3
    assert figures["batch1_tok_s"] > 0 and figures["batchN_tok_s"] > 0
    assert be.batched_decode(model, ids, 8, 0) == {}


def test_report_shows_the_batcher_figures_when_measured():
    model = Path("m")
    variants = be.variants_for(False)
    run = {"load_s": 1.0, "prompt_tok_s": 100.0, "steady_rss_gib": 1.0, "peak_rss_gib": 1.0, "ppl": 10.0,
           "decode_tok_s": 10.0, "batch1_tok_s": 10.0, "batchN_tok_s": 25.0, "batch": 4, "widest": 4}
    results = {("m", v.label): [dict(run)] for v in variants}
    report = be.summarize(results, [model], variants, [], {}, {})
    assert "the bundle's continuous batcher, and on the llama.cpp rows llama.cpp's own" in report
    assert "| fp32 t2 | 10.0 | 25.0 | 2.50 |" in report


PEAK_OF_A_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from workers.models.memory_budget import peak_rss_bytes
print(peak_rss_bytes())
"""


def test_a_childs_peak_memory_is_its_own_not_its_big_parents():
    """The benchmarks' peak RSS: each measurement is a child of a parent that may hold GiBs (the random 1.1 B
    model it generated); getrusage's ru_maxrss keeps that parent's peak across fork and exec."""
    ballast = np.ones(768 * 2**20, np.uint8)  # 768 MiB, every page touched
    out = subprocess.run([sys.executable, "-c", PEAK_OF_A_CHILD, str(ROOT)], capture_output=True, text=True, check=True)
    child_peak = int(out.stdout)
    assert 0 < child_peak < 300 * 2**20, f"child reports {child_peak / 2**20:.0f} MiB; its parent holds {ballast.nbytes >> 20} MiB"


def test_bench_quantize_measures_its_entry_beside_llama_cpp_q8_0_at_each_thread_count(capsys):
    """bench_quantize --llama-cpp: the entry just built (runtime and group size as resolved) and Q8_0 alternate
    per thread count, and INT8 is reported as a ratio to Q8_0 at the same count."""
    from workers.tools import bench_quantize as bq

    variants = bq.speed_variants("neural-speed", 64, llama_cpp=True)
    assert [(v.backend, v.threads, v.runtime, v.group_size, v.gguf) for v in variants] == [
        ("itrex-int8", 1, "neural-speed", 64, ""), ("llama.cpp", 1, "qbits", "auto", "q8_0"),
        ("itrex-int8", 2, "neural-speed", 64, ""), ("llama.cpp", 2, "qbits", "auto", "q8_0")]
    assert [v.backend for v in bq.speed_variants("qbits", -1, llama_cpp=False)] == ["itrex-int8"] * 2

    def run(decode):
        return {"decode_tok_s": decode, "prompt_tok_s": 10.0, "load_s": 5.0, "steady_rss_gib": 8.0}

    i1, q1, i2, q2 = variants
    bq.print_speeds({i1: [run(1.0), run(1.2), run(1.4)], q1: [run(1.0)] * 3,
                     i2: [run(3.0)], q2: [{"error": "crashed"}]})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("  INT8 1 thread(s): decode 1.20 tok/s (1.20x llama.cpp Q8_0)")
    assert out[0].endswith("(median of 3; per round 1.00x, 1.20x, 1.40x)")  # each round's pair, beside the median
    assert out[1].endswith("(median of 3)")  # the reference itself has no ratio
    assert out[2].startswith("  INT8 2 thread(s): decode 3.00 tok/s, prompt")  # no ratio without Q8_0
    assert out[3] == "  llama.cpp Q8_0 2 thread(s): error crashed"


def test_bench_quantize_puts_an_int4_entry_beside_llama_cpp_q4_0():
    """--bits 4: the entry is INT4 and its reference llama.cpp's Q4_0, at each thread count."""
    from workers.tools import bench_quantize as bq

    variants = bq.speed_variants("llama-cpp", 32, llama_cpp=True, bits=4)
    assert [(v.backend, v.threads, v.bits, v.gguf) for v in variants] == [
        ("itrex-int8", 1, 4, ""), ("llama.cpp", 1, 8, "q4_0"), ("itrex-int8", 2, 4, ""), ("llama.cpp", 2, 8, "q4_0")]


def test_bench_quantize_child_builds_the_entry_of_the_settings_it_is_given(tmp_path, monkeypatch):
    """The child that measures the first start builds the asked runtime's entry, not the default one."""
    from workers.config.int8 import Int8Settings
    from workers.engine import int8_cache
    from workers.tools import bench_quantize as bq

    built = []
    monkeypatch.setattr(int8_cache, "ensure", lambda source, settings, root: built.append((source, settings, root)))
    settings = Int8Settings(runtime="llama-cpp", bits=4, group_size=32)
    assert bq.main(["--child-build", str(tmp_path / "model"), str(tmp_path / "cache"), settings.model_dump_json()]) == 0
    assert built == [(tmp_path / "model", settings, tmp_path / "cache")]


def test_bench_quantize_measures_the_library_it_is_asked_for(capsys):
    """--library native: the entry is measured on llama.cpp compiled for this CPU, named so in the report; a runtime
    that has no such library is refused before a model is generated."""
    import pytest

    from workers.tools import bench_quantize as bq

    variants = bq.speed_variants("llama-cpp", 32, llama_cpp=True, library="native")
    assert [(v.backend, v.library) for v in variants] == [("itrex-int8", "native"), ("llama.cpp", "prebuilt")] * 2
    assert variants[0].int8.library == "native"
    bq.print_speeds({variants[0]: [{"decode_tok_s": 2.0, "prompt_tok_s": 9.0, "load_s": 1.0, "steady_rss_gib": 8.0}]})
    assert capsys.readouterr().out.startswith("  INT8 (library built for this CPU) 1 thread(s): decode 2.00 tok/s")
    with pytest.raises(SystemExit):
        bq.main(["--runtime", "qbits", "--library", "native"])
    assert "library: native is not offered by the qbits runtime" in capsys.readouterr().err
