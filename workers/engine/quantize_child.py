"""What every runtime's quantizer child process shares (int8_cache runs one per cache entry): refusing
before the work starts when the machine lacks room, and the exit codes int8_cache reads.

Each quantizer runs in its own process, which keeps quantization's temporary memory out of the
serving process.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import psutil

from workers.config.files import GIB
from workers.models import memory_budget

log = logging.getLogger("quantize")


class NotEnoughRoom(RuntimeError):
    """Refused before the work starts: the machine lacks the memory or disk it needs (exit code 3)."""


class NotEnoughMemory(NotEnoughRoom):
    pass


def check_memory(source: Path) -> None:
    """Refuse before loading anything when quantizing `source` cannot fit in available RAM."""
    need = memory_budget.quantize_peak_of_folder(source)
    if need is None:
        log.warning("cannot estimate the memory quantizing %s needs (its shape is unknown); trying anyway", source.name)
        return
    available = psutil.virtual_memory().available
    if need > available:
        raise NotEnoughMemory(
            f"quantizing {source.name} needs about {need / GIB:.1f} GiB of RAM at its peak and only "
            f"{available / GIB:.1f} GiB is available; stop other workers (scripts/stop_all.sh) and "
            f"start again, or quantize on a larger machine and copy the INT8 cache folder "
            f"(docs/int8.md, 'The quantized-weight cache')"
        )
    log.info("memory: quantizing needs about %.1f GiB, %.1f GiB available", need / GIB, available / GIB)


def run_quantizer(work) -> int:
    """A quantizer child's exit code: 0 done, 3 refused for memory or disk (int8_cache reports either)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s quantize: %(message)s")
    try:
        work()
    except NotEnoughRoom as exc:
        log.error("%s", exc)
        return 3
    return 0


def quantizer_cli(quantize_and_save, description: str, settings_help: str, argv: list[str] | None) -> int:
    """A quantizer child's command line, the same for every runtime:
    --source DIR --staging DIR --settings JSON [--trust-remote-code]."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--staging", type=Path, required=True)
    parser.add_argument("--settings", required=True, help=settings_help)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    return run_quantizer(lambda: quantize_and_save(args.source, args.staging, json.loads(args.settings),
                                                   args.trust_remote_code))
