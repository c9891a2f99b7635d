"""contains_any: the answer contains one of the expected phrases (whitespace ignored)."""
from __future__ import annotations

import re

from workers.tools.checks.result import CheckResult


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", text)


def check(spec, answer: str) -> CheckResult:
    hits = [e for e in spec.expect if _squash(e) in _squash(answer)]
    if hits:
        return CheckResult(True, f"contains {hits[0]!r}")
    return CheckResult(False, f"contains none of {spec.expect}")
