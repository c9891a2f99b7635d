"""How close neural-speed's INT8 answer to a plain prompt (evaluated after the BOS id its llama graph needs first)
is to the fp32 answer (the prompt alone), and how much of the difference is that token's, not INT8's.

    python -m workers.tools.bos_fidelity --entry var/int8-cache/<entry> [--model var/models/smollm2-135m-instruct]
        [--tokens 32]

Greedy, per prompt: INT8 with BOS vs fp32 alone (same answer, common prefix, teacher-forced top-1 agreement along
the fp32 answer, share of INT8's tokens among fp32's 5 most likely), fp32 with the same BOS vs fp32 alone, and
INT8 vs fp32 both with BOS (INT8's own rounding).
"""
from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "In 1905, Albert Einstein",
           "The best way to learn a language is", "Water boils at", "import numpy as np\n", "My favourite food is",
           "The quick brown fox", "Photosynthesis is the process", "1, 2, 3, 4,", "Dear Sir or Madam,",
           "The weather today is", "A list of prime numbers:", "Machine learning is", "Paris is a city"]


def _prefix(a: list[int], b: list[int]) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entry", type=Path, required=True, help="the model's neural-speed INT8 cache entry")
    parser.add_argument("--model", type=Path, default=Path("var/models/smollm2-135m-instruct"))
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workers.engine.runtimes.neural_speed.model import NeuralSpeedModel

    config, tokenizer = AutoConfig.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    int8 = NeuralSpeedModel(args.entry, config, 1, 2048)
    fp32 = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    bos, n = config.bos_token_id, args.tokens

    def fp_logprobs(ids):
        with torch.inference_mode():
            return torch.log_softmax(fp32(torch.tensor([ids])).logits[0].float(), -1)

    def fp_greedy(ids):
        out: list[int] = []
        for _ in range(n):
            out.append(int(fp_logprobs(ids + out)[-1].argmax()))
        return out

    def int8_steps(ids, forced=None):
        """INT8's greedy answer, or (with `forced`) its top-1 at each position along `forced`."""
        int8._model.model.reinit()
        logits, out = int8._model.model.evaluate([ids], False), []
        for i in range(n):
            top = int(np.argmax(np.asarray(logits[0])[-1]))
            out.append(top)
            logits = int8._model.model.evaluate([[forced[i] if forced else top]], False)
        return out

    rows = []
    for text in PROMPTS:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        ref, int8_bos, fp32_bos = fp_greedy(ids), int8_steps([bos] + ids), fp_greedy([bos] + ids)
        along = fp_logprobs(ids + int8_bos)[len(ids) - 1:-1]
        ranks = [int((along[i] > along[i, t]).sum()) for i, t in enumerate(int8_bos)]
        forced = int8_steps([bos] + ids, ref)
        rows.append({"same": ref == int8_bos, "prefix": _prefix(ref, int8_bos),
                     "top1": np.mean([a == b for a, b in zip(forced, ref)]), "top5": np.mean([r < 5 for r in ranks]),
                     "fp32_bos_same": ref == fp32_bos, "int8_same_as_fp32_bos": int8_bos == fp32_bos,
                     "int8_prefix_fp32_bos": _prefix(fp32_bos, int8_bos)})
        print(repr(text), rows[-1], flush=True)
    print(f"{len(rows)} prompts x {n} greedy tokens, means:")
    for key in rows[0]:
        print(f"  {key}: {np.mean([float(r[key]) for r in rows]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
