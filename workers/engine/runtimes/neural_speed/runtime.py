"""The neural-speed runtime: ITREX's own CPU runtime, its bestla kernels and model graphs (family data:
models/families.py NEURAL_SPEED_GRAPHS), run from an INT8 graph file in the quantized-weight cache.

It takes its thread count once, at load, so it cannot follow `threads: shared` (cores shared by demand change
the count per step). Under `int8.runtime: auto` it steps aside for models its graph would pad with more than
MAX_PADDING identity layers.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from importlib.metadata import version
from pathlib import Path

from workers.engine.generate import Job, Result
from workers.engine.prompt import context_length
from workers.engine.slot_batcher import SlotBatcher
from workers.engine.runtimes.base import Engine, LoadRequest, Runtime, RuntimeUnavailable
from workers.engine.runtimes.neural_speed.model import NeuralSpeedModel, SerialRunner, slot_bytes, slots_for
from workers.engine.runtimes.neural_speed.quantize import FILE_LAYOUT, padded_layers
from workers.config.int8 import Int8Settings
from workers.models.families import NeuralSpeedGraph, neural_speed_graph

log = logging.getLogger("loader")

# auto picks neural-speed only when the identity layers it needs add at most this share of layers: with more,
# qbits serves the model better (docs/benchmarks.md).
MAX_PADDING = 0.125


def graph_for(source: Path) -> tuple[NeuralSpeedGraph | None, str]:
    graph, why = neural_speed_graph(json.loads((source / "config.json").read_text()))
    if graph is not None and importlib.util.find_spec("neural_speed") is None:
        return None, "the neural-speed package is not installed"
    return graph, why


class NeuralSpeedRuntime(Runtime):
    name = "neural-speed"
    backends = ("itrex-int8",)
    quantizes = True
    instead = "use runtime: qbits (or auto)"
    quantize_failed_hint = "; models[].int8: {runtime: qbits} quantizes with the other runtime"

    def match(self, source: Path, shared_threads: bool, auto: bool) -> tuple[bool, str]:
        graph, why = graph_for(source)
        if graph is not None and shared_threads:
            return False, "threads: shared changes the thread count per step and neural-speed fixes it at load"
        if graph is None:
            return False, why
        if auto:
            layers = json.loads((source / "config.json").read_text()).get(graph.layers_key, 0)
            padded = padded_layers(layers, graph.layer_counts)
            if padded > layers * (1 + MAX_PADDING):
                return False, (f"its {layers} layers would run as {padded} in neural-speed's graph "
                               f"(more than {MAX_PADDING:.0%} identity layers)")
        return True, ""

    def unsupported_reason(self, settings: Int8Settings, flags: frozenset[str]) -> str | None:
        if "avx2" not in flags:
            return "int8.runtime='neural-speed' needs AVX2, which this CPU lacks; use runtime: qbits"
        return None

    def add_cache_key(self, inputs: dict) -> None:
        # (the qbits runtime's entries keep the keys they had before runtimes existed)
        inputs["runtime"] = self.name
        inputs["versions"]["neural-speed"] = version("neural-speed")
        inputs["ns_file_layout"] = FILE_LAYOUT

    def quantize_command(self, source: Path, staging: Path, inputs: dict, python: str) -> list[str]:
        graph, why = graph_for(source)
        if graph is None:
            raise RuntimeUnavailable(f"neural-speed cannot quantize {source.name}: {why}")
        return [python, "-m", "workers.engine.runtimes.neural_speed.quantize", "--source", str(source),
                "--staging", str(staging), "--settings", json.dumps(inputs["settings"])]

    def memory_extra(self, source: Path, concurrency: int) -> int:
        """Its KV cache slots (model.batch_slots), each a whole context, allocated at load."""
        config = json.loads((source / "config.json").read_text())
        slots = slots_for(config, concurrency)
        return slots * slot_bytes(config, context_length(config)) if slots > 1 else 0

    def load(self, request: LoadRequest, tokenizer) -> NeuralSpeedModel:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(request.source), trust_remote_code=request.trust_remote_code)
        model = NeuralSpeedModel(request.entry, config, request.n_threads, context_length(config), request.concurrency)
        log.info("INT8 runtime neural-speed: %d threads, context %d, %d KV cache slot(s)", request.n_threads,
                 context_length(config), model.slots)
        return model

    def owns(self, model) -> bool:
        return isinstance(model, NeuralSpeedModel)

    def serve(self, model: NeuralSpeedModel, served, share=None, batching: bool = True) -> Engine:
        return NeuralSpeedEngine(model, served)


class NeuralSpeedEngine(Engine):
    """A neural-speed model's own caches: batched when it has several slots (engine/slot_batcher.py), else one generation at a
    time (model.SerialRunner)."""

    no_embeddings = ("runs on the neural-speed INT8 runtime, which gives no hidden states: ask an fp32 model for "
                     "embeddings, or set int8: {runtime: qbits} for this one")
    no_prompt_logits = ("runs on the neural-speed INT8 runtime, which gives the logits of the last prompt position "
                        "only: prompt logprobs (echo with logprobs) need an fp32 model or int8: {runtime: qbits}; "
                        "logprobs without echo work")

    def __init__(self, model: NeuralSpeedModel, served):
        batched = model.slots > 1
        self.runner = (SlotBatcher if batched else SerialRunner)(model, served.decode, served.chat.postprocess)
        self.description = (f"neural-speed INT{model.bits} ({model.n_threads} threads, "
                            + (f"continuous batching in {model.slots} KV cache slots" if batched
                               else "one generation at a time") + ")")

    def evaluable(self, prompt_ids: list[int]) -> list[int]:
        return self.runner.model.evaluable(prompt_ids)

    def submit(self, job: Job, on_text=None) -> Result:
        return self.runner.submit(job, on_text)

    def batching_state(self) -> dict:
        runner = self.runner
        if isinstance(runner, SlotBatcher):
            return {"mode": "continuous batching", "kv_cache_slots": len(runner.slots), "steps": runner.steps,
                    "widest_step": runner.widest, "slots_emptied": runner.emptied}
        return {"mode": "one at a time"}
