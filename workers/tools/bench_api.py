"""Serving benchmark through the OpenAI-style API, next to the in-process engine figures.

    python -m workers.tools.bench_api [--profile default] [--concurrency 1 2 4] [--rounds 2] [--turns 5]
                                      [--max-tokens 64]

For each model and concurrency level, `concurrency` clients send streamed chat requests; rounds
interleave levels and models so machine noise spreads over all of them. Reports requests/s,
output tok/s (and as a multiple of one client: what continuous batching gains), time to first
token and latency (p50/p95), a Markdown table and a PNG plot. Then:
- a chat of `--turns` turns per model (a long system prompt, each answer kept in the history):
  time to first token per turn, turn N / turn 1 (what prefix reuse keeps flat);
- one model busy alone vs every model busy at once (one client each): decode tok/s of each, and
  alone / all busy (what cores shared by demand give a model running alone);
- the API's single-client decode speed as a share of the in-process engine's (bench_engine, same
  model, backend and threads);
- with --constrained N: N answers per model with and without a JSON schema (response_format
  json_schema, decoded under its grammar), interleaved: decode ms per token of each and the difference,
  the cost of constrained decoding per token.
Prints figures; asserts nothing.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import statistics
import sys
import time
from pathlib import Path

from tqdm import tqdm

from workers.config import cpu
from workers.config.paths import reports_dir
from workers.config.schema import ModelSpec
from workers.models.sources import model_dir
from workers.tools.api_client import NotServed, answer_tokens, profile_api, ask, openai_client, served_models

PROMPT = "Write a short story about a robot who learns to paint."
MAX_TOKENS = 64
CHAT_SYSTEM = ("You are a patient tutor. Explain things step by step, in plain words, with one short example each "
               "time, and end with a question that checks understanding. ") * 6
CHAT_TURNS = ["What is a prime number?", "Is 51 prime?", "And 53?", "What is the largest prime you know?",
              "Why are primes useful in cryptography?", "Give me a prime between 100 and 110.", "Thanks! One more fact?"]


def percentile(values: list[float], q: float) -> float | None:
    values = sorted(values)
    if not values:  # every request of the level failed: no figure, and the report says why
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def decode_rate(api: str, key: str, model: str, r: dict) -> float | None:
    """Tokens per second after the first token of one streamed answer."""
    tokens = answer_tokens(api, key, model, r) or 0
    if r["error"] or not r["ttft_s"] or r["total_s"] <= r["ttft_s"] or tokens < 2:
        return None
    return (tokens - 1) / (r["total_s"] - r["ttft_s"])


def run_level(api: str, key: str, model: str, concurrency: int, requests_per_client: int,
              max_tokens: int = MAX_TOKENS) -> dict:
    client = openai_client(api, key, max_retries=0, timeout=600)

    def one_client(_):
        return [ask(client, model, PROMPT, max_tokens, 0.0) for _ in range(requests_per_client)]

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = [r for rs in pool.map(one_client, range(concurrency)) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in results if not r["error"]]
    tokens = [answer_tokens(api, key, model, r) or 0 for r in ok]
    decode = [d for d in (decode_rate(api, key, model, r) for r in ok) if d]
    return {
        "requests": len(results), "errors": len(results) - len(ok), "wall_s": wall,
        "req_s": len(ok) / wall, "out_tok_s": sum(tokens) / wall,
        "ttft_p50": percentile([r["ttft_s"] for r in ok if r["ttft_s"]], 50),
        "ttft_p95": percentile([r["ttft_s"] for r in ok if r["ttft_s"]], 95),
        "lat_p50": percentile([r["total_s"] for r in ok], 50), "lat_p95": percentile([r["total_s"] for r in ok], 95),
        "decode_tok_s": statistics.median(decode) if decode else None,
        "first_error": next((r["error"] for r in results if r["error"]), None),
    }


def chat_turns(api: str, key: str, model: str, turns: int, max_tokens: int) -> list[float | None]:
    """Time to first token of each turn of one growing chat (greedy, so every run asks the same)."""
    client = openai_client(api, key, max_retries=0, timeout=600)
    messages = [{"role": "system", "content": CHAT_SYSTEM}]
    ttfts = []
    for i in range(turns):
        messages.append({"role": "user", "content": CHAT_TURNS[i % len(CHAT_TURNS)]})
        r = ask(client, model, messages, max_tokens, 0.0)
        ttfts.append(None if r["error"] else r["ttft_s"])
        messages.append({"role": "assistant", "content": r["answer"]})
    return ttfts


def alone_and_all_busy(api: str, key: str, models: list[str], max_tokens: int) -> dict[str, tuple]:
    """Decode tok/s of each model with one client, alone and while every model has one client."""
    client = openai_client(api, key, max_retries=0, timeout=600)
    alone = {m: decode_rate(api, key, m, ask(client, m, PROMPT, max_tokens, 0.0)) for m in models}
    with concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        answers = dict(zip(models, pool.map(lambda m: ask(client, m, PROMPT, max_tokens, 0.0), models)))
    return {m: (alone[m], decode_rate(api, key, m, answers[m])) for m in models}


# A schema whose string the model fills freely: the answer runs to max_tokens under the grammar.
CONSTRAINED_FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "strict": True, "schema": {
    "type": "object", "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"], "additionalProperties": False}}}


def constrained_cost(api: str, key: str, model: str, answers: int, max_tokens: int) -> dict:
    """Median decode ms per token of one client's answers, free and under CONSTRAINED_FORMAT (interleaved)."""
    client = openai_client(api, key, max_retries=0, timeout=600)
    ms: dict[str, list[float]] = {"free": [], "constrained": []}
    for _ in range(answers):
        for kind, extra in (("free", {}), ("constrained", {"response_format": CONSTRAINED_FORMAT})):
            rate = decode_rate(api, key, model, ask(client, model, PROMPT, max_tokens, 0.0, **extra))
            if rate:
                ms[kind].append(1000.0 / rate)
    return {kind: statistics.median(v) if v else None for kind, v in ms.items()}


def in_process_decode(spec: ModelSpec) -> float | None:
    from workers.tools.bench_engine import Variant, run_child
    from workers.config.paths import int8_cache_dir

    from workers.engine.runtimes import registry

    source = model_dir(spec.source)
    # the runtime the worker runs
    _, int8 = registry.select(spec.backend, spec.int8, source, spec.shared)
    variant = Variant(spec.backend, threads=(os.cpu_count() or 1) if spec.shared else spec.threads,
                      compute_dtype=int8.compute_dtype, group_size=int8.group_size, runtime=int8.runtime)
    result = run_child(source, variant, int8_cache_dir())
    return result.get("decode_tok_s")


def plot(table: dict, models: list[str], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in models:
        axes[0].plot(levels, [table[(m, c)]["out_tok_s"] for c in levels], marker="o", label=m)
        axes[1].plot(levels, [table[(m, c)]["ttft_p50"] for c in levels], marker="o", label=m)
    axes[0].set(title="output tokens/s (all clients)", xlabel="concurrent clients", xticks=levels)
    axes[1].set(title="time to first token p50 (s)", xlabel="concurrent clients", xticks=levels)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _median(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fixed(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=os.environ.get("BUNDLE_PROFILE", "default"))
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="answer length of every request")
    p.add_argument("--turns", type=int, default=5, help="turns of the growing chat (0: skip)")
    p.add_argument("--no-in-process", action="store_true", help="skip the in-process engine comparison")
    p.add_argument("--constrained", type=int, default=0, metavar="N",
                   help="N answers per model with and without a JSON-schema grammar: its decode cost per token")
    args = p.parse_args(argv)
    dep, api, key = profile_api(args.profile)
    specs = {m.names[0]: m for m in dep.models}
    models, levels = list(specs), sorted(set(args.concurrency))
    try:
        served_models(api, key, models)
    except NotServed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"CPU: {cpu.describe()}", flush=True)
    runs: dict[tuple[str, int], list[dict]] = {(m, c): [] for m in models for c in levels}
    jobs = [(c, m) for _ in range(args.rounds) for c in levels for m in models]
    for c, m in tqdm(jobs, desc="API benchmark (interleaved)", unit="level"):
        runs[(m, c)].append(run_level(api, key, m, c, args.requests_per_client, args.max_tokens))
    table = {k: {f: _median(r[f] for r in v) for f in v[0] if f != "first_error"} for k, v in runs.items()}
    lines = [f"API benchmark ({time.strftime('%Y-%m-%d %H:%M')}; streamed chat, max_tokens {args.max_tokens}, "
             f"{args.requests_per_client} requests per client, medians over {args.rounds} interleaved rounds)",
             f"CPU: {cpu.describe()}", "",
             "| model | clients | req/s | output tok/s | x 1 client | TTFT p50 s | TTFT p95 s | latency p50 s | latency p95 s | errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in models:
        one = table[(m, min(levels))]["out_tok_s"]
        for c in levels:
            t = table[(m, c)]
            lines.append(f"| {m} | {c} | {t['req_s']:.2f} | {t['out_tok_s']:.1f} | {t['out_tok_s'] / one if one else 0:.2f} | "
                         + " | ".join(_fixed(t[f]) for f in ("ttft_p50", "ttft_p95", "lat_p50", "lat_p95"))
                         + f" | {int(t['errors'])} |")
    errors = {f"{m} at {c} clients": r["first_error"] for (m, c), v in runs.items() for r in v if r["first_error"]}
    if errors:
        lines += ["", "Failed requests (the first error of each level):", ""]
        lines += [f"- {where}: {error}" for where, error in errors.items()]
    if args.turns > 0:
        chats = {m: chat_turns(api, key, m, args.turns, args.max_tokens) for m in tqdm(models, desc="growing chat", unit="model")}
        lines += ["", f"Time to first token per turn of a {args.turns}-turn chat (s; long system prompt, answers kept):", "",
                  "| model | " + " | ".join(f"turn {i + 1}" for i in range(args.turns)) + f" | turn {args.turns} / turn 1 |",
                  "|---|" + "---|" * (args.turns + 1)]
        for m, ttfts in chats.items():
            ratio = f"{ttfts[-1] / ttfts[0]:.2f}" if ttfts[0] and ttfts[-1] else "–"
            lines.append(f"| {m} | " + " | ".join(f"{t:.2f}" if t else "–" for t in ttfts) + f" | {ratio} |")
    if len(models) > 1:
        busy = alone_and_all_busy(api, key, models, args.max_tokens)
        lines += ["", "Decode tok/s with one client: the model alone vs every model busy at once:", "",
                  "| model | alone | all busy | alone / all busy |", "|---|---|---|---|"]
        for m, (a, b) in busy.items():
            lines.append(f"| {m} | {a or 0:.1f} | {b or 0:.1f} | {a / b if a and b else 0:.2f} |")
    if not args.no_in_process:
        lines += ["", "| model | API decode tok/s (1 client) | in-process decode tok/s | API / in-process |", "|---|---|---|---|"]
        for m in tqdm(models, desc="in-process reference", unit="model"):
            engine = in_process_decode(specs[m])
            api_one = table[(m, min(levels))]["decode_tok_s"]
            ratio = f"{api_one / engine:.0%}" if engine and api_one else "–"
            lines.append(f"| {m} | {api_one or 0:.1f} | {engine or 0:.1f} | {ratio} |")
    if args.constrained > 0:
        lines += ["", f"Constrained decoding (response_format json_schema) vs free, one client, decode ms per token "
                  f"(median of {args.constrained} answers each, interleaved):", "",
                  "| model | free ms/token | constrained ms/token | grammar cost ms/token |", "|---|---|---|---|"]
        for m in tqdm(models, desc="constrained decoding", unit="model"):
            c = constrained_cost(api, key, m, args.constrained, args.max_tokens)
            cost = f"{c['constrained'] - c['free']:.2f}" if c["free"] and c["constrained"] else "–"
            lines.append(f"| {m} | {_fixed(c['free'])} | {_fixed(c['constrained'])} | {cost} |")
    out = reports_dir() / "bench-api"
    out.mkdir(parents=True, exist_ok=True)
    plot(table, models, levels, out / "bench-api.png")
    report = "\n".join(lines)
    (out / "bench-api.md").write_text(report + "\n")
    (out / "bench-api.json").write_text(json.dumps({f"{m}@{c}": v for (m, c), v in runs.items()}, indent=2))
    print(report)
    print(f"\nwritten to {out}/bench-api.md and bench-api.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
