"""scripts/setup.sh's progress line (workers/ops/pip_progress.py): pip's output to the log, counts to the terminal."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FILTER = ROOT / "workers" / "ops" / "pip_progress.py"

PIP_OUTPUT = """Looking in links: /opt/wheels
Collecting torch==2.3.0 (from -r requirements.txt (line 3))
  Downloading torch-2.3.0-cp311-cp311-manylinux1_x86_64.whl (779.1 MB)
Collecting numpy (from torch==2.3.0)
  Using cached numpy-1.26.4-cp311-cp311-manylinux_2_17_x86_64.whl (18.3 MB)
Requirement already satisfied: setuptools in ./.venv/lib/python3.11/site-packages (65.5.0)
Installing collected packages: numpy, torch
Successfully installed numpy-1.26.4 torch-2.3.0
"""


def run_filter(tmp_path, text: str) -> tuple[str, str]:
    log = tmp_path / "setup.log"
    out = subprocess.run([sys.executable, str(FILTER), str(log), "setup: [3/5] requirements.txt"], input=text,
                         capture_output=True, text=True, check=True).stdout
    return out, log.read_text()


def test_the_terminal_gets_one_summary_line_and_the_log_gets_everything(tmp_path):
    out, log = run_filter(tmp_path, PIP_OUTPUT)
    assert log == PIP_OUTPUT
    assert out.splitlines() == ["setup: [3/5] requirements.txt: 2 installed, 1 downloaded (0 s)"]


def test_a_failing_pip_says_so(tmp_path):
    out, _ = run_filter(tmp_path, "Collecting nothing-such==1\nERROR: No matching distribution found for nothing-such==1\n")
    assert out.strip() == "setup: [3/5] requirements.txt: pip failed (0 s)"


def test_the_live_line_names_what_pip_is_doing():
    sys.path.insert(0, str(FILTER.parent))
    try:
        import pip_progress
    finally:
        sys.path.pop(0)
    p = pip_progress.Progress("setup", live=False)
    shown = [p.feed(line) for line in PIP_OUTPUT.splitlines()]
    assert [s for s in shown if s] == ["collecting 1: torch==2.3.0", "collecting 1: downloading torch-2.3.0-cp311-cp311-manylinux1_x86_64.whl",
                                       "collecting 2: numpy", "installing 2 packages"]
