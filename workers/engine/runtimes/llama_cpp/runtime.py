"""The llama.cpp runtime (`int8: {runtime: llama-cpp}`): Q8_0 weights (Q4_0 with bits: 4) in a GGUF file of the INT8
cache, written by llama.cpp's own converter, decoded by llama.cpp's CPU kernels; every family its converter knows, several
concurrent requests decoding together in KV cache slots (engine/slot_batcher.py).

It is never chosen by `auto` (ITREX is the bundle's INT8 engine): a user names it for a CPU where it decodes faster
(docs/int8.md). Under `threads: shared` it sets llama.cpp's thread count to the worker's share before each step.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from workers.config.environments import CURRENT
from workers.config.int8 import Int8Settings
from workers.engine.generate import Job, Result
from workers.engine.prompt import context_length
from workers.engine.runtimes.base import Engine, LoadRequest, Runtime, RuntimeUnavailable
from workers.engine.runtimes.llama_cpp import binding, native_build
from workers.engine.runtimes.llama_cpp.model import LlamaCppModel, kv_bytes, layout
from workers.engine.runtimes.llama_cpp.quantize import WEIGHTS
from workers.engine.slot_batcher import SlotBatcher

log = logging.getLogger("loader")

CPU_FLAGS = ("avx2", "fma", "f16c")  # what the prebuilt library's kernels are compiled for


class LlamaCppRuntime(Runtime):
    name = "llama-cpp"
    backends = ("itrex-int8",)
    quantizes = True
    instead = "use runtime: auto"
    quantize_failed_hint = "; models[].int8: {runtime: auto} quantizes with ITREX instead"
    # llama.cpp's converter reads tokenizers through transformers APIs newer than the pinned 4.40.2 (Qwen-7B's)
    quantizer_environment = CURRENT
    fixed_group_size = 32  # Q8_0 and Q4_0: blocks of 32 weights, one f16 scale each
    libraries = ("prebuilt", "native")  # native: llama.cpp compiled for this CPU (native_build.py)

    def match(self, source: Path, shared_threads: bool, auto: bool) -> tuple[bool, str]:
        if auto:
            return False, "llama-cpp runs only where int8.runtime names it"
        problem = binding.unavailable_reason()
        return (False, problem) if problem else (True, "")

    def unsupported_reason(self, settings: Int8Settings, flags: frozenset[str]) -> str | None:
        missing = [f for f in CPU_FLAGS if f not in flags]
        if missing:
            return (f"int8.runtime='llama-cpp' runs kernels built for {'/'.join(CPU_FLAGS).upper()}, and this CPU "
                    f"lacks {', '.join(missing).upper()}; use runtime: auto")
        return None

    def prepare(self, settings: Int8Settings, say) -> None:
        if settings.library == "native":
            try:
                native_build.ensure(say)
            except native_build.NativeBuildError as exc:
                raise RuntimeUnavailable(str(exc)) from None

    def add_cache_key(self, inputs: dict) -> None:
        inputs["runtime"] = self.name
        inputs["versions"][binding.PACKAGE] = binding.PINNED  # its converter's version too
        inputs["versions"]["converter transformers"] = CURRENT.transformers

    def quantize_command(self, source: Path, staging: Path, inputs: dict, python: str) -> list[str]:
        return [python, "-m", "workers.engine.runtimes.llama_cpp.quantize", "--source", str(source),
                "--staging", str(staging), "--settings", json.dumps(inputs["settings"])]

    def memory_extra(self, source: Path, concurrency: int) -> int:
        """Its KV cache slots, allocated at load (model.layout)."""
        config = json.loads((source / "config.json").read_text())
        return kv_bytes(config, context_length(config), concurrency)

    def load(self, request: LoadRequest, tokenizer) -> LlamaCppModel:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(request.source), trust_remote_code=request.trust_remote_code)
        context = context_length(config)
        slots, slot_context = layout(config.to_dict(), context, request.concurrency)
        bits = request.int8.bits
        library = native_build.library_file() if request.int8.library == "native" else None
        model = LlamaCppModel(request.entry / WEIGHTS[bits], config, request.n_threads, slot_context, slots, library)
        log.info("INT%d runtime llama-cpp (%s, %s library%s): %d threads, %d KV cache slot(s) of %d tokens (the "
                 "model's context: %d)", bits, model.weight_type, request.int8.library, f" {library}" if library else "",
                 request.n_threads, slots, slot_context, context)
        return model

    def owns(self, model) -> bool:
        return isinstance(model, LlamaCppModel)

    def serve(self, model: LlamaCppModel, served, share=None, batching: bool = True) -> Engine:
        return LlamaCppEngine(model, served, share)


class LlamaCppEngine(Engine):
    """A llama.cpp model's generations, in its KV cache slots: batched when it has several, and a finished
    conversation's next turn evaluates only its new tokens."""

    no_embeddings = ("runs on the llama-cpp INT8 runtime, which the bundle asks for logits only: ask an fp32 model "
                     "for embeddings, or set int8: {runtime: qbits} for this one")
    no_prompt_logits = ("runs on the llama-cpp INT8 runtime, which gives the logits of the last prompt position "
                        "only: prompt logprobs (echo with logprobs) need an fp32 model or int8: {runtime: qbits}; "
                        "logprobs without echo work")

    def __init__(self, model: LlamaCppModel, served, share=None):
        self.context = model.context
        follow = (lambda: model.set_threads(share.share())) if share is not None else None
        self.runner = SlotBatcher(model, served.decode, served.chat.postprocess, before_step=follow)
        threads = "threads shared by demand" if share is not None else f"{model.n_threads} threads"
        self.description = (f"llama.cpp {model.weight_type} ({threads}, "
                            + (f"continuous batching in {model.slots} KV cache slots" if model.slots > 1
                               else "one generation at a time") + ")")

    def submit(self, job: Job, on_text=None) -> Result:
        return self.runner.submit(job, on_text)

    def batching_state(self) -> dict:
        runner = self.runner
        return {"mode": "continuous batching" if len(runner.slots) > 1 else "one at a time",
                "kv_cache_slots": len(runner.slots), "steps": runner.steps, "widest_step": runner.widest,
                "slots_emptied": runner.emptied}
