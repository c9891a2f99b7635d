"""Secrets named by the deployment, read at run time from the environment or a file outside git.

They never appear in a command line, the generated supervisord config or a log line.
"""
from __future__ import annotations

import os
from pathlib import Path

from workers.config import hosts
from workers.config.schema import ApiEndpoint, Deployment


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
            raise SecretError(f"{what}: {file} does not exist")
        values += [line.strip() for line in file.read_text().splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    return values


def api_keys(api: ApiEndpoint) -> list[str]:
    return read_list(api.api_keys_env, api.api_keys_file, "api.api_keys_file")


MIN_WORKER_SECRET = 16


def worker_secret(dep: Deployment) -> str | None:
    """The secret shared by controller, workers, API and web UI, or None when none is configured.

    From $<worker_secret.env> (default BUNDLE_WORKER_SECRET), else the first line of
    worker_secret.file. Required with several hosts; optional on one host (no secret: no check).
    """
    cfg = dep.worker_secret
    values = read_list(None, cfg.file, "worker_secret.file") if cfg.file is not None else []
    value = (os.environ.get(cfg.env) or "").strip() if cfg.env else ""
    value = value or (values[0] if values else "")
    if not value:
        if hosts.several(dep):
            where = f"${cfg.env}" if cfg.env else "worker_secret.file"
            raise SecretError(
                f"a deployment on several hosts needs a worker secret: set {where} to the same value on every host "
                f"(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        return None
    if len(value) < MIN_WORKER_SECRET:
        raise SecretError(f"the worker secret has {len(value)} characters; use at least {MIN_WORKER_SECRET}")
    if not (value.isascii() and value.isprintable()):
        raise SecretError("the worker secret must be printable ASCII characters")
    return value
