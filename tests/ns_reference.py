"""neural-speed's own greedy generate() on an INT8 cache entry, in a process of its own.

    python -m tests.ns_reference ENTRY MODEL_FOLDER MAX_NEW_TOKENS < prompt_ids.json  ->  answer ids (JSON)

A child process, because a test process that has loaded qbits (ITREX) models and torch's OpenMP runtime
crashed (segmentation fault) inside neural-speed's generate(), which brings its own OpenMP runtime; the
worker never mixes the two runtimes in one process.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> int:
    import torch
    from neural_speed import Model

    from workers.engine.runtimes.neural_speed.model import scratch_ratio
    from workers.engine.prompt import context_length

    entry, folder, max_new = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    ids = json.loads(sys.stdin.read())
    context = context_length(json.loads((folder / "config.json").read_text()))  # what the worker uses
    model = Model()  # its generate() settings are taken at init (its default repetition penalty is not 1)
    model.init_from_bin(json.loads((entry / "neural_speed.json").read_text())["module"], str(entry / "model.bin"),
                        threads=1, ctx_size=context, scratch_size_ratio=scratch_ratio(context), do_sample=False,
                        repetition_penalty=1.0)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, repetition_penalty=1.0,
                         ignore_prompt=True)[0]
    print("ANSWER " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
