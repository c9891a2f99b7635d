"""Question sets (conf/questions/*.yaml): schema and loading, with errors naming file and field."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from workers.config.paths import ROOT

QUESTIONS_DIR = ROOT / "conf" / "questions"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ContainsAny(_Strict):
    kind: Literal["contains_any"]
    expect: list[str] = Field(min_length=1)


class Constraint(_Strict):
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


class SeatingConstraints(_Strict):
    kind: Literal["seating_constraints"]
    people: list[str] = Field(min_length=2)
    satisfiable: bool
    constraints: list[Constraint] = Field(min_length=1)


class CppCase(_Strict):
    input: list[int]
    expect: bool | int


class CppFunction(_Strict):
    kind: Literal["cpp_function"]
    function: str  # the C++ signature, e.g. "bool canPartition(std::vector<int>& nums)"
    cases: list[CppCase] = Field(min_length=1)


Check = Annotated[Union[ContainsAny, SeatingConstraints, CppFunction], Field(discriminator="kind")]


class Question(_Strict):
    id: str
    text: str
    note: str | None = None
    check: Check | None = None


class QuestionSet(_Strict):
    id: str
    title: str
    questions: list[Question] = Field(min_length=1)


class QuestionFile(_Strict):
    sets: list[QuestionSet] = Field(min_length=1)


class QuestionsError(ValueError):
    pass


def load(paths: list[Path] | None = None) -> list[QuestionSet]:
    paths = paths or sorted(QUESTIONS_DIR.glob("*.yaml"))
    if not paths:
        raise QuestionsError(f"no question files in {QUESTIONS_DIR}")
    sets: list[QuestionSet] = []
    for path in paths:
        try:
            data = QuestionFile.model_validate(yaml.safe_load(Path(path).read_text()) or {})
        except FileNotFoundError:
            raise QuestionsError(f"{path}: no such question file") from None
        except yaml.YAMLError as exc:
            raise QuestionsError(f"{path}: not valid YAML: {exc}") from None
        except ValidationError as exc:
            lines = [f"{path}: {'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
            raise QuestionsError("\n".join(lines)) from None
        sets += data.sets
    ids = [q.id for s in sets for q in s.questions]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise QuestionsError(f"question ids must be unique across files; repeated: {', '.join(dupes)}")
    return sets
