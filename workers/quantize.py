"""Quantize a model to ITREX INT8 and save it: run as a child process by int8_cache.

Running it in its own process matters: loading fp32 weights to quantize them keeps the fp32 pages
resident (measured 5.5 GiB for a 1 B model), so the serving process only ever loads the saved
INT8 checkpoint (about 2.0 GiB) and its steady memory reflects INT8.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("quantize")

MANIFEST = "bundle_manifest.json"
# Files the INT8 folder needs besides the weights: custom modeling code for trust_remote_code.
_COPY_PATTERNS = ("*.py",)


def quantize_and_save(source: Path, staging: Path, settings: dict, trust_remote_code: bool) -> None:
    from intel_extension_for_transformers.transformers import AutoModelForCausalLM, RtnConfig

    from workers.model_quirks import prepare_cpu_config

    t0 = time.monotonic()
    log.info("[1/3] loading fp32 weights from %s", source)
    config = prepare_cpu_config(source, trust_remote_code)
    log.info("[2/3] quantizing linear layers to INT8 with %s", settings)
    model = AutoModelForCausalLM.from_pretrained(
        str(source),
        config=config,
        quantization_config=RtnConfig(**settings),
        use_neural_speed=False,
        trust_remote_code=trust_remote_code,
    )
    log.info("[3/3] saving INT8 checkpoint (%.0f s so far)", time.monotonic() - t0)
    model.save_pretrained(str(staging))
    for pattern in _COPY_PATTERNS:
        for f in source.glob(pattern):
            if not (staging / f.name).exists():
                shutil.copy2(f, staging / f.name)
    log.info("quantized in %.0f s", time.monotonic() - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="quantize one model into an INT8 cache folder")
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--staging", type=Path, required=True)
    parser.add_argument("--settings", required=True, help="RtnConfig keyword arguments as JSON")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s quantize: %(message)s")
    quantize_and_save(args.source, args.staging, json.loads(args.settings), args.trust_remote_code)
    return 0


if __name__ == "__main__":
    sys.exit(main())
