"""cpp_function: compile the answer's C++ with a harness that calls the named function on each case.

Untrusted code: it is compiled and run in a temporary directory, with no network (a new network
namespace via `unshare`), an empty environment, CPU, memory and wall-clock limits.
"""
from __future__ import annotations

import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path

from workers.tools.checks.result import CheckResult

COMPILE_TIMEOUT_S = 60
RUN_TIMEOUT_S = 10
CPU_LIMIT_S = 5
MEMORY_LIMIT_BYTES = 512 * 2**20

_SIGNATURE = re.compile(r"^\s*([\w:<>\s]+?)\s+(\w+)\s*\((.*)\)\s*$")
_CODE_BLOCK = re.compile(r"```[ \t]*([\w+#-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(answer: str, function_name: str) -> str | None:
    blocks = [(lang.lower(), code) for lang, code in _CODE_BLOCK.findall(answer)]
    cpp = [code for lang, code in blocks if lang in ("cpp", "c++", "cc", "cxx", "c", "")]
    with_function = [code for code in cpp if re.search(rf"\b{re.escape(function_name)}\s*\(", code)]
    if with_function:
        return with_function[0]
    if not blocks and re.search(rf"\b{re.escape(function_name)}\s*\(", answer) and "{" in answer:
        return answer  # code without a fence
    return None


def harness(code: str, function_name: str, cases) -> str:
    uses_class = re.search(r"\b(class|struct)\s+Solution\b", code) is not None
    call = f"Solution().{function_name}(v)" if uses_class else f"{function_name}(v)"
    inputs = ",\n    ".join("{" + ", ".join(str(x) for x in c.input) + "}" for c in cases)
    return f"""#include <bits/stdc++.h>
using namespace std;
#define main bundle_answer_main
{code}
#undef main
int main() {{
  std::vector<std::vector<int>> inputs = {{
    {inputs}
  }};
  for (size_t i = 0; i < inputs.size(); ++i) {{
    std::vector<int> v = inputs[i];
    long long r = (long long)({call});
    std::cout << "CASE " << i << " " << r << std::endl;
  }}
  return 0;
}}
"""


def _limits():
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_LIMIT_S, CPU_LIMIT_S))
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 2**20, 16 * 2**20))


def _sandbox_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None:
        raise RuntimeError("`unshare` (util-linux) is needed to run answer code without network")
    return [unshare, "--net", "--map-root-user"]


def check(spec, answer: str) -> CheckResult:
    match = _SIGNATURE.match(spec.function)
    if not match:
        return CheckResult(False, f"question data error: cannot parse signature {spec.function!r}")
    name = match.group(2)
    code = extract_code(answer, name)
    if code is None:
        return CheckResult(False, f"no C++ code defining {name}() found in the answer")
    with tempfile.TemporaryDirectory(prefix="cpp-check-") as tmp:
        src, exe = Path(tmp) / "answer.cpp", Path(tmp) / "answer"
        src.write_text(harness(code, name, spec.cases))
        try:
            build = subprocess.run(["g++", "-std=c++17", "-O2", "-w", str(src), "-o", str(exe)], cwd=tmp,
                                   capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return CheckResult(False, f"compilation took longer than {COMPILE_TIMEOUT_S} s")
        if build.returncode != 0:
            errors = [line for line in build.stderr.splitlines() if "error" in line][:5]
            return CheckResult(False, "does not compile: " + " | ".join(e.split(": ", 1)[-1] for e in errors))
        try:
            run = subprocess.run(_sandbox_prefix() + [str(exe)], cwd=tmp, env={}, capture_output=True, text=True,
                                 timeout=RUN_TIMEOUT_S, preexec_fn=_limits)
        except subprocess.TimeoutExpired:
            return CheckResult(False, f"time limit exceeded ({RUN_TIMEOUT_S} s): endless loop or far too slow")
    results = dict(re.findall(r"^CASE (\d+) (-?\d+)$", run.stdout, re.MULTILINE))
    failed = []
    for i, case in enumerate(spec.cases):
        got = results.get(str(i))
        want = int(case.expect)
        if got is None:
            failed.append(f"{case.input}: no result ({'killed: CPU time limit' if run.returncode < 0 else 'crashed'})")
        elif int(got) != want:
            failed.append(f"{case.input}: got {got}, expected {want}")
    if failed:
        return CheckResult(False, f"{len(failed)} of {len(spec.cases)} cases failed: " + "; ".join(failed))
    return CheckResult(True, f"all {len(spec.cases)} cases pass")
