"""int8.library: native (engine/runtimes/llama_cpp/native_build.py): which runtimes offer it, where a build lives and
what makes another one, what a host without the tools or without the build is told, and that both libraries share
the INT8 cache entry. The build itself and the answers of the library it makes:
tests/integration/test_llama_cpp_native_build.py."""
from __future__ import annotations

import pytest

from workers.config.int8 import Int8Settings
from workers.engine import int8_cache
from workers.engine.runtimes import registry
from workers.engine.runtimes.base import RuntimeUnavailable
from workers.engine.runtimes.llama_cpp import native_build

AVX2 = frozenset({"avx", "avx2", "fma", "f16c"})
AMX = AVX2 | {"avx512f", "amx_tile", "amx_int8"}
NATIVE = Int8Settings(runtime="llama-cpp", library="native")


@pytest.mark.parametrize("runtime", ["auto", "qbits", "neural-speed"])
def test_native_is_refused_for_the_other_runtimes(embedded_model, runtime):
    _, settings = registry.select("itrex-int8", Int8Settings(runtime=runtime, library="native"), embedded_model)
    assert registry.unsupported_reason(settings, AVX2) == (
        f"library: native is not offered by the {settings.runtime} runtime (it runs prebuilt); runtime: llama-cpp "
        "offers it")
    assert registry.unsupported_reason(NATIVE, AVX2) is None
    assert "built for this CPU" in NATIVE.describe()


def test_a_build_is_kept_per_cpu_and_compiler_and_amx_kernels_are_left_out():
    one = native_build.folder(AVX2, "gcc 12")
    assert one == native_build.folder(AVX2, "gcc 12")
    assert len({one, native_build.folder(AMX, "gcc 12"), native_build.folder(AVX2, "gcc 13")}) == 3
    assert "-DGGML_NATIVE=ON" in native_build.cmake_options(AVX2)
    assert not any("amx" in o for o in native_build.cmake_options(AVX2))
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in native_build.cmake_options(AMX)


def test_a_host_without_cmake_or_a_compiler_is_told_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNDLE_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing to run
    with pytest.raises(RuntimeUnavailable, match="needs cmake and c.. .Debian: apt install cmake g..."):
        registry.by_name("llama-cpp").prepare(NATIVE, print)
    assert not any(tmp_path.iterdir())  # nothing half-built left


def test_a_worker_without_the_build_names_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNDLE_VAR_DIR", str(tmp_path))
    with pytest.raises(native_build.NativeBuildError, match="not built for this CPU yet .*scripts/prepare_models.sh"):
        native_build.library_file()


def test_both_libraries_read_the_same_cache_entry(embedded_model, tmp_path):
    prebuilt = registry.resolve(Int8Settings(runtime="llama-cpp"), embedded_model)
    native = registry.resolve(NATIVE, embedded_model)
    assert native.library == "native"
    assert int8_cache.key_inputs(embedded_model, prebuilt, tmp_path) == int8_cache.key_inputs(embedded_model, native,
                                                                                               tmp_path)


def test_a_start_stops_before_anything_runs_when_the_build_cannot_be_made(embedded_model, tmp_path, monkeypatch):
    """`bundle start` / `bundle prepare` step [2/4] builds it for each model that asks (ops/cli.py)."""
    from workers.config import deployment
    from workers.ops import cli

    dep = deployment.load("default", cpu_count=2)
    int8 = dep.models[0]
    dep = dep.model_copy(update={"models": [int8.model_copy(update={"int8": NATIVE})]})
    monkeypatch.setenv("BUNDLE_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    problem = cli.prepare_int8_weights(dep, {int8.program: embedded_model})
    assert problem.startswith(f"models[{int8.program}]: int8.library: native compiles llama.cpp on this host and needs "
                              "cmake")
