"""The deployment description (conf/<profile>.yaml): schema, loading and validation.

Everything else (supervisord programs, worker flags, the web UI's model list, compare/bench
targets) is derived from this. Errors name the file and the field: `models[1].threads: ...`.
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from workers.int8_settings import Int8Settings
from workers.paths import ROOT

CONF_DIR = ROOT / "conf"
EMBEDDED_MODELS = ("smollm2-135m-instruct",)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class DeploymentError(ValueError):
    """A deployment file is invalid; str() lists every problem, one per line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Endpoint(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)


class ApiEndpoint(Endpoint):
    # Keys never live in the repo: a variable holding comma-separated keys, and/or a file outside git.
    api_keys_env: str | None = None
    api_keys_file: Path | None = None


class WebEndpoint(Endpoint):
    title: str = "CPU LLM Bundle"
    auth_file: Path | None = None  # FastChat gradio auth file: "user:password" per line


class Heartbeat(_Strict):
    # FastChat defaults (45 s / 90 s) leave workers unregistered for up to 90 s after a controller restart.
    worker_interval_s: int = Field(default=3, ge=1)
    expiration_s: int = Field(default=10, ge=2)

    @model_validator(mode="after")
    def _expiration_after_interval(self):
        if self.expiration_s <= 2 * self.worker_interval_s:
            raise ValueError(
                f"expiration_s ({self.expiration_s}) must exceed twice worker_interval_s ({self.worker_interval_s})"
            )
        return self


class Source(_Strict):
    """Exactly one of: a model shipped in a PyPI package, a ModelScope id, a local folder."""

    embedded: Literal[EMBEDDED_MODELS] | None = None  # type: ignore[valid-type]
    modelscope: str | None = None
    path: Path | None = None
    revision: str = "master"

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("embedded", "modelscope", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of embedded, modelscope, path (got {given or 'none'})")
        return self

    @field_validator("modelscope")
    @classmethod
    def _modelscope_id(cls, v):
        if v is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", v):
            raise ValueError(f"{v!r} is not a ModelScope id like 'ZhipuAI/chatglm3-6b'")
        return v


class ModelSpec(_Strict):
    names: list[str] = Field(min_length=1)
    source: Source
    backend: Literal["itrex-int8", "fp32", "bf16"] = "itrex-int8"
    port: int = Field(ge=1, le=65535)
    threads: int = Field(default=1, ge=1)
    cpu_cores: list[int] | None = None
    conv_template: str | None = None
    limit_concurrency: int = Field(default=4, ge=1)
    trust_remote_code: bool = False
    int8: Int8Settings = Int8Settings()

    @field_validator("names")
    @classmethod
    def _names(cls, names):
        for n in names:
            if not _NAME.match(n):
                raise ValueError(f"{n!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit")
        return names

    @property
    def program(self) -> str:
        """The supervisord program name (in group `workers`)."""
        return self.names[0]

    @model_validator(mode="after")
    def _cores_vs_threads(self):
        if self.cpu_cores is not None:
            if len(set(self.cpu_cores)) != len(self.cpu_cores):
                raise ValueError(f"cpu_cores {self.cpu_cores} lists a core twice")
            if self.threads > len(self.cpu_cores):
                raise ValueError(
                    f"threads ({self.threads}) exceeds the {len(self.cpu_cores)} pinned cpu_cores {self.cpu_cores}"
                )
        return self


class Deployment(_Strict):
    controller: Endpoint = Endpoint(port=21001)
    api: ApiEndpoint = ApiEndpoint(port=8000)
    web: WebEndpoint = WebEndpoint(port=7860)
    heartbeat: Heartbeat = Heartbeat()
    models: list[ModelSpec] = Field(min_length=1)


def _format(exc: ValidationError, origin: str) -> str:
    lines = []
    for err in exc.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; the keys are listed in README, 'Configuration')"
        lines.append(f"{origin}: {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def semantic_problems(dep: Deployment, cpu_count: int | None = None, base_dir: Path = ROOT,
                      cpu_flags: frozenset[str] | None = None) -> list[str]:
    """Rules that need the whole deployment or the machine (not just one field)."""
    cpu_count = cpu_count or os.cpu_count() or 1
    problems = []
    seen_names: dict[str, str] = {}
    seen_ports: dict[int, str] = {}
    for field, port in (("controller.port", dep.controller.port), ("api.port", dep.api.port), ("web.port", dep.web.port)):
        if port in seen_ports:
            problems.append(f"{field}: port {port} is already used by {seen_ports[port]}")
        seen_ports.setdefault(port, field)
    used_cores: dict[int, str] = {}
    for i, m in enumerate(dep.models):
        where = f"models[{i}]"
        for n in m.names:
            if n in seen_names:
                problems.append(f"{where}.names: {n!r} is already used by {seen_names[n]}")
            seen_names.setdefault(n, where)
        if m.port in seen_ports:
            problems.append(f"{where}.port: port {m.port} is already used by {seen_ports[m.port]}")
        seen_ports.setdefault(m.port, f"{where}.port")
        if m.threads > cpu_count:
            problems.append(f"{where}.threads: {m.threads} threads but this machine has {cpu_count} cores")
        for c in m.cpu_cores or []:
            if c >= cpu_count:
                problems.append(f"{where}.cpu_cores: core {c} does not exist (cores are 0..{cpu_count - 1})")
            elif c in used_cores:
                problems.append(f"{where}.cpu_cores: core {c} is already pinned by {used_cores[c]}")
            used_cores.setdefault(c, where)
        if m.backend == "itrex-int8":
            from workers.int8_settings import unsupported_reason

            problem = unsupported_reason(m.int8, cpu_flags)
            if problem:
                problems.append(f"{where}.int8: {problem}")
        if m.source.path is not None and not resolve_path(m.source.path, base_dir).is_dir():
            problems.append(f"{where}.source.path: {resolve_path(m.source.path, base_dir)} does not exist")
    total = sum(m.threads for m in dep.models)
    if total > cpu_count:
        problems.append(
            f"models: {total} threads in all on {cpu_count} cores oversubscribes the CPU "
            f"(measured 10-20x slower requests); lower models[*].threads"
        )
    return problems


def resolve_path(path: Path, base_dir: Path = ROOT) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else (base_dir / path)


def ports_in_use(dep: Deployment) -> list[str]:
    """Ports of the deployment that something else is already listening on."""
    busy = []
    endpoints = [("controller.port", dep.controller), ("api.port", dep.api), ("web.port", dep.web)]
    endpoints += [(f"models[{i}].port", m) for i, m in enumerate(dep.models)]
    for field, ep in endpoints:
        host = getattr(ep, "host", "127.0.0.1")
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, ep.port))
            except OSError as exc:
                busy.append(f"{field}: port {ep.port} on {host} is already in use ({exc.strerror})")
    return busy


def config_path(profile_or_path: str) -> Path:
    candidate = Path(profile_or_path)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return CONF_DIR / f"{profile_or_path}.yaml"


def load(profile_or_path: str = "default", cpu_count: int | None = None) -> Deployment:
    path = config_path(profile_or_path)
    if not path.is_file():
        profiles = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise DeploymentError(f"{path}: no such deployment file (profiles in conf/: {', '.join(profiles)})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise DeploymentError(f"{path}: (top level): expected a mapping of keys, got {type(raw).__name__}")
    try:
        dep = Deployment.model_validate(raw)
    except ValidationError as exc:
        raise DeploymentError(_format(exc, str(path))) from None
    problems = semantic_problems(dep, cpu_count, base_dir=ROOT)
    if problems:
        raise DeploymentError("\n".join(f"{path}: {p}" for p in problems))
    return dep
