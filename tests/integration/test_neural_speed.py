"""The neural-speed runtime's tests (neural_speed_cases.py), run by pytest in a fresh process.

neural-speed and ITREX's qbits both embed the bestla kernels under the same symbols; in a process
that had loaded qbits models (earlier tests of this suite), neural-speed segfaulted. A serving worker
runs one INT8 runtime (threads.apply_to_torch never loads qbits next to neural-speed), so the tests
of neural-speed get a process of their own too.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests import tiny_models

ROOT = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("neural_speed_cases.py")


def test_neural_speed_cases_pass_in_a_process_of_their_own(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp",
                           str(tmp_path / "basetemp"), str(CASES)], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    tail = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout, tail
    # the Qwen cases need ../shared/model-code (they skip with that reason where it is absent); nothing else skips
    if tiny_models.model_code_missing() is None:
        assert "skipped" not in proc.stdout, tail
