"""The one interface every runtime implements, and the serving surface of a model it loaded.

A runtime (one package under workers/engine/runtimes/) says whether it can serve a model and why not,
checks a CPU can run it, loads the model, adds its part to the INT8 cache key and quantizes a cache entry,
estimates the memory it allocates beyond the common estimate, and serves the loaded model (an Engine).
Nothing outside its package asks which runtime a model runs on: the registry (registry.py) picks one.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from workers.config.environments import Environment
from workers.config.int8 import Int8Settings
from workers.engine.generate import Job, Result


class RuntimeUnavailable(ValueError):
    """The configured runtime cannot serve this model; the message says why and what to set."""


class UnsupportedBackend(ValueError):
    """No runtime serves this backend, or this model on it (loader.load_model)."""


@dataclass(frozen=True)
class LoadRequest:
    """What a runtime loads: the model folder, the backend and INT8 settings it was chosen for (runtime and
    group size resolved), and the worker's settings some runtimes fix at load."""
    source: Path
    backend: str
    int8: Int8Settings
    cache_root: Path | None = None
    trust_remote_code: bool = False
    n_threads: int = 1            # the worker's thread count (fixed, or the most it uses when shared)
    shared_threads: bool = False  # cores shared by demand: the thread count changes per step
    concurrency: int = 1          # the most generations the worker batches at once
    entry: Path | None = None     # the verified INT8 cache entry, for a runtime that `quantizes`


class Engine(ABC):
    """A loaded model's serving side, as ServedModel (served_model.py) drives it."""

    #: The end of the model's "loaded" log line: how it runs and how its concurrent requests do.
    description: str = ""
    #: The most tokens (prompt and answer) one sequence may hold, when fewer than the model's context (a KV cache
    #: allocated at load); None: the model's.
    context: int | None = None

    @abstractmethod
    def submit(self, job: Job, on_text=None) -> Result:
        """Generate `job` (batched with other requests, or one at a time, as the runtime does)."""

    #: Why it gives no embeddings (the rest of "model NAME ..."), or None when embeddings() works.
    no_embeddings: str | None = None

    def evaluable(self, prompt_ids: list[int]) -> list[int]:
        """The tokens it evaluates for a client's prompt: the prompt, or the prompt after a token the runtime needs
        first (counted as the job's added_prefix, not as the client's)."""
        return list(prompt_ids)

    #: Why it gives no logits for every prompt position (the rest of "model NAME ...", a 400 for prompt logprobs),
    #: or None when prompt_logits() works.
    no_prompt_logits: str | None = None

    def prompt_logits(self, ids: list[int]):
        """The logits (len(ids), vocab) after each position of `ids` (only where no_prompt_logits is None)."""
        raise NotImplementedError(self.no_prompt_logits)

    def embeddings(self, inputs: list[list[int]]) -> list[list[float]]:
        """One L2-normalised vector per input's token ids (only where no_embeddings is None)."""
        raise NotImplementedError(self.no_embeddings)

    @abstractmethod
    def batching_state(self) -> dict:
        """How concurrent requests run, and what the batcher has done so far (POST /model_details)."""


class Runtime(ABC):
    """One way of running a model on CPU. Instances are stateless; registry.RUNTIMES lists them."""

    #: Its name: config's models[].int8.runtime value for an INT8 runtime, and the name in logs.
    name: str
    #: The config backends (models[].backend) it can serve.
    backends: tuple[str, ...]
    #: What to set instead when it cannot serve a model it was asked for by name.
    instead: str = ""
    #: Whether it runs from an INT8 cache entry (int8_cache), which the loader ensures before load().
    quantizes: bool = False
    #: The int8.library values it offers: "native" where it can compile its library for this CPU (prepare()).
    libraries: tuple[str, ...] = ("prebuilt",)

    def match(self, source: Path, shared_threads: bool, auto: bool) -> tuple[bool, str]:
        """Whether it can serve the model in `source` (its config.json) for a worker with these threads, and if not,
        why. `auto`: choosing among runtimes (int8.runtime: auto), where a runtime may also step aside for one that
        serves this model better."""
        return True, ""

    def unsupported_reason(self, settings: Int8Settings, flags: frozenset[str]) -> str | None:
        """Why a CPU with these flags cannot run `settings` correctly on this runtime, or None."""
        return None

    def add_cache_key(self, inputs: dict) -> None:
        """Add this runtime's part to an INT8 cache entry's key inputs (int8_cache.key_inputs)."""

    def quantize_command(self, source: Path, staging: Path, inputs: dict, python: str) -> list[str]:
        """The child process that quantizes `source` into `staging` (int8_cache), run by `python` (the
        environment the model's worker runs in: config/environments.py); RuntimeUnavailable if it cannot."""
        raise RuntimeUnavailable(f"the {self.name} runtime does not quantize")

    #: Appended to the error when its quantizer fails (int8_cache).
    quantize_failed_hint: str = ""
    #: The environment its quantizer runs in when not the model's own (built before it runs: ops.cli).
    quantizer_environment: Environment | None = None
    #: Weights per scale its format fixes, whatever int8.group_size says (registry.resolve); None: int8.group_size.
    fixed_group_size: int | None = None

    def prepare(self, settings: Int8Settings, say) -> None:
        """Host-wide work `settings` need before a worker loads (ops.cli runs it at a start and at `bundle prepare`,
        showing progress through `say`); RuntimeUnavailable when it cannot be done."""

    def memory_extra(self, source: Path, concurrency: int) -> int:
        """Bytes of KV memory it allocates at load for a worker batching `concurrency` generations (memory_budget
        counts it when larger than its own KV estimate); 0 when it allocates as it goes."""
        return 0

    @abstractmethod
    def load(self, request: LoadRequest, tokenizer):
        """The model, ready for serve()."""

    @abstractmethod
    def owns(self, model) -> bool:
        """Whether `model` is one this runtime loaded and serves."""

    @abstractmethod
    def serve(self, model, served, share=None, batching: bool = True) -> Engine:
        """The Engine that runs `model` for `served` (a ServedModel: chat format, decoding, prefix cache);
        `share`: cores shared by demand (core_share.CoreShare), `batching`: models[].batching."""
