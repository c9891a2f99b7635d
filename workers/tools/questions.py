"""Question sets (conf/questions/*.yaml): schema and loading, with errors naming file and field."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from workers.config.loading import ConfigError, Strict, load_yaml
from workers.config.paths import CONF_DIR

QUESTIONS_DIR = CONF_DIR / "questions"


class ContainsAny(Strict):
    kind: Literal["contains_any"]
    expect: list[str] = Field(min_length=1)


class Constraint(Strict):
    """One seating rule; seats are numbered 1..n from the left."""

    at: str | None = None
    seat: int | None = None
    not_at: str | None = None
    seats: list[int] | None = None
    right_of: str | None = None
    next_to: str | None = None
    of: str | None = None
    adjacent: bool | None = None

    @model_validator(mode="after")
    def _one_rule(self):
        rules = [k for k in ("at", "not_at", "right_of", "next_to") if getattr(self, k) is not None]
        if len(rules) != 1:
            raise ValueError(f"give exactly one of at, not_at, right_of, next_to (got {rules or 'none'})")
        needs = {"at": "seat", "not_at": "seats", "right_of": "of", "next_to": "of"}[rules[0]]
        if getattr(self, needs) is None:
            raise ValueError(f"'{rules[0]}' needs '{needs}'")
        return self


class SeatingConstraints(Strict):
    kind: Literal["seating_constraints"]
    people: list[str] = Field(min_length=2)
    satisfiable: bool
    constraints: list[Constraint] = Field(min_length=1)


class CppCase(Strict):
    input: list[int]
    expect: bool | int


class CppFunction(Strict):
    kind: Literal["cpp_function"]
    function: str  # the C++ signature, e.g. "bool canPartition(std::vector<int>& nums)"
    cases: list[CppCase] = Field(min_length=1)


Check = Annotated[Union[ContainsAny, SeatingConstraints, CppFunction], Field(discriminator="kind")]


class Question(Strict):
    id: str
    text: str
    note: str | None = None
    check: Check | None = None


class QuestionSet(Strict):
    id: str
    title: str
    questions: list[Question] = Field(min_length=1)


class QuestionFile(Strict):
    sets: list[QuestionSet] = Field(min_length=1)


class QuestionsError(ConfigError):
    """A question file is invalid (each line names file and field), or question ids repeat."""


def load(paths: list[Path] | None = None) -> list[QuestionSet]:
    paths = paths or sorted(QUESTIONS_DIR.glob("*.yaml"))
    if not paths:
        raise QuestionsError(f"no question files in {QUESTIONS_DIR}")
    sets: list[QuestionSet] = []
    for path in paths:
        sets += load_yaml(Path(path), QuestionFile, QuestionsError,
                          "docs/compare.md, 'Question sets'").sets
    ids = [q.id for s in sets for q in s.questions]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise QuestionsError(f"question ids must be unique across files; repeated: {', '.join(dupes)}")
    return sets
