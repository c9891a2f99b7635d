"""Which ITREX CPU runtime serves a model's INT8 weights: neural-speed or qbits (config `int8.runtime`).

`runtime: auto` picks neural-speed when the model's architecture has a neural-speed graph (family data,
models/families.py) and the worker's thread count is fixed; otherwise qbits, which runs every
family under the transformers model. neural-speed takes its thread count once, at load, so it cannot
follow `threads: shared` (cores shared by demand change the count per step).
`group_size: auto` becomes AUTO_GROUP_SIZE where it divides every weight row, else per channel.
"""
from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

from workers.config.int8 import AUTO_GROUP_SIZE, Int8Settings
from workers.engine.ns_quantize import padded_layers
from workers.models.families import NeuralSpeedGraph, neural_speed_graph
from workers.models.weight_shapes import matrix_row_widths

log = logging.getLogger("int8_runtime")

# auto picks neural-speed only when the identity layers it needs add at most this share of layers.
# Measured (README "Benchmarks", AVX2 EPYC): SmolLM2, 30 -> 32 layers: decode 2.2-2.9x qbits, prompts
# 1.0-1.2x; a 22-layer 1.1 B Llama, 22 -> 32: decode only 1.1x, prompts 0.75x, and no batching
# (qbits decodes 4 sequences at 2.2x one), so qbits serves it better.
MAX_PADDING = 0.125


class RuntimeUnavailable(ValueError):
    """The configured runtime cannot serve this model; the message says why and what to set."""


def graph_for(source: Path) -> tuple[NeuralSpeedGraph | None, str]:
    graph, why = neural_speed_graph(json.loads((source / "config.json").read_text()))
    if graph is not None and importlib.util.find_spec("neural_speed") is None:
        return None, "the neural-speed package is not installed"
    return graph, why


def resolve(settings: Int8Settings, source: Path, shared_threads: bool = False) -> Int8Settings:
    """`settings` with a concrete runtime and group size for this model; RuntimeUnavailable when the
    asked runtime cannot run it."""
    settings = resolve_runtime(settings, source, shared_threads)
    if settings.group_size == "auto":
        settings = settings.model_copy(update={"group_size": auto_group_size(source)})
    return settings


def auto_group_size(source: Path) -> int:
    """AUTO_GROUP_SIZE when it divides every weight row of the model, else -1 (per channel)."""
    try:
        widths = matrix_row_widths(source)
    except FileNotFoundError as exc:
        raise RuntimeUnavailable(f"int8.group_size: auto reads the model's row widths from its weights: {exc}") from None
    uneven = sorted(w for w in widths if w % AUTO_GROUP_SIZE)
    if uneven:
        log.info("INT8 group size for %s: per channel (%d does not divide its %s-wide rows)", source.name,
                 AUTO_GROUP_SIZE, "/".join(map(str, uneven)))
        return -1
    return AUTO_GROUP_SIZE


def resolve_runtime(settings: Int8Settings, source: Path, shared_threads: bool = False) -> Int8Settings:
    """`settings` with a concrete runtime (decided from config.json alone)."""
    if settings.runtime == "qbits":
        return settings
    graph, why = graph_for(source)
    if graph is not None and shared_threads:
        graph, why = None, "threads: shared changes the thread count per step and neural-speed fixes it at load"
    if settings.runtime == "neural-speed":
        if graph is None:
            raise RuntimeUnavailable(f"int8.runtime: neural-speed cannot serve {source.name}: {why}; "
                                     f"use runtime: qbits (or auto)")
        return settings
    if graph is not None and settings.runtime == "auto":
        layers = json.loads((source / "config.json").read_text()).get(graph.layers_key, 0)
        padded = padded_layers(layers, graph.layer_counts)
        if padded > layers * (1 + MAX_PADDING):
            graph, why = None, (f"its {layers} layers would run as {padded} in neural-speed's graph "
                                f"(more than {MAX_PADDING:.0%} identity layers)")
    chosen = "neural-speed" if graph is not None else "qbits"
    log.info("INT8 runtime for %s: %s%s", source.name, chosen, f" ({why})" if graph is None else "")
    return settings.model_copy(update={"runtime": chosen})
