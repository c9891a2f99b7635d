"""Secrets named by the deployment, read at run time from the environment or a file outside git.

They never appear in a command line, the generated supervisord config or a log line.
"""
from __future__ import annotations

import os
from pathlib import Path

from workers.config.schema import ApiEndpoint


class SecretError(ValueError):
    pass


def read_list(env_name: str | None, file: Path | None, what: str) -> list[str]:
    """Comma-separated values from $env_name, plus one value per line of `file` ('#' starts a comment line)."""
    values: list[str] = []
    if env_name and os.environ.get(env_name):
        values += [v.strip() for v in os.environ[env_name].split(",") if v.strip()]
    if file is not None:
        file = file.expanduser()
        if not file.is_file():
            raise SecretError(f"{what} file {file} does not exist")
        values += [line.strip() for line in file.read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    return values


def api_keys(api: ApiEndpoint) -> list[str]:
    return read_list(api.api_keys_env, api.api_keys_file, "api_keys_file")
