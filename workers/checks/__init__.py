"""Automatic answer checks, one module per `check.kind` of a question set."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckResult:
    passed: bool
    detail: str


def run(check, answer: str) -> CheckResult:
    from workers.checks import contains, cpp, seating

    runner = {"contains_any": contains.check, "seating_constraints": seating.check, "cpp_function": cpp.check}[check.kind]
    return runner(check, answer)
