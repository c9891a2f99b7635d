"""Which runtime serves a model: the runtimes, in order of preference, and the choice among them.

A backend (models[].backend) served by one runtime gets that one (fp32/bf16: transformers). The INT8 backend has
several, named by `int8.runtime`; `auto` takes the first in RUNTIMES whose match() accepts the model (neural-speed
where its graph runs the model's architecture and the worker's thread count is fixed, else qbits, which runs every
family under the transformers model), and logs the choice with why the ones before it stepped aside.
`group_size: auto` becomes the bits' auto group size (config/int8.AUTO_GROUP_SIZES) where it divides every weight
row, else per channel.

Adding a runtime: one package under workers/engine/runtimes/ with a Runtime subclass (base.py), one line in
RUNTIMES, and its name in config's int8.RUNTIMES when config names it.
"""
from __future__ import annotations

import logging
from pathlib import Path

from workers.config import cpu
from workers.config import int8 as int8_config
from workers.config.int8 import Int8Settings
from workers.config.schema import BACKENDS
from workers.engine.runtimes.base import Runtime, RuntimeUnavailable, UnsupportedBackend
from workers.engine.runtimes.llama_cpp.runtime import LlamaCppRuntime
from workers.engine.runtimes.neural_speed.runtime import NeuralSpeedRuntime
from workers.engine.runtimes.qbits.runtime import QbitsRuntime
from workers.engine.runtimes.transformers.runtime import TransformersRuntime
from workers.models.weight_shapes import matrix_row_widths

log = logging.getLogger("int8_runtime")

# In order of preference: `auto` takes the first that serves the backend and matches the model.
RUNTIMES: tuple[Runtime, ...] = (NeuralSpeedRuntime(), QbitsRuntime(), LlamaCppRuntime(), TransformersRuntime())
INT8_BACKEND = "itrex-int8"  # the backend whose runtime config's int8.runtime names
AUTO = "auto"


def by_name(name: str) -> Runtime:
    for runtime in RUNTIMES:
        if runtime.name == name:
            return runtime
    raise RuntimeUnavailable(f"no runtime is named {name!r} (runtimes: {', '.join(r.name for r in RUNTIMES)})")


def serving(backend: str) -> list[Runtime]:
    """The runtimes that can serve `backend`, in order of preference."""
    return [r for r in RUNTIMES if backend in r.backends]


def _check_config_names() -> None:
    """Config names the backends and INT8 runtimes without importing the engine: its lists must be these."""
    backends = {b for r in RUNTIMES for b in r.backends}
    if backends != set(BACKENDS):
        raise AssertionError(f"config's BACKENDS {BACKENDS} differ from the runtimes' {sorted(backends)}")
    int8 = {r.name for r in serving(INT8_BACKEND)} | {AUTO}
    if int8 != set(int8_config.RUNTIMES):
        raise AssertionError(f"config's int8.RUNTIMES {int8_config.RUNTIMES} differ from the registry's {sorted(int8)}")


_check_config_names()


def runtime_of(model) -> Runtime:
    """The runtime that serves a model load_model returned."""
    for runtime in RUNTIMES:
        if runtime.owns(model):
            return runtime
    raise TypeError(f"no runtime serves a {type(model).__name__}")


def runtime_for(backend: str, settings: Int8Settings, source: Path, shared_threads: bool = False) -> Runtime:
    """The runtime that serves `backend` for this model (decided from config.json alone); RuntimeUnavailable when
    the asked runtime cannot serve it, UnsupportedBackend for a backend no runtime serves."""
    candidates = serving(backend)
    if not candidates:
        raise UnsupportedBackend(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == INT8_BACKEND:
        return by_name(resolve_runtime(settings, source, shared_threads).runtime)
    if len(candidates) == 1:
        return candidates[0]
    runtime, passed = _first_match(candidates, source, shared_threads, backend)
    log.info("%s runtime for %s: %s%s", backend, source.name, runtime.name, f" ({'; '.join(passed)})" if passed else "")
    return runtime


def _first_match(candidates: list[Runtime], source: Path, shared_threads: bool, what: str) -> tuple[Runtime, list[str]]:
    """The first runtime whose match() accepts the model, and why each one before it stepped aside."""
    passed = []
    for runtime in candidates:
        ok, why = runtime.match(source, shared_threads, auto=True)
        if ok:
            return runtime, passed
        passed.append(why)
    raise RuntimeUnavailable(f"no {what} runtime serves {source.name}: {'; '.join(passed)}")


def select(backend: str, settings: Int8Settings, source: Path, shared_threads: bool = False
           ) -> tuple[Runtime, Int8Settings]:
    """runtime_for, and the INT8 settings with its name and the group size resolved when it quantizes."""
    if backend == INT8_BACKEND and serving(backend):
        settings = resolve(settings, source, shared_threads)
        return by_name(settings.runtime), settings
    runtime = runtime_for(backend, settings, source, shared_threads)
    if runtime.quantizes:
        settings = resolve(settings.model_copy(update={"runtime": runtime.name}), source, shared_threads)
    return runtime, settings


def resolve(settings: Int8Settings, source: Path, shared_threads: bool = False) -> Int8Settings:
    """`settings` with a concrete INT8 runtime and group size for this model; RuntimeUnavailable when the asked
    runtime cannot run it."""
    settings = resolve_runtime(settings, source, shared_threads)
    fixed = by_name(settings.runtime).fixed_group_size
    if fixed is not None:
        return settings.model_copy(update={"group_size": fixed})
    if settings.group_size == "auto":
        settings = settings.model_copy(update={"group_size": auto_group_size(source, settings.auto_group_size)})
    elif settings.bits == 4:
        problem = int8_config.row_width_problem(settings, _row_widths(source, f"{settings.group_size} with bits: 4"))
        if problem:
            raise RuntimeUnavailable(f"int8.{problem}")
    return settings


def _row_widths(source: Path, group_size: str) -> set[int]:
    try:
        return matrix_row_widths(source)
    except FileNotFoundError as exc:
        raise RuntimeUnavailable(f"int8.group_size: {group_size} reads the model's row widths from its weights: "
                                 f"{exc}") from None


def auto_group_size(source: Path, group: int = int8_config.AUTO_GROUP_SIZE) -> int:
    """`group` when it divides every weight row of the model, else -1 (per channel)."""
    widths = _row_widths(source, "auto")
    uneven = sorted(w for w in widths if w % group)
    if uneven:
        log.info("INT8 group size for %s: per channel (%d does not divide its %s-wide rows)", source.name,
                 group, "/".join(map(str, uneven)))
        return -1
    return group


def resolve_runtime(settings: Int8Settings, source: Path, shared_threads: bool = False) -> Int8Settings:
    """`settings` with a concrete INT8 runtime (decided from config.json alone)."""
    if settings.runtime != AUTO:
        runtime = by_name(settings.runtime)
        ok, why = runtime.match(source, shared_threads, auto=False)
        if not ok:
            raise RuntimeUnavailable(f"int8.runtime: {runtime.name} cannot serve {source.name}: {why}; {runtime.instead}")
        return settings
    runtime, passed = _first_match(serving(INT8_BACKEND), source, shared_threads, "INT8")
    log.info("INT8 runtime for %s: %s%s", source.name, runtime.name, f" ({'; '.join(passed)})" if passed else "")
    return settings.model_copy(update={"runtime": runtime.name})


def unsupported_reason(settings: Int8Settings, flags: frozenset[str] | None = None) -> str | None:
    """Why this CPU cannot run `settings` correctly (its runtime's own reasons included once it is known), or None."""
    flags = cpu.flags() if flags is None else flags
    if settings.runtime != AUTO and settings.library not in by_name(settings.runtime).libraries:
        offered = " or ".join(r.name for r in RUNTIMES if settings.library in r.libraries)
        return (f"library: {settings.library} is not offered by the {settings.runtime} runtime (it runs "
                f"{', '.join(by_name(settings.runtime).libraries)}); runtime: {offered} offers it")
    runtime = by_name(settings.runtime).unsupported_reason if settings.runtime != AUTO else None
    return int8_config.unsupported_reason(settings, flags, runtime)
