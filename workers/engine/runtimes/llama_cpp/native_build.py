"""llama.cpp compiled on this host for its CPU (`int8: {runtime: llama-cpp, library: native}`): the same llama.cpp
source the pinned xllamacpp wheel was built from (its PyPI source distribution, quantize.SOURCE_URL), compiled with
`-march=native` into shared libraries that the binding loads instead of the wheel's library, which is compiled for
any AVX2 CPU. Built once per host, CPU and compiler (a few minutes on 2 cores; docs/int8.md), by `bundle prepare` and
`bundle start`, and kept under var/llama-cpp/.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
from collections import deque
from pathlib import Path

from workers.config import cpu
from workers.config.files import publish_dir
from workers.config.paths import var_dir
from workers.engine.runtimes.llama_cpp.binding import PACKAGE, PINNED
from workers.engine.runtimes.llama_cpp.quantize import SOURCE_SHA256, SOURCE_URL, download

LIBRARY = "libllama.so"  # beside it the ggml libraries it needs (found through its $ORIGIN run path)
# Only the library: no tools, examples, tests, server or network code.
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
                 "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF",
                 "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN")
# On an AMX CPU, -march=native also compiles llama.cpp's AMX tile kernels, which die with a general protection fault
# on these VMs (llama.cpp PR #26954); these flags keep every other native feature (as scripts/setup_bench.sh does).
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
PROGRESS = re.compile(r"^\[(\d+)/(\d+)\]")  # ninja's and make's step counters


class NativeBuildError(RuntimeError):
    """The native library cannot be built here; the message says why and what to do."""


def cmake_options(flags: frozenset[str]) -> list[str]:
    options = list(CMAKE_OPTIONS)
    if "amx_tile" in flags:
        options += [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]
    return options


def missing_tools() -> list[str]:
    return [name for name in ("cmake", "c++") if shutil.which(name) is None]


def compiler_version() -> str:
    found = shutil.which("c++")
    if not found:
        return "none"
    return subprocess.run([found, "--version"], check=False, capture_output=True, text=True).stdout.splitlines()[0]


def folder(flags: frozenset[str] | None = None, compiler: str | None = None) -> Path:
    """Where the build for this llama.cpp version, CPU and compiler lives: another CPU (a copied var/ folder, another
    host) or compiler gets a build of its own."""
    flags = cpu.flags() if flags is None else flags
    key = json.dumps({"flags": sorted(flags), "compiler": compiler or compiler_version(),
                      "options": cmake_options(flags)})
    return var_dir() / "llama-cpp" / f"{PACKAGE}-{PINNED}-native-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def library_file() -> Path:
    """The built library; NativeBuildError when this host has none yet."""
    path = folder() / LIBRARY
    if not path.is_file():
        raise NativeBuildError(f"llama.cpp is not built for this CPU yet ({path} is missing): "
                               "`scripts/prepare_models.sh` or `scripts/start_all.sh` builds it (int8.library: native)")
    return path


def ensure(say=print) -> Path:
    """The library built for this CPU, compiled now when missing."""
    final = folder()
    if (final / LIBRARY).is_file():
        return final / LIBRARY
    missing = missing_tools()
    if missing:
        raise NativeBuildError(f"int8.library: native compiles llama.cpp on this host and needs {' and '.join(missing)}"
                               f" (Debian: apt install cmake g++); or use int8.library: prebuilt")
    with publish_dir(final) as staging:  # a build cut short leaves a partial folder the next one removes
        work = staging / "work"
        work.mkdir()
        tree = _fetch_source(work)
        build = work / "build"
        generator = ["-G", "Ninja"] if shutil.which("ninja") else []
        say(f"  compiling llama.cpp {PINNED} for this CPU ({cpu.describe()}); once per host, a few minutes")
        _run(["cmake", "-S", str(tree), "-B", str(build), *generator, *cmake_options(cpu.flags())], say)
        _run(["cmake", "--build", str(build), "--target", "llama", "--parallel"], say)
        for lib in (build / "bin").glob("lib*.so*"):  # the versioned files and their links
            shutil.copy2(lib, staging / lib.name, follow_symlinks=False)
        shutil.rmtree(work)
        (staging / "build.json").write_text(json.dumps(
            {"version": PINNED, "cpu": cpu.describe(), "compiler": compiler_version(),
             "cmake": cmake_options(cpu.flags())}, indent=1))
    say(f"  llama.cpp for this CPU: {final}")
    return final / LIBRARY


def _fetch_source(tmp: Path) -> Path:
    archive = tmp / SOURCE_URL.rsplit("/", 1)[1]
    download(SOURCE_URL, SOURCE_SHA256, archive)
    prefix = f"{PACKAGE}-{PINNED}/thirdparty/llama.cpp/"
    tree = tmp / "llama.cpp"
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            if member.name.startswith(prefix) and (member.isfile() or member.isdir()):
                member.name = member.name[len(prefix):]
                tar.extract(member, tree, filter="data")
    archive.unlink()
    if not (tree / "CMakeLists.txt").is_file():
        raise NativeBuildError(f"{archive.name} holds no {prefix}CMakeLists.txt")
    return tree


def _run(cmd: list[str], say) -> None:
    """Run a build step, showing its step counter every 10 %; its last lines when it fails."""
    tail: deque[str] = deque(maxlen=30)
    shown = -1
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            step = PROGRESS.match(line)
            if step:
                done, total = int(step[1]), int(step[2])
                if done * 10 // total > shown:
                    shown = done * 10 // total
                    say(f"  compiling llama.cpp: {done}/{total}")
    if proc.returncode:
        raise NativeBuildError(f"compiling llama.cpp failed ({' '.join(cmd[:2])}, exit {proc.returncode}); its last "
                               "lines:\n" + "\n".join(tail))
