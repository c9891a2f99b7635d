#!/usr/bin/env bash
# Build .venv-bench, the benchmark-only environment for llama.cpp (requirements-bench.txt): llama-cpp-python
# compiled from its PyPI source with -DGGML_NATIVE=ON, plus what llama.cpp's HF->GGUF converter needs.
# Safe to re-run: does nothing while requirements-bench.txt and the build flags are unchanged.
# The first build compiles llama.cpp (~15 min on 2 idle cores, 45 on busy ones); ninja's [n/N] lines show progress.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-bench
stamp=$venv/.requirements.sha256
# GGML_NATIVE=ON: -march=native, i.e. this CPU's AVX2/AVX512/VNNI/AMX. No multimodal library, tools or tests.
cmake_args="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF ${CMAKE_ARGS_EXTRA:-}"
# On an AMX CPU, -march=native also compiles llama.cpp's AMX tile kernels, and on these VMs Q8_0 then dies with a
# general protection fault in libggml-cpu (llama.cpp PR #26954: the tile config is optimized away / XFD per
# thread). -mno-amx-* keeps every other native flag (AVX512, VNNI, BF16), so Q8_0 runs on its AVX512-VNNI kernels.
if grep -qw amx_tile /proc/cpuinfo && [[ ${BENCH_LLAMA_AMX:-0} != 1 ]]; then
  no_amx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake_args="$cmake_args -DCMAKE_C_FLAGS='$no_amx' -DCMAKE_CXX_FLAGS='$no_amx'"
  echo "setup-bench: AMX CPU: llama.cpp is built without its AMX tile kernels (they crash here; BENCH_LLAMA_AMX=1 keeps them)"
fi
want=$(cat requirements-bench.txt <(echo "$cmake_args") | sha256sum | cut -d' ' -f1)
if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then
  echo "setup-bench: $venv is up to date with requirements-bench.txt"
  exit 0
fi

version=$(sed -n 's/^llama-cpp-python==\([^ ]*\).*/\1/p' requirements-bench.txt)
echo "setup-bench: building $venv with llama-cpp-python $version from source (native CPU flags)"
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
py=$venv/bin/python
"$py" -m pip install --quiet --upgrade "pip==24.3.1"

echo "setup-bench: [1/4] fetching the llama-cpp-python $version source (sdist from PyPI)"
src=$venv/src
mkdir -p "$src"
if [[ ! -f $src/llama_cpp_python-$version/vendor/llama.cpp/convert_hf_to_gguf.py ]]; then
  "$py" -m pip download --progress-bar on --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$src"
  tar -xzf "$src/llama_cpp_python-$version.tar.gz" -C "$src"
fi
tree=$src/llama_cpp_python-$version

echo "setup-bench: [2/4] installing the converter's requirements"
grep -v '^llama-cpp-python' requirements-bench.txt > "$venv/requirements-converter.txt"
"$py" -m pip install --progress-bar on -r "$venv/requirements-converter.txt"
"$py" -m pip install --progress-bar on scikit-build-core "cmake>=3.21" ninja typing-extensions diskcache jinja2

echo "setup-bench: [3/4] installing gguf from the same llama.cpp tree (the converter's own version)"
"$py" -m pip install --progress-bar on --no-deps "$tree/vendor/llama.cpp/gguf-py"

echo "setup-bench: [4/4] compiling llama.cpp and installing llama-cpp-python (verbose: compiler lines follow)"
export CMAKE_ARGS=$cmake_args
export FORCE_CMAKE=1
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
# Full log in $venv/build.log; shown here: ninja's [n/N] lines (shortened to the object built), errors, the result.
set +e
"$py" -m pip install -v --no-build-isolation --no-deps --no-binary llama-cpp-python "$tree" 2>&1 \
  | tee "$venv/build.log" | grep --line-buffered -E '^\s*\[[0-9]+/[0-9]+\]|error:|Error|Successfully' \
  | sed -u -E 's#^\s*(\[[0-9]+/[0-9]+\]).* -o ([^ ]+).*#  \1 \2#'
rc=${PIPESTATUS[0]}
set -e
[[ $rc == 0 ]] || { echo "setup-bench: the llama-cpp-python build failed (rc $rc); full log: $venv/build.log"; exit 1; }
"$py" -c "import llama_cpp, sys; print('setup-bench: llama_cpp', llama_cpp.__version__, 'system info:', llama_cpp.llama_print_system_info().decode())" \
  || { echo "setup-bench: llama_cpp does not import; see the build output above"; exit 1; }
echo "$want" > "$stamp"
echo "setup-bench: done"
