"""The deployment schema (conf/<profile>.yaml): what a deployment may say, field by field.

Rules that need the whole deployment or the machine are in rules.py; loading in deployment.py.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from workers.config.int8 import Int8Settings
from workers.config.loading import Strict

EMBEDDED_MODELS = ("smollm2-135m-instruct",)
BACKENDS = ("itrex-int8", "fp32", "bf16")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HOST_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


class Endpoint(Strict):
    # Without a hosts: section, the address to bind. With one, the name of the host it runs on
    # (default: the first host), and `bind` may override that host's address (e.g. 0.0.0.0).
    host: str = "127.0.0.1"
    port: int = Field(ge=1, le=65535)
    bind: str | None = None


class ApiEndpoint(Endpoint):
    # Keys never live in the repo: a variable holding comma-separated keys, and/or a file outside git.
    api_keys_env: str | None = None
    api_keys_file: Path | None = None


class WebEndpoint(Endpoint):
    title: str = "CPU LLM Bundle"
    auth_file: Path | None = None  # FastChat gradio auth file: "user:password" per line


class Heartbeat(Strict):
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


class Source(Strict):
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


class Sampling(Strict):
    """Sampling defaults for what a request leaves out; each unset field falls back to the model's
    own generation_config.json, then to neutral values (temperature 1, top_p 1, no top_k, no penalty)."""

    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0)


class ModelSpec(Strict):
    names: list[str] = Field(min_length=1)
    # The host (a name from hosts:) whose worker serves this model; default: the first host.
    host: str | None = None
    source: Source
    backend: Literal[BACKENDS] = "itrex-int8"  # type: ignore[valid-type]
    port: int = Field(ge=1, le=65535)
    # A number: that many threads, always (optionally pinned to cpu_cores). "shared": all cores left
    # by fixed-thread workers, split by demand between the shared workers generating at the moment.
    threads: int | Literal["shared"] = 1
    cpu_cores: list[int] | None = None
    conv_template: str | None = None
    limit_concurrency: int = Field(default=4, ge=1)
    # Requests that may wait for a slot; one more is refused at once with 429 and Retry-After.
    max_queue: int = Field(default=16, ge=0)
    # A request that waited this long for a slot gets 503 "busy" instead of waiting on.
    queue_timeout_s: float = Field(default=300, gt=0)
    # Answer length when a request gives no max_tokens (default: generation_config's max_new_tokens, else 512).
    max_tokens_default: int | None = Field(default=None, ge=1)
    sampling: Sampling = Sampling()
    # KV cache kept for recent conversations (prefix reuse), in tokens; 0 turns it off. Counted in
    # the memory budget: KV bytes per token x this (Qwen-7B: 1 MiB/token, SmolLM2: 45 KiB/token).
    prefix_cache_tokens: int = Field(default=2048, ge=0)
    # Concurrent requests decode together, one forward pass per step for all (continuous batching),
    # for families whose code allows it (Family.kv_axes); false: one generate() per request.
    batching: bool = True
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

    @property
    def shared(self) -> bool:
        return self.threads == "shared"

    @field_validator("threads")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"threads must be at least 1 or 'shared', got {v}")
        return v

    @model_validator(mode="after")
    def _cores_vs_threads(self):
        if self.shared and self.cpu_cores is not None:
            raise ValueError("threads: shared uses whichever cores are free; remove cpu_cores, or give a number of threads")
        if self.cpu_cores is not None:
            if len(set(self.cpu_cores)) != len(self.cpu_cores):
                raise ValueError(f"cpu_cores {self.cpu_cores} lists a core twice")
            if self.threads > len(self.cpu_cores):
                raise ValueError(
                    f"threads ({self.threads}) exceeds the {len(self.cpu_cores)} pinned cpu_cores {self.cpu_cores}"
                )
        return self


class Host(Strict):
    """One machine of a deployment: where its programs bind and are reached, and its budget."""

    address: str  # an IP address or DNS name of this machine that the other hosts can reach
    cores: int = Field(ge=1)
    memory_gib: float | None = Field(default=None, gt=0)

    @field_validator("address")
    @classmethod
    def _reachable(cls, v):
        if v.strip() in ("", "0.0.0.0", "::", "[::]", "*"):
            raise ValueError(f"{v!r} is not an address other hosts can reach; give this host's own IP or name")
        return v.strip()


class WorkerSecret(Strict):
    """The secret every call between controller, workers, API and web UI carries (header
    X-Bundle-Worker-Secret). Read at run time, like API keys; never written anywhere."""

    env: str | None = "BUNDLE_WORKER_SECRET"
    file: Path | None = None


class Deployment(Strict):
    hosts: dict[str, Host] = {}
    controller: Endpoint = Endpoint(port=21001)
    api: ApiEndpoint = ApiEndpoint(port=8000)
    web: WebEndpoint = WebEndpoint(port=7860)
    heartbeat: Heartbeat = Heartbeat()
    worker_secret: WorkerSecret = WorkerSecret()
    models: list[ModelSpec] = Field(min_length=1)

    @field_validator("hosts")
    @classmethod
    def _host_names(cls, hosts):
        for name in hosts:
            if not _HOST_NAME.match(name):
                raise ValueError(f"{name!r}: a host name uses lowercase letters, digits, '_' or '-', starting with a letter")
        return hosts

    @model_validator(mode="before")
    @classmethod
    def _place_on_first_host(cls, data):
        """With a hosts: section, what names no host runs on the first one."""
        if not isinstance(data, dict) or not isinstance(data.get("hosts"), dict) or not data["hosts"]:
            return data
        first = next(iter(data["hosts"]))
        data = dict(data)
        for section in ("controller", "api", "web"):
            value = data.get(section)
            if value is None:
                default = cls.model_fields[section].default
                data[section] = {"port": default.port, "host": first}
            elif isinstance(value, dict) and "host" not in value:
                data[section] = {**value, "host": first}
        if isinstance(data.get("models"), list):
            data["models"] = [{**m, "host": first} if isinstance(m, dict) and m.get("host") is None else m
                              for m in data["models"]]
        return data
