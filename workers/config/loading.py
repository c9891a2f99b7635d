"""Load a YAML file into a pydantic schema; every error names the file and the field.

Used for deployments (conf/*.yaml) and question sets (conf/questions/*.yaml).
"""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration file is invalid; str() lists every problem, one per line."""


class Strict(BaseModel):
    """Base of every schema: unknown keys are refused, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def field_path(loc: tuple) -> str:
    """pydantic's error location as written in the file: models[1].threads."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"


def format_errors(exc: ValidationError, origin: str, keys_listed_in: str = "docs/configuration.md, 'Every key'") -> str:
    """One line per problem: file, field path, message; an unknown key points to where the keys are listed."""
    lines = []
    for err in exc.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key (check the spelling; the keys are listed in {keys_listed_in})"
        lines.append(f"{origin}: {field_path(err['loc'])}: {msg}")
    return "\n".join(lines)


def load_yaml(path: Path, schema: type[T], error: type[ConfigError] = ConfigError,
              keys_listed_in: str = "docs/configuration.md, 'Every key'") -> T:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise error(f"{path}: (top level): expected a mapping of keys, got {type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise error(format_errors(exc, str(path), keys_listed_in)) from None
